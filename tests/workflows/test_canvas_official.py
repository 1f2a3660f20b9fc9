"""`slug canvas run` (the official UnlearnCanvas protocol) on tiny stand-ins: a tiny SD pipeline saved as a diffusers
folder, the tiny CLIP it was built from, two tiny timm ViT classifiers saved as safetensors with a judges.json, and a
five-image fake dataset in the official layout. Every method runs through the protocol; the answer set is the
declared subset × the given seeds; bad inputs are refused naming what is wrong, before any work."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slugkit.cli import main  # noqa: E402
from slugkit.workflows import canvas_official as off  # noqa: E402

STYLES, OBJECTS = "Van_Gogh,Seed_Images", "Cats,Dogs"
FILES = ["Van_Gogh/Cats/1.jpg", "Van_Gogh/Cats/2.jpg", "Van_Gogh/Dogs/1.jpg", "Seed_Images/Cats/1.jpg",
         "Seed_Images/Dogs/1.jpg"]
JUDGES = {"arch": "vit_tiny_patch16_224", "image_size": 32,
          "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    import timm
    from hf_tiny import build_adapter, tiny_sd_pipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ucanvas")
    clip = build_adapter(seed=3)
    clip.save_pretrained(root / "clip")
    tiny_sd_pipeline(clip).save_pretrained(root / "sd")
    (root / "cls").mkdir()
    torch.manual_seed(0)
    for name, k in (("style50", 51), ("style50_cls", 20)):
        net = timm.create_model(JUDGES["arch"], pretrained=False, num_classes=k, **JUDGES["kwargs"])
        save_file({n: t.contiguous() for n, t in net.state_dict().items()}, str(root / "cls" / f"{name}.safetensors"))
    (root / "cls" / "judges.json").write_text(json.dumps(JUDGES))
    rng = np.random.default_rng(0)
    for f in FILES:
        p = root / "data" / f
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
    return root


def _args(bench, *extra, styles=STYLES):
    """The command line; a ``--styles``/``--objects`` in ``extra`` replaces the default (an option given twice is
    refused)."""
    base = {"--styles": styles, "--objects": OBJECTS}
    given = [extra[i] for i in range(0, len(extra)) if extra[i] in base]
    return ["canvas", "run", "--pipeline", str(bench / "sd"), "--clip", str(bench / "clip"), "--classifiers",
            str(bench / "cls"), "--data", str(bench / "data"),
            *[w for k, v in base.items() if k not in given for w in (k, v)], *extra]


def test_every_method_runs_the_official_protocol(bench):
    from slugkit.workflows.canvas_lite import run_protocol

    ctx = off.official_context(bench / "sd", bench / "clip", bench / "cls", bench / "data",
                               styles=STYLES.split(","), objects=OBJECTS.split(","), steps=2, seeds=[188, 288])
    assert ctx.grid.image_size == 32 and ctx.max_length == 48 and ctx.guidance == 9.0
    x, prompts = ctx.grid.images([("Van_Gogh", "Cats")], 3, 0, 1)
    # the official sampling scripts' prompt: "A", underscores replaced
    assert x.shape == (3, 32, 32, 3) and prompts[0] == "A Cats image in Van Gogh style."
    erase, keep = ctx.grid.uce_prompts("Van_Gogh")  # UCE's train_erase.py: the bare name; "" and the other pairs
    assert erase == ["Van Gogh"] and keep == ["", "A Cats image in Seed Images style.", "A Dogs image in Seed Images "
                                                                                         "style."]
    fast = {"esd": {"iterations": 2, "ddim_steps": 2}, "salun": {"steps": 2, "per_pair": 1},
            "slug": {"max_searched": 1, "search_steps": 2, "val_target": 2, "val_other": 1}}
    r = run_protocol(ctx, ["slug", "esd", "salun", "uce"], None, None, 1, progress=False, settings=fast)
    # Seed_Images is judged (in the answer set) but not a target
    assert r["options"]["targets"] == ["Van_Gogh", "Cats", "Dogs"]
    assert r["base"]["answer_set_images"] == 2 * 2 * 2 and r["options"]["answer_seeds"] == [188, 288]
    for row in r["rows"]:
        assert set(row) >= {"ua", "ira", "cra", "time_s", "peak_mem_bytes", "storage_bytes", "storage_full_bytes"}
        if not row.get("refused"):
            assert row["time_s"] > 0 and row["storage_bytes"] > 0
    salun = next(x for x in r["rows"] if x["method"] == "salun")
    assert salun["module"] == "unet" and salun["storage_full_bytes"] >= salun["storage_bytes"]
    # the untrained judges recognise (almost) nothing: the targets they never recognise on the unedited model's
    # images are named, and their rows marked, for a UA of 100 % that says nothing (twentieth trial)
    gone = [t for t in r["options"]["targets"] if next(x for x in r["rows"] if x["target"] == t)["base"]["ua"] == 1.0]
    assert gone and r["base"]["unrecognised_targets"] == gone
    assert all(x.get("base_unrecognised", False) == (x["target"] in gone) for x in r["rows"])
    from slugkit.report.canvas import render_canvas

    assert f"of {', '.join(gone)}**: their UA reads 100 % for any method" in render_canvas({"protocol": "official",
                                                                                          **r})


def test_judges_map_official_labels_into_the_grid(bench):
    from slugkit.world.canvas import Grid

    grid = Grid(["Monet", "Van_Gogh"], ["Dogs"], capitalize=False)
    j = off.TimmJudges.load(bench / "cls", grid)
    assert j.maps[0][off.STYLE_LABELS.index("Van_Gogh")] == 1 and j.maps[0][0] == -1  # Abstractionism: outside
    assert j.maps[1][off.OBJECTS20.index("Dogs")] == 0
    s, o = j.predict(torch.zeros(3, 3, 40, 40, dtype=torch.uint8))
    assert s.shape == (3,) and set(s) <= {-1, 0, 1} and set(o) <= {-1, 0}


def test_cli_writes_the_table(bench, tmp_path, capsys):
    out = tmp_path / "run"
    # exit 3 (a warning, as a run's warn verdict): the stand-in judges recognise no Dogs (it exited 0: trial 51)
    assert main(_args(bench, "--methods", "uce", "--targets", "Dogs", "--seeds", "188", "--steps", "2", "--out",
                      str(out), "--no-progress")) == 3
    rep = json.loads((out / "canvas.json").read_text())
    assert rep["protocol"] == "official" and rep["methods"]["uce"]["object"]["ua"] >= 0
    assert "the official protocol (`slug canvas run`)" in (out / "canvas.md").read_text()
    assert rep["options"]["data"] == str(bench / "data")
    assert rep["options"]["settings"]["esd"] == off.OFFICIAL_SETTINGS["esd"]  # SD-1.5 scale, not the embedded one
    # the untrained stand-in judges recognise no Dogs: stderr and canvas.md say it in the same words
    from slugkit.report.canvas import unrecognised_warning

    assert rep["base"]["unrecognised_targets"] == ["Dogs"]
    assert f"warning: {unrecognised_warning(['Dogs'])} (exit status 3)" in capsys.readouterr().err
    assert unrecognised_warning(["Dogs"], bold=True) in (out / "canvas.md").read_text()


def test_bad_inputs_are_refused_before_any_work(bench, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(_args(bench, "--out", str(out), styles="Van_Gogh,Monet")) == 2  # no Monet folder
    assert "Monet/Cats holds no .jpg/.jpeg/.png images" in capsys.readouterr().err
    # trial 38: a --data with none of the style folders was told to restrict the grid, and --out could be inside
    # what the run reads (canvas.* written into the dataset)
    args = _args(bench, "--out", str(out))
    args[args.index("--data") + 1] = str(bench / "sd")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--data {bench / 'sd'} holds none of the grid's 2 style folders (Van_Gogh, Seed_Images)" in err
    for k, inside in (("data", bench / "data" / "run"), ("pipeline", bench / "sd" / "out")):
        assert main(_args(bench, "--out", str(inside))) == 2
        assert f"--out {inside} is inside --{k} {bench / k if k == 'data' else bench / 'sd'}, a folder this run reads" \
            in capsys.readouterr().err
        assert not inside.exists()
    assert main(_args(bench, "--styles", "Vangogh", "--out", str(out))) == 2
    assert "--styles: unknown 'Vangogh'; did you mean 'Van_Gogh'?" in capsys.readouterr().err
    assert main(_args(bench, "--objects", "cats,Dogs", "--out", str(out))) == 2
    assert "--objects: unknown 'cats'; did you mean 'Cats'?" in capsys.readouterr().err
    assert main(_args(bench, "--targets", "Monet", "--out", str(out))) == 2  # not in the declared grid
    assert "--targets: unknown 'Monet'" in capsys.readouterr().err
    for extra, msg in ((["--seeds", "188,x"], "--seeds"), (["--seeds", ","], "--seeds"),
                       (["--seeds", "188,188"], "distinct"), (["--guidance", "nan"], "--guidance must be a finite"),
                       (["--targets", "Seed_Images"], "never unlearns"), (["--objects", "Cats"], "at least two"),
                       (["--styles", "Van_Gogh,Van_Gogh"], "given twice"), (["--objects", "Cats,"], "empty item")):
        try:
            rc = main(_args(bench, *extra, "--out", str(out)))
        except SystemExit as e:  # refused by the parser
            rc = e.code
        assert rc == 2, extra
        assert msg in capsys.readouterr().err, extra
    pth = tmp_path / "cls"
    pth.mkdir()
    (pth / "style50.pth").write_bytes(b"not read")
    args = _args(bench, "--out", str(out))
    args[args.index("--classifiers") + 1] = str(pth)
    assert main(args) == 2
    assert "style50.safetensors is missing; style50.pth is there: slugkit does not unpickle" in capsys.readouterr().err
    import shutil

    broken = tmp_path / "cls_broken"  # a truncated classifier file, then one with the wrong head
    shutil.copytree(bench / "cls", broken)
    (broken / "style50.safetensors").write_bytes((bench / "cls" / "style50.safetensors").read_bytes()[:100])
    args[args.index("--classifiers") + 1] = str(broken)
    assert main(args) == 2
    assert "style50.safetensors is not a vit_tiny_patch16_224 with 51 style outputs" in capsys.readouterr().err
    shutil.copy(bench / "cls" / "style50_cls.safetensors", broken / "style50.safetensors")
    assert main(args) == 2
    assert "must hold the style classifier's state dict" in capsys.readouterr().err
    (broken / "judges.json").write_text("{nope")
    assert main(args) == 2
    assert "judges.json is not valid JSON" in capsys.readouterr().err
    # twentieth trial: lowercased labels made every method a "perfect" erasure (exit 0, UA 100 %); a negative
    # image_size was a traceback after the pipeline loaded; a misspelt key fell back to the default arch silently
    shutil.copy(bench / "cls" / "style50.safetensors", broken / "style50.safetensors")
    lower = {**JUDGES, "style_labels": [x.lower() for x in off.STYLE_LABELS]}
    for spec, said in ((lower, "hold no 'Van_Gogh' (2 of the grid's styles missing) — they spell it 'van_gogh': "
                               "labels are matched exactly"),
                       ({**JUDGES, "style_labels": [x.replace("_", " ") for x in off.STYLE_LABELS]},
                        "hold no 'Van_Gogh' (2 of the grid's styles missing) — they spell it 'Van Gogh'"),
                       ({**JUDGES, "image_size": -5}, "image_size must be a positive integer (pixels), got -5"),
                       ({**JUDGES, "image_size": 64}, "the style classifier does not take 64×64 images"),
                       ({**JUDGES, "archh": "x"}, "unknown key 'archh' (did you mean 'arch'?)"),
                       ({**JUDGES, "object_labels": ["Cats", "Cats"]}, "object_labels must be a non-empty list of "
                                                                        "distinct names")):
        (broken / "judges.json").write_text(json.dumps(spec))
        assert main(args) == 2, spec
        assert said in capsys.readouterr().err, spec
    assert not out.exists()
    assert main(_args(bench, "--methods", "uce", "--esd-iterations", "5", "--out", str(out))) == 2
    assert "--esd-iterations sets esd's budget, and --methods uce does not run esd" in capsys.readouterr().err
    # Seed_Images is judged, never a target: it was counted as one, so a limit that limits nothing ran (21st trial)
    assert main(_args(bench, "--max-targets", "2", "--out", str(out))) == 2
    assert "--max-targets 2 limits nothing: the targets are 1 style and 2 objects" in capsys.readouterr().err
    assert main(_args(bench, "--methods", "slug,uce", "--baseline-max-targets", "2", "--out", str(out))) == 2
    assert "--baseline-max-targets 2 limits nothing: the targets are 1 style and 2 objects" in \
        capsys.readouterr().err
    args[args.index("--classifiers") + 1] = str(bench / "cls")
    bad_img = tmp_path / "data"
    shutil.copytree(bench / "data", bad_img)
    (bad_img / "Van_Gogh" / "Cats" / "3.jpg").write_text("not an image")
    args[args.index("--data") + 1] = str(bad_img)
    assert main(args) == 2
    assert "3.jpg is not a readable image" in capsys.readouterr().err
    args[args.index("--data") + 1] = str(bench / "data")
    args[args.index("--clip") + 1] = str(bench / "sd" / "text_encoder")  # the pipeline's text encoder: not a CLIP
    assert main(args) == 2
    assert "not a transformers CLIPModel folder" in capsys.readouterr().err
    args[args.index("--clip") + 1] = str(tmp_path / "nope")
    assert main(args) == 2
    assert "--clip" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")  # a file was "no such folder" (twentieth trial)
    args[args.index("--clip") + 1] = str(tmp_path / "afile")
    assert main(args) == 2
    assert f"--clip {tmp_path / 'afile'}: is a file, not a folder" in capsys.readouterr().err
    from hf_tiny import build_adapter

    build_adapter(seed=9).save_pretrained(tmp_path / "other_clip")  # not the CLIP the pipeline was built from
    args[args.index("--clip") + 1] = str(tmp_path / "other_clip")
    assert main(args) == 2
    assert "Use the CLIP checkpoint the text encoder was made from" in capsys.readouterr().err and not out.exists()
