"""Trust cases E2, E6 and E7 of ``shared/cases/trust-cases.md`` on the SD / LLaVA integrations: Git LFS pointers in
place of a pipeline's or LLaVA's weights, the architecture a patch was made on checked against the consumer's config,
and diffusers' ``clip_skip`` in what the UNet reads."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from hf_tiny import build_adapter, tiny_llava, tiny_sd_pipeline  # noqa: E402

from slugkit.cli import main  # noqa: E402
from slugkit.patch import PatchMismatchError, make_patch, save_patch  # noqa: E402

LFS = (b"version https://git-lfs.github.com/spec/v1\n"
       b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234567\n")


@pytest.fixture(scope="module")
def clip():
    return build_adapter(seed=0)


def layer_patch(clip, layer: int, kind: str = "text", **kw):
    """A patch of one fc1/fc2 group of ``kind``'s encoder layer ``layer`` (noise of 5%)."""
    params = dict(clip.model.named_parameters())
    prefix = "text_model" if kind == "text" else "vision_model"
    names = [f"{prefix}.encoder.layers.{layer}.mlp.fc1.weight", f"{prefix}.encoder.layers.{layer}.mlp.fc2.weight"]
    g = torch.Generator().manual_seed(layer)
    new = {n: params[n].detach() * (1 + 0.05 * torch.randn(params[n].shape, generator=g)) for n in names}
    return make_patch(clip.model, new, base_model=clip.model_id, adapter="hf_clip", concept="alice abbott", **kw)


def _one_line_lfs_error(capsys, path) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and str(path) in err and "Git LFS pointer" in err and "git lfs pull" in err


# ---------------------------------------------------------------------------------------------- E2


def test_e2_lfs_pointer_in_a_pipeline_folder(tmp_path, clip, capsys):
    tiny_sd_pipeline(clip).save_pretrained(tmp_path / "sd")
    save_patch(layer_patch(clip, 1), tmp_path / "patch")
    weights = tmp_path / "sd" / "text_encoder" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(LFS)
    capsys.readouterr()
    for cmd in ("apply", "revert"):
        assert main([cmd, "--pipeline", str(tmp_path / "sd"), "--patch", str(tmp_path / "patch"), "--out",
                     str(tmp_path / f"out-{cmd}")]) == 2
        _one_line_lfs_error(capsys, weights)
        assert not (tmp_path / f"out-{cmd}").exists()
    # --full-pipeline also links the other components: a pointer among them is refused before anything is written
    weights.write_bytes(good)
    unet = tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(LFS)
    capsys.readouterr()
    assert main(["apply", "--pipeline", str(tmp_path / "sd"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "full"), "--full-pipeline"]) == 2
    _one_line_lfs_error(capsys, unet)
    assert not (tmp_path / "full").exists()
    from slugkit.integrations.diffusers_sd import load_pipeline_folder

    with pytest.raises(ValueError, match="Git LFS pointer"):
        load_pipeline_folder(str(tmp_path / "sd"))


def test_e2_lfs_pointer_in_a_llava_folder(tmp_path, clip, capsys):
    model, processor = tiny_llava(clip)
    model.save_pretrained(tmp_path / "llava")
    save_patch(layer_patch(clip, 0, "vision"), tmp_path / "patch")
    shards = sorted((tmp_path / "llava").glob("*.safetensors"))
    assert shards
    shards[0].write_bytes(LFS)
    capsys.readouterr()
    assert main(["apply", "--llava", str(tmp_path / "llava"), "--patch", str(tmp_path / "patch"), "--out",
                 str(tmp_path / "out")]) == 2
    _one_line_lfs_error(capsys, shards[0])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- E6


def test_e6_hf_architecture_is_recorded_and_checked(clip):
    from transformers import CLIPModel

    from slugkit.patch import apply_patch, architecture_facts

    facts = architecture_facts(clip.model)
    assert facts["text.activation"] == clip.model.config.text_config.hidden_act
    assert facts["vision.activation"] == clip.model.config.vision_config.hidden_act
    patch = layer_patch(clip, 1, architecture=facts)
    cfg = clip.model.config.to_dict()
    cfg["text_config"]["hidden_act"] = "gelu"
    other = CLIPModel(type(clip.model.config).from_dict(cfg)).eval()
    other.load_state_dict(clip.model.state_dict())
    assert other.config.text_config.hidden_act == "gelu"
    with pytest.raises(PatchMismatchError, match=f"(?s)text.activation.*{facts['text.activation']}.*gelu"):
        apply_patch(other, patch)


