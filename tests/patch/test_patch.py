"""Tests for slugkit.patch: the patch format, apply / revert / compose, and paranoid loading.

Everything runs on a tiny random-weight open_clip CLIP built from a config (no downloads), in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import tempfile
from pathlib import Path

import pytest
import torch

try:
    import slugkit.patch  # noqa: F401
except ImportError:  # not installed (pip install -e .): use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slugkit.patch import (
    FORMAT,
    FORMAT_VERSION,
    PATCH_JSON,
    PATCH_SAFETENSORS,
    Patch,
    PatchError,
    PatchFormatError,
    PatchMismatchError,
    apply_patch,
    apply_patches,
    compose_patches,
    describe,
    load_patch,
    load_state_dict_file,
    make_patch,
    revert_patch,
    save_patch,
    save_state_dict_file,
    tensor_sha256,
)

open_clip = pytest.importorskip("open_clip")

CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 4, "layers": 2},
}
BASE = {"id": "tiny-test-clip", "pretrained": "seed0"}
FC = "visual.transformer.resblocks.1.mlp.c_fc.weight"
PROJ = "visual.transformer.resblocks.1.mlp.c_proj.weight"
TXT_FC = "transformer.resblocks.0.mlp.c_fc.weight"


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**CFG).eval()


def params_sha(model) -> dict[str, str]:
    return {n: tensor_sha256(p) for n, p in model.state_dict().items()}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def edited(model, names, eta: float = 0.05, seed: int = 123) -> dict[str, torch.Tensor]:
    """A deterministic 'unlearning step' θ - η·g with a fixed pseudo-gradient."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    return {n: sd[n] - eta * torch.randn(sd[n].shape, generator=g) for n in names}


def make(model, names=(FC,), concept="Elon Musk", **kw) -> Patch:
    kw.setdefault("step_size", 0.05)
    kw.setdefault("metrics", {"forget_top1": 0.02, "utility_top1": 0.61})
    return make_patch(model, edited(model, names), base_model=BASE, adapter="open_clip", concept=concept, **kw)


def assert_same_patch(a: Patch, b: Patch) -> None:
    assert a.meta == b.meta
    assert a.names == b.names
    for n in a.names:
        assert torch.equal(a.patched[n], b.patched[n]) and a.patched[n].dtype == b.patched[n].dtype
        assert torch.equal(a.original[n], b.original[n])


# ----------------------------------------------------------------------------------------------- hashing / make


def test_tensor_sha256_raw_bytes_all_dtypes():
    x = torch.randn(5, 7)
    assert tensor_sha256(x) == hashlib.sha256(x.numpy().tobytes()).hexdigest()
    assert tensor_sha256(x.t()) == tensor_sha256(x.t().contiguous())  # layout does not matter, C order does
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        y = x.to(dt)
        assert tensor_sha256(y) == tensor_sha256(y.clone())
        assert len(tensor_sha256(y)) == 64
    assert tensor_sha256(x.half()) != tensor_sha256(x.bfloat16())
    assert tensor_sha256(torch.tensor(2.5)) == hashlib.sha256(torch.tensor([2.5]).numpy().tobytes()).hexdigest()
    y = x.clone()
    y[2, 3] = torch.nextafter(y[2, 3], torch.tensor(10.0))  # one ulp
    assert tensor_sha256(y) != tensor_sha256(x)


