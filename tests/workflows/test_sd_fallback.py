"""``slug demo --target sd --sd-fallback finetune``: the labelled one-layer fine-tune (not SLUG) when every SLUG
round refuses (:mod:`slugkit.workflows.sd_layer_ft`, :mod:`slugkit.workflows.layer_ft`)."""

import json

import pytest

torch = pytest.importorskip("torch")

FC1 = "text_model.encoder.layers.{}.mlp.fc1.weight"
ATTENTION = [f"text_model.encoder.layers.2.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "out")]


def test_fallback_groups_are_layer_2s_attention_then_fc1_of_layers_2_and_3():
    from slugkit.workflows.sd_layer_ft import fallback_groups

    names = [f"{tower}.encoder.layers.{i}.{t}" for tower in ("text_model", "vision_model") for i in range(4)
             for t in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.q_proj.weight",
                       "self_attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")]
    assert fallback_groups(names) == [ATTENTION, [FC1.format(2)], [FC1.format(3)]]  # the text tower's only
    assert fallback_groups([n for n in names if "layers.2" not in n]) == [[FC1.format(3)]]
    assert fallback_groups([n for n in names if "out_proj" not in n])[0] == [FC1.format(2)]  # a group only whole
    assert fallback_groups(["text_model.encoder.layers.0.mlp.fc1.weight"]) == []  # none: nothing to try


def _pipe():
    from slugkit.workflows.sd_demo import _clip_and_pipeline

    return _clip_and_pipeline(None)


def test_the_fine_tune_is_deterministic_restores_the_encoder_and_moves_only_its_linear():
    from slugkit.patch import tensor_sha256
    from slugkit.workflows.sd_layer_ft import finetune_conditioning

    adapter, pipe, mapping, judge = _pipe()
    te = pipe.text_encoder
    before = {n: tensor_sha256(p) for n, p in te.named_parameters()}
    flags = {n: p.requires_grad for n, p in te.named_parameters()}
    name = mapping[FC1.format(2)]
    params = {name: dict(te.named_parameters())[name]}
    kw = dict(steps=3, lr=0.05, n_forget=4, batch=2, gen_steps=4, progress=False)
    a = finetune_conditioning(pipe, params, "red triangle", **kw)
    b = finetune_conditioning(pipe, params, "red triangle", **kw)
    assert {n: tensor_sha256(p) for n, p in te.named_parameters()} == before  # restored bit for bit
    assert {n: p.requires_grad for n, p in te.named_parameters()} == flags
    assert list(a["delta"]) == [name] and torch.equal(a["delta"][name], b["delta"][name])  # deterministic
    assert a["relative_change"][name] > 0 and a["final_loss"] == b["final_loss"]
    assert a["data"]["retain_prompts"] == 29 * 8 + 1
    # the edit moves the concept's text states more than the others' (what the two losses ask for)
    from slugkit.slug.search import written

    ids_t = pipe.tokenize(["a red triangle"])
    ids_o = pipe.tokenize(["a blue circle"])
    with torch.no_grad():
        h_t, h_o = te(input_ids=ids_t).last_hidden_state, te(input_ids=ids_o).last_hidden_state
        with written(te, {name: name}, {name: params[name].detach() + a["delta"][name]}):
            s_t = (te(input_ids=ids_t).last_hidden_state - h_t).norm() / h_t.norm()
            s_o = (te(input_ids=ids_o).last_hidden_state - h_o).norm() / h_o.norm()
    assert s_t > s_o
    for bad in ({"steps": 0}, {"n_forget": 0}, {"eta": -1.0}):
        with pytest.raises(ValueError, match="finetune_conditioning"):
            finetune_conditioning(pipe, params, "red triangle", **{**kw, **bad})
    with pytest.raises(ValueError, match="no parameters"):
        finetune_conditioning(pipe, {}, "red triangle", **kw)
    assert {n: tensor_sha256(p) for n, p in te.named_parameters()} == before

    class Interrupted(torch.optim.Adam):  # a run stopped mid-way (an error, Ctrl-C) leaves the encoder as it was
        def step(self, *a, **k):
            super().step(*a, **k)
            raise KeyboardInterrupt

    from slugkit.workflows import sd_layer_ft

    sd_layer_ft.torch.optim.Adam, adam = Interrupted, torch.optim.Adam
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune_conditioning(pipe, params, "red triangle", **kw)
    finally:
        sd_layer_ft.torch.optim.Adam = adam
    assert {n: tensor_sha256(p) for n, p in te.named_parameters()} == before
    assert {n: p.requires_grad for n, p in te.named_parameters()} == flags


