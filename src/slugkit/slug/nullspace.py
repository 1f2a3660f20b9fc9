"""The null-space variant of the SLUG step: an edit that leaves a layer's outputs on *kept* inputs unchanged.

SLUG's update of a Linear weight ``W`` (out x in) is ``ΔW = −η·g_f`` (spec §4.1). Null-space-constrained model
editing (Fang et al., "AlphaEdit", ICLR 2025; the idea goes back to continual-learning "null space" projections)
projects the update so that ``ΔW·x = 0`` for the inputs ``x`` the edit must not disturb:

    ΔW ← ΔW (I − P),   P = U_r U_rᵀ,

where the columns of ``U_r`` span the kept inputs' activations **at the layer** (what enters the Linear: captured
with a forward hook). Then for every kept input ``x`` in that span, ``(W + ΔW(I − P))·x = W·x`` exactly; for the
edited layer alone this holds exactly, not only to first order (later layers see unchanged inputs on those
prompts, so the whole tower's output on them is unchanged too, up to the part of their activations outside the
span).

**Rank.** With few kept inputs the span is their exact span (``energy=1.0``: every direction whose eigenvalue of
``Σ x xᵀ`` exceeds ``tol`` x the largest). With many prompts' token activations at a width-64 layer the exact span is
the whole space and ``I − P = 0`` (no edit is left), so :func:`input_projector` keeps the top principal directions
(uncentred: eigenvectors of ``Σ x xᵀ``, the second moment, because ``ΔW·x`` depends on ``x`` itself, not on its
deviation from a mean) that hold a share ``energy`` of ``Σ ‖x‖²``, or a fixed ``rank``; the edit may then still
change kept outputs by ``ΔW·(I − P)·x``, whose size the left-out energy bounds:
``Σ‖ΔW(I−P)x‖² ≤ ‖ΔW‖₂² · (1 − energy) · Σ‖x‖²``.

Only 2-D weights of ``torch.nn.Linear`` modules (``<module>.weight``) can be projected: the input of the module is
what ``P`` is built from.
"""

from __future__ import annotations

from typing import Callable

import torch

# Share of the kept inputs' second moment that P covers (see the module docstring). On the embedded text-to-image
# path (width-64 text layers, 233 kept prompts x 20 tokens) 0.99 keeps 11-17 of 64 directions of an attention input
# and ~15 + ~30 of an fc1/fc2 pair. Over the CLIP Pareto layers 0.99 and 0.999 let the same concepts through (0.99
# with ~3x smaller steps); over every layer (--null-space-layers all --max-searched 4) 0.999 passes 6 of 15 concepts
# where 0.99 passes 1 (benchmarks/sd_embedded.py, 2026-11-30), so 0.999 is the default.
DEFAULT_ENERGY = 0.999


def module_of(model: torch.nn.Module, param_name: str) -> tuple[str, torch.nn.Linear]:
    """``(module name, module)`` of a Linear weight ``<module>.weight``. Raises ``ValueError`` for anything else
    (a bias, a norm, an embedding, a non-Linear module): only a Linear's input defines its null space."""
    mod_name, _, leaf = param_name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError as e:
        raise ValueError(f"{param_name}: no module {mod_name!r} in the model") from e
    if leaf != "weight" or not isinstance(mod, torch.nn.Linear):
        raise ValueError(f"{param_name}: the null-space step projects Linear weights only, not "
                         f"{type(mod).__name__}.{leaf}")
    return mod_name, mod


def _each_input(model: torch.nn.Module, param_names: list[str], run: Callable[[], object],
                take: Callable[[str, torch.Tensor], None]) -> None:
    """Call ``take(name, x)`` with every input ``x`` (``[N, in_features]``, leading dimensions flattened) that the
    Linear owning ``name`` receives while ``run()`` executes. Hooks are removed on exit, also when ``run`` raises;
    ``ValueError`` for a name that is not a Linear weight, ``RuntimeError`` when ``run`` never called a module."""
    mods = {n: module_of(model, n)[1] for n in param_names}
    reached: set[str] = set()
    handles = []
    for n, m in mods.items():
        def hook(_m, args, _out, n=n):
            reached.add(n)
            take(n, args[0].detach().reshape(-1, args[0].shape[-1]))
        handles.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in param_names if n not in reached]
    if missing:
        raise RuntimeError(f"the forward pass never reached the module(s) of {missing[:3]}")


