"""The open_clip adapter: candidate filters and tower split (spec §3.4, §10.4), staged forward (spec §9.3), loading.

The candidate list of the tiny model is written out by hand from its ``named_parameters()`` (not derived with the
adapter's own filter), so a changed filter fails here.
"""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from conftest import TINY_CFG, check_stage_index, class_images
from conftest import run_stages as _run

pytest.importorskip("open_clip")

from slugkit.models.base import ModelLoadError  # noqa: E402
from slugkit.models.open_clip import OpenClipAdapter, resolve_model_name  # noqa: E402

BLOCK_CANDIDATES = ["ln_1.weight", "attn.in_proj_weight", "attn.out_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
                    "mlp.c_proj.weight"]
# In named_parameters() order. Vision: conv1 (stem), ln_pre gain, 6 per block, ln_post gain, proj (16 tensors).
# Language: the 6 per block, ln_final gain, text_projection (14 tensors). (spec §3.4 for ViT-B-32: 76 + 74.)
EXPECTED_VISION = (["visual.proj", "visual.conv1.weight", "visual.ln_pre.weight"]
                   + [f"visual.transformer.resblocks.{i}.{s}" for i in range(2) for s in BLOCK_CANDIDATES]
                   + ["visual.ln_post.weight"])
EXPECTED_LANGUAGE = (["text_projection"]
                     + [f"transformer.resblocks.{i}.{s}" for i in range(2) for s in BLOCK_CANDIDATES]
                     + ["ln_final.weight"])
EXPECTED_EXCLUDED = (
    ["positional_embedding", "logit_scale", "visual.class_embedding", "visual.positional_embedding",
     "visual.ln_pre.bias", "visual.ln_post.bias", "token_embedding.weight", "ln_final.bias"]
    + [f"{p}transformer.resblocks.{i}.{s}" for p in ("visual.", "") for i in range(2)
       for s in ("ln_1.bias", "attn.in_proj_bias", "attn.out_proj.bias", "ln_2.bias", "mlp.c_fc.bias",
                 "mlp.c_proj.bias")]
)


# ---------------------------------------------------------------------------------------------- candidates (§10.4)
def test_candidate_list_is_exact(adapter):
    names = [n for n, _ in adapter.model.named_parameters()]
    assert sorted(names) == sorted(EXPECTED_VISION + EXPECTED_LANGUAGE + EXPECTED_EXCLUDED)  # fixture sanity
    cands = adapter.candidate_names()
    assert sorted(cands) == sorted(EXPECTED_VISION + EXPECTED_LANGUAGE)
    assert len(cands) == len(set(cands)) == 30
    # order: named_parameters() order
    assert cands == [n for n in names if n in set(cands)]


def test_candidate_filter_rules(adapter):
    cands = set(adapter.candidate_names())
    for n, _ in adapter.model.named_parameters():
        if "bias" in n or n in ("logit_scale", "visual.class_embedding", "visual.positional_embedding",
                                "positional_embedding", "token_embedding.weight"):
            assert n not in cands, n
        if any(f"{ln}.weight" in n for ln in ("ln_1", "ln_2", "ln_pre", "ln_post", "ln_final")):
            assert n in cands, f"LayerNorm gains are candidates in open_clip (spec §3.4/§9.5f): {n}"
    for n in ("visual.proj", "text_projection", "visual.conv1.weight"):
        assert n in cands


def test_tower_split(adapter):
    vision = [n for n in adapter.candidate_names() if adapter.tower_of(n) == "vision"]
    language = [n for n in adapter.candidate_names() if adapter.tower_of(n) == "language"]
    assert vision == EXPECTED_VISION
    assert language == EXPECTED_LANGUAGE
    for n, _ in adapter.model.named_parameters():
        assert adapter.tower_of(n) == ("vision" if "visual" in n else "language")


def test_group_is_the_tensor_alone(adapter):
    # q/k/v share attn.in_proj_weight in open_clip: every group is a single tensor (spec §3.1, §4.1)
    for n in adapter.candidate_names():
        assert adapter.group_of(n) == [n]


# ---------------------------------------------------------------------------------------------- staged forward
def test_every_candidate_is_read_by_exactly_one_stage(adapter):
    for n in adapter.candidate_names():
        hits = [(tower, i) for tower in ("vision", "language")
                for i, st in enumerate(adapter.stages(tower)) if n in st.params]
        assert len(hits) == 1, (n, hits)
        tower, i = hits[0]
        assert tower == adapter.tower_of(n)
        assert adapter.stage_index(tower, n) == i