def test_e6_consumer_config_is_checked(clip):
    from slugkit.integrations.diffusers_sd import apply_patch_to_pipeline, revert_patch_from_pipeline
    from slugkit.integrations.llava import apply_patch_to_llava
    from slugkit.patch import architecture_facts

    facts = architecture_facts(clip.model)
    patch = layer_patch(clip, 1, architecture=facts)
    pipe = tiny_sd_pipeline(clip)
    apply_patch_to_pipeline(pipe, patch)  # the same architecture: fine
    revert_patch_from_pipeline(pipe, patch)
    pipe.text_encoder.config.hidden_act = "gelu"
    with pytest.raises(PatchMismatchError, match="(?s)activation.*gelu"):
        apply_patch_to_pipeline(pipe, patch)
    llava, _ = tiny_llava(clip)
    llava.config.vision_config.hidden_act = "gelu"
    with pytest.raises(PatchMismatchError, match="(?s)vision.activation.*gelu"):
        apply_patch_to_llava(llava, layer_patch(clip, 0, "vision", architecture=facts))


# ---------------------------------------------------------------------------------------------- E7


@torch.no_grad()
def test_e7_clip_skip_follows_diffusers(clip):
    """diffusers' ``StableDiffusionPipeline.encode_prompt(clip_skip=k)`` reads ``hidden_states[-(k + 1)]`` through
    ``final_layer_norm`` (k = 1: the penultimate layer): an edit of the last layer changes nothing, one of the layer
    before does; slugkit's consumption says the same. (diffusers 0.42 reaches the norm as
    ``text_encoder.text_model.final_layer_norm``, which transformers 5's ``CLIPTextModel`` no longer has, so the
    formula is computed here as diffusers writes it.)"""
    from slugkit.integrations.diffusers_sd import apply_patch_to_pipeline, consumed_layer_count

    def embeds(pipe, skip):
        ids = pipe.tokenizer(["a photo of alice abbott."], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        te = pipe.text_encoder
        if skip is None:
            return te(ids)[0]
        return te.final_layer_norm(te(ids, output_hidden_states=True)[-1][-(skip + 1)])

    pipe = tiny_sd_pipeline(clip)
    base = {s: embeds(pipe, s) for s in (None, 1)}
    apply_patch_to_pipeline(pipe, layer_patch(clip, 3), clip_skip=0)
    assert torch.equal(embeds(pipe, 1), base[1]) and not torch.equal(embeds(pipe, None), base[None])
    pipe = tiny_sd_pipeline(clip)
    apply_patch_to_pipeline(pipe, layer_patch(clip, 2), clip_skip=1)
    assert not torch.equal(embeds(pipe, 1), base[1])
    assert consumed_layer_count(4, "last", 1) == 3
    with pytest.raises(ValueError, match=r"clip_skip=4 skips every layer of the 4-layer text encoder \(the pipeline "
                                         r"reads its last hidden state, moved back 4 layers\); use a clip_skip of at "
                                         r"most 3"):  # it said "(last)"
        consumed_layer_count(4, "last", 4)
    with pytest.raises(PatchMismatchError, match="(?s)clip_skip.*no effect"):
        apply_patch_to_pipeline(tiny_sd_pipeline(clip), layer_patch(clip, 3), clip_skip=1)


def test_e7_consumer_restriction_with_clip_skip(tmp_path, clip):
    from slugkit.integrations import consumer_restriction, restrict_to_consumer
    from slugkit.integrations.diffusers_sd import pipeline_consumption

    tiny_sd_pipeline(clip).save_pretrained(tmp_path / "sd")
    spec = f"sd:{tmp_path / 'sd'}"
    pred, desc = consumer_restriction(spec, clip)
    assert pred("text_model.encoder.layers.3.mlp.fc1.weight")
    pred, desc = consumer_restriction(spec, clip, clip_skip=1)
    assert not pred("text_model.encoder.layers.3.mlp.fc1.weight") and pred("text_model.encoder.layers.2.mlp.fc1.weight")
    assert "clip_skip=1" in desc
    assert pipeline_consumption(str(tmp_path / "sd"), clip, {"local_files_only": True}, clip_skip=2)[0] == 2
    for bad in (4, -1):
        with pytest.raises(ValueError, match="clip_skip"):
            consumer_restriction(spec, clip, clip_skip=bad)
    from hf_tiny import clone

    a = restrict_to_consumer(clone(clip), spec, clip_skip=1)
    assert not [n for n in a.candidate_names() if ".layers.3." in n]
    model, _ = tiny_llava(clip)
    model.save_pretrained(tmp_path / "llava")
    with pytest.raises(ValueError, match="clip_skip"):
        consumer_restriction(f"llava:{tmp_path / 'llava'}", clip, clip_skip=1)


def test_e7_slug_apply_pipeline_clip_skip(tmp_path, clip, capsys):
    tiny_sd_pipeline(clip).save_pretrained(tmp_path / "sd")
    save_patch(layer_patch(clip, 3), tmp_path / "p3")
    args = ["apply", "--pipeline", str(tmp_path / "sd"), "--patch", str(tmp_path / "p3")]
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "skip1"), "--clip-skip", "1"]) == 2
    err = capsys.readouterr().err.split("\n")  # transformers' own loading progress bar comes first
    assert err[-1] == "" and err[-2].startswith("error: ") and "no effect" in err[-2] and "clip_skip=1" in err[-2]
    assert not (tmp_path / "skip1").exists()
    assert main(args + ["--out", str(tmp_path / "skip0")]) == 0
    assert json.loads((tmp_path / "skip0" / "slugkit_patch.json").read_text())["patch_fingerprint"]
    capsys.readouterr()
    assert main(["apply", "--patch", str(tmp_path / "p3"), "--checkpoint", str(tmp_path / "x.safetensors"),
                 "--clip-skip", "1"]) == 2
    assert "--clip-skip" in capsys.readouterr().err