def test_make_patch_meta_and_validation():
    model = tiny_clip()
    p = make(model, names=(FC, PROJ))
    m = p.meta
    assert m["format"] == FORMAT and m["format_version"] == FORMAT_VERSION and m["created_by"] == "slugkit"
    assert m["base_model"] == BASE and m["adapter"] == "open_clip" and m["concept"] == "Elon Musk"
    assert m["method"] == "slug" and m["step_size"] == 0.05 and m["metrics"]["forget_top1"] == 0.02
    assert "toolkit_version" in m and m["torch_version"] == torch.__version__
    assert not any("time" in k or "date" in k for k in m)  # deterministic: no timestamps
    assert p.names == sorted([FC, PROJ])
    sd = model.state_dict()
    for n in p.names:
        info = m["tensors"][n]
        assert info["shape"] == list(sd[n].shape) and info["dtype"] == "float32"
        assert info["sha256_original"] == tensor_sha256(sd[n])
        assert info["sha256_patched"] == tensor_sha256(p.patched[n])
    assert p.nbytes == 2 * sum(sd[n].numel() * 4 for n in p.names)
    # make_patch cloned: editing the model afterwards does not change the patch
    with torch.no_grad():
        model.get_parameter(FC).zero_()
    assert tensor_sha256(p.original[FC]) == m["tensors"][FC]["sha256_original"]

    model = tiny_clip()
    with pytest.raises(PatchError, match="resblocks.1.mlp.c_fc.weigth"):
        make_patch(model, {FC.replace("weight", "weigth"): torch.zeros(256, 64)}, base_model=BASE,
                   adapter="open_clip", concept="x")
    with pytest.raises(PatchError, match="shape"):
        make_patch(model, {FC: torch.zeros(64, 256)}, base_model=BASE, adapter="open_clip", concept="x")
    with pytest.raises(PatchError, match="float16"):
        make_patch(model, {FC: torch.zeros(256, 64, dtype=torch.float16)}, base_model=BASE, adapter="open_clip",
                   concept="x")
    with pytest.raises(PatchError, match="identical"):
        make_patch(model, {FC: model.get_parameter(FC).detach().clone()}, base_model=BASE, adapter="open_clip",
                   concept="x")
    with pytest.raises(PatchError, match="NaN"):
        make_patch(model, {FC: torch.full((256, 64), float("nan"))}, base_model=BASE, adapter="open_clip",
                   concept="x")
    with pytest.raises(PatchError, match="JSON"):
        make_patch(model, edited(model, [FC]), base_model=BASE, adapter="open_clip", concept="x",
                   metrics={"bad": object()})


def test_make_patch_from_state_dict_and_numpy_metrics():
    np = pytest.importorskip("numpy")
    model = tiny_clip()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    p1 = make_patch(sd, edited(model, [FC]), base_model=BASE, adapter="open_clip", concept=["a", "b"],
                    metrics={"forget_top1": np.float32(0.25), "n": np.int64(3), "t": torch.tensor(0.5)})
    p2 = make(model, concept=["a", "b"], metrics={"forget_top1": 0.25, "n": 3, "t": 0.5}, step_size=None)
    assert p1.meta == p2.meta and p1.fingerprint == p2.fingerprint


# ----------------------------------------------------------------------------------------------- save / load


def test_round_trip_and_path_forms(tmp_path):
    model = tiny_clip()
    p = make(model, names=(FC, "logit_scale"))
    out = save_patch(p, tmp_path / "patch")
    assert sorted(x.name for x in out.iterdir()) == [PATCH_JSON, PATCH_SAFETENSORS]
    doc = json.loads((out / PATCH_JSON).read_text())
    assert doc["safetensors_sha256"] == hashlib.sha256((out / PATCH_SAFETENSORS).read_bytes()).hexdigest()
    assert (out / PATCH_JSON).read_text().endswith("}\n")
    for where in (out, out / PATCH_JSON, out / PATCH_SAFETENSORS, str(out)):
        assert_same_patch(load_patch(where), p)
    # no temp folders left behind
    assert sorted(x.name for x in tmp_path.iterdir()) == ["patch"]
    with pytest.raises(FileNotFoundError):
        load_patch(tmp_path / "nope")


def test_save_is_deterministic(tmp_path):
    a = save_patch(make(tiny_clip(), names=(FC, PROJ)), tmp_path / "a")
    b = save_patch(make(tiny_clip(), names=(FC, PROJ)), tmp_path / "b")
    c = save_patch(load_patch(a), tmp_path / "c")
    for f in (PATCH_JSON, PATCH_SAFETENSORS):
        assert (a / f).read_bytes() == (b / f).read_bytes() == (c / f).read_bytes()
    # repeated saves in one process too (safetensors keeps header metadata in a hash map: keep it to one key)
    p = load_patch(a)
    for i in range(8):
        d = save_patch(p, tmp_path / f"r{i}")
        assert (d / PATCH_SAFETENSORS).read_bytes() == (a / PATCH_SAFETENSORS).read_bytes()


