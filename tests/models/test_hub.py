"""Knowing at once that the hub cannot be reached (twelfth trial: a hub id took ~52 s of retries to fail)."""

from __future__ import annotations

import socket

import pytest

from slugkit.models import hub
from slugkit.models.base import ModelLoadError


@pytest.fixture
def no_network(monkeypatch):
    for v in hub.PROXY_VARS + ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    calls = []

    def refuse(address, timeout=None, *a, **k):
        calls.append((address, timeout))
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


def test_an_unreachable_hub_is_named_and_the_block_runs_offline(no_network, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example:8443")
    assert hub.hub_unreachable() == "hub.example:8443: Name or service not known"
    assert no_network[-1] == (("hub.example", 8443), hub.PROBE_TIMEOUT_S)
    before = constants.HF_HUB_OFFLINE
    with hub.offline_unless_reachable() as why:
        assert why == "hub.example:8443: Name or service not known" and constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before  # restored
    assert "cannot be reached from this machine (hub.example:8443" in hub.unreachable_note(why)
    assert hub.unreachable_note(None) == ""


def test_nothing_is_probed_behind_a_proxy_or_when_already_offline(no_network, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.hub_unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with hub.offline_unless_reachable() as why:
        assert why is None
    assert no_network == []


def test_a_hub_id_fails_at_once_when_the_hub_is_unreachable(no_network, tmp_path):
    pytest.importorskip("transformers")
    from slugkit.models.hf_clip import HFClipAdapter

    with pytest.raises(ModelLoadError, match="cannot be reached from this machine .*Name or service not known.*only "
                                             "the local cache was tried"):  # offline at once: no ~50 s of retries
        HFClipAdapter.load("slugkit-test/no-such-clip", cache_dir=str(tmp_path))
    assert no_network


def test_an_open_clip_tag_fails_at_once_when_the_hub_is_unreachable(no_network, tmp_path):
    pytest.importorskip("open_clip")
    from slugkit.models.open_clip import OpenClipAdapter

    with pytest.raises(ModelLoadError, match="cannot be reached from this machine"):  # the cache only, no retries
        OpenClipAdapter.load("ViT-B-32", "laion400m_e32", cache_dir=str(tmp_path))
    assert no_network


def test_a_folder_of_another_kind_given_as_the_clip_is_named(tmp_path):
    """Trial 43: a LLaVA folder loaded as a transformers CLIPModel with every weight "unexpected" and the rest random
    (`slug grads` wrote that random CLIP's gradients, exit 0); a pipeline's text_encoder/ became a default-size
    random CLIP; a diffusers pipeline was said to lack model.safetensors; the other family's folder was no hint."""
    import json

    from slugkit.models import ModelLoadError, load_adapter

    def folder(name, **files):
        d = tmp_path / name
        d.mkdir()
        for f, content in files.items():
            (d / f.replace("__", ".")).write_text(json.dumps(content))
        return d

    cases = [
        (folder("sd", model_index__json={"_class_name": "StableDiffusionPipeline"}), "hf_clip",
         "is a diffusers pipeline folder (model_index.json), not a CLIP: pass the CLIP its text encoder comes from as "
         "--model, and the pipeline as --consumer sd:DIR"),
        (folder("llava", config__json={"model_type": "llava"}), "hf_clip",
         "is a LLaVA folder (config.json: model_type 'llava'), not a CLIP: pass the CLIP its vision tower comes from "
         "as --model, and this folder as --consumer llava:DIR"),
        (folder("te", config__json={"model_type": "clip_text_model"}), "hf_clip",
         "holds a CLIP text tower alone (config.json: model_type 'clip_text_model', e.g. a pipeline's text_encoder/)"),
        (folder("bert", config__json={"model_type": "bert"}), "hf_clip", "is a 'bert' model (config.json: model_type)"),
        (folder("oc", open_clip_config__json={"model_cfg": {}}), "hf_clip",
         "holds an open_clip_config.json, not a transformers config.json: pass --family open_clip"),
        (folder("hf", config__json={"model_type": "clip"}), "open_clip",
         "holds a transformers config.json, not an open_clip_config.json: pass --family hf_clip"),
        (tmp_path / "sd", "open_clip", "is a diffusers pipeline folder (model_index.json)"),
        # the default family given a LLaVA or a text tower: named as such, not "pass --family hf_clip" (which then
        # named it: the same kind of input, one step later)
        (tmp_path / "llava", "open_clip", "is a LLaVA folder (config.json: model_type 'llava')"),
        (tmp_path / "te", "open_clip", "holds a CLIP text tower alone"),
    ]
    for path, family, words in cases:
        with pytest.raises(ModelLoadError) as e:
            load_adapter(str(path), family=family)
        assert str(e.value).startswith(f"{path} {words}"), (family, str(e.value))
    for gone in (str(tmp_path / "nope"), "./nope", "a/b/c"):  # verify 45: advised `hf download /tmp/…/nope`
        with pytest.raises(ModelLoadError, match=r": no such folder \(a hub id is ORG/NAME"):
            load_adapter(gone, family="hf_clip")