def test_e2_lfs_pointer_in_a_model_folder_for_slug_apply(tmp_path, clip, capsys):
    clip.model.save_pretrained(tmp_path / "clip")
    save_patch(layer_patch(clip, 1), tmp_path / "patch")
    weights = tmp_path / "clip" / "model.safetensors"
    weights.write_bytes(LFS)
    capsys.readouterr()
    assert main(["apply", "--family", "hf_clip", "--model", str(tmp_path / "clip"), "--patch", str(tmp_path / "patch"),
                 "--out", str(tmp_path / "out.safetensors")]) == 2
    _one_line_lfs_error(capsys, weights)


def test_apply_checkpoint_on_a_text_encoder_file_saved_without_the_tower_prefix(tmp_path, clip, capsys):
    """`slug apply --checkpoint sd/text_encoder/model.safetensors`: transformers 5 saves a CLIPTextModel without
    ``text_model.``, and the patch's names failed on "no tensor named". The file is now matched through the prefix,
    written back under its own names, and reverted byte for byte."""
    from safetensors.torch import load_file

    tiny_sd_pipeline(clip).save_pretrained(tmp_path / "sd")
    ck = tmp_path / "sd" / "text_encoder" / "model.safetensors"
    keys = set(load_file(ck))
    if any(k.startswith("text_model.") for k in keys):
        pytest.skip("this transformers saves CLIPTextModel with its text_model. prefix")
    patch = layer_patch(clip, 1)
    save_patch(patch, tmp_path / "p")
    out, back = tmp_path / "o.safetensors", tmp_path / "back.safetensors"
    capsys.readouterr()
    assert main(["apply", "--patch", str(tmp_path / "p"), "--checkpoint", str(ck), "--out", str(out)]) == 0
    assert "saved without 'text_model.'" in capsys.readouterr().err
    got = load_file(out)
    assert set(got) == keys
    for name, value in patch.patched.items():
        assert torch.equal(got[name.removeprefix("text_model.")], value.to(got[name.removeprefix("text_model.")].dtype))
    assert main(["revert", "--patch", str(tmp_path / "p"), "--checkpoint", str(out), "--out", str(back)]) == 0
    assert back.read_bytes() == ck.read_bytes()
    # a vision patch on that text file: its layer names fit the text layers too, and it ended on a hash mismatch
    save_patch(layer_patch(clip, 0, kind="vision"), tmp_path / "v")
    capsys.readouterr()
    assert main(["apply", "--patch", str(tmp_path / "v"), "--checkpoint", str(ck), "--out", str(tmp_path / "w")]) == 2
    assert "is a lone CLIP text tower; the patch edits the vision tower" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_consumer_folder_that_is_not_one_is_refused(tmp_path, monkeypatch):
    """`--consumer sd:DIR` took an empty folder, or a data folder, as a pipeline whose text encoder has transformers'
    default 12 layers, and `sd:embedded` failed with a hub error while `--pipeline embedded` works (trial 24)."""
    from slugkit.integrations import consumer_restriction
    from slugkit.models.base import ModelLoadError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"--consumer sd:.*empty: not a diffusers pipeline folder"):
        consumer_restriction(f"sd:{tmp_path / 'empty'}")
    with pytest.raises(ModelLoadError, match="no such folder"):
        consumer_restriction(f"sd:{tmp_path / 'missing'}")
    with pytest.raises(ModelLoadError, match="not a LLaVA model folder"):
        consumer_restriction(f"llava:{tmp_path / 'empty'}")
    pred, desc = consumer_restriction("sd:embedded")
    assert desc == "the embedded text-to-image model (4 text layers)"
    assert pred("text_model.encoder.layers.3.mlp.fc1.weight")
    assert not pred("vision_model.encoder.layers.0.mlp.fc1.weight")
    with pytest.raises(ValueError, match="clip-skip"):
        consumer_restriction("sd:embedded", clip_skip=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id not in the cache: transformers' message, on one line
    with pytest.raises(ModelLoadError, match="could not read the consumer's config from 'someorg/somemodel'") as e:
        consumer_restriction("sd:someorg/somemodel")
    assert "\n" not in str(e.value) and ".." not in str(e.value)


def test_a_consumer_of_another_model_is_refused(tmp_path, clip):
    """Trial 25: `--consumer llava:DIR` took a CLIP's config.json as a default LLaVA's (24 vision layers), and a
    consumer built on another CLIP went through; `sd:models/sd15` (a relative path) was tried on the hub."""
    from slugkit.integrations import consumer_restriction

    (tmp_path / "clipdir").mkdir()
    (tmp_path / "clipdir" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match="config.json is of a 'clip' model, not a LLaVA"):
        consumer_restriction(f"llava:{tmp_path / 'clipdir'}", clip)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text('{"model_type": "llava"}')  # transformers' defaults: CLIP-L
    with pytest.raises(ValueError, match=r"vision tower \(24 layers, width 1024\) is not this CLIP's vision tower"):
        consumer_restriction(f"llava:{tmp_path / 'big'}", clip)
    from slugkit.models.base import ModelLoadError

    (tmp_path / "models").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ModelLoadError, match="no such folder"):
            consumer_restriction("sd:models/sd15")
    finally:
        os.chdir(cwd)


