"""The benchmark scripts refuse bad arguments when they are parsed (exit 2, the option named on stderr), before any
model or data is loaded: each was a traceback after the work, a second identical run, or ran on a silent default
(new-user trial of the benchmark scripts, trial 33: an unknown concept became a "crashed" row with exit 0, `--limit
0` divided by zero, a one-identity run replaced the committed 60-identity results). Only refusals are run here: each
takes a few seconds. The SD sweep's summary names the worst other concept of every run (it was the nearest
neighbours' alone, which missed cyan circle -0.30)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("script, args, named", [
    ("compare_embedded.py", ["--methods", "slug,slug"], "--methods"),
    ("compare_embedded.py", ["--lr-sweep", "0,1"], "--lr-sweep"),
    ("compare_embedded.py", ["--concept", "Bogus"], "--concept"),
    ("compare_embedded.py", ["--concept", "Jowen Gormere", "--concept", "jowen gormere"], "--concept"),
    ("compare_embedded.py", ["--threads", "0"], "--threads"),
    ("canvas_embedded.py", ["--max-targets", "-1"], "--max-targets"),
    ("canvas_embedded.py", ["--per-pair", "0"], "--per-pair"),
    ("canvas_embedded.py", ["--seed", "-1"], "--seed"),  # a traceback after the first runs (trial 51)
    ("canvas_embedded.py", ["--targets", "harley,"], "--targets"),  # ran (the CLI refuses an empty item)
    ("canvas_embedded.py", ["--methods", "uce", "--esd-iterations", "5"], "--esd-iterations"),
    ("canvas_embedded.py", ["--sampling-steps", "0"], "--sampling-steps"),
    ("canvas_embedded.py", ["--methods", "bogus"], "choose from slug, slug-null-space, esd, salun, uce"),
    ("canvas_embedded.py", ["--targets", "Harley"], "did you mean 'harley'?"),  # ran (the CLI refuses it)
    ("canvas_embedded.py", ["--methods", "SLUG"], "did you mean 'slug'?"),
    ("vlm_embedded.py", ["--seed", "-1"], "--seed"),
    ("canvas_embedded.py", ["--methods", "slug", "--baseline-max-targets", "2"], "--baseline-max-targets"),
    ("gradient_pass.py", ["--repeats", "0"], "--repeats"),
    ("gradient_pass.py", ["--arch", "embedded", "embedded"], "--arch"),
    ("precision.py", ["--threads", "0"], "--threads"),
    ("search_cache.py", ["--threads", "0"], "--threads"),
    ("summary.py", ["--batches", "0"], "--batches"),
    ("sd_embedded.py", ["--concepts", "Bogus"], "--concepts: unknown name 'Bogus'"),
    ("sd_embedded.py", ["--concepts", "red triangle,Red Triangle"], "'red triangle' is given twice"),
    ("sd_embedded.py", ["--threads", "0"], "argument --threads: must be >= 1"),
    ("sd_embedded.py", ["--json", "benchmarks/results/sd_embedded_all.json"], "exists; pass --overwrite"),
    ("vlm_embedded.py", ["--first", "2", "--concepts", "Jowen Gormere"], "--first and --concepts exclude each other"),
    ("vlm_embedded.py", ["--concepts", ""], "--concepts '' names nothing"),
    ("vlm_embedded.py", ["--json", "src/slugkit/v.json"], "is inside the slugkit package"),
    ("vlm_embedded.py", ["--vlm-model", "no_such_vlm"], "--vlm-model"),
    ("vlm_embedded.py", ["--name-prob", "0"], "--name-prob: must be in (0, 1]"),
    ("vlm_embedded.py", ["--neighbours-k", "0"], "--neighbours-k: must be >= 1"),
    ("vlm_embedded.py", ["--fallback", "finetune", "--max-layers", "4"], "invalid choice: 4"),
    ("vlm_embedded.py", ["--fallback", "retrain"], "invalid choice: 'retrain'"),
    ("sd_embedded.py", ["--fallback", "retrain"], "invalid choice: 'retrain'"),
    ("all_identities.py", ["--limit", "0"], "argument --limit: must be >= 1"),
    ("all_identities.py", ["--variant", "margin=-1"], "SearchConfig.margin"),
    ("all_identities.py", ["--rescore", "benchmarks/results/all_identities_paper.json"], "give --json OUT"),
    ("all_identities.py", ["--data-dir", "README.md"], "README.md is a file, not a folder"),
    ("all_identities.py", ["--variant", "paper,paper"], "'paper' is given twice"),
    ("all_identities.py", ["--limit", "61"], "the world has 60 identities"),
    ("compare_embedded.py", ["--out", ""], "argument --out: is empty"),
    ("sd_embedded.py", ["--concepts", "red triangle", "--all"], "--all and --concepts exclude each other"),
    ("sd_embedded.py", ["--neighbours-k", "30"], "there are 29 other concepts"),
    ("precision.py", ["--device", "tpu"], "give cpu, cuda or cuda:N"),
    ("vlm_ceiling.py", ["--scopes", "layers.3"], "--scopes: scope 'layers.3' names no parameter"),  # past layer -2
    ("vlm_ceiling.py", ["--scopes", " , "], "--scopes ' , ' names nothing"),
    ("vlm_ceiling.py", ["--scopes", "layers.2,"], "has an empty item"),
    ("vlm_ceiling.py", ["--scopes", "layers.2,layers.2"], "'layers.2' is given twice"),
    ("vlm_ceiling.py", ["--neighbour-images", "101"], "give at most 100"),
    ("vlm_ceiling.py", ["--merge", "README.md", "--json", "/tmp/never-written.json"], "not readable JSON"),
    ("sd_ceiling.py", ["--n", "201"], "at most 200"),
    ("sd_ceiling.py", ["--merge", "benchmarks/results/sd_embedded_all.json", "--json", "/tmp/never-written.json"],
     "not a --json file of this script"),
    ("vlm_ceiling.py", ["--merge", "benchmarks/results/vlm_embedded_vlm_name_prob.json", "--json",
                        "/tmp/never-written.json"], "not a --json file of this script"),  # complete, no scope
    ("sd_embedded.py", ["--merge", "benchmarks/results/vlm_ceiling.json", "--json", "/tmp/never-written.json"],
     "not a --json file of this script"),  # no "complete"
    ("sd_ceiling.py", ["--merge", "benchmarks/results/sd_ceiling.json", "/tmp/nothing.json"], "not readable JSON"),
    ("vlm_ceiling.py", ["--first", "2", "--concepts", "Jowen Gormere"], "--first and --concepts exclude each other"),
    ("vlm_ceiling.py", ["--first", "61"], "the world has 60 identities"),
    ("vlm_ceiling.py", ["--steps", "0"], "--steps: must be >= 1"),
    ("vlm_ceiling.py", ["--concepts", "Bogus"], "--concepts: unknown name 'Bogus'"),
    ("sd_ceiling.py", ["--scopes", "encoder.layers.9"], "--scopes: scope 'encoder.layers.9' names no parameter"),
    ("sd_ceiling.py", ["--scopes", ","], "--scopes ',' names nothing"),
    ("sd_ceiling.py", ["--concepts", "red triangel"], "did you mean 'red triangle'"),
    ("sd_ceiling.py", ["--n", "0"], "--n: must be >= 1"),
])
def test_a_bad_argument_is_refused_naming_the_option(script, args, named):
    r = _run(script, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "error:" in last and named in last and "Traceback" not in r.stderr


def test_a_json_inside_a_run_folder_is_refused(tmp_path):
    """`search_cache.py --json RUN/curate.json --overwrite` replaced a curated set's marker (trial 34)."""
    run = tmp_path / "cur"
    run.mkdir()
    (run / "curate.json").write_text("{}\n")
    (run / "forget.tar").write_text("")
    (run / ".slugkit-entries.json").write_text('{"entries": ["curate.json", "forget.tar"]}')
    r = _run("search_cache.py", "--json", str(run / "curate.json"), "--overwrite")
    assert r.returncode == 2 and "is inside a slug run folder" in r.stderr
    assert (run / "curate.json").read_text() == "{}\n"


