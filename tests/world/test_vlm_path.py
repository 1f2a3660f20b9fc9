"""The VLM path as a new user drives it (trial 26): apply/audit/demo options and folders it mishandled."""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from slugkit.cli import main  # noqa: E402
from slugkit.patch import save_patch  # noqa: E402
from slugkit.patch.ops import make_patch  # noqa: E402
from slugkit.world import render as world  # noqa: E402
from slugkit.world import vlm  # noqa: E402

NAME = "vision_model.encoder.layers.1.self_attn.out_proj.weight"
OTHER = "vision_model.encoder.layers.0.mlp.fc1.weight"


@pytest.fixture(scope="module")
def clip():
    from slugkit.models.hf_clip import embedded_hf_adapter

    return embedded_hf_adapter()


def _patch(clip, out, name=NAME, base=None, concept=None, **extra):
    p = make_patch(clip.model, {name: dict(clip.model.named_parameters())[name].detach() * -1.0},
                   base_model=base or clip.model_id, adapter="hf_clip", concept=concept or world.IDENTITIES[0].name,
                   extra={"target": "vlm", **extra})
    save_patch(p, out)
    return out


def test_apply_llava_onto_an_existing_file_is_refused(clip, tmp_path, capsys):
    """`slug apply --llava … --out notes.txt` moved the user's file to a hidden .old and wrote a model folder there,
    exit 0."""
    patch = _patch(clip, tmp_path / "patch")
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    assert main(["apply", "--llava", "embedded", "--patch", str(patch), "--out", str(notes)]) == 2
    assert "exists and is not a folder; --llava writes a model folder there" in capsys.readouterr().err
    assert notes.read_text() == "my precious notes" and sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt", "patch"]
    # a patch found below the folder given (a model folder holding a run, by mistake) is named (trial 26)
    (tmp_path / "m" / "run").mkdir(parents=True)
    shutil.copytree(patch, tmp_path / "m" / "run" / "patch")
    assert main(["apply", "--llava", "embedded", "--patch", str(tmp_path / "m"), "--out", str(notes)]) == 2
    assert f"note: --patch {tmp_path / 'm'}: using the patch at {tmp_path / 'm' / 'run' / 'patch'}" in \
        capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "m")]) == 0  # inspect (and export, audit) used it without a word
    assert f"note: slug inspect {tmp_path / 'm'}: using the patch at {tmp_path / 'm' / 'run' / 'patch'}" in \
        capsys.readouterr().err
    # a --llava folder that is not there, or a file, was "not a LLaVA model folder (no config.json in it)"
    for cmd in ("apply", "revert"):
        assert main([cmd, "--llava", str(tmp_path / "nope"), "--patch", str(patch), "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 2
        assert f"{tmp_path / 'nope'}: no such folder; pass a folder written by model.save_pretrained(DIR)" in \
            capsys.readouterr().err
    assert main(["apply", "--llava", str(notes), "--patch", str(patch), "--out", str(tmp_path / "o")]) == 2
    assert f"{notes}: is a file; pass the LLaVA model folder" in capsys.readouterr().err
    (tmp_path / "sd").mkdir()  # a diffusers pipeline folder is named as one (trial 48: "no config.json in it")
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    assert main(["apply", "--llava", str(tmp_path / "sd"), "--patch", str(patch), "--out", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'sd'} is a diffusers pipeline folder (model_index.json), not a LLaVA" in \
        capsys.readouterr().err
    (tmp_path / "te").mkdir()  # a pipeline's text_encoder/ was loaded as a default 7B LLaVA (OOM; verify 50)
    (tmp_path / "te" / "config.json").write_text('{"model_type": "clip_text_model"}')
    assert main(["apply", "--llava", str(tmp_path / "te"), "--patch", str(patch), "--out", str(tmp_path / "o")]) == 2
    assert "its config.json says model_type 'clip_text_model', not 'llava'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_audit_of_a_vlm_patch_refuses_what_it_would_ignore(clip, tmp_path, capsys):
    """`slug audit` of a VLM patch audited the patch's concept whatever --concept said (a typo too) and dropped
    --alias, --test-identities, --names without a word, while the CLIP audit refuses another concept."""
    patch = _patch(clip, tmp_path / "patch")
    other = world.IDENTITIES[3].name
    assert main(["audit", "--patch", str(patch), "--concept", other, "--out", str(tmp_path / "a")]) == 2
    assert f"--concept {other!r}: the patch at {patch} removed" in capsys.readouterr().err
    (tmp_path / "n.txt").write_text("A B\n")
    assert main(["audit", "--patch", str(patch), "--alias", "Jowen", "--names", str(tmp_path / "n.txt"), "--out",
                 str(tmp_path / "a")]) == 2
    assert ("--alias, --names: apply to the audit of a CLIP patch; this patch is of the embedded VLM model"
            in capsys.readouterr().err)
    assert not (tmp_path / "a").exists()
    # --model took it for a CLIP audit ("--test-identities is required …"), whose options are refused (trial 27)
    assert main(["audit", "--patch", str(patch), "--model", "ViT-B-32", "--out", str(tmp_path / "a")]) == 2
    assert "--model ViT-B-32: this patch is of the embedded VLM" in capsys.readouterr().err
    # the VLM folder the patch was judged on, gone: it blamed --vlm-model, an option audit has not
    moved = _patch(clip, tmp_path / "moved", vlm_model=str(tmp_path / "gone"))
    assert main(["audit", "--patch", str(moved), "--out", str(tmp_path / "a")]) == 2
    assert f"the VLM this patch was judged on, {tmp_path / 'gone'} (patch.json extra.vlm_model), is gone" in \
        capsys.readouterr().err


def test_audit_options_an_audit_does_not_read_are_refused(clip, tmp_path, capsys):
    """The VLM audit ran its fixed budgets under --relearn-steps/--attack-iterations without a word, the
    CLIP audit under --audit-images, and the run commands took every audit option without --audit."""
    patch = _patch(clip, tmp_path / "patch")
    assert main(["audit", "--patch", str(patch), "--relearn-steps", "5", "--attack-iterations", "3", "--out",
                 str(tmp_path / "a")]) == 2
    assert ("--attack-iterations, --relearn-steps: not read by the audit of a VLM patch; drop them (it reads "
            "--gate-representation, --probes)") in capsys.readouterr().err
    clip_patch = tmp_path / "clip_patch"
    from slugkit.models import load_adapter

    oc = load_adapter("embedded")
    name = "visual.transformer.resblocks.1.attn.out_proj.weight"
    save_patch(make_patch(oc.model, {name: dict(oc.model.named_parameters())[name].detach() * 0.5},
                          base_model=oc.model_id, adapter="open_clip", concept=world.IDENTITIES[0].name), clip_patch)
    assert main(["audit", "--patch", str(clip_patch), "--audit-images", "4", "--out", str(tmp_path / "a")]) == 2
    assert "--audit-images: not read by the audit of a CLIP patch; drop it (it reads --attack-candidates" in \
        capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    for argv, said in ((["demo", "--relearn-steps", "5"], "--relearn-steps: audit option(s), read only with --audit"),
                       (["demo", "--target", "sd", "--audit", "--relearn-lr", "1e-3"],
                        "--relearn-lr: not read by the audit of a text-to-image patch"),
                       (["compare", "--probes", "prompts"], "--probes: audit option(s), read only with --audit"),
                       (["unlearn", "--model", "embedded", "--concept", world.IDENTITIES[0].name, "--train-identities",
                         str(tmp_path)], "--train-identities: the relearning and representation probes' images, read "
                                         "only with --audit")):
        assert main([*argv, "--out", str(tmp_path / "r")]) == 2, argv
        assert said in capsys.readouterr().err, argv
    assert not (tmp_path / "r").exists()


def test_demo_vlm_refuses_options_and_folders_it_would_misuse(tmp_path, capsys, monkeypatch):
    """--save-gradients wrote nothing under --target vlm; --out inside the VLM folder it read, or inside the
    package's assets, was written into. --no-progress now also silences transformers' and the hub's bars."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert main(["demo", "--target", "vlm", "--save-gradients", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    assert "--save-gradients: option(s) of the CLIP demo (--target clip), which --target vlm does not use" in \
        capsys.readouterr().err
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"
    assert main(["demo", "--target", "vlm", "--batch-size", "32", "--out", str(tmp_path / "r")]) == 2
    assert "--batch-size: option(s) of the CLIP demo" in capsys.readouterr().err
    from slugkit.cli import build_parser  # the CLIP search options reach the VLM demo without --criterion (trial 40)
    from slugkit.cli.args import search_config
    from slugkit.slug.search import SearchConfig

    import slugkit.workflows.sd_demo as sdd
    import slugkit.workflows.vlm_demo as vd

    seen = {}

    def fake(*args, **kw):
        seen.update(kw)
        raise ValueError("stopped here")  # before any work

    monkeypatch.setattr(vd, "run_vlm_demo", fake)
    monkeypatch.setattr(sdd, "run_sd_demo", fake)
    # trial 40: --protect-neighbours 0 ran with the default (recorded 10), so it was refused, while the run projected
    # its CLIP step off 10 neighbours and its report named `--protect-neighbours 0` (verification 66): it is read now
    for target in ("vlm", "sd"):
        seen.clear()
        assert main(["demo", "--target", target, "--protect-neighbours", "0", "--out", str(tmp_path / "r")]) == 2
        assert "stopped here" in capsys.readouterr().err and seen["protect_neighbours"] == 0
    # not beside the VLM's own gradient, which is projected off every other identity's instead
    assert main(["demo", "--target", "vlm", "--vlm-gradient", "vlm", "--protect-neighbours", "3", "--out",
                 str(tmp_path / "r")]) == 2
    assert "--protect-neighbours projects SLUG's CLIP gradient; --vlm-gradient vlm edits along the VLM's own" in \
        capsys.readouterr().err
    # nor beyond the other concepts there are (it said "the 50 nearest" of 29: verification 67)
    assert main(["demo", "--target", "sd", "--protect-neighbours", "30", "--out", str(tmp_path / "r")]) == 2
    assert "--protect-neighbours 30: --target sd has 29 other concepts to protect; give 0 to 29" in \
        capsys.readouterr().err
    assert main(["demo", "--target", "vlm", "--steps", "4", "--margin", "1.3", "--out", str(tmp_path / "r")]) == 2
    assert "stopped here" in capsys.readouterr().err
    assert seen["search"] == SearchConfig(steps=4, margin=1.3)
    assert search_config(build_parser().parse_args(["demo", "--target", "vlm"])) == SearchConfig()  # the old run
    copy = tmp_path / "vlm_copy"
    copy.mkdir()
    assert main(["demo", "--target", "vlm", "--vlm-model", str(copy), "--out", str(copy / "run")]) == 2
    assert f"--out {copy / 'run'} is inside --vlm-model {copy}" in capsys.readouterr().err
    inside = vlm.VLM_DIR / "run"
    assert main(["demo", "--target", "vlm", "--out", str(inside)]) == 2
    assert "is inside the slugkit package" in capsys.readouterr().err and not inside.exists()


def test_a_damaged_vlm_folder_is_one_line(clip, tmp_path):
    """A Git LFS pointer for the weights, or a config the weights do not fit, ended `slug demo --target vlm` in a
    traceback."""
    from slugkit.models.base import ModelLoadError

    d = tmp_path / "m"
    shutil.copytree(vlm.VLM_DIR, d)
    (d / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(ValueError, match="Git LFS pointer"):
        vlm.load_vlm(d)
    shutil.copy2(vlm.VLM_DIR / "model.safetensors", d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 2 * cfg["text_config"]["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"--vlm-model .*: transformers could not load it \(RuntimeError: the "
                                             r"weights hold tensors of other shapes than its config.json says\)") as e:
        vlm.load_vlm(d)
    assert "\n" not in str(e.value)
    # fewer vision layers than the weights hold: loaded with the last dropped, then the patch was blamed (trial 26)
    cfg = json.loads((vlm.VLM_DIR / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] -= 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config.json does not fit its weights \(\d+ unexpected keys \(e.g. "):
        vlm.load_vlm(d)
    from slugkit.integrations.llava import save_patched_llava

    with pytest.raises(ModelLoadError, match="does not fit its weights"):
        save_patched_llava(d, _patch(clip, tmp_path / "p"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg["vision_config"]["num_hidden_layers"] += 1  # back; the language model's width changed: `slug apply --llava`
    cfg["text_config"]["hidden_size"] *= 2  # ended in a traceback (trial 27)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"transformers could not load it \(RuntimeError: the weights hold"):
        save_patched_llava(d, tmp_path / "p", tmp_path / "out")


def test_apply_llava_says_when_no_processor_went_along(clip, tmp_path, capsys):
    """A LLaVA folder without tokenizer files was written as "(model + processor)" that AutoProcessor could not
    load; the shipped VLM's train_report.json (the unpatched model's scores) was copied into the patched folder."""
    src = tmp_path / "notok"
    shutil.copytree(vlm.VLM_DIR, src)
    (src / "tokenizer.json").unlink()  # tokenizer_config.json alone is no tokenizer either (trial 27)
    patch = _patch(clip, tmp_path / "patch")
    assert main(["apply", "--llava", str(src), "--patch", str(patch), "--out", str(tmp_path / "o")]) == 0
    out, err = capsys.readouterr()
    assert "(the model only)" in out and "holds no tokenizer (tokenizer.json" in err
    assert not (tmp_path / "o" / "train_report.json").exists() and (tmp_path / "o" / "config.json").is_file()


def test_patches_of_the_same_converted_clip_compose(clip, tmp_path):
    """A VLM demo's patch (base_model without "precision") and a `slug unlearn` one ("precision": "fp32") of the
    same model could not be composed: "different base models: embedded … vs embedded …"."""
    from slugkit.patch import compose_patches, load_patch

    a = load_patch(_patch(clip, tmp_path / "a"))
    b = load_patch(_patch(clip, tmp_path / "b", OTHER, base={**clip.model_id, "precision": "fp32"}))
    assert sorted(compose_patches([a, b]).names) == sorted([NAME, OTHER])


def test_a_gradients_file_of_other_candidates_names_the_consumer(clip, tmp_path):
    """Gradients computed under `--consumer llava:…` read by a run without it: "computed for other model weights",
    though only the candidates differed."""
    from slugkit.slug.gradfile import check_provenance, run_provenance, save_full
    from slugkit.slug.gradients import Gradients

    names = [NAME, OTHER]
    g = Gradients({n: torch.zeros(1) for n in names[:1]}, {n: torch.zeros(1) for n in names[:1]}, 1, 1)
    save_full(tmp_path / "g.safetensors", g, run_provenance(clip, names[:1], {}))
    with pytest.raises(ValueError, match=r"other candidate tensors than this run's \(it holds the gradients of 1 "
                                         r"tensors; this run has 2 candidates; the model's weights are the same\): "
                                         r"pass the --consumer"):
        check_provenance(tmp_path / "g.safetensors", clip, names, {})


def test_demo_on_a_patched_vlm_says_so(clip, tmp_path, capsys):
    """`slug demo --target vlm --vlm-model <a patched copy>` advised "use the CLIP checkpoint the LLaVA vision tower
    was made from", which the demo has no option for; the folder's slugkit_patch.json said why (trial 26)."""
    patch = _patch(clip, tmp_path / "patch")
    assert main(["apply", "--llava", "embedded", "--patch", str(patch), "--out", str(tmp_path / "patched")]) == 0
    capsys.readouterr()
    assert main(["demo", "--target", "vlm", "--vlm-model", str(tmp_path / "patched"), "--no-progress", "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--vlm-model {tmp_path / 'patched'} holds a patched VLM" in err and "slug revert --llava" in err
    assert not (tmp_path / "run").exists()
