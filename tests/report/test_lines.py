"""Lines shared by the CLIP, SD and VLM demos (report.unlearn): the worst case and the outputs in the terminal
summary, the heading of report.md's layer table."""

from slugkit.eval.collateral import collateral_record
from slugkit.report.unlearn import outputs_line, two, worst_line


def test_the_summary_line_is_the_same_for_every_demo_and_says_drop():
    """The CLIP, SD and VLM demos print the worst case through one function (the CLIP's said "change −0.06" while
    the others said "drop +0.06" for the same fact)."""
    before = {"look-alike": 0.9, "far": 1.0}
    after = {"look-alike": 0.2, "far": 1.0}
    rec = collateral_record(before, after, [("look-alike", 0.8), ("far", 0.1)], "top-1", k=2)
    assert worst_line(rec, "concept") == ("worst other concept: look-alike 0.90 -> 0.20 (drop 0.70); "
                                          "nearest: look-alike 0.90 -> 0.20, far 1.00 -> 1.00")
    assert worst_line(None) is None and worst_line({"worst": None}) is None
    flat = collateral_record({"a": 1.0, "b": 0.999}, {"a": 1.0, "b": 1.0}, [("a", 0.8), ("b", 0.1)], "top-1", k=1)
    assert "(drop 0.00)" in worst_line(flat) and "-0.00" not in worst_line(flat)  # report.md's column printed -0.00
    assert [two(x) for x in (-0.001, -0.0, 0.004, -0.25)] == ["0.00", "0.00", "0.00", "-0.25"]


def test_the_outputs_line_lists_what_the_run_folder_holds(tmp_path):
    """The summary's outputs line is read from the folder (the SD one omitted layers.json, run.json and data/)."""
    for f in ["report.md", "result.json", "layers.json", ".hidden", "thesis.txt"]:  # the last two: not the run's
        (tmp_path / f).write_text("x")
    (tmp_path / "patch").mkdir()
    (tmp_path / "data").mkdir()
    assert outputs_line(tmp_path) == f"outputs: {tmp_path}/result.json, layers.json, report.md, data/, patch/"
    # a run folder records its own entries: the line lists exactly those (a compare run: its marker first)
    from slugkit.common.outguard import write_manifest

    for f in ["compare.json", "compare.md", "tradeoff.png"]:
        (tmp_path / f).write_text("x")
    (tmp_path / "slug").mkdir()
    write_manifest(tmp_path, ["compare.json", "compare.md", "tradeoff.png", "slug", "data"])
    assert outputs_line(tmp_path) == f"outputs: {tmp_path}/compare.json, compare.md, tradeoff.png, data/, slug/"
    odd = tmp_path / "a\nb"  # `--out $'a\nb'` split the line (fifth trial)
    odd.mkdir()
    (odd / "result.json").write_text("x")
    assert outputs_line(odd) == f"outputs: {tmp_path}/a\\nb/result.json"
    accented = tmp_path / "résumé"  # printable: shown as is (ascii() wrote r\xe9sum\xe9; eighth trial)
    accented.mkdir()
    (accented / "result.json").write_text("x")
    assert outputs_line(accented) == f"outputs: {accented}/result.json"


def test_report_says_when_a_downstream_search_chose_the_layers():
    """A T2I/VLM run's layer table lists the CLIP side's candidates: under "Why this layer" a reader took the
    unedited candidates for the edit."""
    from slugkit.report.unlearn import _why_heading

    assert _why_heading({"layer": "visual.proj"}) == ["## Why this layer", ""]
    two = {"layer": "a", "layers_edited": [{"layer": "a", "round": 1}, {"layer": "b", "round": 2}],
           "chooser": {"rounds": [{"round": 1, "generator_search": {"layers": []}}, {"round": 2}]}}
    text = "\n".join(_why_heading(two))
    assert text.startswith("## The CLIP search over the candidate layers")
    assert "(`a`, `b`)" in text and "the generated images" in text
    one = {"layer": "c", "chooser": {"vlm_search": {"layers": []}}}
    assert "(`c`)" in "\n".join(_why_heading(one)) and "the VLM's answers" in "\n".join(_why_heading(one))


