"""Step 2 of SLUG: rank candidate tensors by importance and gradient alignment, keep the Pareto front (spec §3).

For each candidate tensor l (one entry of ``named_parameters()``; a "layer" as in the official code):

* importance  I_l = ‖g_f,l‖ / ‖θ_l‖   (norm of the *mean* forget gradient over the weight norm, spec §2.6);
* alignment   A_l = |cos(vec g_r,l, vec g_f,l)|, with torch's ``cosine_similarity(dim=0, eps=1e-6)``.

A tensor with a better chance of forgetting the concept while leaving the rest intact has a large I and a small A.
The front is computed **per tower** (vision / language) with the official strict rule: point i is dominated iff some
j has A_j < A_i **and** I_j > I_i — so exact duplicates are both kept and a point tied in A with a better point stays.
Candidates are visited in descending-A order (the official ``ranked_cos`` order), which fixes the output order.
Tensors with ‖g_f‖ = 0 have no importance (the official code gives them no entry) and are reported as excluded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


def importance(g_f: torch.Tensor, theta: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(g_f.float()).item() / torch.linalg.vector_norm(theta.float()).item())


def alignment(g_f: torch.Tensor, g_r: torch.Tensor) -> float:
    return abs(float(F.cosine_similarity(g_r.float().flatten(), g_f.float().flatten(), dim=0, eps=1e-6).item()))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of non-dominated points (minimise x = alignment, maximise y = importance), in input order."""
    front = []
    for i, (xi, yi) in enumerate(points):
        if not any(xj < xi and yj > yi for j, (xj, yj) in enumerate(points) if j != i):
            front.append(i)
    return front


@dataclass
class LayerRow:
    name: str
    tower: str
    shape: list[int]
    numel: int
    param_norm: float
    forget_grad_norm: float
    retain_grad_norm: float
    importance: float
    alignment: float
    ratio: float  # R_l = ‖θ_l‖ / ‖g_f,l‖, the unit of the step size (the search starts at R/10)
    on_front: bool = False


@dataclass
class LayerTable:
    rows: list[LayerRow]  # every scored candidate, descending alignment within each tower
    fronts: dict[str, list[str]]  # tower -> front names in candidate (descending-A) order
    excluded: dict[str, str]  # name -> reason

    def row(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def front_names(self) -> list[str]:
        return [n for t in ("vision", "language") for n in self.fronts.get(t, [])]

    def to_json(self) -> dict:
        def clean(x):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "rule": "importance = ||g_f||/||theta||; alignment = |cos(g_f, g_r)|; Pareto front per tower "
                    "(i dominated iff exists j: A_j < A_i and I_j > I_i)",
            "fronts": self.fronts,
            "excluded": self.excluded,
            "candidates": [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows],
        }


def rank_layers(adapter, grads, names: list[str] | None = None) -> LayerTable:
    """The layer table from full gradients (``grads.forget`` / ``grads.retain``)."""
    names = list(names if names is not None else adapter.candidate_names())
    scalars = {}
    for n in names:
        if n in grads.forget:
            gf, gr = grads.forget[n], grads.retain[n]
            scalars[n] = (float(torch.linalg.vector_norm(gf.float()).item()),
                          float(torch.linalg.vector_norm(gr.float()).item()), alignment(gf, gr))
    return rank_from_scalars(adapter, scalars, names)


def rank_from_scalars(adapter, scalars: dict[str, tuple[float, float, float]], names: list[str]) -> LayerTable:
    """The layer table from per-tensor (‖g_f‖, ‖g_r‖, alignment); used by :func:`rank_layers` and by the
    stats-first gradient pass, which never holds both full gradients."""
    params = dict(adapter.model.named_parameters())
    scored: list[LayerRow] = []
    excluded = {}
    for n in names:
        if n not in scalars:
            excluded[n] = "no stored forget gradient"
            continue
        gf_norm, gr_norm, align = scalars[n]
        theta = params[n].detach()
        if gf_norm == 0.0:
            excluded[n] = "zero forget gradient (the forget loss does not depend on it)"
            continue
        if theta.ndim == 0:
            excluded[n] = "scalar tensor"
            continue
        p_norm = float(torch.linalg.vector_norm(theta.float()).item())
        scored.append(LayerRow(
            name=n, tower=adapter.tower_of(n), shape=list(theta.shape), numel=theta.numel(), param_norm=p_norm,
            forget_grad_norm=gf_norm, retain_grad_norm=gr_norm, importance=gf_norm / p_norm, alignment=align,
            ratio=p_norm / gf_norm))
    return build_table(scored, excluded)


def build_table(scored_rows: list[LayerRow], excluded: dict[str, str]) -> LayerTable:
    """Sort each tower's rows by descending alignment and mark its Pareto front (the one place these rules live;
    :func:`rank_layers` and the stats-first pass both end here)."""
    scored: dict[str, list[LayerRow]] = {"vision": [], "language": []}
    for r in scored_rows:
        scored.setdefault(r.tower, []).append(r)
    rows, fronts = [], {}
    for tower, trs in scored.items():
        trs.sort(key=lambda r: -r.alignment)  # stable: ties keep named_parameters() order
        idx = pareto_front([(r.alignment, r.importance) for r in trs])
        for i in idx:
            trs[i].on_front = True
        fronts[tower] = [trs[i].name for i in idx]
        rows.extend(trs)
    return LayerTable(rows, fronts, excluded)