@pytest.mark.slow
def test_a_refused_slug_run_passed_by_the_fine_tune_is_labelled_so(tmp_path, monkeypatch, capsys):
    """End to end with the real fine-tune (3 steps at a large rate), SLUG's generator search made to refuse and the
    collateral budgets open: result.json, the patch, the report and the console say ``layer-finetune``; the patch
    holds the fine-tuned values of one group (layer 2's attention, or one Linear)."""
    from slugkit.cli import main
    from slugkit.patch import load_patch
    from slugkit.workflows import sd_generator, sd_layer_ft
    from slugkit.world.demo_data import ensure_world_data

    monkeypatch.setattr(sd_generator, "generator_step_search", lambda *a, **k: ([], None))
    for k, v in {"FT_STEPS": 10, "FT_LR": 0.02, "FT_ETA": 3.0, "N_FORGET": 4, "BATCH": 2}.items():
        monkeypatch.setattr(sd_layer_ft, k, v)  # a fine-tune of seconds that halves the concept (measured)
    out = tmp_path / "ft"
    rc = main(["demo", "--target", "sd", "--sd-fallback", "finetune", "--out", str(out), "--data-dir",
               str(ensure_world_data(None, progress=False)), "--no-progress", "--n-target", "8", "--n-other", "1",
               "--gen-steps", "10", "--val-images", "8", "--other-budget", "1", "--n-neighbour", "3",
               "--val-neighbour", "3", "--neighbour-budget", "1", "--worst-budget", "off", "--gen-threshold", "0.6"])
    res = json.loads((out / "result.json").read_text())
    assert rc == {"pass": 0, "warn": 3, "fail": 4}[res["verdict"]["status"]]
    fb = res["chooser"]["fallback"]
    tried = fb["tried"]
    assert [t["group"] for t in tried] == [ATTENTION, [FC1.format(2)], [FC1.format(3)]][:len(tried)]  # in turn
    assert [t["accepted"] for t in tried] == [False] * (len(tried) - 1) + [True]
    assert all(t["target_recognised"] > 0.6 for t in tried[:-1]) and tried[-1]["target_recognised"] <= 0.6
    assert res["method"] == "layer-finetune" and res["layer"] == fb["accepted"] == tried[-1]["layer"]
    assert res["step_size"] == 1.0 and res["group"] == tried[-1]["group"] and fb["steps"] == 10
    assert res["chooser"]["policy"].startswith("SLUG refused; one-layer fine-tune")
    assert "not SLUG" in res["layers_edited"][0]["why"] and len(res["layers_edited"]) == 1
    patch = load_patch(out / "patch")
    assert patch.meta["method"] == "layer-finetune" and "not SLUG" in patch.meta["extra"]["edit"]
    assert patch.names == sorted(res["group"])  # the one group, at the fine-tuned values
    for n in patch.names:
        moved = float((patch.patched[n] - patch.original[n]).norm() / patch.original[n].norm())
        assert abs(moved - tried[-1]["relative_change"][n]) < 1e-4 * max(moved, 1)
    report = (out / "report.md").read_text()
    assert "**Not SLUG: method layer-finetune.**" in report.split("## ")[0]  # at the top, before any section
    assert "(`--sd-fallback finetune`)" in report and f"fine-tuned `{' + '.join(res['group'])}`" in report
    top = max(tried[0]["relative_change"], key=tried[0]["relative_change"].get)  # the attention, tried first
    assert f"` (largest relative change {tried[0]['relative_change'][top]:.3g}, {top.split('.')[-2]}, " in report
    assert "method: A one-layer fine-tune (NOT SLUG: SLUG's search refused; --sd-fallback finetune)" in report
    assert "Applied step" not in report and "Cost of the whole run: SLUG + the fine-tune" in report
    # SLUG's CLIP search of the fine-tuned layer is not presented as the applied step (verification 60)
    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and "**(edited" in ln]  # the CLIP table's
    assert all("not this row's step" in ln for ln in rows)
    trajectory = report.split("## Search trajectory of the first edited layer")[1].split("## ")[0]
    assert "| # | η |" not in trajectory or "**None of these steps was applied**" in trajectory
    said = capsys.readouterr().out
    assert "\nA one-layer fine-tune (NOT SLUG: SLUG's search refused; --sd-fallback finetune) unlearned" in said
    assert "(the fine-tuned values, not a SLUG step) of its CLIP text encoder" in said
    assert "time: SLUG + the fine-tune" in said and "Apply it: `slug apply --pipeline embedded --patch patch/" in report
    # the console's apply command runs as printed (it had none; then it named SD_DIR and DIR: verification 64)
    hint = f"apply the patch: slug apply --pipeline embedded --patch {out}/patch --out {out}-pipeline"
    assert hint in said
    assert main(hint.split()[4:]) == 0 and (tmp_path / f"{out.name}-pipeline" / "slugkit_patch.json").is_file()
    assert "applied on the embedded text-to-image pipeline's text encoder; wrote" in capsys.readouterr().out  # (v. 66:
    # "applied on embedded's text encoder")    # report.md's, to paste in the run folder (it said --out DIR: verification 65)
    assert "Apply it: `slug apply --pipeline embedded --patch patch/ --out ../ft-pipeline` in this folder" in report
    # the run folder itself as --out is refused as one (it said "holds files slug did not write": verification 65)
    capsys.readouterr()
    assert main(["apply", "--pipeline", "embedded", "--patch", str(out / "patch"), "--out", str(out)]) == 2
    assert "is a slug run folder; write the pipeline outside that run" in capsys.readouterr().err
    assert "SLUG's own refusal, before the fine-tune: " in report and "(no patch)" not in report
    assert json.loads((out / "run.json").read_text())["sd"]["fallback"] == "finetune"


