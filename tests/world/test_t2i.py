"""The embedded text-to-image stand-in for Stable Diffusion, the exact open_clip -> transformers conversion it rests on,
and `slug demo --target sd` end to end (on the shipped UNet, with few images)."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from slugkit.models.open_clip import OpenClipAdapter  # noqa: E402
from slugkit.world import render as world  # noqa: E402
from slugkit.world import t2i, t2i_train  # noqa: E402


@pytest.fixture(scope="module")
def embedded_hf():
    from slugkit.models.convert import embedded_hf_clip

    return embedded_hf_clip()


def test_conversion_is_exact(embedded_hf):
    hf, tok, cfg = embedded_hf
    oc = OpenClipAdapter.load("embedded")
    texts = ["a photo of a red circle.", f"a photo of {world.IDENTITIES[3].name}.", "a circle that is red.", ""]
    ids = tok(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")["input_ids"]
    ref = oc.tokenize(texts)
    for r, i in zip(ref, ids):  # same ids up to the end of text (open_clip pads with 0, OpenAI/HF with EOT)
        n = int((r == 49407).nonzero()[0]) + 1
        assert r[:n].tolist() == i[:n].tolist()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from slugkit.models.hf_clip import features

        torch.testing.assert_close(features(hf.get_text_features(input_ids=ids)), oc.model.encode_text(ref),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features(hf.get_image_features(pixel_values=x)), oc.model.encode_image(x),
                                   atol=1e-5, rtol=1e-5)
    assert hf.logit_scale.item() == oc.model.logit_scale.item()


def test_conversion_refuses_resnet_towers():
    from slugkit.models.convert import hf_config_from_open_clip

    with pytest.raises(ValueError, match="ViT"):
        hf_config_from_open_clip({"embed_dim": 32, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 16},
                                  "text_cfg": {"layers": 1, "width": 32, "heads": 2}})


TINY = dict(block_out_channels=(8, 16, 16), steps=3, batch_size=8, train_per_class=2, warmup=1)


def test_training_is_deterministic_and_writes_atomically(tmp_path):
    a, info_a = t2i_train.train_t2i(t2i.T2IConfig(**TINY), progress=False)
    b, _ = t2i_train.train_t2i(t2i.T2IConfig(**TINY), progress=False)
    assert t2i_train._unet_bytes(a) == t2i_train._unet_bytes(b)
    assert info_a["steps_done"] == 3
    t2i_train._write_unet(tmp_path, a, t2i.T2IConfig(**TINY), info_a)
    meta = json.loads((tmp_path / t2i.CONFIG_FILE).read_text())
    assert meta["unet"]["cross_attention_dim"] == 64 and meta["info"]["steps_done"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_pipeline_generation_is_seeded(embedded_hf):
    hf, tok, _ = embedded_hf
    pipe = t2i.EmbeddedT2IPipeline.load(clip=(hf, tok))  # the shipped UNet
    x1 = pipe(["a red circle.", "a blue star."], [1, 2], steps=2)
    x2 = pipe(["a red circle.", "a blue star."], [1, 2], steps=2)
    x3 = pipe(["a red circle.", "a blue star."], [1, 3], steps=2)
    assert x1.dtype == torch.uint8 and x1.shape == (2, 3, 32, 32)
    assert torch.equal(x1, x2) and torch.equal(x1[0], x3[0]) and not torch.equal(x1[1], x3[1])
    with pytest.raises(ValueError, match="seeds"):
        pipe(["a"], [1, 2])


def test_generation_plan_and_concepts():
    plan = t2i.generation_plan("red triangle", 5, 2)
    assert sum(c == "red triangle" for c, _, _ in plan) == 5 and len(plan) == 5 + 29 * 2
    assert len({s for _, _, s in plan}) == len(plan)  # one seed per image
    assert all(c.split()[0] in p and c.split()[1] in p for c, p, _ in plan)
    with pytest.raises(ValueError, match="unknown concept"):
        t2i.concept_by_name("Jowen Gormere")


def test_shipped_unet_draws_recognisable_concepts(embedded_hf):
    """Base quality of the shipped generator, measured on a few seeds (the full figure is in the README)."""
    hf, tok, _ = embedded_hf
    pipe = t2i.EmbeddedT2IPipeline.load(clip=(hf, tok))
    rec, _, _ = t2i.recognition(pipe, t2i.ConceptJudge(), t2i.generation_plan(None, 0, 3))
    assert sum(rec.values()) / len(rec) >= 0.5


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    from slugkit.cli import main

    tmp = tmp_path_factory.mktemp("sd")
    out = tmp / "run"
    from slugkit.world.demo_data import ensure_world_data

    world_dir = ensure_world_data(None, progress=False)  # the shared world cache: its own copy cost ~11 s
    rc = main(["demo", "--target", "sd", "--out", str(out), "--data-dir", str(world_dir), "--no-progress",
               "--n-target", "8", "--n-other", "1", "--gen-steps", "10", "--val-images", "8",
               "--other-budget", "0.2", "--n-neighbour", "3", "--val-neighbour", "3", "--neighbour-budget", "0.4",
               "--worst-budget", "off"])  # 1 image per other concept: a single-concept drop here is noise
    assert rc == 0
    return out


@pytest.mark.slow
def test_demo_target_sd_end_to_end(sd_run):
    out = sd_run
    r = json.loads((out / "result.json").read_text())
    assert r["target"] == "sd" and r["concept"] == "red triangle"
    # the edit is on text-encoder layers the pipeline consumes (a q/k/v or fc1/fc2 group moves together)
    assert all(n.startswith("text_model.encoder.layers.") for n in r["group"])
    assert r["patch"]["tensors"] == r["group"]
    g = r["generation"]
    for k in ("before", "after"):
        assert {"generated_target_recognised", "generated_other_recognised", "clip_score", "UA", "IRA"} <= set(g[k])
    assert g["after"]["generated_target_recognised"] < g["before"]["generated_target_recognised"]
    assert r["chooser"]["conditioning_shift"] and r["pipeline"]["text_encoder_verified"]
    # issue 12: the worst concept and the 5 nearest neighbours (by the pipeline's text encoder), 3 images each here
    c = g["collateral"]
    assert c["concepts"] == 29 and c["worst"]["concept"] in c["per_concept"]
    nb = c["neighbours"]["concepts"]
    assert len(nb) == 5 and "red triangle" not in [n["concept"] for n in nb]
    assert {"red star", "purple triangle"} <= {n["concept"] for n in nb}
    assert g["images"]["per_neighbour"] == 3 and g["images"]["neighbours"] == 5
    gs = r["chooser"]["generator_search"]
    assert gs["validation_per_neighbour"] == 3 and set(gs["base_neighbour_recognised"]) == {n["concept"] for n in nb}
    assert "worst_drop" in r["verdict"]["budgets"]
    # accepted_step_size is the generator search's accepted step (it was the CLIP search's; eighth trial)
    assert r["step_size"] == pytest.approx(r["accepted_step_size"] * r["chooser"]["gen_margin"], rel=1e-12)
    assert "**worst**" in (out / "report.md").read_text()
    assert (out / "generations.png").read_bytes()[:4] == b"\x89PNG"
    assert "Generated images" in (out / "report.md").read_text()
    # report.md opens with the run's own verdict: the CLIP section's line below it (the CLIP run's) was taken for it
    assert (out / "report.md").read_text().startswith(
        f"> **This run's verdict, judged on the generated images: {r['verdict']['status']}** (section \"Generated "
        "images\"")
    # with its reasons (they were on the console and in result.json only: verification 66)
    for reason in r["verdict"]["reasons"]:
        assert f"> - {'fail' if reason['severity'] == 'fail' else 'warning'}: {reason['message']}\n" in \
            (out / "report.md").read_text()
    # and the CLIP section's own line is labelled as the CLIP run's (a bare "**verdict: fail**": trial 44)
    assert "**verdict: " not in (out / "report.md").read_text()
    assert "**the CLIP's own verdict, used on its own (not this run's, see above): " in (out / "report.md").read_text()
    # the CLIP sections are said to measure the patched CLIP, and what their words mean, before them (verification 64:
    # a fine-tune run's said "the CLIP run the search started from", and the relabelling came after the tables)
    head = (out / "report.md").read_text().split("# ", 1)[0]
    assert "measure the CLIP with this patch applied" in head and '"identities" are the 30 object concepts' in head
    assert f"Cost of the whole run: SLUG {r['timing_s']['slug_total']:.1f} s" in (out / "report.md").read_text()
    # the CLIP and the pipeline are loaded before run_unlearn, whose own load_model read ~0 (it was given them)
    assert 0.01 < r["timing_s"]["load_model"] < r["timing_s"]["slug_total"]
    # judged on the generated images, and the patch carries that verdict (not the CLIP run's)
    assert r["verdict"]["status"] == "pass"
    assert json.loads((out / "patch" / "patch.json").read_text())["extra"]["verdict"] == "pass"
    # and what it was judged on, which `slug inspect` prints beside the CLIP metrics (ninth trial)
    from slugkit.patch import describe, load_patch

    down = json.loads((out / "patch" / "patch.json").read_text())["extra"]["downstream"]
    assert down["concept"] == [g["before"]["generated_target_recognised"], g["after"]["generated_target_recognised"]]
    w = g["collateral"]["worst"]
    assert down["worst_other"] == [w["concept"], w["drop"], w["before"], w["after"]]
    text = describe(load_patch(out / "patch"))  # the drop said as one (1.0 read as "still recognised": 17th trial)
    assert "  judged on:  generated images: concept " in text
    assert f"worst {w['concept']} drop {w['drop']:.2f} ({w['before']:.2f} → {w['after']:.2f})" in text
    # the figures as report.md prints them (a mean drop read "0.003448" here, "0.003" there: verification 65)
    assert f"concept {down['concept'][0]:.2f} → {down['concept'][1]:.2f}, others' mean drop " \
        f"{down['others_mean_drop']:.3f}, worst" in text


def test_demo_target_sd_refuses_identity_concept(tmp_path, capsys):
    from slugkit.cli import main

    assert main(["demo", "--target", "sd", "--concept", "Jowen Gormere", "--out", str(tmp_path / "x")]) == 2
    assert "error: --concept: unknown concept" in capsys.readouterr().err
    # the same kind on the other targets: the message names the option
    assert main(["demo", "--concept", "Nobody Here", "--out", str(tmp_path / "x")]) == 2
    assert "error: --concept: unknown identity 'Nobody Here'" in capsys.readouterr().err
    assert main(["demo", "--target", "vlm", "--concepts", "Jowen Gormere,Nobody", "--out", str(tmp_path / "x")]) == 2
    assert "error: --concepts: unknown identity 'Nobody'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_curate_generate_writes_a_deterministic_forget_shard(tmp_path, capsys):
    from slugkit.cli import main
    from slugkit.data.folders import iter_pairs

    args = ["curate", "--generate", "a red circle.", "--generate", "a photo of a red circle.", "-n", "3",
            "--concept", "red circle", "--gen-steps", "2", "--no-progress"]
    assert main(args + ["--threads", "1", "--out", str(tmp_path / "a")]) == 0  # --threads as eval-sd's (trial 43)
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (tmp_path / "a" / "forget.tar").read_bytes(), (tmp_path / "b" / "forget.tar").read_bytes()
    assert a == b
    pairs = list(iter_pairs(str(tmp_path / "a" / "forget.tar")))
    assert [p.caption for p in pairs] == ["red circle"] * 3 and pairs[0].image.size == (32, 32)
    man = json.loads((tmp_path / "a" / "forget_manifest.json").read_text())
    assert [s["prompt"] for s in man["samples"]] == ["a red circle.", "a photo of a red circle.", "a red circle."]
    # trial 40: the manifest named the run folder's temporary path, and the guidance used as null
    assert man["shard"] == str(tmp_path / "a" / "forget.tar") and man["guidance"] == t2i.DEFAULT_GUIDANCE
    cur = json.loads((tmp_path / "a" / "curate.json").read_text())
    assert (cur["concept"], cur["pipeline"], cur["shard"]) == ("red circle", "embedded", str(tmp_path / "a" /
                                                                                             "forget.tar"))
    assert "warnings" not in cur  # the prompts name the concept
    assert main(["curate", "--generate", "a red circle.", "-n", "1", "--concept", "blue star", "--gen-steps", "2",
                 "--no-progress", "--out", str(tmp_path / "w")]) == 0  # trial 40: captioned "blue star" silently
    assert "warning: no --generate prompt names 'blue star'" in capsys.readouterr().err
    assert main(["curate", "--generate", "a red circle.", "--out", str(tmp_path / "c")]) == 2
    assert "-n" in capsys.readouterr().err
    for extra, said in ((["--generate", "x", "-n", "2", "--shards", "s.tar", "--max-forget", "1"],
                         "--shards, --max-forget: option(s) of `slug curate` from shards"),
                        (["--shards", "s.tar", "--concept", "c", "-n", "2", "--gen-steps", "3", "--threads", "1"],
                         "-n, --gen-steps, --threads: option(s) of `slug curate` with --generate")):
        assert main(["curate", *extra, "--out", str(tmp_path / "d")]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_generator_step_search_finds_the_smallest_forgetting_step():
    from slugkit.workflows.sd_generator import generator_step_search

    calls = []

    def evaluate(eta):  # the generator forgets for eta >= 3.0; the others suffer beyond eta 5.0
        calls.append(eta)
        return (0.0 if eta >= 3.0 else 0.6), (0.2 if eta > 5.0 else 0.0)

    traj, best = generator_step_search(evaluate, start=1.0, steps=8, threshold=0.05, other_budget=0.05)
    assert calls[:3] == [1.0, 2.0, 4.0]  # doubling until accepted, then bisection
    assert 3.0 <= best <= 3.0 * 1.1 and len(traj) == 8
    assert all(t["accepted"] == (3.0 <= t["step_size"] <= 5.0) for t in traj)
    # starting too large: forgot but harmful -> bisect down into the feasible window
    traj, best = generator_step_search(evaluate, start=8.0, steps=6)
    assert traj[0]["accepted"] is False and best is not None and 3.0 <= best <= 5.0
    # never forgets
    _, none = generator_step_search(lambda eta: (1.0, 0.0), start=1.0, steps=3)
    assert none is None
    # harm before forgetting: larger steps cannot help, the search stops at once
    traj, none = generator_step_search(lambda eta: (0.5, 0.3), start=1.0, steps=6)
    assert none is None and len(traj) == 1
    # the official UnlearnCanvas rule: stop at the first accepted step (1, 2, 4: accepted)
    calls.clear()
    traj, best = generator_step_search(evaluate, start=1.0, steps=11, first_accepted=True)
    assert calls == [1.0, 2.0, 4.0] and best == 4.0 and traj[-1]["accepted"]
    # ... from its first step 0.4 R in its bracket [0, 10 x 0.4 R] (spec §4.4): growing bisects towards the bracket's
    # top instead of doubling; forgot-but-harmful halves towards the last step that did not forget
    calls.clear()
    traj, best = generator_step_search(evaluate, start=0.4, steps=11, first_accepted=True, upper=4.0)
    assert calls == pytest.approx([0.4, 2.2, 3.1]) and best == pytest.approx(3.1)
    calls.clear()
    traj, best = generator_step_search(evaluate, start=8.0, steps=11, first_accepted=True, upper=80.0)
    assert calls == [8.0, 4.0] and best == 4.0 and [t["accepted"] for t in traj] == [False, True]


def test_conditioning_shift_is_relative_l2():
    from slugkit.workflows.sd_generator import relative_shift

    h = torch.ones(2, 3, 4)
    assert relative_shift(h, h) == 0.0
    assert abs(relative_shift(h, 1.5 * h) - 0.5) < 1e-6


@pytest.mark.slow
def test_eval_sd_scores_a_pipeline_before_and_after(sd_run, tmp_path, capsys):
    from slugkit.cli import main

    out = tmp_path / "ev"
    rc = main(["eval-sd", "--pipeline", "embedded", "--patch", str(sd_run / "patch"), "--target", "red triangle",
               "--concepts", ",".join(t2i.concept_names()[:6]),
               "--template", "a photo of a {}.",
               "--cross-concepts", "blue star,green cross", "--n-target", "4", "--n-other", "1", "--steps", "5",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "gen_eval.json").read_text())
    # the 5 others are all among the 5 nearest neighbours: 20 images each (issue 12)
    assert r["images"] == {"in_domain": 4 + 5 * 20, "cross_domain": 2, "steps": 5,
                           "guidance": t2i.DEFAULT_GUIDANCE, "per_neighbour": 20}  # the scale used, not null
    assert len(r["collateral"]["neighbours"]["concepts"]) == 5 and r["collateral"]["concepts"] == 5
    for k in ("before", "after"):
        assert {"UA", "IRA", "CRA", "clip_score", "generated_target_recognised"} <= set(r[k])
        assert abs(r[k]["UA"] + r[k]["generated_target_recognised"] - 1) < 1e-9
    assert (out / "generations.png").read_bytes()[:4] == b"\x89PNG"
    assert "UA" in capsys.readouterr().out
    # what was evaluated is recorded (it was not: two patches composed looked like one; fifteenth trial)
    from slugkit.patch import load_patch

    assert r["patches"] == [{"path": str(sd_run / "patch"), "fingerprint": load_patch(sd_run / "patch").fingerprint,
                             "concept": "red triangle"}]
    assert (r["pipeline"], r["seed"], r["template"], r["n_target"]) == ("embedded", 0, "a photo of a {}.", 4)
    args = ["eval-sd", "--pipeline", "embedded", "--patch", str(sd_run / "patch"), "--concepts",
            "blue star,green cross,red circle", "--n-target", "2", "--n-other", "1", "--n-neighbour", "0", "--steps",
            "1", "--no-progress"]
    assert main(args + ["--target", "red triangle", "--out", str(out)]) == 2  # replaced a finished one silently
    assert f"{out} already holds gen_eval.json; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--target", "blue star", "--out", str(tmp_path / "ev2")]) == 0
    err = capsys.readouterr().err  # a target the patch never removed, and one the pipeline never drew: said so
    assert "--target 'blue star' is not the concept of the patch ('red triangle')" in err
    assert "the unpatched pipeline drew 'blue star' recognisably on only 0% of its images" in err
    ev2 = json.loads((tmp_path / "ev2" / "gen_eval.json").read_text())
    assert ev2["images"]["in_domain"] == 2 + 2 and ev2["images"]["per_neighbour"] == 1  # what they got
    assert [w.split(" ")[0] for w in ev2["warnings"]] == ["--target", "the"]  # the JSON read alone said UA 1.000
    # a target not in --concepts is a class of the judge too (it was not: UA 1.000 before and after), and another
    # spelling of a listed one is that one ("Red Circle" ended in KeyError): sixteenth trial
    assert main(args + ["--target", "Red Triangle", "--out", str(tmp_path / "ev3")]) == 0
    assert "note: --target 'Red Triangle' is not in --concepts; the judge classifies over it too (4 classes)" in \
        capsys.readouterr().err
    assert json.loads((tmp_path / "ev3" / "gen_eval.json").read_text())["judge"]["classes"] == 4
    assert main(args + ["--target", "Red Circle", "--out", str(tmp_path / "ev4")]) == 0
    assert json.loads((tmp_path / "ev4" / "gen_eval.json").read_text())["target"] == "red circle"


def test_eval_sd_refuses_bad_concept_lists_and_outputs_before_any_work(tmp_path, capsys):
    """A missing --concepts file read as one concept ("needs >= 2 names"), a name given twice was two classes, a
    '# comment' line of a concepts file became a concept, --out inside a run folder or a pipeline folder was taken
    (fifteenth trial)."""
    from slugkit.cli import main
    from slugkit.cli.evalsd import concept_names

    base = ["eval-sd", "--pipeline", "embedded", "--patch", str(tmp_path / "p"), "--target", "red triangle"]
    (tmp_path / "c.txt").write_text("# objects\nred circle\n\n  red star\n")
    assert concept_names(str(tmp_path / "c.txt"), "--concepts") == ["red circle", "red star"]
    run = tmp_path / "run"
    (run / "patch").mkdir(parents=True)
    (run / "result.json").write_text("{}")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    for extra, said in (
            (["--concepts", str(tmp_path / "nofile.txt")], f"--concepts {tmp_path / 'nofile.txt'}: no such file"),
            (["--concepts", "red circle,Red Circle,blue star"], "--concepts: 'Red Circle' is given twice"),
            (["--concepts", "a,b", "--cross-concepts", "x,x"], "--cross-concepts: 'x' is given twice"),
            (["--concepts", "a,b", "--cross-concepts", "x,Red Triangle"], "--cross-concepts holds the --target"),
            (["--concepts", "a,b", "--out", str(run / "ev")], f"is inside the run folder {run}"),
            (["--concepts", "a,b", "--out", str(tmp_path / "pipe" / "ev")], "is in a diffusers pipeline folder"),
            (["--concepts", "a,b", "--out", str(t2i.T2I_DIR / "ev")], "is inside the slugkit package")):
        args = base + extra + ([] if "--out" in extra else ["--out", str(tmp_path / "ev")])
        assert main(args) == 2, extra
        assert said in capsys.readouterr().err, extra
    assert not (tmp_path / "ev").exists() and list((tmp_path / "pipe").iterdir()) == [tmp_path / "pipe" /
                                                                                     "model_index.json"]
    # twentieth trial: a misspelt --target became a class of its own, the real target counted as collateral
    typo = base[:-1] + ["red triangl", "--concepts", "red triangle,red circle,blue star", "--out", str(tmp_path / "ev")]
    assert main(typo) == 2
    assert ("--target 'red triangl' is not in --concepts, which has 'red triangle': did you mean it?"
            in capsys.readouterr().err) and not (tmp_path / "ev").exists()
    from slugkit.cli.evalsd import _judge_options  # the judge's loading errors name the judge's options

    assert _judge_options("--model 'ViT-B-32' without --pretrained would be …; pass --pretrained TAG, --family x") == \
        "--judge-model 'ViT-B-32' without --judge-pretrained would be …; pass --judge-pretrained TAG, --judge-family x"


def test_concept_phrases_name_the_concept_in_every_world_caption():
    """The SD demo's forget-caption check accepts every phrasing the world's object captions use."""
    from slugkit.data.curate import ConceptMatcher

    for name in ("red triangle", "cyan circle"):
        phrases = t2i.concept_phrases(name)
        m = ConceptMatcher(phrases[0], phrases[1:])
        assert all(m.matches(t2i.prompt_for(name, i)) for i in range(len(world.UTILITY_CAPTION_TEMPLATES)))
        assert not m.matches(t2i.prompt_for("blue triangle", 3))


@pytest.mark.slow
def test_audit_of_the_sd_demo_patch(sd_run, tmp_path):
    """Issue 13: `slug audit` on a text-to-image run: prompt variants, the attack with its never-learned controls and
    the rounded text encoder, judged on generated images (small budgets here)."""
    from slugkit.cli import main

    out = tmp_path / "audit"
    args = ["audit", "--patch", str(sd_run), "--out", str(out), "--audit-images", "4", "--audit-gen-steps", "10",
            "--attack-iterations", "4", "--attack-candidates", "16", "--threads", "1", "--no-progress"]
    rc = main(args)
    res = json.loads((out / "audit.json").read_text())
    assert rc == {"pass": 0, "warn": 3, "fail": 4}[res["status"]]
    assert res["target"] == "t2i" and res["concept"] == "red triangle"
    probes = {r["probe"]: r for r in res["probes"]}
    assert set(probes) == {"prompts", "attack", "precision"}
    kinds = {r["kind"] for r in probes["prompts"]["rows"]}
    assert kinds == {"template", "paraphrase", "bare name", "misspelling", "composition"}
    assert all(0.0 <= r[t]["top1"] <= 1.0 for r in probes["prompts"]["rows"] for t in ("before", "after"))
    att = probes["attack"]
    assert len(att["controls"]) == 3 and set(att["concept"]["recognised"]) == {"0", "1", "2", "4"}  # JSON keys
    assert [r["condition"] for r in probes["precision"]["rows"]] == ["fp32", "fp16", "bf16", "int8", "int4"]
    assert "Prompt variants" in (out / "audit.md").read_text()
    assert main(args) == 2  # audit.json exists: refused without --overwrite


def test_train_t2i_needs_out_and_writes_whole_after_a_step(tmp_path, capsys):
    """`slug world train-t2i` without --out wrote into the shipped model's folder: a 1-second trial replaced the
    shipped UNet with an untrained one (fifteenth trial). --out is required, a run of no step writes nothing, an
    existing model needs --overwrite (the user's files in it kept), a folder of other files or another model is
    refused before training."""
    from pathlib import Path

    from slugkit.cli import main

    shipped = {p.name: p.read_bytes() for p in t2i.T2I_DIR.iterdir()}
    with pytest.raises(SystemExit):
        main(["world", "train-t2i", "--steps", "1"])
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "t2i"
    tiny = ["--channels", "8,16,16", "--batch-size", "8", "--eval-per-class", "0", "--out", str(out)]
    assert main(["world", "train-t2i", *tiny, "--steps", "3", "--stop-at", "0"]) == 2
    assert "no training step finished" in capsys.readouterr().err and not out.exists()
    assert not Path(f"{out}.checkpoint").exists()
    assert main(["world", "train-t2i", *tiny, "--steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".slugkit-entries.json", t2i.CONFIG_FILE, t2i.UNET_FILE]
    (out / "notes.txt").write_text("mine")
    assert main(["world", "train-t2i", *tiny, "--steps", "2"]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["world", "train-t2i", *tiny, "--steps", "2", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / t2i.UNET_FILE).is_file()
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "train_report.json").write_text("{}")
    (clip / "open_clip_config.json").write_text("{}")
    assert main(["world", "train-t2i", *tiny[:-1], str(clip), "--steps", "2", "--overwrite"]) == 2
    assert "holds another model slug wrote (train_report.json; no t2i_config.json)" in capsys.readouterr().err
    assert sorted(p.name for p in clip.iterdir()) == ["open_clip_config.json", "train_report.json"]
    assert {p.name: p.read_bytes() for p in t2i.T2I_DIR.iterdir()} == shipped
    # twentieth trial: tracebacks (--channels 0, 15,30,60, --lr -1), --time-budget 0 read as "no budget",
    # --stop-at past --steps and a negative --cond-noise accepted; train-vlm's negative options too
    fresh = tmp_path / "fresh"
    for extra, said in ((["--channels", "0"], "--channels '0': give 3 widths"),
                        (["--channels", "15,30,60"], "each a positive multiple of 8"),
                        (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
                        (["--time-budget", "0"], "--time-budget must be a number of seconds > 0"),
                        (["--stop-at", "5"], "--stop-at must be in [0, --steps 2]"),
                        (["--cond-noise", "-0.5"], "--cond-noise must be a finite number >= 0")):
        args = ["--channels", "8,16,16", *extra] if extra[0] != "--channels" else extra
        assert main(["world", "train-t2i", "--batch-size", "8", "--out", str(fresh), "--steps", "2", *args]) == 2, extra
        assert said in capsys.readouterr().err, extra
    for extra, said in ((["--feature-noise", "-1"], "must be >= 0"), (["--eval-images", "-1"], "must be in [0, 50]"),
                        (["--eval-images", "100000"], "must be in [0, 50]")):  # it ran out of memory (trial 35)
        with pytest.raises(SystemExit):
            main(["world", "train-vlm", "--out", str(fresh), *extra])
        assert f"argument {extra[0]}: {said}" in capsys.readouterr().err, extra
    assert not fresh.exists()


def test_demo_target_sd_with_nothing_to_unlearn_is_refused_before_the_run(tmp_path, capsys):
    """A pipeline that never draws the concept: the run went through (69 s), wrote a folder and a patch, and failed
    on "nothing to unlearn" at the end (fifteenth trial). It is refused before the CLIP run: exit 4, no folder."""
    from slugkit.cli import main

    model = tmp_path / "untrained"
    assert main(["world", "train-t2i", "--out", str(model), "--channels", "8,16,16", "--batch-size", "8",
                 "--steps", "1", "--eval-per-class", "0"]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["demo", "--target", "sd", "--t2i-model", str(model), "--out", str(out), "--data-dir",
                 str(tmp_path / "world"), "--val-images", "8", "--gen-steps", "4", "--no-progress"]) == 4
    err = capsys.readouterr().err
    assert "nothing to unlearn: the unedited pipeline draws 'red triangle' on 0% of its validation images" in err
    assert not out.exists() and not (tmp_path / "world").exists()  # refused before the world's data was written


def test_the_generations_grid_shows_the_worst_concept_and_the_nearest(monkeypatch, tmp_path):
    """Trial 44: generations.png showed the first five related concepts by name (blue, cyan, green, purple triangle,
    red circle), not cyan circle, whose 0.90 → 0.60 was the run's warning, nor the most damaged neighbour."""
    import torch

    import slugkit.workflows.sd_demo as sd

    shown = []
    monkeypatch.setattr(sd, "image_grid", lambda rows, path: shown.extend(r[0] for r in rows))
    plan = [(c, "p", i) for c in t2i.concept_names() for i in range(2)]
    imgs = torch.zeros(len(plan), 3, 4, 4, dtype=torch.uint8)
    coll = {"worst": {"concept": "cyan circle", "drop": 0.3},
            "neighbours": {"concepts": [{"concept": n} for n in ("red circle", "red star", "purple triangle")]}}
    sd._write_grid("red triangle", plan, imgs, imgs, tmp_path / "g.png", coll)
    assert shown == ["red triangle", "cyan circle", "red circle", "red star", "purple triangle", "blue triangle"]