def test_save_refuses_non_empty_dir_unless_overwrite(tmp_path):
    p1, p2 = make(tiny_clip(), concept="one"), make(tiny_clip(), names=(PROJ,), concept="two")
    (tmp_path / "empty").mkdir()
    save_patch(p1, tmp_path / "empty")  # an existing empty folder is fine
    out = save_patch(p1, tmp_path / "p")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_patch(p2, out)
    assert load_patch(out).concept == "one"
    save_patch(p2, out, overwrite=True)
    assert load_patch(out).concept == "two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["empty", "p"]  # old copy and temp dirs removed
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_patch(p1, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        save_patch(p1, tmp_path / "file")


# ----------------------------------------------------------------------------------------------- apply / revert


def test_apply_changes_exactly_the_named_tensors_and_revert_is_bit_exact():
    model = tiny_clip()
    before, before_sha = snapshot(model), params_sha(model)
    p = make(model, names=(FC, PROJ))
    assert params_sha(model) == before_sha  # making a patch does not touch the model
    param_obj = model.get_parameter(FC)
    assert apply_patch(model, p) is model
    assert model.get_parameter(FC) is param_obj  # in place, no new Parameter objects
    after = model.state_dict()
    for n, t in after.items():
        if n in (FC, PROJ):
            assert torch.equal(t, p.patched[n]) and not torch.equal(t, before[n])
        else:
            assert torch.equal(t, before[n]), n
    # the patched model still runs
    with torch.no_grad():
        img = model.encode_image(torch.randn(1, 3, 32, 32))
    assert torch.isfinite(img).all()
    assert revert_patch(model, p) is model
    assert params_sha(model) == before_sha
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_apply_to_plain_state_dict():
    model = tiny_clip()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    p = make(model)
    apply_patch(sd, p)
    assert torch.equal(sd[FC], p.patched[FC])
    revert_patch(sd, p)
    assert tensor_sha256(sd[FC]) == p.meta["tensors"][FC]["sha256_original"]


def test_apply_to_wrong_base_is_refused_and_model_untouched():
    p = make(tiny_clip(0), names=(FC,))
    other = tiny_clip(1)
    sha = params_sha(other)
    with pytest.raises(PatchMismatchError) as e:
        apply_patch(other, p)
    msg = str(e.value)
    assert FC in msg and "tiny-test-clip" in msg and "Load the base model" in msg
    assert p.meta["tensors"][FC]["sha256_original"][:12] in msg and tensor_sha256(other.get_parameter(FC))[:12] in msg
    assert params_sha(other) == sha


def test_two_tensor_patch_all_or_nothing_when_second_mismatches():
    model = tiny_clip()
    p = make(model, names=(FC, PROJ))
    assert p.names == [FC, PROJ]  # FC is checked (and would be written) first
    with torch.no_grad():
        model.get_parameter(PROJ)[0, 0] += 1.0
    sha = params_sha(model)
    with pytest.raises(PatchMismatchError, match="c_proj"):
        apply_patch(model, p)
    assert params_sha(model) == sha  # FC was not written either


def test_missing_tensor_and_wrong_dtype_are_mismatches():
    model = tiny_clip()
    p = make(model)
    sd = {k: v for k, v in model.state_dict().items() if k != FC}
    with pytest.raises(PatchMismatchError, match="no tensor named"):
        apply_patch(sd, p)
    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(PatchMismatchError, match="did you mean 'module."):
        apply_patch(ddp, p)
    # a half-precision model is patched through a cast (trust case E4, test_trust_patch.py); a tensor of a dtype the
    # patch cannot be cast to is still a mismatch
    apply_patch(tiny_clip().half(), p)
    ints = dict(model.state_dict())
    ints[FC] = ints[FC].to(torch.int32)
    with pytest.raises(PatchMismatchError, match="int32"):
        apply_patch(ints, p)


def test_apply_twice_and_revert_unpatched_are_refused():
    model = tiny_clip()
    p = make(model)
    apply_patch(model, p)
    sha = params_sha(model)
    with pytest.raises(PatchMismatchError, match="already applied"):
        apply_patch(model, p)
    assert params_sha(model) == sha
    revert_patch(model, p)
    with pytest.raises(PatchMismatchError, match=r"holds the original values\. The patch is not applied: there is "
                                                 "nothing to revert. The model was not modified") as e:  # once (v. 66)
        revert_patch(model, p)
    assert "not in the patched state" not in str(e.value)
    with pytest.raises(PatchMismatchError, match="not in the patched state"):
        revert_patch(tiny_clip(3), p)
    # every tensor in the same state is said once, not per tensor (it said "not applied" three times, 23rd trial)
    two = make(model, (FC, PROJ))
    with pytest.raises(PatchMismatchError) as e:
        revert_patch(model, two)
    assert str(e.value).count("not applied") == 1 and "each of its 2 tensors" in str(e.value)
    apply_patch(model, two)
    with pytest.raises(PatchMismatchError, match=r"each of its 2 tensors \(.*\) holds the patched values\. The "
                                                 r"patch is already applied"):
        apply_patch(model, two)
    revert_patch(model, two)


def test_apply_check_false_skips_only_the_hash():
    p = make(tiny_clip(0))
    other = tiny_clip(1)
    apply_patch(other, p, check=False)
    assert torch.equal(other.get_parameter(FC), p.patched[FC])


# ----------------------------------------------------------------------------------------------- compose


def test_compose_disjoint_applies_both_and_overlap_is_refused(tmp_path):
    model = tiny_clip()
    before = params_sha(model)
    a = make(model, names=(FC,), concept="Elon Musk")
    b = make(model, names=(TXT_FC,), concept="Taylor Swift", step_size=0.1)
    ab = compose_patches([a, b])
    assert ab.names == sorted([FC, TXT_FC])
    assert ab.meta["concept"] == ["Elon Musk", "Taylor Swift"] and ab.meta["method"] == "composed"
    comps = ab.meta["components"]
    assert [c["fingerprint"] for c in comps] == [a.fingerprint, b.fingerprint]
    assert comps[1]["step_size"] == 0.1 and comps[0]["tensors"] == [FC]
    ab2 = load_patch(save_patch(ab, tmp_path / "ab"))
    assert_same_patch(ab2, ab)

    apply_patches(model, [a, b])
    assert torch.equal(model.get_parameter(FC), a.patched[FC])
    assert torch.equal(model.get_parameter(TXT_FC), b.patched[TXT_FC])
    revert_patch(model, b)  # a composed application can be reverted part by part
    revert_patch(model, a)
    assert params_sha(model) == before

    c = make(model, names=(TXT_FC, PROJ), concept="Beyoncé")
    with pytest.raises(PatchError, match="Taylor Swift") as e:
        compose_patches([a, b, c])
    assert TXT_FC in str(e.value) and "Beyoncé" in str(e.value)
    with pytest.raises(PatchError, match="the same patch .* is given twice; give it once"):  # not "both edit it"
        apply_patches(model, [a, a])
    assert params_sha(model) == before

    d = make_patch(model, edited(model, [PROJ]), base_model={"id": "another"}, adapter="open_clip", concept="z")
    with pytest.raises(PatchError, match="different base"):
        compose_patches([a, d])


def test_apply_patches_is_all_or_nothing():
    model = tiny_clip()
    a = make(model, names=(FC,), concept="a")
    b = make(model, names=(TXT_FC,), concept="b")
    with torch.no_grad():
        model.get_parameter(TXT_FC).mul_(2)
    sha = params_sha(model)
    with pytest.raises(PatchMismatchError, match="transformer.resblocks.0.mlp.c_fc.weight"):
        apply_patches(model, [a, b])
    assert params_sha(model) == sha


# ----------------------------------------------------------------------------------------------- corrupt files


@pytest.fixture()
def saved(tmp_path):
    return save_patch(make(tiny_clip(), names=(FC, PROJ)), tmp_path / "patch")


def _edit_json(folder: Path, fn) -> None:
    doc = json.loads((folder / PATCH_JSON).read_text())
    fn(doc)
    (folder / PATCH_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True))