def test_vlm_search_lines_say_where_a_search_without_a_clip_step_started():
    """The VLM report printed `(CLIP step None)` for a layer the VLM gradient searched (fifteenth trial)."""
    from slugkit.report.vlm import _search_lines

    row = {"step_size": 0.5, "target_recognised": 0.0, "other_drop": 0.01, "accepted": True}
    lines = _search_lines([{"layer": "a", "clip_step_size": None, "start_step": 1.25, "trajectory": [row]},
                           {"layer": "b", "clip_step_size": 2.0, "start_step": 2.0, "trajectory": [row]}])
    assert lines[0].startswith("- VLM step search on `a` (no CLIP step; started at 1.25): 0.5: named 0.00")
    assert lines[1].startswith("- VLM step search on `b` (CLIP step 2): ") and "None" not in "".join(lines)


def test_the_vlm_report_says_what_its_search_counted_as_naming_the_target():
    """With the name margin (``--vlm-name-prob``) the search's rows count "named or likely", and the report and
    console say so; without it, that the answers alone were counted (verification 55: "named 0.10" read as answers,
    and an ``off`` run said nothing)."""
    from slugkit.report.vlm import _search_lines, search_criterion

    row = {"step_size": 0.5, "target_recognised": 0.1, "other_drop": 0.01, "accepted": False}
    layer = [{"layer": "a", "clip_step_size": 1.0, "trajectory": [row]}]
    assert ": named or likely 0.10" in _search_lines(layer, likely=True)[0]
    margin = {"rounds": [{"vlm_search": {"name_prob": 0.1}}, {"vlm_search": {"name_prob": 0.1}}]}
    assert "summed probability >= 0.1" in search_criterion(margin)
    assert "answer names it (`--vlm-name-prob off`)" in search_criterion({"vlm_search": {"name_prob": None}})


def test_a_group_edit_names_every_tensor_it_changed():
    """An MLP edit changes fc1 and fc2 (one group); the summary line and report.md's head named fc2 alone (trial 26)."""
    from slugkit.report.unlearn import downstream_head, edit_label

    g = ["vision_model.encoder.layers.2.mlp.fc1.weight", "vision_model.encoder.layers.2.mlp.fc2.weight"]
    result = {"layer": g[1], "group": g, "step_size": 11.72, "relative_change": 0.229, "verdict": {"status": "pass"}}
    assert edit_label(result) == f"{g[0]} + {g[1]} (step 11.72, relative change 0.229 of fc2)"  # which (v. 67)
    assert f"applied step 11.72 on `{g[0]} + {g[1]}`" in downstream_head(result, "the VLM's answers", "VLM", "search")
    one = {**result, "layer": "visual.proj", "group": ["visual.proj"]}
    assert edit_label(one) == "visual.proj (step 11.72, relative change 0.229)"
    # trial 43: a q/k/v edit's headline gave q_proj's 0.032 while v_proj changed by 0.172; the largest is said too
    qkv = [f"text_model.encoder.layers.3.self_attn.{p}_proj.weight" for p in "qkv"]
    e = {"layer": qkv[0], "group": qkv, "step_size": 3.866, "relative_change": 0.032, "round": 1, "why": "w"}
    res = {**result, "layers_edited": [{**e, "relative_change_max": 0.172, "relative_change_max_tensor": qkv[2]}]}
    assert edit_label(res).endswith("(step 3.866, relative change 0.032 of q_proj; largest: v_proj 0.172)")
    res = {**result, "layers_edited": [{**e, "relative_change_max": 0.032, "relative_change_max_tensor": qkv[0]}]}
    assert edit_label(res).endswith("(step 3.866, relative change 0.032 of q_proj)")
    # verification 67: a two-layer edit's banner gave the first layer's step for both
    two = {**result, "layers_edited": [{**e, "layer": "a.weight", "group": ["a.weight"], "step_size": 9.497},
                                       {**e, "layer": "b.weight", "group": ["b.weight"], "step_size": 19.91}]}
    assert "applied step 9.497 on `a.weight`, then step 19.91 on `b.weight`)" in downstream_head(
        two, "the generated images", "G", "s")
    # and its protection line claimed the projection for a layer `--null-space-layers all` took in unprojected
    from slugkit.report.unlearn import _protection_lines

    prot = {"k": 10, "neighbours": [{"concept": "red circle", "pairs": 5}], "groups": {"a.weight": {"rank": 10}}}
    said = " ".join(_protection_lines({**two, "neighbour_protection": prot}))
    assert "projected on the Pareto layers (`a.weight`) only; the edited `b.weight` is not among them" in said
    assert "not among them" not in " ".join(_protection_lines({**two, "layers_edited": two["layers_edited"][:1],
                                                               "neighbour_protection": prot}))


