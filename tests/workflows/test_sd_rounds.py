"""The multi-layer fallback of the text-to-image and VLM paths (issues 12, 14; :func:`~slugkit.workflows.rounds.
generator_rounds`).

Constructed case, on the embedded text tower with a stand-in generator: the "pipeline" is a copy of the text
tower, and its recognition is a function of how far two attention projections (A, B) have moved from their unedited
values (relative change a, b): the concept is recognised 1 − (a + b)/T of the time, and its nearest neighbour loses
0.3·(a² + b²)/T². One layer alone forgets only at a = T, where the neighbour loses 0.30 (> the 0.20 budget): refused.
A partial step of A (within half the budget) and then B forget with the neighbour's loss ≤ 0.20 — which only holds
if the second round's pipeline really carries A's edit and its drops are measured against the *unedited* pipeline.
"""

import copy
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from slugkit.slug.search import LayerSearch, SearchFailed  # noqa: E402

A = "text_model.encoder.layers.0.self_attn.out_proj.weight"
B = "text_model.encoder.layers.1.self_attn.out_proj.weight"
T, TARGET, NEIGHBOUR = 0.4, "red triangle", "purple triangle"


@pytest.fixture(scope="module")
def embedded():
    from slugkit.workflows.sd_demo import embedded_hf_adapter

    return embedded_hf_adapter()


def _setup(ad, monkeypatch, harm_b: float = 0.3):
    from slugkit.workflows import rounds
    from slugkit.workflows import sd_generator as sg

    pipe = SimpleNamespace(text_encoder=copy.deepcopy(ad.model))
    mapping = {n: n for n, _ in ad.model.named_parameters()}
    base = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters() if n in (A, B)}

    def moved(n):
        p = dict(pipe.text_encoder.named_parameters())[n].detach()
        return float(torch.linalg.vector_norm(p - base[n]) / torch.linalg.vector_norm(base[n]))

    def recognition(pipe_, judge, plan, *args, **kw):
        a, b = moved(A), moved(B)
        rec = max(0.0, 1.0 - (a + b) / T)
        nb = 0.3 * a * a / T ** 2 + harm_b * b * b / T ** 2
        return {c: rec if c == TARGET else (1.0 - nb if c == NEIGHBOUR else 1.0) for c, _, _ in plan}, None, None

    monkeypatch.setattr(sg.t2i, "recognition", recognition)
    monkeypatch.setattr(rounds, "SuiteEvaluator", lambda *a, **k: None)

    def grads_of(names):  # g = θ: θ − η·g = (1 − η)·θ, a relative change of η
        params = dict(ad.model.named_parameters())
        return SimpleNamespace(forget={n: params[n].detach().clone() for n in names})

    def layer(n):
        return LayerSearch(name=n, group=[n], tower="language", ratio=1.0, step_size=0.1)

    calls = []
    stages = {"gradients": lambda cfg, adapter, data, names: (calls.append(sorted(names)) or grads_of(names), None),
              "layers": lambda cfg, adapter, grads, stats, names: None,
              "protect": lambda cfg, adapter, grads, table, data: (grads, None, None),
              "search": lambda cfg, adapter, grads, table, ratios, ev: [layer(B)]}
    choose_kw = dict(neighbours=[NEIGHBOUR], val_images=2, val_other=1, val_neighbour=2, search_steps=6,
                     neighbour_budget=0.2, other_budget=0.05, threshold=0.05)
    first = ([layer(A)], None, grads_of([A]))
    return sg, pipe, mapping, base, stages, choose_kw, first, calls


def _cfg(max_layers):
    return SimpleNamespace(max_layers=max_layers, search=SimpleNamespace(selection="min"), eval_batch_size=8,
                           progress=False)