def _write_st(folder: Path, data: bytes) -> None:
    """Replace patch.safetensors and update the checksum so the parser / per-tensor checks are what's tested."""
    (folder / PATCH_SAFETENSORS).write_bytes(data)
    _edit_json(folder, lambda d: d.__setitem__("safetensors_sha256", hashlib.sha256(data).hexdigest()))


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda d: d["tensors"][FC].__setitem__("shape", [64, 256]), "shape|float32"),
        (lambda d: d["tensors"][FC].__setitem__("dtype", "float16"), "float16"),
        (lambda d: d["tensors"][FC].__setitem__("sha256_original", "0" * 64), "sha256_original"),
        (lambda d: d["tensors"][PROJ].__setitem__("sha256_patched", "f" * 64), "sha256_patched"),
        (lambda d: d["tensors"][FC].__setitem__("sha256_patched", "xyz"), "invalid sha256_patched"),
        (lambda d: d["tensors"].pop(PROJ), "unexpected"),
        (lambda d: d.__setitem__("tensors", {}), "tensors"),
        (lambda d: d.__setitem__("format", "something-else"), "not a slugkit patch"),
        (lambda d: d.__setitem__("safetensors_sha256", "0" * 64), "does not match"),
        (lambda d: d.pop("safetensors_sha256"), "safetensors_sha256"),
    ],
)
def test_json_disagreement_is_a_format_error(saved, edit, pattern):
    _edit_json(saved, edit)
    with pytest.raises(PatchFormatError, match=pattern) as e:
        load_patch(saved)
    assert "patch." in str(e.value)  # names the file