def _constructed(monkeypatch, forgets: str | None, progress: bool = False):
    """The constructed two-round case of ``test_sd_rounds`` (SLUG's steps cannot forget within the budgets, a second
    layer neither) with the fine-tune faked: it moves its Linear by half its norm, and the stand-in generator stops
    drawing the concept when the Linear ``forgets`` has moved (None: none does)."""
    from test_sd_rounds import _cfg, _setup

    from slugkit.slug.search import SearchFailed  # noqa: F401
    from slugkit.workflows import sd_layer_ft
    from slugkit.workflows.sd_demo import embedded_hf_adapter

    ad = embedded_hf_adapter()
    sg, pipe, mapping, base, stages, kw, first, _ = _setup(ad, monkeypatch, harm_b=3.0)
    monkeypatch.setattr(ad, "candidate_names", lambda: [n for n, _ in ad.model.named_parameters()
                                                        if n.startswith("text_model.encoder.layers.")])
    slug_recognition = sg.t2i.recognition
    unedited = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters() if "fc1.weight" in n}

    def recognition(pipe_, judge, plan, *args, **kw_):
        rec, _, _ = slug_recognition(pipe_, judge, plan)
        if forgets is not None and not torch.equal(dict(pipe.text_encoder.named_parameters())[forgets],
                                                   unedited[forgets]):
            rec = {c: 0.0 if c == "red triangle" else r for c, r in rec.items()}
        return rec, None, None

    monkeypatch.setattr(sg.t2i, "recognition", recognition)
    calls = []

    def fake(pipe_, params, target, **k):
        calls.append((list(params), k["steps"]))
        return {"delta": {n: -0.5 * p.detach().clone() for n, p in params.items()},
                "relative_change": {n: 0.5 for n in params}, "final_loss": {"forget": 0.1, "retain": 0.01},
                "train_s": 0.0, "data": {}}

    monkeypatch.setattr(sd_layer_ft, "finetune_conditioning", fake)
    chooser = sg.generator_chooser("red triangle", pipe, None, mapping, max_layers=2, fallback="finetune",
                                   progress=progress, **kw)
    return ad, pipe, base, stages, first, chooser, calls, _cfg(2)