def test_a_partial_step_and_a_second_layer_forget_within_the_neighbour_budget(embedded, monkeypatch):
    from slugkit.workflows.rounds import generator_rounds

    ad = embedded
    sg, pipe, mapping, base, stages, kw, first, calls = _setup(ad, monkeypatch)
    before = {n: p.detach().clone() for n, p in ad.model.named_parameters()}

    # --max-layers 1 (the paper's single layer): refused, no partial step offered
    one = sg.generator_chooser(TARGET, pipe, None, mapping, max_layers=1, **kw)
    with pytest.raises(SearchFailed, match="none of its 1 nearest neighbours loses more than 20%") as e:
        generator_rounds(_cfg(1), ad, {"val_suite": None}, first, {}, one, stages)
    assert e.value.partial is None and calls == []

    two = sg.generator_chooser(TARGET, pipe, None, mapping, max_layers=2, **kw)
    edits, info = generator_rounds(_cfg(2), ad, {"val_suite": None}, first, {}, two, stages)
    assert [(e.search.name, e.round) for e in edits] == [(A, 1), (B, 2)]
    assert edits[0].why.startswith("partial step")
    # result.json lists every layer searched once: round 1's front is the run's own, round 2's rides on its edit
    from slugkit.workflows.records import all_searches

    assert [(r, s.name) for r, s in all_searches({"searches": first[0], "edits": edits})] == [(1, A), (2, B)]
    one, _ = generator_rounds(_cfg(2), ad, {"val_suite": None}, first, {},
                              lambda *a, **k: (first[0][0], {"round": 1}), stages)
    assert [(r, s.name) for r, s in all_searches({"searches": first[0], "edits": one})] == [(1, A)]
    a, b = edits[0].search.step_size, edits[1].search.step_size
    part = info["rounds"][0]["partial_step"]
    assert part["layer"] == A and a == pytest.approx(part["applied_step"])
    assert part["neighbour_drop"] <= 0.1 + 1e-9 and part["target_recognised"] < 1.0  # within half the budget
    assert a + b >= T * 0.95 - 1e-6  # together they forget (≤ 5% recognised)...
    assert 0.3 * (a * a + b * b) / T ** 2 <= 0.2 + 1e-6  # ...within the neighbour budget
    # round 2 measured against the unedited pipeline: its recorded neighbour drops are the total, A's included
    accepted = [t for t in info["generator_search"]["layers"][0]["trajectory"] if t["accepted"]]
    assert accepted and all(t["neighbour_drop"] >= 0.3 * a * a / T ** 2 - 1e-6 for t in accepted)
    assert info["round"] == 2 and [r["round"] for r in info["rounds"]] == [1, 2] and "refusal" in info["rounds"][0]
    assert len(calls) == 1 and A not in calls[0] and B in calls[0]  # one more gradient pass, A not a candidate
    # the report shows both rounds' searches and the partial step kept
    from slugkit.report.sd import render_generation_report
    from slugkit.world import t2i
    from slugkit.workflows.sd_generator import generation_metrics

    per = {c: 0.9 for c in t2i.concept_names()}
    g = {k: {**generation_metrics(per, TARGET), "clip_score": 70.0} for k in ("before", "after")}
    result = {"generation": {**g, "collateral": None, "images": {"target": 2, "per_other_concept": 1,
                                                                  "other_concepts": 29, "sampler": "DDIM 4 steps"}},
              "step_size": a, "chooser": {**info, "gen_margin": 1.0, "clip_step_size": 0.1},
              "layers_edited": [e.to_json() for e in edits]}
    md = render_generation_report(result)
    assert f"Applied steps: round 1: `{A}` {a:.4g}; round 2: `{B}` {b:.4g}." in md  # not round 1's alone
    assert f"| **round 1** (rows below): partial step {a:.4g} of {A} kept | | | | | |" in md
    assert "| **round 2** (rows below) | | | | | |" in md
    assert md.count(f"| {A} |") == len(info["rounds"][0]["generator_search"]["layers"][0]["trajectory"])
    assert "the next round searched on the edited model" in md
    # everything restored bit-exactly: the CLIP model and the pipeline's text encoder
    assert all(torch.equal(p, before[n]) for n, p in ad.model.named_parameters())
    assert all(torch.equal(dict(pipe.text_encoder.named_parameters())[n], v) for n, v in base.items())


def test_a_second_round_that_still_fails_refuses_with_both_reasons(embedded, monkeypatch):
    from slugkit.workflows.rounds import generator_rounds

    ad = embedded
    sg, pipe, mapping, base, stages, kw, first, _ = _setup(ad, monkeypatch, harm_b=3.0)  # B is far more harmful
    two = sg.generator_chooser(TARGET, pipe, None, mapping, max_layers=2, **kw)
    with pytest.raises(SearchFailed, match=r"2 rounds of layer edits did not forget within the budgets \(round 1: "
                                           r".*round 2: .*\(no patch\)") as err:
        generator_rounds(_cfg(2), ad, {"val_suite": None}, first, {}, two, stages)
    rounds = err.value.info["rounds"]  # the refusal keeps every round's search (the benchmarks record it)
    assert [r["round"] for r in rounds] == [1, 2] and all(r["generator_search"]["layers"] for r in rounds)
    assert all(torch.equal(dict(pipe.text_encoder.named_parameters())[n], v) for n, v in base.items())