def test_newer_format_version_is_refused(saved):
    _edit_json(saved, lambda d: d.__setitem__("format_version", FORMAT_VERSION + 1))
    with pytest.raises(PatchFormatError, match="newer slugkit.*upgrade"):
        load_patch(saved)


def test_invalid_json_and_missing_file(saved):
    (saved / PATCH_JSON).write_text('{"format": "slugkit-patch", ')
    with pytest.raises(PatchFormatError, match="patch.json.*not valid JSON"):
        load_patch(saved)
    (saved / PATCH_JSON).unlink()
    with pytest.raises(PatchFormatError, match=f"{saved}: holds no patch.json, so it is not a patch"):
        load_patch(saved)


def test_hand_edited_metadata_is_refused(saved):
    """`slug inspect` showed hand-edited metrics as the patch's (new-user trial): the recorded fingerprint seals the
    metadata; a patch without one (older) still loads."""
    good = load_patch(saved)
    assert json.loads((saved / PATCH_JSON).read_text())["fingerprint"] == good.fingerprint
    assert "fingerprint" not in good.meta and "safetensors_sha256" not in good.meta
    _edit_json(saved, lambda d: d.__setitem__("concept", "Someone Else"))
    with pytest.raises(PatchFormatError, match=r"patch.json: was edited after slug wrote it: .* not the recorded "):
        load_patch(saved)
    _edit_json(saved, lambda d: d.__setitem__("concept", good.concept))
    assert load_patch(saved).fingerprint == good.fingerprint  # restored: loads again
    # a tensor hash edited in patch.json is blamed on patch.json, not on the intact tensors (23rd trial)
    name = sorted(good.meta["tensors"])[0]
    _edit_json(saved, lambda d: d["tensors"][name].__setitem__("sha256_original", "0" * 64))
    with pytest.raises(PatchFormatError, match=r"patch.json, tensor '.*': was edited after slug wrote it: its "
                                               r"sha256_original is not the stored tensor's hash"):
        load_patch(saved)
    _edit_json(saved, lambda d: d["tensors"][name].__setitem__("sha256_original",
                                                                good.meta["tensors"][name]["sha256_original"]))
    assert load_patch(saved).fingerprint == good.fingerprint
    sha = json.loads((saved / PATCH_JSON).read_text())["safetensors_sha256"]
    _edit_json(saved, lambda d: d.__setitem__("safetensors_sha256", 123))  # present, another type: not "missing"
    with pytest.raises(PatchFormatError, match="non-string safetensors_sha256"):
        load_patch(saved)
    _edit_json(saved, lambda d: d.__setitem__("safetensors_sha256", sha))
    _edit_json(saved, lambda d: d.__setitem__("metrics", {**(d.get("metrics") or {}), "forget_top5": 0.0}))
    with pytest.raises(PatchFormatError, match="was edited after slug wrote it"):
        load_patch(saved)
    _edit_json(saved, lambda d: d.pop("fingerprint"))  # stripping the seal does not turn the check off
    with pytest.raises(PatchFormatError, match="has no fingerprint, which its format_version requires"):
        load_patch(saved)
    _edit_json(saved, lambda d: d.__setitem__("format_version", 1))  # a format 1 patch: loads, shown as unsealed
    old = load_patch(saved)
    assert old.meta["metrics"]["forget_top5"] == 0.0
    assert "  sealed:     no (a format 1 patch: its concept and metrics are not covered by a fingerprint)" in \
        describe(old).splitlines()