def test_a_verdict_with_the_worst_drop_check_off_says_so():
    """Trial 44: `--worst-budget off` gave a bare "verdict: pass" beside Hasa Malwick 1.00 → 0.42."""
    from slugkit.report.unlearn import verdict_lines

    v = {"status": "pass", "reasons": [], "budgets": {"worst_drop": 1.0}}
    assert verdict_lines(v) == ["verdict: pass", "note: the worst single-concept drop was not checked "
                                                 "(--worst-budget off); see the collateral above"]
    assert verdict_lines({**v, "budgets": {"worst_drop": 0.2}}) == ["verdict: pass"]


def test_a_selection_that_never_met_the_rule_is_marked():
    """Trial 46: SSD's joint cell "15/16 (α 1, λ 0.2)" read like the rows that met the rule (validation FA@5 = 0),
    though its minimum was 0.05; FT (the control) likewise."""
    from slugkit.report.compare import _epoch_cell

    grid = {"epochs": [{"epoch": 1, "alpha": 1, "lambda": 0.2, "val": {"forget_top5": 0.05, "forget_top1": 0.0}}],
            "selected_epoch": 1}
    assert _epoch_cell("ssd", grid) == "1/1 (α 1, λ 0.2; rule not met: validation FA@5 0.05)"
    assert _epoch_cell("ssd", grid, "forget_top1") == "1/1 (α 1, λ 0.2)"  # the paper's FA@1 rule: met
    met = {"epochs": [{"epoch": 1, "val": {"forget_top5": 0.0}}], "selected_epoch": 1, "config": {"lr": 1e-4}}
    assert _epoch_cell("gaft", met) == "1/1 (lr 1e-4)"


def test_the_headline_names_every_edited_layer_and_never_a_fine_tunes_step():
    """A two-layer SLUG run's console headline named its first layer only; a fine-tune's said "(step 1)"."""
    from slugkit.report.fallback import edited_phrase

    two = {"group": ["b.q", "b.k"], "step_size": 52.57, "layers_edited": [
        {"group": ["b.q", "b.k"], "step_size": 52.57, "round": 2}, {"group": ["a.out"], "step_size": 0.733}]}
    said = edited_phrase(two, "of its CLIP vision tower")
    assert said == ("b.q, b.k (step 52.57) + a.out (step 0.733) of its CLIP vision tower (2 layers: no single layer "
                    "forgot within the budgets)")
    assert edited_phrase({"group": ["x"], "step_size": 3.0}, "of it") == "x (step 3) of it"
    ft = {"method": "layer-finetune", "group": ["f1", "f2"], "step_size": 1.0,
          "layers_edited": [{"group": ["f1", "f2"], "step_size": 1.0}]}
    assert edited_phrase(ft, "of it") == "f1, f2 (the fine-tuned values, not a SLUG step) of it"


def test_the_apply_hint_names_the_model_the_run_was_judged_on_and_quotes_the_folder():
    """The console's apply command after the outputs line, to paste as printed: the pipeline for a text-to-image run
    (it printed none), LLaVA for a VLM run, the model the run used and a new folder beside the run's, quoted for a
    shell (it named SD_DIR and DIR, and failed when pasted: verification 64); placeholders only where the result does
    not say the model (a result from before the field), and said."""
    from slugkit.report.search_lines import apply_command, apply_hint

    assert apply_hint({"target": "sd", "pipeline": {"model": "embedded"}}, "my runs/r/") == (
        "apply the patch: slug apply --pipeline embedded --patch 'my runs/r/patch' --out 'my runs/r-pipeline'")
    assert apply_hint({"target": "vlm", "vlm_model": "/m/my vlm"}, "r") == (
        "apply the patch: slug apply --llava '/m/my vlm' --patch r/patch --out r-vlm")
    assert apply_hint({"target": "sd"}, "r") == (
        "apply the patch: slug apply --pipeline SD_DIR --patch r/patch --out r-pipeline (SD_DIR: the pipeline's "
        "folder, embedded for the shipped one)")
    assert apply_command({"target": "sd", "pipeline": {"model": "embedded"}}) == (
        "`slug apply --pipeline embedded --patch patch/ --out DIR` (DIR: a new folder for the patched copy)")
    # a result that says VLM only by its search record gets the LLaVA form and a -vlm folder, as the console's does
    assert apply_hint({"chooser": {"vlm_search": {}, "rounds": [{"vlm_search": {"layers": []}}]}, "vlm_model": "m"},
                      "r") == "apply the patch: slug apply --llava m --patch r/patch --out r-vlm"
    assert apply_hint({"chooser": {}}, "r") == "apply the patch: slug apply --patch r/patch ..."


