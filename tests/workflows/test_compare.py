"""`slug compare` end to end on the embedded world with small sets: output shape and bookkeeping."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from slugkit.cli import main  # noqa: E402
from slugkit.workflows.compare import CompareConfig, run_compare  # noqa: E402
from slugkit.workflows.compare_support import changed_storage, make_baseline, state_sha256  # noqa: E402
from slugkit.world import render as world  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("compare") / "run"
    from slugkit.world.demo_data import ensure_world_data

    data_dir = ensure_world_data(None, progress=False)  # the shared world cache: a copy costs ~11 s
    rc = main(["compare", "--methods", "slug,ga,ssd", "--epochs", "1", "--forget-samples", "40",
               "--retain-samples", "64", "--out", str(out), "--data-dir", str(data_dir), "--no-progress"])
    torch.set_num_threads(threads)  # `slug compare` defaults to one thread; do not leak it into other tests
    assert rc == 0
    return out, data_dir


def test_compare_outputs(compare_run):
    out, _ = compare_run
    rep = json.loads((out / "compare.json").read_text())
    assert rep["concept"] == world.IDENTITIES[0].name
    assert list(rep["methods"]) == ["slug", "ga", "ssd"]
    assert rep["peak_mem_method"] in ("hwm", "sampled") and "VmHWM" in rep["peak_mem_note"]
    assert rep["data"]["n_forget"] == 40 and rep["data"]["n_retain"] == 64
    keys = {"forget_top1", "forget_top5", "related_top1", "utility_top1", "utility_top5"}
    for name, e in rep["methods"].items():
        assert {"metrics", "time_s", "cpu_s", "peak_mem_bytes", "storage_bytes", "passes", "mia", "epochs",
                "selected_epoch"} <= set(e), name
        assert e["cpu_s"] > 0
        assert set(e["metrics"]["before"]) >= keys and set(e["metrics"]["after"]) >= keys
        assert e["start_sha256"] == rep["base_sha256"]
        assert e["time_s"] > 0 and e["storage_bytes"] > 0 and e["peak_mem_bytes"] >= 0
        assert 0 <= e["mia"]["mean"] <= 100 and len(e["mia"]["per_seed"]) == 10
    slug = rep["methods"]["slug"]
    assert slug["storage_bytes"] == (out / "slug" / "patch" / "patch.safetensors").stat().st_size
    assert (out / "slug" / "result.json").is_file()
    from slugkit.patch.format import resolve_patch_dir  # `slug inspect RUN` on a compare run (eleventh trial)
    assert resolve_patch_dir(out) == out / "slug" / "patch"
    import argparse

    from slugkit.cli.audit import _patch_and_out  # `slug audit --patch RUN` said "no patch there" (13th trial)
    assert _patch_and_out(argparse.Namespace(patch=str(out), out=None)) == (out / "slug" / "patch", out)
    result = json.loads((out / "slug" / "result.json").read_text())
    assert slug["metrics"]["after"] == result["metrics"]["after"]  # the numbers of `slug unlearn`
    # time and CPU seconds of the run's own stages, every round and the neighbour projection (the CPU came from a
    # replay of round 1 alone: 2.4 s against 7.2 s of wall time for a two-layer run; eleventh trial)
    stages = ("gradients", "layers", "neighbours", "search")
    assert slug["time_s"] == pytest.approx(sum(result["timing_s"][k] for k in stages))
    assert slug["cpu_s"] == pytest.approx(sum(result["cpu_s"][k] for k in stages))
    rounds = max(e["round"] for e in result["layers_edited"])
    assert slug["passes"]["gradient_passes"] == rounds and slug["passes"]["backward_samples"] == rounds * (40 + 64)
    # every edited layer (compare.json named the first of a two-layer edit: trial 46), and the table says how many
    assert slug["layers"] == [e["layer"] for e in result["layers_edited"]]
    assert ("search (2 layers)" if len(slug["layers"]) == 2 else "| search |") in (out / "compare.md").read_text()
    ga = rep["methods"]["ga"]
    assert len(ga["epochs"]) == 1 and ga["selected_epoch"] == 1
    assert ga["passes"]["backward_samples"] == 40 and ga["passes"]["optimizer_steps"] == 2  # batch 32
    assert ga["storage_bytes"] > slug["storage_bytes"]
    assert rep["methods"]["ssd"]["passes"]["backward_samples"] == 40 + 64
    md = (out / "compare.md").read_text()
    for col in ("FA@1", "FA@5", "TA_IN@1", "TA_CA@1", "MIA", "time", "storage"):
        assert col in md
    for name in ("original", "slug", "ga", "ssd"):
        assert f"| {name} |" in md
    import re  # one time line, one direction (the CLI printed its inverse beside it: trial 33)
    ratio = re.search(r"SLUG time / method time: ga (\d+\.\d+) \(SLUG (\d+\.\d)× (faster|slower)\)", md)
    v = slug["time_s"] / ga["time_s"]
    assert ratio and float(ratio[1]) == pytest.approx(v, abs=1e-3) and ratio[3] == ("faster" if v <= 1 else "slower")
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_existing_output_and_bad_method(compare_run, capsys):
    out, data_dir = compare_run
    assert main(["compare", "--methods", "ga", "--out", str(out), "--data-dir", str(data_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err  # the CLI's words only: "(overwrite=True)" is for the Python API (trial 33)
    assert "already holds" in err and "pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert main(["compare", "--methods", "ga,nope", "--out", str(out) + "x", "--data-dir", str(data_dir),
                 "--no-progress"]) == 2


def test_state_hash_and_changed_storage():
    m = torch.nn.Linear(3, 2)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    h = state_sha256(m)
    assert changed_storage(m, base)["storage_bytes"] == 0
    with torch.no_grad():
        m.weight[0, 0] += 1
    assert state_sha256(m) != h
    s = changed_storage(m, base)
    assert s["storage_bytes"] == 6 * 4 and s["changed_params"] == 1 and s["changed_tensors"] == 1
    m.load_state_dict(base)
    assert state_sha256(m) == h


def test_compare_refuses_learning_rates_it_would_drop(compare_run, capsys):
    """`--lr GAFT=5e-4` (or `--lr foo=1e-4`) ran with the default rate and said nothing; a repeated --lr kept the
    last (eleventh trial)."""
    out, data_dir = compare_run
    base = ["compare", "--out", str(out) + "-lr", "--data-dir", str(data_dir), "--no-progress", "--epochs", "1"]
    for lr, said in ((["--methods", "gaft", "--lr", "GAFT=5e-4"], "--lr GAFT=...: 'GAFT' is not among --methods"),
                     (["--methods", "ga", "--lr", "foo=1e-4"], "'foo' is not among --methods (ga)"),
                     (["--methods", "ga,ssd", "--lr", "ssd=1e-4"], "--lr ssd=...: ssd has no learning rate"),
                     (["--methods", "ga", "--lr", "ga=1e-4", "--lr", "ga=2e-4"], "--lr ga is given twice")):
        assert main(base + lr) == 2
        assert said in capsys.readouterr().err
    assert not Path(str(out) + "-lr").exists()
    assert main(base[:-2] + ["--methods", "slug,ssd", "--lr-sweep", "1e-4"]) == 2  # recorded, then unused (13th)
    assert "--lr-sweep applies to GA, GA+FT, SalUn and SalUn-RL without an --lr of their own" in \
        capsys.readouterr().err
    assert main(base + ["--methods", "slug,ga", "--lr-sweep", "1e-4", "--lr", "ga=1e-3"]) == 2  # the --lr won
    assert main(base + ["--methods", "ga", "--modes", "joint"]) == 2  # ran the single-concept comparison
    assert "--modes applies to several concepts: add --concepts A,B" in capsys.readouterr().err
    # trial 39: a method option no chosen method reads ran, silently (as --lr for a method not run is refused)
    for extra, said in ((["--methods", "slug,ssd"], "--epochs applies to ft, ga, gaft, salun, salun-rl, and "
                                                    "--methods slug,ssd runs none of them"),
                        (["--methods", "ga", "--ssd-alpha", "2"], "--ssd-alpha applies to ssd, ssd-cumulative"),
                        (["--methods", "ga", "--salun-threshold", "0.3"], "--salun-threshold applies to salun"),
                        (["--methods", "ga", "--ssd-importance-loss", "cos"], "--ssd-importance-loss applies to ssd")):
        assert main(base + extra) == 2
        assert said in capsys.readouterr().err
    assert not Path(str(out) + "-lr").exists()
    from slugkit.cli.compare import lr_list
    assert lr_list("3e-4,1e-4") == [1e-4, 3e-4]


def test_reaching_fa5_zero_says_what_was_broken_on_the_way():
    from slugkit.report.compare import DAMAGE_BUDGETS, _with_damage
    from slugkit.workflows.verdict import Budgets

    assert DAMAGE_BUDGETS == {k: getattr(Budgets(), k) for k in DAMAGE_BUDGETS}

    m = {"before": {"utility_top1": 0.99, "related_top1": 0.99}, "after": {"utility_top1": 0.03,
                                                                          "related_top1": 0.98}}
    report = {"methods": {"ga": {"metrics": m}, "slug": {"metrics": {"before": m["before"], "after": m["before"]}}}}
    assert _with_damage(report, ["ga", "slug"]) == ["ga (but utility 0.99 → 0.03)", "slug"]
    worst = {"worst": {"concept": "Jota Quinford", "before": 1.0, "after": 0.0}}  # the mean hid it (17th trial)
    report["methods"]["ssd"] = {"metrics": {"before": m["before"], "after": m["before"]}, "collateral": worst}
    report["methods"]["slug"]["collateral"] = {"worst": {"concept": "Hasa Malwick", "before": 1.0, "after": 0.8}}
    assert _with_damage(report, ["ssd", "slug"]) == ["ssd (but Jota Quinford 1.00 → 0.00)", "slug"]


def test_compare_config_defaults():
    cc = CompareConfig(concept="x", out="y")
    assert cc.methods == ["slug", "ft", "ga", "gaft", "salun", "ssd"] and cc.select_metric == "forget_top5"
    assert cc.modes == ["joint", "sequential"] and cc.concept_list() == ["x"]
    assert run_compare is not None


def test_make_baseline_settings():
    from slugkit.methods import ALPHA_GRID, LRSweep

    cc = CompareConfig(concept="x", out="y", lr_sweep=[1e-4, 3e-5], lr={"gaft": 2e-4})
    ga = make_baseline(cc, "ga")
    assert isinstance(ga, LRSweep) and ga.lrs == (3e-5, 1e-4) and ga.select_metric == "forget_top5"
    assert make_baseline(cc, "gaft").lr == 2e-4  # an explicit lr is not swept
    assert not isinstance(make_baseline(cc, "ft"), LRSweep)  # FT is the control: not swept
    ssd = make_baseline(cc, "ssd")
    assert ssd.alphas == ALPHA_GRID and len(ssd.points) == 16 and ssd.early_stop
    fixed = make_baseline(CompareConfig(concept="x", out="y", ssd_alpha=10.0), "ssd")
    assert fixed.points == [(10.0, 1.0)]


def test_compare_explicit_data_flags(compare_run, tmp_path):
    """The real-model form: the data flags of `slug unlearn` (here pointing at the world's files) + --mia-heldout."""
    run, data_dir = compare_run
    name = world.IDENTITIES[0].name
    heldout = tmp_path / "heldout"
    world.write_pair_shards(world.make_samples("test", "identity", 12, classes=[0]), heldout, prefix="h")
    argv = ["compare", "--model", "embedded", "--concept", name, "--forget", str(run / "data" / "forget.tar"),
            "--retain", str(run / "data" / "retain.tar"), "--val-identities", str(data_dir / "val" / "identities"),
            "--test-identities", str(data_dir / "test" / "identities"), "--names", str(data_dir / "names.txt"),
            "--utility-val", str(data_dir / "val" / "utility"), "--utility-test", str(data_dir / "test" / "utility"),
            "--utility-templates", str(data_dir / "utility_templates.txt"), "--methods", "ga",
            "--epochs", "1", "--forget-samples", "40", "--retain-samples", "64", "--no-progress"]
    for t in world.IDENTITY_EVAL_TEMPLATES:
        argv += ["--identity-template", t]
    out = tmp_path / "explicit"
    threads = torch.get_num_threads()
    rc = main(argv + ["--mia-heldout", str(heldout / "h-00000.tar"), "--out", str(out)])
    torch.set_num_threads(threads)
    assert rc == 0
    rep = json.loads((out / "compare.json").read_text())
    first = json.loads((run / "compare.json").read_text())
    assert rep["data"]["mia_heldout"] == 12 and rep["methods"]["ga"]["mia"]["n"] == 12
    from slugkit.report.compare import MIA_SKIPPED, render_compare

    assert MIA_SKIPPED not in render_compare(rep) and "50 = indistinguishable" in render_compare(rep)
    rep0 = {**rep, "data": {**rep["data"], "mia_heldout": 0}}  # without --mia-heldout: said (trial 39)
    assert MIA_SKIPPED in render_compare(rep0) and "50 = indistinguishable" not in render_compare(rep0)
    assert rep["original"]["metrics"]["before"] == first["original"]["metrics"]["before"]  # same test suite
    assert rep["methods"]["ga"]["metrics"]["after"] == first["methods"]["ga"]["metrics"]["after"]  # same data
    assert main(["compare", "--model", "ViT-B-32", "--concept", name, "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2  # real models need the data flags


# ----------------------------------------------------------------------------------------------- several concepts
@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, compare_run):
    _, data_dir = compare_run  # reuse the generated world
    out = tmp_path_factory.mktemp("compare-multi") / "run"
    a, b = world.IDENTITIES[0].name, world.IDENTITIES[1].name
    threads = torch.get_num_threads()
    run_compare(CompareConfig(concept=a, concepts=[a, b], out=str(out), methods=["slug", "ga"], epochs=1,
                              retain_samples=48, mia_heldout=10, data_dir=str(data_dir), threads=1))
    torch.set_num_threads(threads)
    return out, (a, b)


def test_compare_concepts_output_shape(multi_run):
    out, concepts = multi_run
    rep = json.loads((out / "compare.json").read_text())
    assert rep["concepts"] == list(concepts) and {"joint", "sequential"} <= set(rep)
    shared = {"related_top1", "utility_top1"}
    for mode in ("joint", "sequential"):
        part = rep[mode]
        assert part["mode"] == mode and list(part["methods"]) == ["slug", "ga"]
        assert part["data"]["test_sizes"]["concepts"] == list(concepts)
        for name, e in part["methods"].items():
            assert {"metrics", "time_s", "cpu_s", "peak_mem_bytes", "storage_bytes", "passes", "mia",
                    "per_concept"} <= set(e)
            assert e["start_sha256"] == rep["base_sha256"] and e["time_s"] > 0
            assert set(e["per_concept"]) == set(concepts), (mode, name)
            for c in concepts:
                assert set(e["per_concept"][c]["after"]) == {"forget_top1", "forget_top5"}
                assert e["per_concept"][c]["before"]["forget_top5"] >= 0.9
            assert shared <= set(e["metrics"]["after"])
            assert set(e["metrics"]["after"]["forget_by_concept"]) == set(concepts)
        assert part["original"]["metrics"]["before"] == rep["original"]["metrics"]["before"]
    joint, seq = rep["joint"], rep["sequential"]
    assert joint["data"]["n_forget"] == 200 and joint["methods"]["ga"]["selected_epoch"] == 1
    assert (out / "joint" / "slug" / "result.json").is_file()
    # sequential: SLUG chained one patch over its two runs; each baseline ran one step per concept
    s = seq["methods"]["slug"]
    assert [st["concept"] for st in s["steps"]] == list(concepts)
    assert s["storage_bytes"] == (out / "sequential" / "slug" / "patch" / "patch.safetensors").stat().st_size
    assert json.loads((out / "sequential" / "slug" / "patch" / "patch.json").read_text())["method"] == "chained"
    ga = seq["methods"]["ga"]
    assert [st["concept"] for st in ga["steps"]] == list(concepts) and ga["passes"]["backward_samples"] == 200
    assert ga["time_s"] == pytest.approx(sum(st["time_s"] for st in ga["steps"]))
    # step 2's retain set names neither concept unlearned so far
    step2 = seq["data"]["steps"][1]
    assert step2["curate"]["retain_excluding_earlier"]["excludes"] == [concepts[0]]
    from slugkit.data.folders import iter_pairs

    spec = out / "sequential" / "slug" / f"2-{concepts[1].replace(' ', '_')}" / "data" / "retain-excluding-earlier.tar"
    captions = [p.caption.lower() for p in iter_pairs(str(spec), decode=False)]
    assert captions and not any(c.lower() in cap for cap in captions for c in concepts)
    assert seq["data"]["mia_heldout"] == 20 and joint["data"]["mia_heldout"] == 20
    md = (out / "compare.md").read_text()
    assert "## Joint" in md and "## Sequential" in md
    # the headline verdict covers both modes and says each; each section has its own (trial 46)
    v = rep["verdict"]
    assert v["by_mode"] == {m: rep[m]["methods"]["slug"]["verdict"]["status"] for m in ("joint", "sequential")}
    assert (f"SLUG's verdict: **{v['status']}** (the more severe of joint: {v['by_mode']['joint']}, sequential: "
            f"{v['by_mode']['sequential']})") in md
    assert f"## Joint\n\nSLUG's verdict in this mode: **{v['by_mode']['joint']}**" in md
    assert all(st["layers"][0] == st["layer"] for st in s["steps"])
    for c in concepts:
        assert f"{c} FA@1" in md and f"{c} FA@5" in md


def test_compare_concepts_refusals(compare_run, tmp_path, capsys):
    run, data_dir = compare_run
    a, b = world.IDENTITIES[0].name, world.IDENTITIES[1].name
    assert main(["compare", "--concepts", f"{a},{b}", "--modes", "nope", "--out", str(tmp_path / "m"),
                 "--data-dir", str(data_dir), "--no-progress"]) == 2
    assert "--modes: unknown 'nope'; choose from joint, sequential, or both" in capsys.readouterr().err
    from slugkit.cli.compare import _modes  # trial 39: "both", which --help offers, was refused

    assert _modes("both") == _modes(None) == ["joint", "sequential"] and _modes("sequential,both") == [
        "sequential", "joint"] and _modes("joint") == ["joint"]
    argv = ["compare", "--concepts", f"{a},{b}", "--forget", str(run / "data" / "forget.tar"),
            "--retain", str(run / "data" / "retain.tar"), "--val-identities", str(data_dir / "val" / "identities"),
            "--test-identities", str(data_dir / "test" / "identities"), "--names", str(data_dir / "names.txt"),
            "--out", str(tmp_path / "e"), "--no-progress"]
    assert main(argv) == 2  # explicit data: sequential needs one forget set per concept
    assert "sequential" in capsys.readouterr().err


def test_mixed_retain_set_composition(compare_run, tmp_path, capsys):
    """``--retain-identity-fraction``: exactly that share of other identities' pairs, never the concept, the rest
    utility pairs; deterministic bytes; bad fractions and explicit data refused."""
    from slugkit.data.folders import iter_pairs
    from slugkit.workflows.world_runs import world_config
    from slugkit.world.demo_data import write_mixed_retain

    run, data_dir = compare_run
    concept = world.IDENTITIES[0].name
    cfg, cur, _ = world_config(concept, tmp_path / "w", data_dir, progress=False, retain_identity_fraction=0.1)
    assert cur["retain_mix"]["identity_pairs"] == 90 and cur["retain_mix"]["utility_pairs"] == 810
    captions = [p.caption.lower() for p in iter_pairs(cfg.retain, decode=False)]
    named = [next((i.name for i in world.IDENTITIES if i.name.lower() in c), None) for c in captions]
    assert len(captions) == 900 and sum(n is not None for n in named) == 90 and concept not in named
    assert len({n for n in named if n}) > 30  # spread over the other identities, not one of them
    assert any(n is None for n in named[:50]) and any(n is not None for n in named[:100])  # mixed order
    again = write_mixed_retain([concept], tmp_path / "again.tar", 0.1)
    assert again == cur["retain_mix"] and (tmp_path / "again.tar").read_bytes() == open(cfg.retain, "rb").read()
    with pytest.raises(ValueError, match="retain-identity-fraction"):
        write_mixed_retain([concept], tmp_path / "bad.tar", 1.5)
    argv = ["compare", "--concept", concept, "--retain-identity-fraction", "0.1", "--forget", str(run / "data" / "forget.tar"),
            "--retain", str(run / "data" / "retain.tar"), "--val-identities", str(data_dir / "val" / "identities"),
            "--test-identities", str(data_dir / "test" / "identities"), "--names", str(data_dir / "names.txt"),
            "--out", str(tmp_path / "e"), "--no-progress"]
    assert main(argv) == 2
    assert "retain-identity-fraction" in capsys.readouterr().err


def test_compare_on_the_model_device(compare_run, tmp_path, monkeypatch):
    """`slug compare --device`: SLUG, the baselines, the evaluation and the MIA with the model on a (simulated)
    separate device — data in host memory must be moved batch by batch — give the CPU run's metrics exactly."""
    import slugkit.models as models
    from sim_device import SimDeviceAdapter

    run, data_dir = compare_run
    real = models.load_adapter
    monkeypatch.setattr(models, "load_adapter", lambda *a, **k: SimDeviceAdapter(real(*a, **k)))
    threads = torch.get_num_threads()
    try:
        rep = run_compare(CompareConfig(concept=world.IDENTITIES[0].name, out=str(tmp_path / "sim"),
                                        methods=["slug", "ga", "ssd"], epochs=1, forget_samples=40, retain_samples=64,
                                        data_dir=str(data_dir), threads=1))
    finally:
        torch.set_num_threads(threads)
    ref = json.loads((run / "compare.json").read_text())
    for m in ("slug", "ga", "ssd"):
        assert rep["methods"][m]["metrics"]["after"] == ref["methods"][m]["metrics"]["after"], m
        assert rep["methods"][m]["mia"] == ref["methods"][m]["mia"], m
    assert rep["config"]["device"] == "cpu"  # the simulated device stands in for a GPU on the CPU


def test_compare_records_final_paths(compare_run, multi_run):
    """Assembled in a temporary folder and renamed: compare.json and the SLUG runs inside it record the paths the
    folders have after the rename, and no temporary folder or lock is left next to them."""
    for out in (compare_run[0], multi_run[0]):
        for f in out.rglob("*.json"):
            assert ".slug-" not in f.read_text(), f
        assert not [p.name for p in out.parent.iterdir() if ".slug-" in p.name]
    out = compare_run[0]
    run = json.loads((out / "slug" / "run.json").read_text())
    assert run["config"]["out"] == str(out / "slug")
    assert run["config"]["forget"] == str(out / "data" / "forget.tar") and (out / "data" / "forget.tar").is_file()
    out, concepts = multi_run
    seq = json.loads((out / "sequential" / "slug" / "result.json").read_text())
    steps = [out / "sequential" / "slug" / f"{k + 1}-{c.replace(' ', '_')}" for k, c in enumerate(concepts)]
    assert [s["out"] for s in seq["steps"]] == [str(p) for p in steps]
    assert all((p / "result.json").is_file() for p in steps)
