"""Step 2 of SLUG: importance, alignment, Pareto front, per-tower ranking (spec §3, §10.2, §10.3, §10.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slugkit.slug.gradients import Gradients
from slugkit.slug.layers import alignment, importance, pareto_front, rank_layers


def _np(t):
    return t.detach().double().cpu().numpy().ravel()


def _np_alignment(gf, gr, eps=1e-6):
    a, b = _np(gr), _np(gf)
    return abs(float(a @ b) / (max(np.linalg.norm(a), eps) * max(np.linalg.norm(b), eps)))


# ---------------------------------------------------------------------------------------------- formulas
def test_importance_and_alignment_hand_values():
    assert importance(torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])) == pytest.approx(0.5, rel=1e-7)
    assert importance(torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.ones(2, 2)) == pytest.approx(1.0, rel=1e-7)
    assert alignment(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == 0.0
    assert alignment(torch.tensor([1.0, 2.0]), torch.tensor([-2.0, -4.0])) == pytest.approx(1.0, rel=1e-6)  # |cos|
    assert alignment(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(2 ** -0.5, rel=1e-6)
    # a zero retain gradient has alignment 0 (torch's eps, not a division by zero)
    assert alignment(torch.tensor([[1.0, -3.0]]), torch.zeros(1, 2)) == 0.0


def test_rank_layers_matches_float64_hand_computation(adapter, base_grads):
    table = rank_layers(adapter, base_grads)
    params = dict(adapter.model.named_parameters())
    cands = adapter.candidate_names()
    assert sorted(r.name for r in table.rows) == sorted(cands) and not table.excluded
    for r in table.rows:
        theta, gf, gr = params[r.name], base_grads.forget[r.name], base_grads.retain[r.name]
        p_norm, f_norm, r_norm = (np.linalg.norm(_np(x)) for x in (theta, gf, gr))
        assert r.param_norm == pytest.approx(p_norm, rel=1e-5)
        assert r.forget_grad_norm == pytest.approx(f_norm, rel=1e-5)
        assert r.retain_grad_norm == pytest.approx(r_norm, rel=1e-5)
        assert r.importance == pytest.approx(f_norm / p_norm, rel=1e-5)
        assert r.ratio == pytest.approx(p_norm / f_norm, rel=1e-5)
        assert r.alignment == pytest.approx(_np_alignment(gf, gr), rel=1e-5, abs=1e-7)
        assert r.tower == adapter.tower_of(r.name)
        assert r.shape == list(theta.shape) and r.numel == theta.numel()
    # the alignments are spread (not all ~0 or ~1), so rel 1e-5 is a real check
    al = [r.alignment for r in table.rows]
    assert max(al) - min(al) > 0.1


def _grads_for(adapter, planned: dict[str, tuple[float, float]], seed=0) -> Gradients:
    """Hand-made gradients with alignment A and importance I exactly as planned: g_f = I‖θ‖u, g_r = A u + √(1−A²) v."""
    params = dict(adapter.model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    forget, retain = {}, {}
    for n, (a, i) in planned.items():
        theta = params[n].detach().double()
        u = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        v = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        u /= u.norm()
        v -= (v * u).sum() * u
        v /= v.norm()
        forget[n] = (i * theta.norm() * u).float()
        retain[n] = (a * u + math.sqrt(max(0.0, 1 - a * a)) * v).float()
    return Gradients(forget, retain, 1, 1)


V = [f"visual.transformer.resblocks.{i}.{s}" for i in range(2) for s in ("attn.out_proj.weight", "mlp.c_fc.weight")]
L = ["transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.1.mlp.c_fc.weight", "text_projection"]


def test_planned_points_are_reproduced(adapter):
    planned = {V[0]: (0.9, 3.0), V[1]: (0.25, 0.5), L[0]: (0.0, 1e-3)}
    table = rank_layers(adapter, _grads_for(adapter, planned), list(planned))
    for n, (a, i) in planned.items():
        assert table.row(n).alignment == pytest.approx(a, abs=1e-6)
        assert table.row(n).importance == pytest.approx(i, rel=1e-6)


def test_rank_layers_per_tower_fronts_and_order(adapter):
    # vision: V2 is dominated by V1 (0.5 < 0.6 and 2 > 1); language: L1 dominates L2.
    # L1 (A=0.05, I=10) would dominate *every* vision point if the towers were pooled.
    planned = {
        V[3]: (0.2, 0.5),   # V4
        V[0]: (0.9, 3.0),   # V1
        V[2]: (0.6, 1.0),   # V3 (dominated by V2)
        V[1]: (0.5, 2.0),   # V2
        L[1]: (0.3, 5.0),   # L2 (dominated by L1)
        L[2]: (0.01, 0.1),  # L3
        L[0]: (0.05, 10.0),  # L1
    }
    table = rank_layers(adapter, _grads_for(adapter, planned), list(planned))
    vis = [r.name for r in table.rows if r.tower == "vision"]
    lang = [r.name for r in table.rows if r.tower == "language"]
    assert vis == [V[0], V[2], V[1], V[3]]  # descending alignment
    assert lang == [L[1], L[0], L[2]]
    for tower in ("vision", "language"):
        al = [r.alignment for r in table.rows if r.tower == tower]
        assert al == sorted(al, reverse=True)
    assert table.fronts["vision"] == [V[0], V[1], V[3]]
    assert table.fronts["language"] == [L[0], L[2]]
    assert table.front_names() == [V[0], V[1], V[3], L[0], L[2]]
    assert {r.name for r in table.rows if r.on_front} == set(table.front_names())
    # pooled, the vision front would be empty: the towers really are separate
    pooled = [(r.alignment, r.importance) for r in table.rows]
    assert all(table.rows[i].tower == "language" for i in pareto_front(pooled))


def test_zero_retain_grad_gives_alignment_zero(adapter, base_grads):
    n = "visual.transformer.resblocks.0.mlp.c_proj.weight"
    retain = dict(base_grads.retain)
    retain[n] = torch.zeros_like(retain[n])
    table = rank_layers(adapter, Gradients(base_grads.forget, retain, 5, 7))
    assert table.row(n).alignment == 0.0
    assert table.row(n).importance > 0


def test_zero_or_missing_forget_grad_is_excluded_with_reason(adapter, base_grads):
    zero, missing = "transformer.resblocks.0.ln_1.weight", "visual.ln_post.weight"
    forget = {k: v for k, v in base_grads.forget.items() if k != missing}
    forget[zero] = torch.zeros_like(forget[zero])
    table = rank_layers(adapter, Gradients(forget, base_grads.retain, 5, 7))
    assert set(table.excluded) == {zero, missing}
    assert "zero forget gradient" in table.excluded[zero]
    assert "no stored forget gradient" in table.excluded[missing]
    names = {r.name for r in table.rows}
    assert zero not in names and missing not in names and zero not in table.front_names()
    assert len(table.rows) == len(adapter.candidate_names()) - 2
    js = table.to_json()
    assert js["excluded"] == table.excluded and len(js["candidates"]) == len(table.rows)


# ---------------------------------------------------------------------------------------------- Pareto front (§3.5)
def test_pareto_hand_cases():
    assert pareto_front([]) == []
    assert pareto_front([(0.5, 1.0)]) == [0]
    assert pareto_front([(0.5, 1.0), (0.5, 1.0)]) == [0, 1]  # exact duplicates: both kept
    assert pareto_front([(0.5, 2.0), (0.5, 1.0)]) == [0, 1]  # equal x, lower y: kept (strict x_j < x_i)
    assert pareto_front([(0.2, 1.0), (0.5, 1.0)]) == [0, 1]  # equal y, higher x: kept (strict y_j > y_i)
    assert pareto_front([(0.2, 2.0), (0.5, 1.0)]) == [0]  # strictly dominated: removed
    assert pareto_front([(0.5, 1.0), (0.2, 2.0)]) == [1]
    # output in input order (not sorted by x or y)
    pts = [(0.9, 3.0), (0.6, 1.0), (0.1, 0.5), (0.5, 2.0), (0.7, 0.1)]
    assert pareto_front(pts) == [0, 2, 3]


def _brute_front(points):
    x = np.array([p[0] for p in points], dtype=float).reshape(-1, 1)
    y = np.array([p[1] for p in points], dtype=float).reshape(-1, 1)
    dominated = ((x.T < x) & (y.T > y)).any(axis=1) if len(points) else np.zeros(0, bool)
    return [i for i in range(len(points)) if not dominated[i]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=12))
def test_pareto_matches_brute_force_with_ties(points):
    pts = [(float(a) / 4, float(b)) for a, b in points]  # small integer grid: many ties and duplicates
    assert pareto_front(pts) == _brute_front(pts)
