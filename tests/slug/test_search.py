"""Step 3 of SLUG: the single-tensor edit and the step-size search (spec §4.1–§4.3, §9.3, §10.6, §10.7).

Clean sign convention: the edit is θ ← θ − η·g_f with η > 0 (the official λ = −η, spec §2.3), so the official
λ sequence −1, −2, −4, −3, −2.5, … (units of R/10) is the η sequence 1, 2, 4, 3, 2.5, … here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slugkit.eval.zeroshot import PARTS, SuiteEvaluator
from slugkit.slug.layers import rank_layers
from slugkit.slug.search import (
    LayerSearch,
    SearchConfig,
    SearchFailed,
    bisection_search,
    choose_layer,
    edited,
    edited_values,
    search_layers,
)

# η sequence, in units of R/10, for an oracle that forgets iff η >= 0.3 R (spec §10.7)
SEQ_03 = [1, 2, 4, 3, 2.5, 2.75, 2.875, 2.9375, 2.96875, 2.984375]


def make_oracle(c, ratio, metric="forget_top5", utility=None):
    """evaluate(η) -> {metric: 0.0 if η >= c·R else 0.5}; the other forget metric stays 0.5 (never satisfied)."""
    calls = []

    def evaluate(eta):
        calls.append(eta)
        units = eta / (ratio / 10)
        m = {"forget_top1": 0.5, "forget_top5": 0.5}
        m[metric] = 0.0 if units >= 10 * c - 1e-9 else 0.5
        if utility is not None:
            m["utility_top1"] = utility(units)
        return m

    return evaluate, calls


# ---------------------------------------------------------------------------------------------- bisection (§10.7)
def test_trajectory_c03_exact():
    R = 10.0  # η0 = R/10 = 1.0: every step is a dyadic rational, so the sequence is exact
    evaluate, calls = make_oracle(0.3, R)
    traj, best = bisection_search(evaluate, R, SearchConfig())
    assert calls == SEQ_03  # exactly 10 evaluations, in this order
    assert [s.step_size for s in traj] == SEQ_03
    assert [s.relative_change for s in traj] == [u / 10 for u in SEQ_03]
    assert [s.accepted for s in traj] == [False, False, True, True] + [False] * 6
    assert [s.metrics["forget_top5"] for s in traj] == [0.5, 0.5, 0.0, 0.0] + [0.5] * 6
    # the smallest accepted η (3 R/10), not the last evaluated one (2.984375 R/10, not accepted)
    assert best == 3.0


@pytest.mark.parametrize("R", [0.0371, 1.0, 123.4])
def test_trajectory_c03_in_units_of_r(R):
    evaluate, calls = make_oracle(0.3, R)
    traj, best = bisection_search(evaluate, R, SearchConfig())
    assert len(calls) == 10
    assert [s.step_size / (R / 10) for s in traj] == pytest.approx(SEQ_03, rel=1e-12)
    assert best == pytest.approx(0.3 * R, rel=1e-12)
    assert best == traj[3].step_size


def test_first_step_accepted_only_shrinks():
    evaluate, calls = make_oracle(0.05, 10.0)  # forgets from η = 0.5 R/10
    traj, best = bisection_search(evaluate, 10.0, SearchConfig())
    assert calls == [1, 0.5, 0.25, 0.375, 0.4375, 0.46875, 0.484375, 0.4921875, 0.49609375, 0.498046875]
    assert best == 0.5


def test_never_accepted_doubles_and_returns_none():
    evaluate, calls = make_oracle(1e9, 10.0)
    traj, best = bisection_search(evaluate, 10.0, SearchConfig())
    assert calls == [2.0 ** k for k in range(10)]
    assert best is None and not any(s.accepted for s in traj)


@pytest.mark.parametrize("steps,expected,best", [(1, [1], None), (3, [1, 2, 4], 4.0), (4, [1, 2, 4, 3], 3.0),
                                                 (12, SEQ_03 + [2.9921875, 2.99609375], 3.0)])
def test_number_of_steps_is_configurable(steps, expected, best):
    evaluate, calls = make_oracle(0.3, 10.0)
    traj, got = bisection_search(evaluate, 10.0, SearchConfig(steps=steps))
    assert calls == expected and len(traj) == steps and got == best


def test_forget_top1_criterion_uses_that_key():
    evaluate, calls = make_oracle(0.3, 10.0, metric="forget_top1")  # forget_top5 stays 0.5
    assert bisection_search(evaluate, 10.0, SearchConfig(metric="forget_top1"))[1] == 3.0
    assert calls == SEQ_03
    evaluate, calls = make_oracle(0.3, 10.0, metric="forget_top1")
    assert bisection_search(evaluate, 10.0, SearchConfig(metric="forget_top5"))[1] is None


def test_threshold():
    def evaluate(eta):
        return {"forget_top5": 0.05 if eta >= 3 else 0.5}

    assert bisection_search(evaluate, 10.0, SearchConfig())[1] is None
    assert bisection_search(evaluate, 10.0, SearchConfig(threshold=0.1))[1] == 3.0
    assert bisection_search(evaluate, 10.0, SearchConfig(threshold=0.01))[1] is None

    def evaluate32(eta):  # metrics are float32 fractions turned into Python floats: 2/20 -> 0.10000000149...
        return {"forget_top5": torch.tensor(2 / 20).item() if eta >= 3 else 0.5}

    assert torch.tensor(2 / 20).item() > 0.1
    assert bisection_search(evaluate32, 10.0, SearchConfig(threshold=0.1))[1] == 3.0


def test_utility_floor_shrinks_but_does_not_accept():
    cfg = SearchConfig(utility_floor=0.1)
    # utility drops below base - floor = 0.7 from η = 3.5 R/10: η = 4 forgets (shrink) but is not accepted
    evaluate, calls = make_oracle(0.3, 10.0, utility=lambda u: 0.8 if u < 3.5 else 0.5)
    traj, best = bisection_search(evaluate, 10.0, cfg, base_utility=0.8)
    assert calls == SEQ_03  # same trajectory as the unconstrained search
    assert [s.accepted for s in traj] == [False, False, False, True] + [False] * 6
    assert best == 3.0
    # utility too low wherever the concept is forgotten: nothing is ever accepted
    evaluate, calls = make_oracle(0.3, 10.0, utility=lambda u: 0.8 if u < 2.9 else 0.5)
    traj, best = bisection_search(evaluate, 10.0, cfg, base_utility=0.8)
    assert calls == SEQ_03 and best is None
    # a drop of exactly the floor is allowed, also with float32 fractions (0.8 - 0.1 > 0.7 in floating point)
    evaluate, _ = make_oracle(0.3, 10.0, utility=lambda u: 0.7)
    assert bisection_search(evaluate, 10.0, cfg, base_utility=0.8)[1] == 3.0
    f32 = lambda x: torch.tensor(x).item()  # noqa: E731
    evaluate, _ = make_oracle(0.3, 10.0, utility=lambda u: f32(7 / 10))
    assert bisection_search(evaluate, 10.0, cfg, base_utility=f32(8 / 10))[1] == 3.0
    evaluate, _ = make_oracle(0.3, 10.0, utility=lambda u: 0.69)
    assert bisection_search(evaluate, 10.0, cfg, base_utility=0.8)[1] is None


def test_search_config_validation():
    for kw in ({"metric": "utility_top1"}, {"steps": 0}, {"margin": 0.99}, {"selection": "best"}):
        with pytest.raises(ValueError):
            SearchConfig(**kw)


# ---------------------------------------------------------------------------------------------- the edit (§10.6)
EDIT_NAMES = ["visual.proj", "visual.conv1.weight", "visual.transformer.resblocks.1.attn.out_proj.weight",
              "transformer.resblocks.0.mlp.c_fc.weight", "text_projection", "ln_final.weight"]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_edit_at_eta0_changes_exactly_ten_percent(adapter, base_grads):
    model = adapter.model
    table = rank_layers(adapter, base_grads)
    before = _snapshot(model)
    for name in EDIT_NAMES:
        R = table.row(name).ratio
        with edited(model, base_grads.forget, [name], R / 10):
            now = dict(model.named_parameters())
            delta = (now[name].detach().double() - before[name].double()).norm() / before[name].double().norm()
            assert float(delta) == pytest.approx(0.1, rel=1e-5)
            assert torch.equal(now[name].detach(), before[name] - (R / 10) * base_grads.forget[name])
            for n, p in now.items():
                if n != name:
                    assert torch.equal(p, before[n]), n  # bit-identical
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n  # restored bit-for-bit


def test_edit_restores_when_body_raises(adapter, base_grads):
    model = adapter.model
    before = _snapshot(model)
    group = ["visual.proj", "transformer.resblocks.1.attn.in_proj_weight"]
    with pytest.raises(RuntimeError, match="boom"):
        with edited(model, base_grads.forget, group, 0.37):
            assert not torch.equal(dict(model.named_parameters())["visual.proj"], before["visual.proj"])
            raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_group_edit_and_edited_values(adapter, base_grads):
    model = adapter.model
    before = _snapshot(model)
    group = ["visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.0.mlp.c_proj.weight"]
    vals = edited_values(model, base_grads.forget, group, 0.25)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # edited_values does not edit
    with edited(model, base_grads.forget, group, 0.25):
        now = dict(model.named_parameters())
        for n in group:  # each member moves along its own gradient with the same η
            assert torch.equal(now[n].detach(), vals[n])
            assert torch.equal(vals[n], before[n] - 0.25 * base_grads.forget[n])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # a later round's edit of the same group composes: its values start from the earlier round's (the patch of two
    # rounds on one layer equals the two edits applied in order)
    g2 = {n: -0.5 * base_grads.forget[n] for n in group}
    twice = edited_values(model, g2, group, 0.1, base=vals)
    with edited(model, base_grads.forget, group, 0.25), edited(model, g2, group, 0.1):
        now = dict(model.named_parameters())
        assert all(torch.equal(now[n].detach(), twice[n]) for n in group)
    assert not torch.equal(twice[group[0]], vals[group[0]])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- search_layers wiring
class OracleEvaluator:
    """Stands in for SuiteEvaluator: reads η back from the edited weights and answers like the §10.7 oracle."""

    def __init__(self, model, grads, ratios, c, utility=0.9, related=0.8):
        self.model, self.grads, self.ratios, self.c = model, grads, ratios, c
        self.utility, self.related = utility, related
        self.base = _snapshot(model)
        self.log, self.prepared = [], []

    def _edit(self):
        params = dict(self.model.named_parameters())
        changed = [n for n in self.base if not torch.equal(params[n], self.base[n])]
        assert len(changed) == 1, changed
        n = changed[0]
        g = self.grads[n].double()
        eta = float(((self.base[n].double() - params[n].detach().double()) * g).sum() / (g * g).sum())
        return n, eta

    def _metrics(self, parts, mode):
        n, eta = self._edit()
        units = eta / (self.ratios[n] / 10)
        self.log.append((mode, n, eta, tuple(parts)))
        m = {}
        if "forget" in parts:
            m["forget_top1"] = m["forget_top5"] = 0.0 if units >= 10 * self.c[n] - 1e-3 else 0.5
        if "related" in parts:
            m["related_top1"] = self.related
        if "utility" in parts:
            m["utility_top1"] = self.utility
        return m

    def base_metrics(self, parts=PARTS):
        assert all(torch.equal(p, self.base[n]) for n, p in self.model.named_parameters())
        return {"utility_top1": 0.9, "related_top1": 0.8} if "utility" in parts else {}

    def prepare(self, name, parts=PARTS):
        self.prepared.append((name, tuple(parts)))
        return {"name": name, "parts": tuple(parts)}

    def evaluate_cached(self, cache):
        assert self._edit()[0] == cache["name"]
        return self._metrics(cache["parts"], "cached")

    def evaluate_naive(self, parts=PARTS):
        return self._metrics(parts, "naive")


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("margin", [1.0, 1.1])
def test_search_layers_margin_and_wiring(adapter, base_grads, cached, margin):
    front = ["visual.proj", "text_projection"]
    table = rank_layers(adapter, base_grads)
    ratios = {n: table.row(n).ratio for n in front}
    ev = OracleEvaluator(adapter.model, base_grads.forget, ratios, c={"visual.proj": 0.3, "text_projection": 1e9})
    before = _snapshot(adapter.model)
    res = search_layers(adapter, base_grads, front, ratios, ev, SearchConfig(margin=margin), cached=cached,
                        progress=False)
    assert all(torch.equal(p, before[n]) for n, p in adapter.model.named_parameters())
    vis, txt = res
    assert (vis.name, vis.group, vis.tower, vis.ratio) == ("visual.proj", ["visual.proj"], "vision", ratios[vis.name])
    assert vis.depth == adapter.stage_index("vision", "visual.proj") == 3
    assert txt.depth == adapter.stage_index("language", "text_projection") == 3
    R = ratios["visual.proj"]
    assert [s.step_size / (R / 10) for s in vis.trajectory] == pytest.approx(SEQ_03, rel=1e-12)
    assert vis.accepted_step == vis.trajectory[3].step_size == pytest.approx(0.3 * R, rel=1e-12)
    assert vis.step_size == margin * vis.accepted_step
    # the validation metrics are taken at the applied step, on every part
    mode = "cached" if cached else "naive"
    val_calls = [e for e in ev.log if e[1] == "visual.proj" and e[3] == tuple(PARTS)]
    assert len(val_calls) == 1 and val_calls[0][0] == mode
    assert val_calls[0][2] == pytest.approx(vis.step_size, rel=1e-5)
    assert vis.val_metrics == {"forget_top1": 0.0, "forget_top5": 0.0, "related_top1": 0.8, "utility_top1": 0.9}
    # the search itself only evaluates the criterion part
    search_calls = [e for e in ev.log if e[3] == ("forget",)]
    assert len(search_calls) == 20 and {e[0] for e in search_calls} == {mode}
    assert ev.prepared == ([("visual.proj", ("forget",)), ("visual.proj", tuple(PARTS)),
                            ("text_projection", ("forget",))] if cached else [])
    # never accepted: no step, no validation
    assert txt.accepted_step is None and txt.step_size is None and txt.val_metrics is None
    assert len(txt.trajectory) == 10
    with pytest.raises(SearchFailed):
        choose_layer([txt], "utility")
    assert choose_layer(res, "utility") is vis


def test_search_layers_with_utility_floor_evaluates_utility(adapter, base_grads):
    front = ["visual.proj"]
    ratios = {"visual.proj": rank_layers(adapter, base_grads).row("visual.proj").ratio}
    ev = OracleEvaluator(adapter.model, base_grads.forget, ratios, c={"visual.proj": 0.3}, utility=0.75)
    cfg = SearchConfig(utility_floor=0.1)  # base utility 0.9 -> 0.75 < 0.8: never accepted
    (r,) = search_layers(adapter, base_grads, front, ratios, ev, cfg, progress=False)
    assert {e[3] for e in ev.log} == {("forget", "utility")}
    assert r.accepted_step is None and [s.step_size / (ratios["visual.proj"] / 10)
                                        for s in r.trajectory] == pytest.approx(SEQ_03, rel=1e-12)
    ev = OracleEvaluator(adapter.model, base_grads.forget, ratios, c={"visual.proj": 0.3}, utility=0.85)
    (r,) = search_layers(adapter, base_grads, front, ratios, ev, cfg, progress=False)
    assert r.accepted_step == pytest.approx(0.3 * ratios["visual.proj"], rel=1e-12)


# ---------------------------------------------------------------------------------------------- layer choice
def LS(name, util, rel, step=1.0, ratio=10.0, depth=0, accepted=True):
    return LayerSearch(name, [name], "vision", ratio, depth=depth,
                       accepted_step=step if accepted else None, step_size=step if accepted else None,
                       val_metrics={"utility_top1": util, "related_top1": rel} if accepted else None)


def _pick(results, policy, base=None):
    return choose_layer(results, policy, base).name


def test_choose_utility_policy_and_tie_breaks():
    assert _pick([LS("a", .8, .5), LS("b", .9, .1), LS("c", 1.0, 1.0, accepted=False)], "utility") == "b"
    assert _pick([LS("a", .9, .1), LS("b", .9, .3)], "utility") == "b"  # tie -> related
    assert _pick([LS("a", .9, .3, step=2, ratio=10), LS("b", .9, .3, step=3, ratio=30)], "utility") == "b"  # -> η/R
    assert _pick([LS("a", .9, .3), LS("b", .9, .3)], "utility") == "a"  # full tie -> first (front order)


def test_choose_mean_min_deepest_policies():
    assert _pick([LS("a", .9, .1), LS("b", .6, .6)], "mean") == "b"
    assert _pick([LS("a", .9, .1), LS("b", .6, .6)], "utility") == "a"
    three = [LS("a", .9, .1), LS("b", .5, .5), LS("c", .7, .45)]
    assert _pick(three, "min") == "b"
    assert _pick(three, "mean") == "c"
    assert _pick([LS("a", .5, .6), LS("b", .5, .9)], "min") == "b"  # tie on min -> mean
    assert _pick([LS("a", .5, .6, step=2), LS("b", .6, .5, step=1)], "min") == "b"  # tie on min and mean -> η/R
    deep = [LS("a", .9, .9, depth=3), LS("b", .5, .5, depth=7), LS("c", .6, .1, depth=7),
            LS("d", 1.0, 1.0, depth=9, accepted=False)]
    assert _pick(deep, "deepest") == "c"  # deepest accepted layer; tie on depth -> utility


def test_choose_uses_retention_against_base():
    # retention = after / before: utility 0.45/0.5 = 0.9, related 0.5/1.0 = 0.5 (a) vs 0.6, 0.8 (b)
    res = [LS("a", .45, .5), LS("b", .3, .8)]
    assert _pick(res, "min") == "a"  # raw values: min .45 vs .3
    assert _pick(res, "min", {"utility_top1": 0.5, "related_top1": 1.0}) == "b"  # retention: min .5 vs .6


def LSW(name, util, rel, per_id):
    r = LS(name, util, rel)
    r.val_metrics["related_by_concept"] = per_id
    return r


def test_choose_keeps_the_worst_neighbour_within_budget():
    base = {"utility_top1": 1.0, "related_top1": 1.0, "related_by_concept": {"x": 1.0, "y": 1.0, "z": 1.0}}
    # a: best mean/min retention but breaks the look-alike y (drop 0.6); b: a little worse on average, y kept
    a = LSW("a", .99, .95, {"x": 1.0, "y": 0.4, "z": 1.0})
    b = LSW("b", .97, .93, {"x": 0.9, "y": 0.9, "z": 0.95})
    assert choose_layer([a, b], "min", base).name == "a"  # without a worst budget: the mean hides y
    assert choose_layer([a, b], "min", base, worst_budget=0.2).name == "b"
    # none within the budget: the least damaging one, whatever its mean retention
    c = LSW("c", .99, .99, {"x": 1.0, "y": 0.5, "z": 1.0})
    assert choose_layer([a, c], "min", base, worst_budget=0.2).name == "c"
    # then the utility budget among those: b's 0.03 utility drop is over 0.02, d's is not
    d = LSW("d", .99, .90, {"x": 0.85, "y": 0.9, "z": 0.9})
    assert choose_layer([b, d], "min", base, worst_budget=0.2).name == "b"
    assert choose_layer([b, d], "min", base, worst_budget=0.2, utility_budget=0.02).name == "d"
    with pytest.raises(ValueError, match="worst_budget"):
        SearchConfig(worst_budget=1.5)


def test_choose_fails_without_accepted_layer():
    with pytest.raises(SearchFailed):
        choose_layer([], "utility")
    with pytest.raises(SearchFailed):
        choose_layer([LS("a", 1.0, 1.0, accepted=False)], "min")


# ---------------------------------------------------------------------------------------------- cached == naive
CACHE_NAMES = ["visual.transformer.resblocks.1.attn.out_proj.weight",  # a vision block tensor
               "visual.proj",  # the vision head
               "visual.conv1.weight",  # the vision stem
               "transformer.resblocks.0.mlp.c_fc.weight",  # a text block tensor
               "text_projection"]  # the text head


def _cached_features(adapter, cache):
    x = cache["x"]
    for st in adapter.stages(cache["tower"])[cache["k"]:]:
        x = st.fn(x, cache["ctx"])
    return F.normalize(x, dim=-1)


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_cached_evaluation_equals_naive(trained_adapter, trained_grads, suite, name):
    with torch.no_grad():
        _check_cached_equals_naive(trained_adapter, trained_grads, suite, name)


def _check_cached_equals_naive(a, trained_grads, suite, name):
    ev = SuiteEvaluator(a, suite)
    base = ev.base_metrics()
    R = rank_layers(a, trained_grads, [name]).row(name).ratio
    tower = a.tower_of(name)
    subsets = (tuple(PARTS), ("forget",), ("forget", "utility"), ("related",))
    caches = {parts: ev.prepare(name, parts) for parts in subsets}  # on the base model, as the search does
    changed_metrics = 0
    for rel in (0.05, 0.2, 0.5, 1.0):
        with edited(a.model, trained_grads.forget, [name], rel * R):
            naive = ev.evaluate_naive(PARTS)
            assert ev.evaluate_cached(caches[tuple(PARTS)]) == naive, (name, rel)
            for parts in subsets[1:]:
                assert ev.evaluate_cached(caches[parts]) == ev.evaluate_naive(parts), (name, rel, parts)
            # prepared under the edit (as for the validation metrics): same result
            assert ev.evaluate_cached(ev.prepare(name, PARTS)) == naive, (name, rel)
            full = ev._encode_images_full(ev.images) if tower == "vision" else ev._encode_text_full(ev.tokens)
            cache = caches[tuple(PARTS)]
            feats = _cached_features(a, cache)
            ref = full[cache["rows"]]
            assert torch.allclose(feats, ref, rtol=0, atol=1e-6), (name, rel, (feats - ref).abs().max().item())
            base_feats = (ev.base_img if tower == "vision" else ev.base_txt)[cache["rows"]]
            assert (ref - base_feats).abs().max() > 1e-4  # the edit really changed what is compared
        changed_metrics += naive != base
    assert changed_metrics > 0, f"no step changed the metrics of {name}: the comparison would be vacuous"


def test_prepare_caches_base_activations(trained_adapter, trained_grads, suite):
    """prepare() must run on the unedited model; evaluate_cached() then only re-runs stages >= k."""
    a = trained_adapter
    ev = SuiteEvaluator(a, suite)
    name = "visual.transformer.resblocks.1.attn.out_proj.weight"
    cache = ev.prepare(name, PARTS)
    assert cache["k"] == a.stage_index("vision", name) == 2
    R = rank_layers(a, trained_grads, [name]).row(name).ratio
    with torch.no_grad(), edited(a.model, trained_grads.forget, [name], 0.5 * R):
        assert ev.evaluate_cached(cache) == ev.evaluate_naive(PARTS)
    assert ev.evaluate_cached(cache) == ev.base_metrics()  # unedited again: base metrics


def _same_search(r1, r2):
    assert (r1.name, r1.group, r1.tower, r1.ratio, r1.depth) == (r2.name, r2.group, r2.tower, r2.ratio, r2.depth)
    assert [s.step_size for s in r1.trajectory] == [s.step_size for s in r2.trajectory], r1.name
    assert [s.metrics for s in r1.trajectory] == [s.metrics for s in r2.trajectory], r1.name
    assert [s.accepted for s in r1.trajectory] == [s.accepted for s in r2.trajectory], r1.name
    assert (r1.accepted_step, r1.step_size, r1.val_metrics) == (r2.accepted_step, r2.step_size, r2.val_metrics)


@pytest.mark.parametrize("cfg", [SearchConfig(), SearchConfig(metric="forget_top1", utility_floor=0.2, steps=6)],
                         ids=["default", "top1-floor"])
def test_search_cached_equals_naive(trained_adapter, trained_grads, suite, cfg):
    a = trained_adapter
    table = rank_layers(a, trained_grads)
    front = list(dict.fromkeys(table.front_names() + CACHE_NAMES))
    ratios = {r.name: r.ratio for r in table.rows}
    ev = SuiteEvaluator(a, suite)
    before = _snapshot(a.model)
    cached = search_layers(a, trained_grads, front, ratios, ev, cfg, cached=True, progress=False)
    naive = search_layers(a, trained_grads, front, ratios, ev, cfg, cached=False, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in a.model.named_parameters())
    assert [r.name for r in cached] == [r.name for r in naive] == front
    for r1, r2 in zip(cached, naive):
        _same_search(r1, r2)
    # non-vacuous: some layers accept a step, some steps are rejected, the metrics move along the trajectories
    assert any(r.accepted_step is not None for r in cached)
    assert any(not s.accepted for r in cached for s in r.trajectory)
    assert any(len({s.metrics[cfg.metric] for s in r.trajectory}) > 1 for r in cached)
    for r in cached:
        if r.accepted_step is not None:
            assert r.step_size == pytest.approx(cfg.margin * r.accepted_step, rel=1e-15)
            assert min(s.step_size for s in r.trajectory if s.accepted) == r.accepted_step
    base = ev.base_metrics()
    for policy in ("utility", "mean", "min", "deepest"):
        assert choose_layer(cached, policy, base).name == choose_layer(naive, policy, base).name
    # the untouched model still gives the base metrics
    assert ev.evaluate_naive(PARTS) == base
    assert math.isclose(base["forget_top1"], 1.0)