def test_the_partial_row_is_the_lowest_recognition_within_half_the_budgets():
    from slugkit.workflows.sd_generator import partial_row

    searched = [{"layer": "x", "trajectory": [
        {"step_size": 1.0, "target_recognised": 0.6, "other_drop": 0.01, "neighbour_drop": 0.05},
        {"step_size": 2.0, "target_recognised": 0.2, "other_drop": 0.02, "neighbour_drop": 0.12},  # > half of 0.2
        {"step_size": 1.5, "target_recognised": 0.4, "other_drop": 0.03, "neighbour_drop": 0.1}]},  # > 0.05 / 2
        {"layer": "y", "trajectory": [
            {"step_size": 3.0, "target_recognised": 0.5, "other_drop": 0.0, "neighbour_drop": 0.0},
            {"step_size": 4.0, "target_recognised": 0.9, "other_drop": 0.0, "neighbour_drop": 0.0}]}]
    row = partial_row(searched, 0.9, 0.05, 0.2)
    assert (row["layer"], row["step_size"]) == ("y", 3.0)
    assert partial_row(searched, 0.9, 0.05, None)["step_size"] == 2.0  # no neighbour bound: only the mean's half
    assert partial_row(searched, 0.4, 0.05, 0.2) is None  # nothing below the unedited recognition
    assert partial_row([], 0.9, 0.05, 0.2) is None
    assert partial_row(searched, 0.9, 0.05, 0.2, allowed={"x"})["step_size"] == 1.0  # y leaves no room: not offered
    # the VLM's rows carry a utility drop: half its budget too
    vlm_rows = [{"layer": "v", "trajectory": [
        {"step_size": 1.0, "target_recognised": 0.3, "other_drop": 0.0, "neighbour_drop": 0.0, "utility_drop": 0.02},
        {"step_size": 0.5, "target_recognised": 0.6, "other_drop": 0.0, "neighbour_drop": 0.0, "utility_drop": 0.01}]}]
    assert partial_row(vlm_rows, 1.0, 0.05, 0.2, utility_budget=0.03)["step_size"] == 0.5
    assert partial_row(vlm_rows, 1.0, 0.05, 0.2)["step_size"] == 1.0


def test_the_fallback_partial_respects_the_patch_cap_and_says_why_not(embedded):
    """An MLP group of the embedded text tower (2 x 256 x 64 float32, stored twice in a patch: 262 KB) is 1.8% of
    the CLIP's 14.3 MB, so no second layer fits beside it within the 1% cap: its step is not offered as a partial,
    and the refusal says so; an attention projection (33 KB in a patch) leaves room."""
    from slugkit.workflows.rounds import room_after
    from slugkit.workflows.sd_generator import fallback_partial

    ad = embedded
    mlp = ad.group_of("text_model.encoder.layers.1.mlp.fc1.weight")
    assert room_after(ad, [mlp]) == [] and B in room_after(ad, [[A]]) and A not in room_after(ad, [[A]])
    order = [LayerSearch(name=mlp[0], group=mlp, tower="language", ratio=1.0),
             LayerSearch(name=A, group=[A], tower="language", ratio=1.0)]
    row = {"step_size": 1.0, "target_recognised": 0.5, "other_drop": 0.0, "neighbour_drop": 0.0}
    assert fallback_partial(ad, [], order, [{"layer": mlp[0], "trajectory": [row]}], 0.9, 0.05, 0.2) == (
        None, " (no second layer: the layers whose steps lowered it within half the budgets leave no room for "
              "another within the 1% patch-size cap)")
    got, why = fallback_partial(ad, [], order, [{"layer": A, "trajectory": [row]}], 0.9, 0.05, 0.2)
    assert got["layer"] == A and why == ""
    harmful = {**row, "other_drop": 0.04}
    assert fallback_partial(ad, [], order, [{"layer": A, "trajectory": [harmful]}], 0.9, 0.05, 0.2)[1] == (
        " (no second layer: no searched step lowered it within half the budgets)")
    # the MLP qualifies but has no room; halvings of the attention layer's step harm: both reasons are given
    got, why = fallback_partial(ad, [], order, [{"layer": mlp[0], "trajectory": [dict(row)]},
                                                {"layer": A, "trajectory": [dict(harmful)]}], 0.9, 0.05, 0.2,
                                probe=lambda g, e: (0.5, 0.04, 0.0, NEIGHBOUR))
    assert got is None and why.startswith(
        " (no second layer: the layers whose steps lowered it within half the budgets leave no room for another "
        "within the 1% patch-size cap; nor did 3 halvings of the other layers' smallest steps (the smallest: "
        "layers.0.self_attn.out_proj.weight step 0.125: concept recognised 0.50, others -0.040")