def test_every_refused_slug_round_then_the_fine_tune_in_turn_on_the_unedited_model(monkeypatch):
    from slugkit.workflows.rounds import generator_rounds

    ad, pipe, base, stages, first, chooser, calls, cfg = _constructed(monkeypatch, FC1.format(3))
    edits, info = generator_rounds(cfg, ad, {"val_suite": None}, first, {}, chooser, stages)
    assert [c[0] for c in calls] == [ATTENTION, [FC1.format(2)], [FC1.format(3)]]  # in turn; layer 3's fc1 forgets
    assert len(edits) == 1 and edits[0].search.name == FC1.format(3) and edits[0].search.group == [FC1.format(3)]
    assert edits[0].search.step_size == 1.0 and abs(edits[0].search.step_size / edits[0].search.ratio - 0.5) < 1e-6
    w = dict(ad.model.named_parameters())[FC1.format(3)].detach()
    assert torch.equal(edits[0].grads.forget[FC1.format(3)], 0.5 * w)  # θ − 1·g = the fine-tuned value, θ/2
    assert info["edit_method"] == "layer-finetune" and "not SLUG" in edits[0].why and info["step_size"] == 1.0
    assert info["refusal"].startswith("2 rounds of layer edits did not forget") and len(info["rounds"]) == 2
    assert [t["accepted"] for t in info["fallback"]["tried"]] == [False, False, True]
    # every SLUG edit was taken back before the fine-tune: the pipeline is the unedited one again
    assert all(torch.equal(dict(pipe.text_encoder.named_parameters())[n], v) for n, v in base.items())
    # the report: SLUG's rounds were tried, their partial step is not in the patch, the fine-tune is the edit
    from slugkit.report.sd import render_generation_report
    from slugkit.workflows.sd_generator import generation_metrics
    from slugkit.world import t2i

    g = {k: {**generation_metrics({c: 0.9 for c in t2i.concept_names()}, "red triangle"), "clip_score": 70.0}
         for k in ("before", "after")}
    md = render_generation_report({
        "generation": {**g, "collateral": None, "images": {"target": 2, "per_other_concept": 1, "other_concepts": 29,
                                                            "sampler": "DDIM 4 steps"}},
        "method": "layer-finetune", "step_size": 1.0, "chooser": {**info, "gen_margin": 1.0},
        "layers_edited": [e.to_json() for e in edits]})
    part = info["rounds"][0]["partial_step"]
    assert f"partial step {part['applied_step']:.4g} of {part['layer']} tried (not in the patch)" in md
    assert "No step above was accepted (2 rounds of SLUG), so the edit is the fine-tune below" in md
    assert f"- fine-tuned `{FC1.format(3)}` (relative change 0.5" in md and "(accepted)" in md
    assert "Applied step" not in md and " kept |" not in md


def test_a_fine_tune_that_fails_too_refuses_with_every_try(monkeypatch, capsys):
    from slugkit.slug.search import SearchFailed
    from slugkit.workflows.rounds import generator_rounds

    ad, pipe, base, stages, first, chooser, calls, cfg = _constructed(monkeypatch, None, progress=True)  # its lines
    with pytest.raises(SearchFailed, match=r"2 rounds of layer edits .*the one-layer fine-tune \(--sd-fallback "
                                           r"finetune, step 1 = the fine-tuned values\) did not pass either: "
                                           r"layers\.2\.self_attn\.q_proj\.weight \+ layers\.2\.self_attn\.k_proj"
                                           r"\.weight \+ .*out_proj\.weight step 1: concept recognised 1\.00.*"
                                           r"layers\.2\.mlp\.fc1\.weight step 1: .*layers\.3\.mlp\.fc1\.weight") as err:
        generator_rounds(cfg, ad, {"val_suite": None}, first, {}, chooser, stages)
    assert len(err.value.info["fallback"]["tried"]) == 3 and "accepted" not in err.value.info["fallback"]
    # each try says which it is and why it was not accepted (every one began "SLUG refused:", none said the outcome)
    said = capsys.readouterr().err
    assert said.count("SLUG refused: fine-tune 1 of 3 (not SLUG): ") == 1
    assert "fine-tune 3 of 3 (not SLUG), as fine-tune 2 was not accepted: text_model.encoder.layers.3.mlp.fc1" in said
    assert said.count("not accepted: the concept is still recognised") == 3
    # each try's validation line names the fine-tuned values (it read "step 1:", a step no search measured)
    assert said.count("  the fine-tuned values: concept recognised 1.00") == 3 and "  step 1: concept" not in said
    import re  # a zero change read "-0.00" (verification 66)

    assert re.search(r"\+0\.0+(?![0-9])", said) and not re.search(r"-0\.0+(?![0-9])", said)
    assert all(torch.equal(dict(pipe.text_encoder.named_parameters())[n], v) for n, v in base.items())


def test_the_fallback_is_refused_where_it_could_not_run(tmp_path, capsys):
    from slugkit.cli import main
    from slugkit.workflows.sd_demo import run_sd_demo
    from slugkit.workflows.sd_generator import generator_chooser

    with pytest.raises(ValueError, match="fallback"):
        generator_chooser("red triangle", None, None, {}, fallback="retrain")
    for bad in ({"fallback": "retrain"}, {"fallback": "finetune", "gen_search": False}):
        with pytest.raises(ValueError, match="fallback"):
            run_sd_demo("red triangle", tmp_path / "r", **bad)
    cases = [(["--target", "sd", "--sd-fallback", "finetune", "--no-gen-search"], "--sd-fallback: option(s) of the "
              "search on generated images, which --no-gen-search turns off"),
             (["--target", "vlm", "--sd-fallback", "finetune"], "--sd-fallback: option(s) of --target sd"),
             (["--sd-fallback", "finetune"], "--sd-fallback: option(s) of --target sd")]
    for args, said in cases:
        assert main(["demo", *args, "--out", str(tmp_path / "c")]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()