def test_a_downstream_reports_clip_section_says_its_verdict_is_the_clip_used_on_its_own():
    """Under a run judged on the pipeline or the VLM, the CLIP section's verdict is labelled the CLIP's, used on its
    own, and a broken CLIP's "do not ship this patch" no longer contradicts the run's warn (verification 64)."""
    from slugkit.report.unlearn import clip_section

    text = ("# SLUG unlearning report: x\n\n**verdict: fail**\n- fail: utility (TA_IN@1) accuracy dropped 0.996 -> "
            "0.831 (drop 0.165, more than 0.1 = 5 × the budget): the edit broke the model; do not ship this patch\n")
    out = clip_section(text)
    assert "**the CLIP's own verdict, used on its own (not this run's, see above): fail**" in out
    assert "do not ship" not in out and "do not use the patched CLIP on its own" in out
    # its apply command names the model the downstream run used (written before the run recorded it)
    text += ("Apply it: `slug apply --pipeline SD_DIR --patch patch/ --out DIR` (SD_DIR: the pipeline's folder, "
             "`embedded` for the shipped one; DIR: a new folder for the patched copy) or `slugkit.apply_patch(…)`")
    out = clip_section(text, {"target": "sd", "pipeline": {"model": "/p/my sd"}})
    assert ("Apply it: `slug apply --pipeline '/p/my sd' --patch patch/ --out DIR` (DIR: a new folder for the patched "
            "copy) or `slugkit.apply_patch(…)`") in out and "SD_DIR" not in out


def test_a_downstream_banner_gives_the_runs_reasons_and_whose_they_are():
    """Verification 66: report.md's banner said "This run's verdict is the generated images': warn" and no reason
    (they were on the console and in result.json only), and said so when the only reason was the CLIP's own utility,
    with the images passing every check. The banner now lists the reasons, and says when all are the CLIP's; an audit
    folded in later rewrites them (:func:`slugkit.workflows.audit_fold._report_head`)."""
    from slugkit.report.unlearn import downstream_head, verdict_lines
    from slugkit.workflows.audit_fold import _report_head

    clip = {"severity": "warn", "code": "utility_drop", "on": "clip",
            "message": "CLIP zero-shot, the text encoder on its own: utility (TA_IN@1) accuracy dropped 0.996 -> 0.914"}
    images = {"severity": "warn", "code": "worst_drop", "message": "'cyan circle' dropped 0.300 (0.900 -> 0.600)"}
    result = {"layer": "a", "group": ["a"], "step_size": 2.0, "verdict": {"status": "warn", "reasons": [clip]}}
    head = downstream_head(result, "the generated images", "Generated images", "generator search")
    lines = head.split("\n")
    assert lines[0].startswith("> **This run's verdict, judged on the generated images: warn** (section")
    assert lines[1] == f"> - warning: {clip['message']}"
    assert lines[2] == "> - The generated images pass every check of their own: the warning is the CLIP's, used on " \
                       "its own."
    assert lines[3] == ">" and lines[4].startswith("> The CLIP sections that follow")
    both = downstream_head({**result, "verdict": {"status": "warn", "reasons": [images, clip]}},
                           "the VLM's answers", "VLM", "VLM search")
    assert f"> - warning: {images['message']}\n> - warning: {clip['message']}\n>\n" in both
    assert "pass every check" not in both
    passed = downstream_head({**result, "verdict": {"status": "pass", "reasons": []}}, "the generated images", "G", "s")
    assert passed.split("\n")[1] == ">"
    # an audit folded in: the status and the reason lines are rewritten, the rest kept
    audit = {"severity": "warn", "code": "audit_warn", "message": "the audit says the removal may not hold"}
    body = "# SLUG unlearning report: x\n"
    for text in (head, passed):
        out = _report_head(text + body, {"status": "warn", "reasons": [clip, audit]}, verdict_lines)
        assert out.startswith("> **This run's verdict, judged on the generated images: warn** (section")
        assert f"> - warning: {clip['message']}\n> - warning: {audit['message']}\n>\n> The CLIP sections" in out
        assert out.count("pass every check") == 0 and out.endswith(body)