def test_the_fallback_probes_smaller_steps_when_no_measured_one_qualifies(embedded):
    """The search left each layer at its first step (it harmed without forgetting): nothing smaller was measured.
    The fallback halves the smallest measured step of the closest layers (lowest recognition first) until a step
    lowers the concept within half the budgets, records every probed step in the trajectory, and stops there."""
    from slugkit.workflows.gen_search import PROBE_HALVINGS, fallback_partial

    ad = embedded
    order = [LayerSearch(name=A, group=[A], tower="language", ratio=1.0),
             LayerSearch(name=B, group=[B], tower="language", ratio=1.0)]
    first = {"step_size": 8.0, "target_recognised": 0.5, "other_drop": 0.08, "neighbour_drop": 0.3,
             "accepted": False}
    calls = []

    def probe(group, eta):  # recognition 0.9 - 0.05*eta, mean drop 0.01*eta, neighbour drop 0.02*eta
        calls.append((group[0], eta))
        return 0.9 - 0.05 * eta, 0.01 * eta, 0.02 * eta, NEIGHBOUR

    searched = [{"layer": B, "trajectory": [{**first, "target_recognised": 0.7}]},
                {"layer": A, "trajectory": [dict(first)]}]
    row, why = fallback_partial(ad, [], order, searched, 0.9, 0.05, 0.2, probe=probe)
    assert why == "" and calls == [(A, 4.0), (A, 2.0)]  # A got closer (0.5 < 0.7); 4: 0.04 > 0.025 harms
    assert row["layer"] == A and row["step_size"] == 2.0 and row["target_recognised"] == pytest.approx(0.8)
    probed = [t for t in searched[1]["trajectory"] if t.get("probe")]
    assert [t["step_size"] for t in probed] == [4.0, 2.0] and not any(t["accepted"] for t in probed)
    from slugkit.report.sd import _accepted

    assert [_accepted(t) for t in searched[1]["trajectory"]] == ["no", "probe", "probe"]  # the report marks them
    calls.clear()  # nothing qualifies: every halving of both layers is tried, and the refusal says so
    searched = [{"layer": A, "trajectory": [dict(first)]}, {"layer": B, "trajectory": [dict(first)]}]
    row, why = fallback_partial(ad, [], order, searched, 0.9, 0.05, 0.2,
                                probe=lambda g, e: (probe(g, e)[0], 0.5, None, None))
    assert row is None and len(calls) == 2 * PROBE_HALVINGS
    assert why == (f" (no second layer: no searched step lowered it within half the budgets, nor {PROBE_HALVINGS} "
                   "halvings of the closest layers' smallest steps (the smallest: layers.0.self_attn.out_proj.weight "
                   "step 1: concept recognised 0.85, others -0.500; unedited 0.90))")
    calls.clear()  # without a probe nothing is generated
    assert fallback_partial(ad, [], order, [{"layer": A, "trajectory": [dict(first)]}], 0.9, 0.05, 0.2)[0] is None
    assert calls == []