def test_every_tower_parameter_is_covered_once(adapter):
    # every parameter of a tower is read by exactly one of its stages (logit_scale belongs to neither tower)
    for n, _ in adapter.model.named_parameters():
        if n == "logit_scale":
            continue
        tower = adapter.tower_of(n)
        assert sum(n in st.params for st in adapter.stages(tower)) == 1, n
    with pytest.raises(KeyError):
        adapter.stage_index("vision", "text_projection")


@torch.no_grad()
def test_staged_forward_equals_encoders(adapter, forget_data):
    images, tokens = forget_data
    v = _run(adapter.stages("vision"), images, None)
    t = _run(adapter.stages("language"), tokens, tokens)
    ref_v, ref_t = adapter.model.encode_image(images), adapter.model.encode_text(tokens)
    assert v.shape == ref_v.shape == (len(images), 32)
    assert t.shape == ref_t.shape == (len(tokens), 32)
    assert torch.allclose(v, ref_v, rtol=0, atol=1e-6)
    assert torch.allclose(t, ref_t, rtol=0, atol=1e-6)
    # same ops on the same shapes: bit-identical
    assert torch.equal(v, ref_v) and torch.equal(t, ref_t)


@torch.no_grad()
def test_stage_index_is_where_the_tensor_first_matters(adapter, forget_data):
    """Perturbing a candidate leaves the activations entering its stage unchanged and changes the tower output.

    This is what the cached search relies on: activations before ``stage_index`` can be computed once.
    """
    images, tokens = forget_data
    check_stage_index(adapter, images, tokens, lambda p: 0.5 * p.std().clamp_min(0.1))


# ---------------------------------------------------------------------------------------------- loading errors
def test_missing_safetensors_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(ModelLoadError, match="not found") as ei:
        resolve_model_name("ViT-B-32", str(missing))
    assert str(missing) in str(ei.value)
    with pytest.raises(ModelLoadError) as ei:
        OpenClipAdapter.load("ViT-B-32", str(missing))
    assert str(missing) in str(ei.value)


def test_a_named_model_without_pretrained_weights_is_refused_not_randomly_initialised(capsys):
    """Trial 17: `slug grads --model ViT-B-32` (the README's torchrun line had no --pretrained) ran on a random model;
    only open_clip's log said so. A misspelt name still gets its own message."""
    from slugkit.cli import main

    with pytest.raises(ModelLoadError, match="without --pretrained would be randomly initialised"):
        OpenClipAdapter.load("ViT-B-32")
    with pytest.raises(ModelLoadError, match="is not an open_clip model name"):
        OpenClipAdapter.load("ViT-B-3")
    assert main(["grads", "--model", "ViT-B-32", "--forget", "f.tar", "--retain", "r.tar", "--out",
                 "g.safetensors"]) == 2
    assert "pass --pretrained TAG (e.g. --model ViT-B-32 --pretrained laion400m_e32)" in capsys.readouterr().err


def _tripwire(path):  # unpickling a _Tripwire calls this
    open(path, "w").close()


class _Tripwire:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_tripwire, (self.path,))


def test_pt_checkpoint_is_refused_and_never_unpickled(tmp_path):
    sentinel = tmp_path / "unpickled"
    pt = tmp_path / "weights.pt"
    pt.write_bytes(pickle.dumps({"state_dict": _Tripwire(str(sentinel))}))
    for call in (lambda: resolve_model_name("ViT-B-32", str(pt)), lambda: OpenClipAdapter.load("ViT-B-32", str(pt))):
        with pytest.raises(ModelLoadError) as ei:
            call()
        msg = str(ei.value)
        assert "safetensors" in msg and "never unpickles" in msg
        assert str(pt) in msg
    assert not sentinel.exists()


def test_a_folder_model_takes_its_weights_from_a_pretrained_file(tmp_path):
    """``--model embedded --pretrained patched.safetensors`` silently loaded the shipped weights: the run, its patch
    and an audit described another model than the one named (twelfth trial). The file's weights are used now, and
    a file that does not fit or a tag beside a folder is refused."""
    from safetensors.torch import save_file

    base = OpenClipAdapter.load("embedded")
    state = {k: v.clone().contiguous() for k, v in base.model.state_dict().items()}
    state["visual.proj"] = state["visual.proj"] * 0.5
    save_file(state, str(tmp_path / "patched.safetensors"))
    got = OpenClipAdapter.load("embedded", str(tmp_path / "patched.safetensors"))
    assert torch.equal(got.model.visual.proj, base.model.visual.proj * 0.5)
    assert torch.equal(got.model.text_projection, base.model.text_projection)
    assert got.model_id["pretrained"] == str(tmp_path / "patched.safetensors")
    del state["text_projection"]
    state["visual.conv1.weight"] = state["visual.conv1.weight"][:, :1].contiguous()
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelLoadError, match=r"does not fit 'embedded': missing 1 \(text_projection\); shape "
                                             r"differs for 1 \(visual.conv1.weight\)"):
        OpenClipAdapter.load("embedded", str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelLoadError, match="'laion400m_e32' is a tag of a named model; 'embedded' is a folder"):
        OpenClipAdapter.load("embedded", "laion400m_e32")
    with pytest.raises(ModelLoadError, match="not found"):
        OpenClipAdapter.load("embedded", str(tmp_path / "nope.safetensors"))


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        resolve_model_name(str(tmp_path), None)


