"""The verdict follows the measured numbers (trust cases A1–A6): constructed metric dicts, one per reason."""

import pytest

from slugkit.workflows.verdict import (Budgets, Verdict, caption_check, collateral_checks, data_checks,
                                       exit_status_of, forgetting_checks, generation_checks)

BEFORE = {"forget_top1": 1.0, "forget_top5": 1.0, "related_top1": 0.99, "utility_top1": 0.99}


def _after(**kw):
    return {"forget_top1": 0.0, "forget_top5": 0.0, "related_top1": 0.98, "utility_top1": 0.985, **kw}


def _verdict(before=BEFORE, after=None, metric="forget_top5", threshold=0.0, budgets=Budgets()):
    v = Verdict(budgets=vars(budgets))
    forgetting_checks(v, ["Jowen Gormere"], metric, threshold, before, after or _after(), budgets.forget_tolerance)
    collateral_checks(v, before, after or _after(), budgets)
    return v


def codes(v):
    return sorted(r["code"] for r in v.reasons)


def test_clean_run_passes():
    v = _verdict()
    assert (v.status, v.exit_status, v.reasons) == ("pass", 0, [])


def test_threshold_one_never_forgets_is_a_fail():
    """A1: FA stays at 1.0; whatever the search accepted, the test numbers say no."""
    v = _verdict(after=_after(forget_top1=1.0, forget_top5=1.0))
    assert v.status == "fail" and codes(v) == ["not_forgotten"] and v.exit_status == 4


def test_within_tolerance_passes_and_beyond_fails():
    assert _verdict(after=_after(forget_top5=0.04)).status == "pass"
    assert codes(_verdict(after=_after(forget_top5=0.06))) == ["not_forgotten"]
    assert codes(_verdict(after=_after(forget_top1=0.1, forget_top5=0.04))) == ["not_forgotten"]


def test_nothing_to_unlearn():
    """A2: a template without {} makes every prompt identical: FA@5 before is already at the threshold."""
    v = _verdict(before={**BEFORE, "forget_top1": 0.0, "forget_top5": 0.0})
    assert codes(v) == ["nothing_to_unlearn"] and v.status == "fail"
    assert "nothing to unlearn" in v.reasons[0]["message"]


def test_joint_runs_are_judged_per_concept():
    before = {**BEFORE, "forget_by_concept": {"A": {"forget_top1": 1, "forget_top5": 1},
                                              "B": {"forget_top1": 1, "forget_top5": 1}}}
    after = _after(forget_by_concept={"A": {"forget_top1": 0, "forget_top5": 0},
                                      "B": {"forget_top1": 0.5, "forget_top5": 0.9}})
    v = Verdict()
    forgetting_checks(v, ["A", "B"], "forget_top5", 0.0, before, after, 0.05)
    assert codes(v) == ["not_forgotten"] and "'B'" in v.reasons[0]["message"]


@pytest.mark.parametrize("key,code", [("utility_top1", "utility_drop"), ("related_top1", "related_drop")])
def test_collateral_over_budget_warns(key, code):
    v = _verdict(after=_after(**{key: BEFORE[key] - 0.09}))
    assert codes(v) == [code] and v.status == "warn" and v.exit_status == 3