def test_a_llava_consumer_whose_vision_tower_differs_from_the_clip_is_refused(tmp_path):
    """Verify 45: `--consumer llava:DIR` was read from configs alone (an SD consumer's weights are checked since trial
    43), so a patch judged on one CLIP landed in a LLaVA whose tower differs in a layer the patch does not edit. The
    folder's vision tensors of the layers it reads (and the embeddings) must be the CLIP's; its unread last layer may
    differ; the embedded VLM is its CLIP's."""
    from slugkit.integrations import TowerMismatchError
    from slugkit.integrations.consumer import restrict_to_consumer
    from slugkit.integrations.llava import verify_llava_folder
    from slugkit.models import load_adapter

    adapter = build_adapter(seed=0)
    llava, processor = tiny_llava(adapter)
    n = len(adapter.model.vision_model.encoder.layers) - 1  # read at -2: the last layer is not consumed
    llava.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    assert verify_llava_folder(str(tmp_path / "llava"), adapter, n) > 0
    restrict_to_consumer(adapter, f"llava:{tmp_path / 'llava'}")  # its own tower: accepted
    params = dict(llava.named_parameters())
    with torch.no_grad():
        next(v for k, v in params.items() if f"encoder.layers.{n}.mlp.fc1.weight" in k).add_(1e-3)  # unread layer
    llava.save_pretrained(tmp_path / "llava")
    restrict_to_consumer(build_adapter(seed=0), f"llava:{tmp_path / 'llava'}")
    with torch.no_grad():
        next(v for k, v in params.items() if "encoder.layers.0.mlp.fc1.weight" in k and "vision" in k).add_(1e-3)
    llava.save_pretrained(tmp_path / "llava")
    with pytest.raises(TowerMismatchError, match=r"--consumer llava:.*encoder\.layers\.0\.mlp\.fc1\.weight .*differs"):
        restrict_to_consumer(build_adapter(seed=0), f"llava:{tmp_path / 'llava'}")
    embedded = load_adapter("embedded", family="hf_clip")
    restrict_to_consumer(embedded, "llava:embedded")  # the shipped VLM's tower is the shipped CLIP's