def test_an_existing_json_file_needs_overwrite(tmp_path):
    published = tmp_path / "summary.json"
    published.write_text("{}\n")
    r = _run("summary.py", "--json", str(published))
    assert r.returncode == 2 and "--overwrite" in r.stderr.strip().splitlines()[-1]
    assert published.read_text() == "{}\n"
    r = _run("precision.py", "--json", str(tmp_path))  # a folder: refused before the work, not after it
    assert r.returncode == 2 and "is a folder" in r.stderr


def test_an_existing_comparison_folder_needs_overwrite(tmp_path):
    (tmp_path / "Jowen_Gormere").mkdir()
    (tmp_path / "Jowen_Gormere" / "compare.json").write_text("{}\n")
    r = _run("compare_embedded.py", "--concept", "Jowen Gormere", "--out", str(tmp_path))
    assert r.returncode == 2 and "--overwrite" in r.stderr.strip().splitlines()[-1]


def test_the_sd_summary_names_the_worst_other_concept_of_every_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd_embedded

    rows = json.loads((ROOT / "benchmarks" / "results" / "sd_embedded_all.json").read_text())["rows"]
    s = sd_embedded.summary(rows)
    ran = [r for r in rows if "refused" not in r and "error" not in r]
    assert s["worst_other_drop_worst"] == max(r["worst"]["drop"] for r in ran) > s["neighbour_drop_worst"]
    assert s["worst_other"].startswith("cyan circle (unlearning red square)")