@pytest.mark.parametrize("key,broken,budget", [("utility_top1", 0.11, 0.02), ("related_top1", 0.26, 0.05)])
def test_a_broken_model_fails_even_when_the_concept_is_gone(key, broken, budget):
    """Utility 0.994 -> 0.515 said "unlearned — with warnings", like a slight overshoot (tenth and twelfth trials):
    beyond 5 × its budget a mean drop fails the run (model_broken); just under it, it warns."""
    v = _verdict(after=_after(**{key: BEFORE[key] - broken}))
    assert codes(v) == ["model_broken"] and v.status == "fail" and v.exit_status == 4
    assert f"more than {5 * budget:g} = 5 × the budget): the edit broke the model" in v.reasons[0]["message"]
    zero = Budgets(**{"utility_top1": {"utility_drop": 0.0}, "related_top1": {"related_drop": 0.0}}[key])
    assert codes(_verdict(after=_after(**{key: BEFORE[key] - 0.002}), budgets=zero)) == [  # a warning, not broken
        "utility_drop" if key == "utility_top1" else "related_drop"]
    loose = Budgets(**{"utility_top1": {"utility_drop": 0.2}, "related_top1": {"related_drop": 0.2}}[key])
    v = _verdict(after=_after(**{key: BEFORE[key] - 0.45}), budgets=loose)  # 5 x 0.2 = 1: never (14th trial)
    assert codes(v) == ["model_broken"] and "more than 0.3 = the most any budget below it allows" in \
        v.reasons[0]["message"]
    assert _verdict(after=_after(**{key: BEFORE[key] - 5 * budget + 0.001})).status == "warn"
    from slugkit.report.unlearn import headline
    line = headline({"concept": "Jowen Gormere", "verdict": v.to_json()}, "embedded", "visual.proj")
    assert line.startswith("SLUG removed 'Jowen Gormere' from embedded by editing visual.proj, but the edit BROKE")
    from slugkit.workflows.verdict import sd_verdict
    sd = sd_verdict("red triangle", v.to_json(), {"generated_target_recognised": 0.9, "generated_other_recognised":
                                                  0.88}, {"generated_target_recognised": 0.0,
                                                          "generated_other_recognised": 0.87}, 0.05, 0.05, 0.05)
    assert sd.status == "warn" and [r["code"] for r in sd.reasons] == ["clip_broken"]  # the pipeline is fine
    assert sd.reasons[0]["message"].startswith("CLIP zero-shot, the text encoder on its own: ")  # whose numbers
    assert sd.reasons[0]["on"] == "clip"  # for a program too: the CLIP's worst_drop and the images' share a code
    clip_worst = {"status": "warn", "budgets": {"worst_drop": 0.2}, "reasons": [
        {"severity": "warn", "code": "worst_drop", "message": "'A' dropped 0.5"}]}
    per = {"generated_target_recognised": 0.9, "generated_other_recognised": 0.9, "per_concept": {"x": 0.9, "y": 0.9}}
    sd = sd_verdict("red triangle", clip_worst, per, {**per, "generated_target_recognised": 0.0,
                                                      "per_concept": {"x": 0.9, "y": 0.5}}, 0.05, 0.05, 0.05)
    assert [(r["code"], r.get("on")) for r in sd.reasons] == [("worst_drop", None), ("worst_drop", "clip")]


def test_a_sequential_run_that_broke_the_model_says_so(capsys):
    """The sequential summary said "did NOT unlearn A, B" when both were gone and the edits broke the model."""
    from slugkit.report.sequential import print_sequential_summary

    m = {"forget_top1": 0.0, "forget_top5": 0.0, "related_top1": 0.5, "utility_top1": 0.4}
    result = {"concepts": ["A", "B"], "steps": [{"layer": "visual.proj"}, {"layer": "ln_final"}],
              "per_concept": {c: {"before": {**m, "forget_top1": 1.0, "forget_top5": 1.0}, "after": m} for c in "AB"},
              "metrics": {"before": {**m, "related_top1": 1.0, "utility_top1": 1.0}, "after": m},
              "patch": {"bytes": 10}}
    broken = {"code": "model_broken", "severity": "fail", "message": "x"}
    for reasons, said in (([broken], "SLUG removed A, B one after another (visual.proj then ln_final), but the "
                           "edits BROKE the model (see the verdict); do not ship the patch"),
                          ([broken, {"code": "not_forgotten", "severity": "fail", "message": "y"}],
                           "SLUG did NOT unlearn A, B one after another (visual.proj then ln_final)\n")):
        print_sequential_summary({**result, "verdict": {"status": "fail", "reasons": reasons}}, "out")
        assert said in capsys.readouterr().out


def test_budgets_are_configurable():
    after = _after(utility_top1=0.95)  # a 0.04 drop
    assert _verdict(after=after).status == "warn"
    assert _verdict(after=after, budgets=Budgets(utility_drop=0.05)).status == "pass"
    with pytest.raises(ValueError, match="utility_drop"):
        Budgets(utility_drop=-0.1)


def test_unmeasured_utility_warns():
    """A5: no utility folders: say so instead of dropping the row silently."""
    before = {k: v for k, v in BEFORE.items() if k != "utility_top1"}
    after = {k: v for k, v in _after().items() if k != "utility_top1"}
    v = _verdict(before=before, after=after)
    assert codes(v) == ["not_measured"] and "utility" in v.reasons[0]["message"]