@torch.no_grad()
def linear_inputs(model: torch.nn.Module, param_names: list[str], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The inputs of the Linear modules owning ``param_names`` while ``run()`` executes (e.g. a forward pass over the
    kept prompts): ``{param name: [N, in_features] float32 CPU tensor}``, every leading dimension (batch, token
    position) flattened into N. Errors as :func:`_each_input`'s."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in param_names}
    _each_input(model, param_names, run, lambda n, x: seen[n].append(x.float().cpu()))
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def linear_moments(model: torch.nn.Module, param_names: list[str],
                   run: Callable[[], object]) -> dict[str, tuple[torch.Tensor, int]]:
    """What :func:`input_projector` needs of :func:`linear_inputs`, accumulated while ``run()`` executes: per name
    ``(Σ x xᵀ [in_features, in_features] float64 CPU, N)`` over every input row ``x``. Memory is in² per layer
    instead of N x in — at SD 1.5 scale the ~75,000 token states of UnlearnCanvas's other prompts entering a
    3,072-wide ``fc2`` would be 0.9 GB as rows. Errors as :func:`_each_input`'s."""
    acc: dict[str, list] = {n: [None, 0] for n in param_names}

    def take(n: str, x: torch.Tensor) -> None:
        x = x.to(device="cpu", dtype=torch.float64)
        acc[n][0] = x.T @ x if acc[n][0] is None else acc[n][0] + x.T @ x
        acc[n][1] += x.shape[0]

    _each_input(model, param_names, run, take)
    return {n: (m2, k) for n, (m2, k) in acc.items()}


def input_projector(acts: torch.Tensor, energy: float = DEFAULT_ENERGY, rank: int | None = None,
                    tol: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """``P`` (d x d, float32): the orthogonal projector onto the top principal directions of ``acts`` (N x d), and
    ``{"rank", "dim", "energy"}`` (the share of ``Σ‖x‖²`` the kept directions hold).

    ``rank``: keep this many directions (clipped to the numerically non-zero ones); otherwise the fewest whose share
    reaches ``energy`` (``energy=1.0``: the exact span, every eigenvalue above ``tol`` x the largest). Computed in
    float64 (``eigh`` of ``AᵀA``). Raises ``ValueError`` for an empty or non-2-D ``acts``, ``energy`` outside
    (0, 1] or ``rank`` < 0."""
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise ValueError(f"activations must be N x d with N >= 1, got shape {tuple(acts.shape)}")
    a = acts.detach().to(torch.float64)
    return moment_projector(a.T @ a, energy, rank, tol)


def moment_projector(moment: torch.Tensor, energy: float = DEFAULT_ENERGY, rank: int | None = None,
                     tol: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """:func:`input_projector` from the second moment ``Σ x xᵀ`` (d x d, :func:`linear_moments`) instead of the rows;
    same result, same errors for ``energy`` and ``rank``."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    evals, evecs = torch.linalg.eigh(moment.detach().to(torch.float64))
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)  # descending
    total = float(evals.sum())
    nonzero = int((evals > tol * float(evals[0])).sum()) if total > 0 else 0
    if rank is not None:
        r = min(rank, nonzero)
    elif energy >= 1.0:
        r = nonzero
    else:
        share = evals.cumsum(0) / max(total, 1e-300)
        r = min(int((share < energy - 1e-12).sum()) + 1, nonzero)
    u = evecs[:, :r]
    kept = float(evals[:r].sum()) / total if total > 0 else 0.0
    return (u @ u.T).to(torch.float32), {"rank": r, "dim": int(moment.shape[1]), "energy": kept}


def project_gradient(grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """``g (I − P)`` for a Linear weight's gradient ``g`` (out x in) and ``P`` (in x in): the edit ``−η·g(I−P)``
    leaves ``W·x`` unchanged for every ``x`` with ``P·x = x``. Same dtype and device as ``grad``. Raises
    ``ValueError`` when the shapes do not fit."""
    if grad.ndim != 2 or projector.shape != (grad.shape[1], grad.shape[1]):
        raise ValueError(f"gradient {tuple(grad.shape)} and projector {tuple(projector.shape)} do not fit "
                         "(need out x in and in x in)")
    g = grad.float()
    p = projector.to(device=g.device, dtype=torch.float32)
    return (g - g @ p).to(grad.dtype)


def null_space_gradients(model: torch.nn.Module, grads: dict[str, torch.Tensor], names: list[str],
                         run: Callable[[], object], energy: float = DEFAULT_ENERGY,
                         rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The forget gradients of ``names`` projected onto the null space of their Linear's inputs under ``run()``
    (:func:`linear_moments`, :func:`moment_projector`, :func:`project_gradient`): ``({name: g(I−P)}, {name: info})``
    where info has ``rank``, ``dim``, ``energy``, the kept-input count ``inputs`` and ``norm_ratio`` =
    ‖g(I−P)‖_F / ‖g‖_F (how much of the gradient survives). ``grads`` is not modified."""
    moments = linear_moments(model, names, run)
    out, info = {}, {}
    for n in names:
        p, i = moment_projector(moments[n][0], energy, rank)
        out[n] = project_gradient(grads[n], p)
        i["inputs"] = moments[n][1]
        i["norm_ratio"] = float(out[n].float().norm() / grads[n].float().norm().clamp_min(1e-30))
        info[n] = i
    return out, info