def test_the_sd_sweep_reuses_the_unedited_pipelines_images_exactly(monkeypatch):
    """`sd_embedded.py` keeps what the unedited pipeline drew for a plan (with 50 images of every concept each
    concept's test plan is the same plan); the same call on the same weights is given back, an edited text encoder
    or another plan is drawn."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd_embedded

    from slugkit.workflows.sd_demo import _clip_and_pipeline
    from slugkit.world import t2i

    drawn = []
    original = t2i.recognition
    monkeypatch.setattr(t2i, "recognition", lambda *a, **k: drawn.append(a[2]) or original(*a, **k))
    stats = sd_embedded.reuse_unedited_images()
    _, pipe, _, judge = _clip_and_pipeline(None)
    plan = t2i.generation_plan(None, 0, 1, seed_base=10_000)[:3]
    first = t2i.recognition(pipe, judge, plan, 2)
    again = t2i.recognition(pipe, judge, plan, 2)
    assert stats["hits"] == 1 and len(drawn) == 1 and first[0] == again[0] and first[2] == again[2]
    assert torch.equal(first[1], again[1]) and first[1] is not again[1]
    t2i.recognition(pipe, judge, plan[:2], 2)  # another plan: drawn
    assert len(drawn) == 2
    w = next(p for n, p in pipe.text_encoder.named_parameters() if n.endswith("fc1.weight"))
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
        t2i.recognition(pipe, judge, plan, 2)  # an edited encoder: drawn, and not kept
        t2i.recognition(pipe, judge, plan, 2)
        w.copy_(saved)
    assert len(drawn) == 4 and stats["hits"] == 1
    t2i.recognition(pipe, judge, plan, 2)
    assert len(drawn) == 4 and stats["hits"] == 2  # the unedited weights again


def test_the_vlm_summary_splits_the_passes_by_the_method_that_made_the_patch():
    """With --fallback, a pass by the fine-tune is not SLUG's: the summary counts each method's runs and passes
    (the README's "4 of the single passes by SLUG's own step ..., 5 and the joint one by the fine-tune")."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vlm_embedded

    rows = json.loads((ROOT / "benchmarks" / "results" / "vlm_embedded_vlm_fallback.json").read_text())["rows"]
    s = vlm_embedded.summary(rows)
    assert s["by_method"] == {"layer-finetune": {"runs": 5, "passed": 5}, "slug": {"runs": 4, "passed": 4}}
    assert (s["passed"], s["refused"], s["total"]) == (9, 1, 10)
    joint = json.loads((ROOT / "benchmarks" / "results" / "vlm_embedded_vlm_fallback_joint.json").read_text())["rows"]
    assert vlm_embedded.summary(joint)["by_method"] == {"layer-finetune": {"runs": 1, "passed": 1}}
    old = json.loads((ROOT / "benchmarks" / "results" / "vlm_embedded_vlm_name_prob.json").read_text())["rows"]
    assert vlm_embedded.summary(old)["by_method"] == {"slug": {"runs": 4, "passed": 4}}  # rows from before "method"


def test_the_canvas_checks_read_within_10_points_as_at_most_10_below():
    """Issue 15's "style UA within 10 points of theirs": forgetting more than a baseline is not a miss (the paper's
    SLUG is 12 points below ESD's UA); 10.5 points below is. Time and storage ratios as the issue states them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import canvas_embedded

    def method(ua, t, full):
        return {"style": {"ua": ua}, "time_s": t, "storage_bytes": full / 10, "storage_full_bytes": full}

    slug = {"style": {"ua": 0.85}, "time_s": 2.0, "storage_bytes": 100}
    out = canvas_embedded.checks({"esd": method(0.65, 20.0, 5000), "salun": method(0.955, 9.0, 5001)}, slug)
    verdict = {k.split(" (")[0]: v for k, v in out.items()}
    assert verdict == {"time slug <= 1/10 esd": True, "style UA slug at most 10 pts below esd": True,
                       "storage slug patch <= 1/50 esd checkpoint": True, "time slug <= 1/5 salun": False,
                       "style UA slug at most 10 pts below salun": False,
                       "storage slug patch <= 1/50 salun checkpoint": True}
    assert any("+20.0 pts" in k for k in out) and any("-10.5 pts" in k for k in out)
    refused = canvas_embedded.checks({"salun": method(0.9, 9.0, 5000)}, {"style": {"ua": 0.2}, "time_s": 1.0})
    assert refused == {"slug: every search on the baselines' targets was refused, no edit to check": False}


def test_a_canvas_quick_check_that_recognises_nothing_exits_3_with_the_embedded_advice(tmp_path):
    """Two DDIM steps draw nothing the judges recognise: the benchmark said 0 and "met", with the official
    protocol's advice (check the classifiers) it was never given (verification 53)."""
    out = tmp_path / "q.json"
    r = _run("canvas_embedded.py", "--methods", "uce", "--targets", "harley", "--per-pair", "1", "--sampling-steps",
             "2", "--json", str(out))
    assert r.returncode == 3, r.stderr[-2000:]
    assert "check --sampling-steps" in r.stderr and "check the classifiers" not in r.stdout + r.stderr
    rep = json.loads(out.read_text())
    assert rep["protocol"] == "lite" and rep["options"]["quick_check"] == {"sampling_steps": 2, "per_pair": 1}


def test_the_canvas_benchmark_refuses_a_canvas_model_that_does_not_load(tmp_path):
    """An incomplete --canvas-model was a traceback and exit 1 (verification 54); `slug canvas lite` says it in one
    line, exit 2."""
    r = _run("canvas_embedded.py", "--canvas-model", str(tmp_path), "--methods", "uce", "--targets", "harley")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "canvas_config.json is missing" in r.stderr


def test_the_ceilings_scopes_stop_at_the_layer_the_vlm_reads():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vlm_ceiling

    from slugkit.world import vlm

    llava, _ = vlm.load_vlm()
    tower, read = llava.model.vision_tower, llava.config.vision_feature_layer
    short = lambda ps: sorted(n.removeprefix("vision_model.") for n in ps)  # noqa: E731
    assert short(vlm_ceiling.scope_params(tower, "layers.2.mlp", read)) == [
        "encoder.layers.2.mlp.fc1.bias", "encoder.layers.2.mlp.fc1.weight", "encoder.layers.2.mlp.fc2.bias",
        "encoder.layers.2.mlp.fc2.weight"]
    whole = short(vlm_ceiling.scope_params(tower, "tower", read))  # hidden_states[-2] of 4 blocks: blocks 0-2 feed it
    assert "embeddings.patch_embedding.weight" in whole and "encoder.layers.2.mlp.fc2.weight" in whole
    assert not [n for n in whole if n.startswith(("encoder.layers.3.", "post_layernorm"))]
    with pytest.raises(ValueError, match="layers 0..2"):
        vlm_ceiling.scope_params(tower, "layers.3.mlp", read)


def test_the_ceilings_look_alikes_are_the_nearest_mean_features():
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vlm_ceiling

    feats = {"T": torch.tensor([1.0, 0.0]), "far": torch.tensor([-1.0, 0.1]), "near": torch.tensor([2.0, 0.2]),
             "mid": torch.tensor([1.0, 1.0])}  # cosine, not distance: "near" is twice T's norm
    assert vlm_ceiling.look_alikes(feats, "T", 2) == ["near", "mid"]


def test_the_sd_ceilings_scopes_are_dotted_prefixes_of_the_text_encoder():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd_ceiling

    from slugkit.world import t2i

    te = t2i.EmbeddedT2IPipeline.load().text_encoder
    assert list(sd_ceiling.scope_params(te, "encoder.layers.2.mlp.fc1.weight")) == ["encoder.layers.2.mlp.fc1.weight"]
    block = sd_ceiling.scope_params(te, "encoder.layers.2")
    assert block and all(n.startswith("encoder.layers.2.") for n in block)
    assert not sd_ceiling.scope_params(te, "encoder.layers.1").keys() & block.keys()
    with pytest.raises(ValueError, match="names no parameter"):
        sd_ceiling.scope_params(te, "encoder.layers.2.mlp.fc")  # a prefix of a name, not a dotted part of it


def test_the_vlm_ceiling_takes_slugs_full_layer_names_and_merges_disjoint_parts(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import vlm_ceiling

    from slugkit.world import vlm

    llava, _ = vlm.load_vlm()
    tower, read = llava.model.vision_tower, llava.config.vision_feature_layer
    full = "vision_model.encoder.layers.2.mlp.fc1.weight"  # how SLUG's results name the layer
    assert list(vlm_ceiling.scope_params(tower, full, read)) == list(
        vlm_ceiling.scope_params(tower, "layers.2.mlp.fc1.weight", read))
    rows = json.loads((ROOT / "benchmarks" / "results" / "vlm_ceiling.json").read_text())["rows"]
    parts = []
    for k, half in enumerate((rows[:20], rows[20:])):
        parts.append(tmp_path / f"part{k}.json")
        parts[-1].write_text(json.dumps({"rows": half, "options": {"steps": 300}, "complete": True}))
    out = tmp_path / "merged.json"
    r = _run("vlm_ceiling.py", "--merge", *map(str, parts), "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    merged = json.loads(out.read_text())
    assert merged["complete"] and len(merged["rows"]) == 40 and merged["summary"]["layers.2"]["passed"] == 9
    assert merged["summary"]["layers.2.mlp.fc1.weight"]["passed_and_worst_ok"] == 1
    copy = tmp_path / "copy.json"  # the same file twice is said as such (verification 71); a copy shares the rows
    copy.write_text(parts[0].read_text())
    r = _run("vlm_ceiling.py", "--merge", str(parts[0]), str(copy), "--json", str(tmp_path / "twice.json"))
    assert r.returncode == 2 and "share concept and scope Jowen Gormere / layers.2.mlp.fc1.weight" in r.stderr


def test_the_sd_summary_splits_the_passes_by_the_method_that_made_the_patch():
    """sd_embedded.py --fallback: a patch the labelled fine-tune made is counted apart from SLUG's, and said so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sd_embedded
    import sweep

    rows = json.loads((ROOT / "benchmarks" / "results" / "sd_embedded_all.json").read_text())["rows"]
    s = sd_embedded.summary(rows)
    assert set(s["by_method"]) == {"slug"} and sweep.by_method_line(s) is None  # rows from before "method"
    ran = [r for r in rows if "refused" not in r and "error" not in r]
    ft = [{**ran[0], "method": "layer-finetune", "passed": True}, {**ran[1], "method": "layer-finetune",
                                                                     "passed": False}]
    s = sd_embedded.summary(rows + ft)
    assert s["by_method"]["layer-finetune"] == {"runs": 2, "passed": 1}
    assert s["by_method"]["slug"] == {"runs": len(ran), "passed": sum(r["passed"] for r in ran)}
    assert sweep.by_method_line(s).startswith("by method: layer-finetune 1 of 2 passed; slug ")
    assert "(fine-tune, not SLUG)" in sd_embedded.line(ft[0]) and "not SLUG" not in sd_embedded.line(ran[0])


def test_the_sd_sweep_merges_parts_of_one_sweep_and_refuses_others(tmp_path):
    """sd_embedded.py --merge: a sweep run in two processes, or stopped and finished in a later session, is one
    sweep again — a stopped part gives its finished rows and the merged file says it is not complete; parts with a
    concept in common or run with other options are refused, naming what differs."""
    done = json.loads((ROOT / "benchmarks" / "results" / "sd_embedded_all.json").read_text())
    rows, opts = done["rows"], done["options"]
    parts = [tmp_path / "a.json", tmp_path / "b.json"]
    first9 = ",".join(x["concept"] for x in rows[:9])
    parts[0].write_text(json.dumps({"rows": rows[:9], "options": {**opts, "concepts": first9, "threads": 2},
                                    "base_recognition": None, "complete": True}))
    parts[1].write_text(json.dumps({"rows": rows[9:], "options": {**opts, "concepts": "later"},  # stopped before it
                                    "base_recognition": None, "complete": False}))
    out = tmp_path / "merged.json"
    r = _run("sd_embedded.py", "--merge", *map(str, parts), "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "13/16 concepts pass" in r.stdout and "had not ended" in r.stdout
    merged = json.loads(out.read_text())
    assert merged["complete"] is False and [x["concept"] for x in merged["rows"]] == [x["concept"] for x in rows]
    assert merged["summary"]["passed"] == 13 and merged["options"]["merged_from"] == list(map(str, parts))
    # a part that ended without a row for a concept it was given is not this script's (verification 71)
    lacks = tmp_path / "lacks.json"
    lacks.write_text(json.dumps({"rows": rows[:9], "options": {**opts, "concepts": first9 + ",x"}, "complete": True}))
    r = _run("sd_embedded.py", "--merge", str(lacks), str(parts[1]), "--json", str(tmp_path / "lacks_m.json"))
    assert r.returncode == 2 and "says \"complete\": true but has no row for x" in r.stderr
    # that stopped sweep, finished later by a part over the rest: merged again, it is one complete sweep (the merged
    # file's own merged_from was taken for an option that differs, and a stopped part kept "complete": false)
    stopped = tmp_path / "stopped.json"
    stopped.write_text(json.dumps({"rows": rows[9:], "options": {**opts, "concepts": ",".join(
        [x["concept"] for x in rows[9:]] + ["unfinished"])}, "complete": False}))
    r = _run("sd_embedded.py", "--merge", str(parts[0]), str(stopped), "--json", str(tmp_path / "m2.json"))
    assert r.returncode == 0 and json.loads((tmp_path / "m2.json").read_text())["complete"] is False, r.stderr[-2000:]
    assert "not run: unfinished" in r.stdout
    # merged again on its own it stays incomplete: the concepts not run are kept (they were dropped: verification 69)
    r = _run("sd_embedded.py", "--merge", str(tmp_path / "m2.json"))
    assert r.returncode == 0 and "not run: unfinished" in r.stdout and "(no --json: nothing written)" in r.stdout
    # refused: a part given twice, a part with no rows, --json onto a part (verification 71)
    (tmp_path / "empty.json").write_text(json.dumps({"rows": [], "options": opts, "complete": True}))
    for args, said in (([str(stopped), str(stopped)], "given twice"), ([str(tmp_path / "empty.json")], "no rows"),
                       ([str(parts[0]), str(stopped), "--json", str(stopped), "--overwrite"], "is one of the --merge")):
        r = _run("sd_embedded.py", "--merge", *args)
        assert r.returncode == 2 and said in r.stderr, (args, r.stderr[-500:])
    rest = tmp_path / "rest.json"
    rest.write_text(json.dumps({"rows": [{**rows[0], "concept": "unfinished"}],
                                "options": {**opts, "concepts": "unfinished"}, "complete": True}))
    r = _run("sd_embedded.py", "--merge", str(tmp_path / "m2.json"), str(rest), "--json", str(tmp_path / "m3.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "every concept the parts were given has its row" in r.stdout
    m3 = json.loads((tmp_path / "m3.json").read_text())
    assert m3["complete"] is True and len(m3["rows"]) == len(rows) + 1
    assert m3["options"]["json"] == str(tmp_path / "m3.json")  # it kept the first part's --json (verification 69)
    # stdout closed early (`… | head -1`): the file is written, the script ends quietly with 141 (a traceback, 1)
    r_end, w_end = os.pipe()
    os.close(r_end)
    try:
        done = subprocess.run([sys.executable, "benchmarks/sd_embedded.py", "--merge", str(tmp_path / "m3.json"),
                               "--json", str(tmp_path / "m4.json")], cwd=ROOT, stdout=w_end, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, text=True, timeout=60)
    finally:
        os.close(w_end)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert json.loads((tmp_path / "m4.json").read_text())["complete"] is True
    parts[1].write_text(json.dumps({"rows": rows[9:], "options": {**opts, "neighbours_k": 29, "concepts": None},
                                    "complete": True}))
    r = _run("sd_embedded.py", "--merge", *map(str, parts), "--json", str(tmp_path / "other.json"))
    assert r.returncode == 2 and "other options" in r.stderr and "neighbours_k: 29" in r.stderr
    (tmp_path / "copy.json").write_text(parts[0].read_text())
    r = _run("sd_embedded.py", "--merge", str(parts[0]), str(tmp_path / "copy.json"), "--json",
             str(tmp_path / "twice.json"))
    assert r.returncode == 2 and "share concept red circle" in r.stderr
    assert not (tmp_path / "other.json").exists() and not (tmp_path / "twice.json").exists()
