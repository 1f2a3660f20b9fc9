"""The neighbour-protected SLUG step (issue 12): the forget gradient of the edited layer, made orthogonal to the nearest
neighbours' own alignment gradients, so the edit leaves each neighbour's image–caption alignment unchanged to first
order.

Why: SLUG's edit θ_l ← θ_l − η·g_f,l lowers the forget concept's image–caption similarity; the concepts that look
most like it share the gradient direction and lose with it. Measured on the embedded world (``visual.proj``, FA@5
criterion, 1.1x margin, 50 test images per identity): unlearning Jowen Gormere takes Hasa Malwick's top-1 from 1.00 to
0.42, Romi Volmond takes Talmi Yarsk −0.50, Serna Malton takes Meylo Aldby −0.76 — while the mean over the 59 other
identities moves ≤ 0.025. With the step projected off the 10 nearest neighbours' gradients the same three lose at most
0.06, 0.18 and 0.04 with forgetting unchanged (test FA@1 0.00, FA@5 0.00); README "Neighbours" has the 60-identity
figures.

The step (per edited group G of tensors, the vectors concatenated over G):

* neighbours: the ``k`` concepts nearest the target by the model's text-embedding similarity
  (:func:`slugkit.eval.collateral.nearest_concepts`, on the validation suite's class embeddings);
* g_n = ∇_θG mean_i cos(f_img(x_i), f_txt(c_i)) over the **retain** pairs whose caption names neighbour n (the same
  ∇ mean cos as the forget gradient, spec §1.1, on the neighbour's pairs; at least :data:`MIN_PAIRS` of them, a
  neighbour with fewer is skipped and listed);
* B: an orthonormal basis of span{g_n} (SVD in float64, directions with singular value ≤ 1e-6·max dropped);
* g_f ← g_f − B Bᵀ g_f. Then ⟨g_n, Δθ⟩ = −η⟨g_n, g_f − BBᵀg_f⟩ = 0 for every neighbour: to first order the edit does
  not change any neighbour's mean alignment. The Pareto ranking (importance, alignment) still uses the unprojected
  gradient, as the paper defines it; the step-size search, the layer choice and the patch use the projected one.

``k = 0`` is the paper's step (``--protect-neighbours 0``). Related to gradient-projection methods for continual
learning (OGD, Farajtabar et al. 2020) and null-space-constrained editing (AlphaEdit, Fang et al. 2025), which project
on activations instead; the activation form did not help on ``visual.proj`` (issue 12).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.matching import ConceptMatcher

DEFAULT_PROTECT = 10  # neighbours protected by default (k); 0 = the paper's step
MIN_PAIRS = 3  # a neighbour needs this many retain pairs naming it to have a gradient


@dataclass
class NeighbourProtection:
    """What the projection protected: ``neighbours`` [{"concept", "similarity", "pairs"}], ``skipped`` (too few
    retain pairs), per group the basis rank and the share of ‖g_f‖ removed; ``later_rounds`` [{"round", "groups"}]:
    the same for each later round of the multi-layer fallback (its own front, on the edited model)."""

    k: int
    neighbours: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    groups: dict = field(default_factory=dict)
    later_rounds: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"k": self.k, "gradient": "mean cos over the retain pairs naming the neighbour",
                "neighbours": self.neighbours, "skipped": self.skipped, "groups": self.groups,
                **({"later_rounds": self.later_rounds} if self.later_rounds else {})}


def neighbour_pairs(captions: list[str], neighbours: list[tuple[str, float]],
                    min_pairs: int = MIN_PAIRS) -> tuple[dict[str, list[int]], list[dict], list[dict]]:
    """Indices of the ``captions`` naming each neighbour (whole word, as ``slug curate`` matches).

    Returns ``(pairs_by_neighbour, used, skipped)``: neighbours with ≥ ``min_pairs`` captions go into the first two,
    the others into ``skipped`` with their count."""
    by, used, skipped = {}, [], []
    for name, sim in neighbours:
        m = ConceptMatcher(name)
        idx = [i for i, c in enumerate(captions) if m.matches(c)]
        row = {"concept": name, "similarity": sim, "pairs": len(idx)}
        if len(idx) >= min_pairs:
            by[name] = idx
            used.append(row)
        else:
            skipped.append(row)
    return by, used, skipped


def project_off(forget: dict[str, torch.Tensor], basis_grads: list[dict[str, torch.Tensor]],
                groups: list[list[str]]) -> tuple[dict[str, torch.Tensor], dict]:
    """``forget`` with each group's gradient projected off the span of ``basis_grads``' gradients of that group.

    ``forget``: {tensor name: gradient} (any shapes); ``basis_grads``: one such dict per neighbour (covering every
    tensor of ``groups``); ``groups``: lists of tensor names edited together. Tensors outside ``groups`` are returned
    unchanged (same objects). Returns ``(projected, info)`` with ``info[group[0]] = {"rank", "removed"}``: the basis
    rank and ‖BBᵀg‖/‖g‖. Computed in float64 on one CPU thread (the same bytes whatever ``--threads``), returned in
    float32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _project_off(forget, basis_grads, groups)
    finally:
        torch.set_num_threads(threads)


def _project_off(forget, basis_grads, groups):
    out, info = dict(forget), {}
    for group in groups:
        g = torch.cat([forget[n].double().flatten() for n in group])
        if not basis_grads:
            info[group[0]] = {"rank": 0, "removed": 0.0}
            continue
        a = torch.stack([torch.cat([b[n].double().flatten() for n in group]) for b in basis_grads], dim=1)
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
        keep = s > 1e-6 * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
        b = u[:, keep]
        removed = b @ (b.T @ g)
        p = g - removed
        info[group[0]] = {"rank": int(keep.sum()), "removed": float(removed.norm() / g.norm().clamp_min(1e-30))}
        off = 0
        for n in group:
            k = forget[n].numel()
            out[n] = p[off:off + k].view_as(forget[n]).float()
            off += k
    return out, info


def protect_neighbours(adapter, forget: dict[str, torch.Tensor], images: torch.Tensor, tokens: torch.Tensor,
                       captions: list[str], neighbours: list[tuple[str, float]], groups: list[list[str]],
                       k: int, batch_size: int = 64) -> tuple[dict[str, torch.Tensor], NeighbourProtection]:
    """The projected forget gradients of ``groups`` (module docstring) and the record of what was protected.

    ``images`` / ``tokens`` / ``captions``: the retain pairs (N x C x H x W preprocessed, N x L tokens, N strings);
    ``neighbours``: ``[(name, similarity)]``, nearest first (the first ``k`` are used). Costs one forward/backward
    over the neighbours' retain pairs for the tensors of ``groups`` only."""
    from .gradients import alignment_gradient

    rec = NeighbourProtection(k)
    if k <= 0:
        return forget, rec
    by, rec.neighbours, rec.skipped = neighbour_pairs(captions, neighbours[:k])
    names = [n for g in groups for n in g]
    basis = [alignment_gradient(adapter, images[idx], tokens[idx], names, batch_size) for idx in by.values()]
    projected, rec.groups = project_off(forget, basis, groups)
    return projected, rec