def test_patch_paths_that_are_not_a_patch_say_what_they_are(saved, tmp_path, monkeypatch):
    """`slug inspect FILE` and `slug inspect ""` answered "patch.json: missing" without a path (new-user trial)."""
    with pytest.raises(ValueError, match="the patch path is empty"):
        load_patch("")
    note = tmp_path / "notes.json"
    note.write_text("{}")
    with pytest.raises(PatchFormatError, match=f"{note}: is a file, not a patch; a patch is a folder holding"):
        load_patch(note)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(PatchFormatError, match=f"{tmp_path / 'empty'}: holds no patch.json"):
        load_patch(".")
    run = tmp_path / "run"  # a run folder stands for its patch
    run.mkdir()
    (run / "result.json").write_text("{}")
    saved.rename(run / "patch")
    assert load_patch(run).fingerprint == load_patch(run / "patch").fingerprint


def test_dropped_tensor_in_safetensors_is_a_format_error(saved):
    import safetensors.torch

    tensors = safetensors.torch.load((saved / PATCH_SAFETENSORS).read_bytes())
    del tensors[f"original/{PROJ}"]
    _write_st(saved, safetensors.torch.save(tensors))
    with pytest.raises(PatchFormatError, match=f"missing.*original/{PROJ}"):
        load_patch(saved)


def test_swapped_original_and_patched_is_caught(saved):
    import safetensors.torch

    tensors = safetensors.torch.load((saved / PATCH_SAFETENSORS).read_bytes())
    tensors[f"original/{FC}"], tensors[f"patched/{FC}"] = tensors[f"patched/{FC}"], tensors[f"original/{FC}"]
    _write_st(saved, safetensors.torch.save(tensors))
    with pytest.raises(PatchFormatError, match="resblocks.1.mlp.c_fc.weight"):
        load_patch(saved)