def test_unreachable_pretrained_tag_explains_local_weights(tmp_path, monkeypatch, caplog):
    """Offline, a pretrained tag fails fast with a message that says how to pass local weights, said once (open_clip
    also logged it as ``ERROR:root:Failed to download weights …`` before our error)."""
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time; patch the module flag it consults as well
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True, raising=False)
    if hasattr(hf_constants, "is_offline_mode") and not hf_constants.is_offline_mode():
        pytest.skip("cannot force huggingface_hub offline in-process; the download would retry for ~1 minute")
    caplog.set_level("DEBUG")
    with pytest.raises(ModelLoadError) as ei:
        OpenClipAdapter.load("ViT-B-32", "laion400m_e32", cache_dir=str(tmp_path / "cache"))
    msg = str(ei.value)
    assert "Failed to download weights for tag 'laion400m_e32'" in msg
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    logging.getLogger().error("after the load: logged as usual")  # the filter was removed
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == ["after the load: logged as usual"]
    assert "ViT-B-32" in msg and "laion400m_e32" in msg
    assert "--pretrained /path/to/open_clip_model.safetensors" in msg
    assert "local-dir:" in msg


def test_local_dir_round_trip(tmp_path, adapter, forget_data):
    from safetensors.torch import save_file

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    state = {k: v.contiguous() for k, v in adapter.model.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    for model_id in (str(tmp_path), f"local-dir:{tmp_path}"):
        loaded = OpenClipAdapter.load(model_id)
        got = loaded.model.state_dict()
        assert sorted(got) == sorted(state)
        for k, v in state.items():
            assert torch.equal(got[k], v), k
        assert not loaded.model.training
        images, tokens = forget_data
        assert torch.equal(loaded.tokenize(["alice abbott."]), adapter.tokenize(["alice abbott."]))
        with torch.no_grad():  # same architecture (e.g. no QuickGELU switch), not only the same tensors
            assert torch.equal(loaded.encode_image(images), adapter.encode_image(images))
            assert torch.equal(loaded.encode_text(tokens), adapter.encode_text(tokens))
        assert loaded.candidate_names() == adapter.candidate_names()


def test_from_config_is_seeded():
    a = OpenClipAdapter.from_config(TINY_CFG, seed=0)
    b = OpenClipAdapter.from_config(TINY_CFG, seed=0)
    c = OpenClipAdapter.from_config(TINY_CFG, seed=1)
    pa, pb, pc = (dict(x.model.named_parameters()) for x in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["visual.proj"], pc["visual.proj"])
    imgs = class_images(0, 2, seed=5)
    assert a.encode_image(imgs).shape == (2, 32)


def test_an_unknown_model_name_is_one_line_and_a_weights_file_is_pointed_to_pretrained(tmp_path):
    """`--judge-model bad.safetensors` printed a 3 KB error listing every open_clip model (fifteenth trial)."""
    f = tmp_path / "bad.safetensors"
    f.write_text("x")
    for model, extra in ((str(f), "(it is a file: a weights file goes in --pretrained"), ("ViT-Q-99", None)):
        with pytest.raises(ModelLoadError) as e:
            OpenClipAdapter.load(model)
        msg = str(e.value)
        assert msg.startswith(f"{model!r} is not an open_clip model name") and len(msg) < 400, msg
        assert (extra in msg) if extra else "it is a file" not in msg


def test_a_model_folder_option_given_a_file_says_so(tmp_path):
    """`--canvas-model FILE` said `FILE/canvas_config.json is missing`; the kind: every model-folder option."""
    from slugkit.world import canvas, t2i, vlm

    f = tmp_path / "base.safetensors"
    f.write_text("x")
    for load, option in ((lambda: canvas.CanvasPipeline.load(f), "--canvas-model"),
                         (lambda: t2i.EmbeddedT2IPipeline.load(f), "--t2i-model"),
                         (lambda: vlm.load_vlm(f), "--vlm-model"),
                         (lambda: vlm.load_vlm(tmp_path / "no"), "--vlm-model")):
        with pytest.raises(ModelLoadError) as e:
            load()
        assert (" is a file, not a folder; " in str(e.value) or " is no such folder; " in str(e.value)) and \
            f"{option}: give the folder `slug world train-" in str(e.value)