def test_skipped_samples_warn():
    v = Verdict()
    data_checks(v, {"forget": {"samples": 10, "skipped_bad_image": 2, "skipped_no_caption": 0,
                               "truncated_shards": []},
                    "retain": {"samples": 50, "skipped_bad_image": 0, "truncated_shards": []}})
    assert codes(v) == ["samples_skipped"] and "forget" in v.reasons[0]["message"]


def test_captions_without_concept_and_truncated_names_warn():
    v = Verdict()
    caption_check(v, named=80, total=100, truncated=5, concepts=["Jowen Gormere"])
    assert codes(v) == ["captions_without_concept", "name_truncated"] and v.status == "warn"
    v = Verdict()
    caption_check(v, named=100, total=100, truncated=0, concepts=["Jowen Gormere"])
    assert v.status == "pass"


def test_retain_captions_naming_the_concept():
    """Most retain captions naming the concept (or the same set as --forget) is refused before the run; a minority
    is a warning with the count (new-user trial: a retain set of the concept's own pairs was accepted silently)."""
    from slugkit.workflows.verdict import ForgetCaptionsError, check_retain_captions

    with pytest.raises(ForgetCaptionsError, match="--retain and --forget are the same set"):
        check_retain_captions(0, 10, ["Jowen Gormere"], "d/forget.tar", "d/./forget.tar")
    with pytest.raises(ForgetCaptionsError, match="6 of the 10 retain captions in r.tar name 'Jowen Gormere'"):
        check_retain_captions(6, 10, ["Jowen Gormere"], "r.tar", "f.tar")
    check_retain_captions(5, 10, ["Jowen Gormere"], "r.tar", "f.tar")  # half: not most
    v = Verdict()
    caption_check(v, named=100, total=100, truncated=0, concepts=["Jowen Gormere"], retain_named=5, retain_total=10)
    assert codes(v) == ["retain_names_concept"] and v.status == "warn" and "5 of 10 retain captions" in \
        v.reasons[0]["message"]


def test_generation_checks():
    b = {"generated_target_recognised": 0.9, "generated_other_recognised": 0.88}
    v = Verdict()
    generation_checks(v, "red triangle", b, {"generated_target_recognised": 0.0, "generated_other_recognised": 0.86},
                      0.05, 0.05, 0.05)
    assert v.status == "pass"
    v = Verdict()
    generation_checks(v, "red triangle", b, {"generated_target_recognised": 0.5, "generated_other_recognised": 0.7},
                      0.05, 0.05, 0.05)
    assert codes(v) == ["not_forgotten", "related_drop"]
    v = Verdict()
    generation_checks(v, "red triangle", {**b, "generated_target_recognised": 0.02}, b, 0.05, 0.05, 0.05)
    assert codes(v) == ["nothing_to_unlearn"]


def test_exit_status_of_result():
    assert [exit_status_of({"verdict": {"status": s}}) for s in ("pass", "warn", "fail")] == [0, 3, 4]


def test_nothing_to_unlearn_on_validation_is_refused_before_the_gradient_pass():
    from slugkit.workflows.verdict import NothingToUnlearnError, check_recognised

    with pytest.raises(NothingToUnlearnError, match="nothing to unlearn") as e:
        check_recognised(["A"], "forget_top5", 0.0, {"forget_top5": 0.0})
    assert e.value.exit_status == 4
    check_recognised(["A"], "forget_top5", 0.0, {"forget_top5": 0.5})  # recognised: no error
    joint = {"forget_by_concept": {"A": {"forget_top5": 0.0}, "B": {"forget_top5": 1.0}}}
    check_recognised(["A", "B"], "forget_top5", 0.0, joint)  # one of them still to unlearn


def test_no_forget_caption_names_the_concept_is_refused():
    from slugkit.workflows.verdict import ForgetCaptionsError, check_captions

    with pytest.raises(ForgetCaptionsError, match="none of the 100 forget captions"):
        check_captions(0, 100, ["Meylan Falmond"], "forget.tar")
    check_captions(1, 100, ["Meylan Falmond"], "forget.tar")