def test_tampered_safetensors_bytes(saved):
    good = (saved / PATCH_SAFETENSORS).read_bytes()
    header_len = int.from_bytes(good[:8], "little")
    flipped = bytearray(good)
    flipped[8 + header_len // 2] ^= 0xFF
    # without fixing the checksum: caught by safetensors_sha256
    (saved / PATCH_SAFETENSORS).write_bytes(bytes(flipped))
    with pytest.raises(PatchFormatError, match="patch.safetensors.*sha256"):
        load_patch(saved)
    # with the checksum fixed too: the header no longer parses -> still a PatchFormatError, not SafetensorError
    _write_st(saved, bytes(flipped))
    with pytest.raises(PatchFormatError, match="patch.safetensors"):
        load_patch(saved)
    for bad in (good[: len(good) // 2], good[:5], b"", good[:8] + b"[" + good[9:]):
        _write_st(saved, bad)
        with pytest.raises(PatchFormatError, match="patch.safetensors"):
            load_patch(saved)
    # a flipped data byte with a fixed checksum is caught by the per-tensor hash
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    _write_st(saved, bytes(flipped))
    with pytest.raises(PatchFormatError, match="does not match its sha256"):
        load_patch(saved)


@pytest.fixture(scope="module")
def fuzz_reference():
    model = tiny_clip()
    p = make(model, names=("visual.ln_post.weight", "logit_scale"))  # small tensors: the header is a big share
    with tempfile.TemporaryDirectory() as d:
        out = save_patch(p, Path(d) / "p")
        return p, (out / PATCH_JSON).read_bytes(), (out / PATCH_SAFETENSORS).read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), fix_checksum=st.booleans())
def test_fuzzed_safetensors_is_verified_or_format_error(fuzz_reference, data, fix_checksum):
    ref, json_bytes, st_bytes = fuzz_reference
    header_end = 8 + int.from_bytes(st_bytes[:8], "little")
    buf = bytearray(st_bytes)
    # byte edits, biased to the 8-byte length prefix and the JSON header where the parser lives
    pos = st.one_of(st.integers(0, 8), st.integers(0, header_end - 1), st.integers(0, len(buf) - 1))
    for i, v in data.draw(st.lists(st.tuples(pos, st.integers(0, 255)), max_size=4), label="edits"):
        buf[i] = v
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[: data.draw(st.integers(0, len(buf)), label="length")]
    if data.draw(st.booleans(), label="append"):
        buf += data.draw(st.binary(min_size=1, max_size=16), label="tail")
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        doc = json.loads(json_bytes)
        if fix_checksum:
            doc["safetensors_sha256"] = hashlib.sha256(bytes(buf)).hexdigest()
        (folder / PATCH_JSON).write_text(json.dumps(doc))
        (folder / PATCH_SAFETENSORS).write_bytes(bytes(buf))
        try:
            loaded = load_patch(folder)
        except PatchFormatError:
            return
    assert_same_patch(loaded, ref)  # it loaded, so the content must be exactly the verified original


# ----------------------------------------------------------------------------------------------- checkpoints / describe


def test_state_dict_file_round_trip_and_pickle_refused(tmp_path):
    model = tiny_clip()
    sd = model.state_dict()
    path = save_state_dict_file(sd, tmp_path / "ckpt.safetensors")
    data1 = path.read_bytes()
    save_state_dict_file(sd, tmp_path / "ckpt.safetensors")
    assert path.read_bytes() == data1  # deterministic
    loaded = load_state_dict_file(path)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # tied / shared tensors are accepted
    shared = {"a": sd[FC], "b": sd[FC], "c": sd[FC][:3]}
    back = load_state_dict_file(save_state_dict_file(shared, tmp_path / "shared.safetensors"))
    assert torch.equal(back["b"], sd[FC]) and torch.equal(back["c"], sd[FC][:3])

    class Boom:
        def __reduce__(self):
            return (sys.exit, ("unpickled!",))

    pt = tmp_path / "ckpt.pt"
    torch.save({"x": torch.zeros(2)}, pt)
    with pytest.raises(PatchFormatError, match="(?s)never unpickles.*save_file"):
        load_state_dict_file(pt)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(PatchFormatError, match="never unpickles"):
        load_state_dict_file(disguised)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(PatchFormatError, match="garbage.safetensors"):
        load_state_dict_file(garbage)
    with pytest.raises(PatchFormatError, match=".safetensors"):
        save_state_dict_file(sd, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_describe_and_repr():
    p = make(tiny_clip(), names=(FC,), metrics={"forget_top1": 0.02})
    text = describe(p)
    for needle in ("Elon Musk", "slug", "tiny-test-clip", FC, "(256, 64)", "0.05", "forget_top1"):
        assert needle in text, needle
    assert "Elon Musk" in repr(p)


def test_describe_gives_every_layers_step_of_a_multi_layer_patch():
    """The fallback's patch holds two layers with two step sizes; ``step_size`` at the top is the first one's only."""
    from slugkit.patch import make_patch

    base = {"a": torch.ones(3), "b": torch.ones(2)}
    edits = [{"layer": "a", "step_size": 2.5, "round": 1}, {"layer": "b", "step_size": 0.75, "round": 2}]
    p = make_patch(base, {"a": base["a"] * 2, "b": base["b"] * 3}, base_model="toy", adapter="t", concept="A",
                   step_size=2.5, extra={"layers_edited": edits})
    assert "  step sizes: a 2.5 (round 1); b 0.75 (round 2)" in describe(p).splitlines()
    p.meta["extra"]["layers_edited"][1] = "b\x1b[2J"  # untrusted patch.json: a malformed entry is printed, escaped
    assert "; b\\x1b[2J" in describe(p)


def test_describe_says_a_fine_tune_patch_is_not_slug_and_has_no_step():
    """A ``--sd/--vlm-fallback finetune`` patch stores ``step_size`` 1.0 (θ ← θ − 1·(−delta)); inspect printed
    "step size: 1.0" and the bare method name, as if SLUG had stepped by 1."""
    from slugkit.patch import make_patch

    base = {"a": torch.ones(3)}
    p = make_patch(base, {"a": base["a"] * 2}, base_model="toy", adapter="t", concept="A", step_size=1.0,
                   method="layer-finetune")
    lines = describe(p).splitlines()
    assert "  method:     layer-finetune (NOT SLUG: a fine-tune after SLUG's search refused)" in lines, lines
    assert not any(ln.startswith("  step size:  1") for ln in lines)
    assert any(ln.startswith("  step size:  none (a fine-tune") for ln in lines)
    slug = describe(make_patch(base, {"a": base["a"] * 2}, base_model="toy", adapter="t", concept="A",
                               step_size=1.0)).splitlines()
    assert "  step size:  1.0" in slug and not any("NOT SLUG" in ln for ln in slug)


def test_describe_names_a_joint_runs_concepts_as_words():
    """`slug inspect` of a joint run's patch printed the concept list as Python's ``['A', 'B']``."""
    from slugkit.patch import make_patch

    base = {"a": torch.ones(3)}
    p = make_patch(base, {"a": base["a"] * 2}, base_model="toy", adapter="t", concept=["Jowen Gormere", "B\x1b[2J"],
                   step_size=1.0)
    lines = describe(p).splitlines()
    assert "  concepts:   Jowen Gormere, B\\x1b[2J" in lines, lines
    by = {"before": {"forget_top1": 1.0, "forget_by_concept": {"Jowen Gormere": {"forget_top1": 1.0}}},
          "after": {"forget_top1": 0.5, "forget_by_concept": {"Jowen Gormere": {"forget_top1": 0.25}}}}
    q = make_patch(base, {"a": base["a"] * 2}, base_model="toy", adapter="t", concept=["Jowen Gormere", "B"],
                   step_size=1.0, metrics=by)
    lines = describe(q).splitlines()  # the per-concept figures one line each (a Python dict was printed)
    assert "    FA@1 of Jowen Gormere: 1.0 → 0.25" in lines and not any("{" in ln for ln in lines), lines


def test_chain_patches_folds_sequential_edits():
    from slugkit.patch import PatchError, apply_patch, chain_patches, make_patch, revert_patch

    base = {"w": torch.arange(6, dtype=torch.float32), "v": torch.ones(3)}
    a = make_patch(base, {"w": base["w"] + 1}, base_model="toy", adapter="t", concept="A")
    after_a = {"w": base["w"] + 1, "v": base["v"].clone()}
    b = make_patch(after_a, {"w": after_a["w"] * 2, "v": after_a["v"] + 3}, base_model="toy", adapter="t",
                   concept="B")
    chain = chain_patches([a, b])
    assert chain.names == ["v", "w"] and chain.meta["concept"] == ["A", "B"]
    assert "  step sizes: per component, below (η of each component's first layer)" in describe(chain).splitlines()
    state = {k: v.clone() for k, v in base.items()}
    apply_patch(state, chain)
    assert torch.equal(state["w"], (base["w"] + 1) * 2) and torch.equal(state["v"], base["v"] + 3)
    revert_patch(state, chain)
    assert all(torch.equal(state[k], base[k]) for k in base)
    # a "second" patch made on the base instead of on top of the first is not a chain
    b_wrong = make_patch(base, {"w": base["w"] * 2}, base_model="toy", adapter="t", concept="B")
    with pytest.raises(PatchError, match="not made on top"):
        chain_patches([a, b_wrong])


def test_describe_shows_the_verdict_and_rounded_numbers():
    """`slug inspect` never showed a fail verdict (only --json did) and printed nested metrics as raw floats
    (0.03999999910593033; new-user trial)."""
    from slugkit.patch import make_patch

    base = {"a": torch.ones(3)}
    p = make_patch(base, {"a": base["a"] * 2}, base_model="toy", adapter="t", concept="A", step_size=2.1936208891788933,
                   metrics={"after": {"forget_top5": 0.03999999910593033}}, extra={"verdict": "fail"})
    lines = describe(p).splitlines()
    # why it failed: "not forgotten" was said of a run whose model broke (thirteenth trial); an old patch: both
    assert ("  verdict:    fail (of the run that made it; see its result.json): the concept was not forgotten on its "
            "test images, or the edit broke the model") in lines
    p.meta["extra"]["verdict_codes"] = ["model_broken"]
    assert ("  verdict:    fail (of the run that made it; see its result.json): the edit broke the model: utility or "
            "the other concepts lost more than 5 × their budget") in describe(p).splitlines()
    p.meta["extra"]["warning_codes"] = ["worst_drop"]  # a fail's warnings too (verification 69)
    assert any(x.endswith("5 × their budget; also warned: worst_drop") for x in describe(p).splitlines())
    assert "  step size:  2.19362" in lines and "    after: {'forget_top5': 0.04}" in lines
    # before and after: one line a metric in report.md's names (Python dicts of internal keys, 23rd trial)
    p.meta["metrics"] = {"before": {"forget_top1": 1.0, "utility_top1": 0.99399}, "after": {"forget_top1": 0.0}}
    got = describe(p).splitlines()
    i = got.index("  metrics (before → after):")
    assert got[i + 1:i + 3] == ["    FA@1: 1.0 → 0.0", "    TA_IN@1 (utility): 0.994 → –"]