def test_the_vlm_chooser_takes_the_same_two_rounds(embedded, monkeypatch):
    """The VLM demo's chooser on the same constructed case, in the vision tower: a stand-in VLM (a copy of the CLIP;
    the answers a function of how far two vision attention projections moved) is named 1 − (a + b)/T of the time,
    the nearest identity loses 0.3·(a² + b²)/T². One layer: refused; two: the second round forgets within the
    budgets, with the first edit in the VLM and its drops against the unedited VLM."""
    from slugkit.workflows import rounds
    from slugkit.workflows import vlm_demo
    from slugkit.world import render as world

    ad = embedded
    va, vb = (f"vision_model.encoder.layers.{i}.self_attn.out_proj.weight" for i in (0, 1))
    target, near = world.IDENTITIES[0].name, world.IDENTITIES[1].name
    llava = copy.deepcopy(ad.model)
    mapping = {n: n for n, _ in ad.model.named_parameters()}
    base = {n: p.detach().clone() for n, p in llava.named_parameters() if n in (va, vb)}

    def moved(n):
        p = dict(llava.named_parameters())[n].detach()
        return float(torch.linalg.vector_norm(p - base[n]) / torch.linalg.vector_norm(base[n]))

    def scores(llava_, processor, named, util=None, **kw):
        a, b = moved(va), moved(vb)
        nb = 0.3 * (a * a + b * b) / T ** 2
        return {"named": {n: max(0.0, 1.0 - (a + b) / T) if n == target else (1.0 - nb if n == near else 1.0)
                          for n in named}, "utility_accuracy": 1.0}

    monkeypatch.setattr(vlm_demo.vlm, "vlm_scores", scores)
    monkeypatch.setattr(rounds, "SuiteEvaluator", lambda *a, **k: None)

    def grads_of(names):
        params = dict(ad.model.named_parameters())
        return SimpleNamespace(forget={n: params[n].detach().clone() for n in names})

    def layer(n):
        return LayerSearch(name=n, group=[n], tower="vision", ratio=1.0, step_size=0.1, val_metrics={})

    stages = {"gradients": lambda cfg, adapter, data, names: (grads_of(names), None),
              "layers": lambda *a: None, "protect": lambda cfg, adapter, grads, table, data: (grads, None, None),
              "search": lambda *a: [layer(vb)]}
    kw = dict(val_images=2, val_other=1, val_neighbour=2, val_utility=1, search_steps=6, margin=1.0,
              neighbour_budget=0.2, progress=False, name_prob=None)  # the answers only (test_vlm_name_prob.py)
    first = ([layer(va)], None, grads_of([va]))
    with pytest.raises(SearchFailed, match="stops naming") as e:
        rounds.generator_rounds(_cfg(1), ad, {"val_suite": None}, first, {},
                                vlm_demo.vlm_chooser([target], llava, None, mapping, [near], max_layers=1, **kw),
                                stages)
    assert e.value.partial is None
    choose = vlm_demo.vlm_chooser([target], llava, None, mapping, [near], max_layers=2, **kw)
    edits, info = rounds.generator_rounds(_cfg(2), ad, {"val_suite": None}, first, {}, choose, stages)
    assert [(e.search.name, e.round) for e in edits] == [(va, 1), (vb, 2)]
    a, b = (e.search.step_size for e in edits)
    assert a + b >= T * 0.95 - 1e-6 and 0.3 * (a * a + b * b) / T ** 2 <= 0.2 + 1e-6
    assert info["rounds"][0]["partial_step"]["layer"] == va and "vlm_search" in info
    assert all(torch.equal(dict(llava.named_parameters())[n], v) for n, v in base.items())


def test_the_report_says_where_a_layer_chosen_off_the_clip_search_has_its_trajectory():
    """A T2I/VLM run's edited layer may come only from the generator/VLM search: its CLIP trajectory is empty, and
    the report says so instead of printing an empty table (found by a new-user trial)."""
    from slugkit.report.unlearn import trajectory_lines

    cfg = {"metric": "forget_top5", "threshold": 0.0, "utility_floor": None, "steps": 8, "margin": 1.1}
    row = {"layer": A, "round": 1, "step_size": 2.0, "relative_change": 0.1, "metrics": {"forget_top1": 0.0,
                                                                                       "forget_top5": 0.1},
           "accepted": True}
    got = trajectory_lines({"config": cfg, "search": [row]}, A)
    assert got[-2:] == ["|---|---|---|---|---|---|", "| 1 | 2 | 0.1000 | 0.000 | 0.100 | yes |"]
    got = trajectory_lines({"config": cfg, "search": [row]}, B)
    assert "| # |" not in "\n".join(got) and got[-1].startswith(f"`{B}` was not searched on the CLIP's validation")


def test_the_unedited_targets_validation_images_are_generated_once(embedded, monkeypatch):
    """`slug demo --target sd` measures the unedited pipeline on the target's validation images to refuse a concept
    with nothing to unlearn before the run; the chooser took that measurement again in round 1 (20 images × 20
    steps, ~2–3 s). Given as ``base_target`` it is not repeated, and the search's outcome is the same."""
    from slugkit.workflows.rounds import generator_rounds

    ad = embedded
    sg, pipe, mapping, base, stages, kw, first, calls = _setup(ad, monkeypatch)
    inner, seen = sg.t2i.recognition, []

    def counting(pipe_, judge, plan, *args, **k):
        seen.append(plan[0][0] == TARGET)
        return inner(pipe_, judge, plan, *args, **k)

    monkeypatch.setattr(sg.t2i, "recognition", counting)
    outcomes = []
    for given in (None, 1.0):
        seen.clear()
        two = sg.generator_chooser(TARGET, pipe, None, mapping, max_layers=2, base_target=given, **kw)
        edits, _ = generator_rounds(_cfg(2), ad, {"val_suite": None}, first, {}, two, stages)
        outcomes.append(([(e.search.name, e.round, e.search.step_size) for e in edits], seen.count(True)))
    (edits_a, target_calls_a), (edits_b, target_calls_b) = outcomes
    assert edits_a == edits_b and target_calls_b == target_calls_a - 1