def test_sd_verdict_judges_generated_images_and_keeps_other_reasons():
    from slugkit.workflows.verdict import sd_verdict

    clip = {"status": "fail", "budgets": {"forget_tolerance": 0.05},
            "reasons": [{"code": "not_forgotten", "severity": "fail", "message": "CLIP still ranks it first"},
                        {"code": "samples_skipped", "severity": "warn", "message": "2 skipped"}]}
    gb = {"generated_target_recognised": 0.9, "generated_other_recognised": 0.88}
    ga = {"generated_target_recognised": 0.0, "generated_other_recognised": 0.85}
    v = sd_verdict("red triangle", clip, gb, ga, 0.05, 0.05, 0.05)
    assert v.status == "warn" and codes(v) == ["samples_skipped"]


def test_sequential_verdict_judges_every_concept_on_the_final_model():
    from slugkit.workflows.verdict import sequential_verdict

    before = {**BEFORE, "forget_by_concept": {"A": {"forget_top1": 1, "forget_top5": 1},
                                              "B": {"forget_top1": 1, "forget_top5": 1}}}
    after = _after(forget_by_concept={"A": {"forget_top1": 0.3, "forget_top5": 0.5},  # A came back after step B
                                      "B": {"forget_top1": 0, "forget_top5": 0}})
    v = sequential_verdict(["A", "B"], "forget_top5", 0.0, before, after, Budgets(), [{"reasons": []}] * 2)
    assert v.status == "fail" and "'A'" in v.reasons[0]["message"]


def test_names_cut_off_by_the_context_are_refused_when_most_are_or_under_strict():
    from slugkit.workflows.verdict import ForgetCaptionsError, check_captions

    with pytest.raises(ForgetCaptionsError, match="beyond the text"):
        check_captions(100, 100, ["A"], "forget.tar", truncated=60)
    check_captions(100, 100, ["A"], "forget.tar", truncated=10)  # a few: a warning in the verdict, not an error
    with pytest.raises(ForgetCaptionsError, match="--strict"):
        check_captions(100, 100, ["A"], "forget.tar", truncated=10, strict=True)


def test_one_broken_look_alike_warns_although_the_mean_is_fine():
    per_b = {f"id{i}": 1.0 for i in range(19)} | {"look-alike": 1.0}
    per_a = {f"id{i}": 1.0 for i in range(19)} | {"look-alike": 0.3}
    before = {**BEFORE, "related_top1": 1.0, "related_by_concept": per_b}
    after = _after(related_top1=0.965, related_by_concept=per_a)  # mean drop 0.035: inside the 0.05 budget
    v = _verdict(before, after)
    assert codes(v) == ["worst_drop"] and v.exit_status == 3
    assert "'look-alike' dropped 0.700" in v.reasons[0]["message"]
    assert "although the mean over the others may look small" in v.reasons[0]["message"]
    assert codes(_verdict(before, after, budgets=Budgets(worst_drop=0.7))) == []
    per_a = {f"id{i}": 0.6 for i in range(19)} | {"look-alike": 0.3}  # the mean fell too: not "may look small"
    v = _verdict(before, _after(related_top1=0.6, related_by_concept=per_a))
    worst = next(r["message"] for r in v.reasons if r["code"] == "worst_drop")
    assert "the mean over the others dropped 0.415 too" in worst and "look small" not in worst
    with pytest.raises(ValueError, match="worst_drop"):
        Budgets(worst_drop=1.2)


def test_generation_checks_warn_on_the_worst_concept():
    b = {"generated_target_recognised": 0.9, "generated_other_recognised": 0.9,
         "per_concept": {"red triangle": 0.9, "purple triangle": 0.9, "blue star": 0.9}}
    a = {"generated_target_recognised": 0.0, "generated_other_recognised": 0.85,
         "per_concept": {"red triangle": 0.0, "purple triangle": 0.2, "blue star": 0.9}}
    v = Verdict()
    generation_checks(v, "red triangle", b, a, 0.05, 0.1, 0.05, worst_budget=0.2)
    assert codes(v) == ["worst_drop"] and "'purple triangle' dropped 0.700" in v.reasons[0]["message"]
    v = Verdict()
    generation_checks(v, "red triangle", b, a, 0.05, 0.1, 0.05)  # no worst budget: the mean alone
    assert codes(v) == []
