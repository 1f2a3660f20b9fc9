"""The embedded synthetic world (slugkit.data.world) and its tiny-CLIP trainer (slugkit.world.train)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from slugkit.world import render as world
from slugkit.data.shards import encode_image, iter_samples

ATTRIBUTE_WORDS = world.COLOURS + world.SHAPES


def test_attribute_sets():
    assert world.COLOURS == ["red", "green", "blue", "yellow", "purple", "cyan"]
    assert world.SHAPES == ["circle", "square", "triangle", "cross", "star"]
    assert world.PATTERNS == ["plain", "striped", "dotted"]
    assert world.BORDERS == ["none", "outline"]
    assert world.TINTS == ["neutral", "warm", "cool"]


def test_identities_unique_names_and_combinations():
    ids = world.IDENTITIES
    assert len(ids) == 60
    assert [i.index for i in ids] == list(range(60))
    names = world.identity_names()
    assert len(set(names)) == 60
    firsts = [n.split(" ")[0] for n in names]
    lasts = [n.split(" ")[1] for n in names]
    assert len(set(firsts)) == 60 and len(set(lasts)) == 60
    for n in names:
        assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", n), n
        assert not any(w in n.lower() for w in ATTRIBUTE_WORDS), n
    combos = {i.attributes for i in ids}
    assert len(combos) == 60
    for i in ids:
        assert i.colour in world.COLOURS and i.shape in world.SHAPES and i.pattern in world.PATTERNS
        assert i.border in world.BORDERS and i.tint in world.TINTS
    # related like faces: many pairs share 3+ of the 5 attributes
    shared = [sum(a == b for a, b in zip(x.attributes, y.attributes)) for x in ids for y in ids if x.index < y.index]
    assert sum(s >= 3 for s in shared) > 100


def test_identity_by_name():
    ident = world.IDENTITIES[7]
    assert world.identity_by_name(ident.name) is ident
    assert world.identity_by_name("  " + ident.name.upper() + " ") is ident
    with pytest.raises(KeyError, match="slug world names"):
        world.identity_by_name("Nobody Atall")


def test_utility_classes_and_captions_never_name_identities():
    assert len(world.UTILITY_CLASSES) == 30
    assert world.UTILITY_CLASSES[0].name == "red circle"
    assert {c.name for c in world.UTILITY_CLASSES} == {f"{c} {s}" for c in world.COLOURS for s in world.SHAPES}
    name_parts = {p.lower() for n in world.identity_names() for p in n.split()}
    captions = [world.utility_caption(c, k) for c in world.UTILITY_CLASSES for k in range(len(world.UTILITY_CAPTION_TEMPLATES))]
    captions += [t.format(c.name) for c in world.UTILITY_CLASSES for t in world.UTILITY_EVAL_TEMPLATES]
    captions += [s.caption for s in world.make_samples("train", "utility", 3)]
    for cap in captions:
        words = set(re.findall(r"[a-z]+", cap.lower()))
        assert not words & name_parts, cap
    assert len(world.IDENTITY_EVAL_TEMPLATES) == 3 and len(world.UTILITY_EVAL_TEMPLATES) == 3
    assert len(world.IDENTITY_CAPTION_TEMPLATES) >= 8 and len(world.UTILITY_CAPTION_TEMPLATES) >= 6


def test_identity_captions_name_only_the_identity():
    for s in world.make_samples("train", "identity", 5, classes=[0, 1, 2]):
        assert world.IDENTITIES[s.label].name in s.caption
        assert not any(w in s.caption.lower() for w in ATTRIBUTE_WORDS), s.caption


def _bytes(samples):
    return [(s.key, s.caption, s.image.tobytes()) for s in samples]


def test_generator_deterministic_and_independent_of_request():
    a = world.make_samples("train", "identity", 3, classes=[5, 9])
    b = world.make_samples("train", "identity", 3, classes=[5, 9])
    assert _bytes(a) == _bytes(b)
    # class 9's images do not depend on which other classes (or how many samples) are requested
    alone = world.make_samples("train", "identity", 3, classes=[9])
    assert _bytes(alone) == _bytes(a[3:])
    # start offsets the index: indices 1..2 equal the tail of 0..2
    assert _bytes(world.make_samples("train", "identity", 2, classes=[9], start=1)) == _bytes(alone[1:])
    # splits differ
    other = world.make_samples("test", "identity", 3, classes=[9])
    assert all(x.image.tobytes() != y.image.tobytes() for x, y in zip(alone, other))
    u1 = world.make_samples("val", "utility", 2, classes=[3, 17])
    u2 = world.make_samples("val", "utility", 2, classes=[17])
    assert _bytes(u1[2:]) == _bytes(u2)


def test_samples_fields():
    s = world.make_samples("pool", "utility", 2, classes=[4], start=10)
    assert [x.key for x in s] == ["pool-utility-004-00010", "pool-utility-004-00011"]
    for x in s:
        assert "." not in x.key
        assert x.kind == "utility" and x.label == 4 and x.class_name == world.UTILITY_CLASSES[4].name
        assert x.image.size == (32, 32) and x.image.mode == "RGB"
    img = world.render_identity(world.IDENTITIES[0], np.random.default_rng(0))
    assert img.size == (32, 32) and img.mode == "RGB"
    with pytest.raises(ValueError):
        world.make_samples("nosuch", "identity", 1)
    with pytest.raises(ValueError):
        world.make_samples("train", "identity", 1, classes=[60])


def test_shard_round_trip(tmp_path):
    samples = world.make_samples("val", "identity", 3, classes=[0, 1]) + world.make_samples("val", "utility", 1)
    paths = world.write_pair_shards(samples, tmp_path, "val", per_shard=16)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["val-00000.tar", "val-00001.tar", "val-00002.tar"]
    back = list(iter_samples(str(tmp_path), strict=True))
    assert [b.key for b in back] == [s.key for s in samples]
    assert [b.caption for b in back] == [s.caption for s in samples]
    from PIL import Image
    import io

    for b, s in zip(back, samples):
        expected = Image.open(io.BytesIO(encode_image(s.image))).convert("RGB")
        assert b.image.tobytes() == expected.tobytes()


def test_image_folder_layout(tmp_path):
    samples = world.make_samples("test", "utility", 2, classes=[29, 0, 7])
    world.write_image_folder(samples, tmp_path)
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert dirs == ["cyan_star", "green_triangle", "red_circle"]
    assert (tmp_path / "classnames.txt").read_text().splitlines() == ["cyan star", "green triangle", "red circle"]
    assert sorted(p.name for p in (tmp_path / "red_circle").iterdir()) == [
        "test-utility-000-00000.jpg",
        "test-utility-000-00001.jpg",
    ]
    ids = world.make_samples("test", "identity", 1, classes=[3])
    world.write_image_folder(ids, tmp_path / "ids")
    assert (tmp_path / "ids" / "classnames.txt").read_text() == world.IDENTITIES[3].name + "\n"
    assert (tmp_path / "ids" / world.IDENTITIES[3].name.replace(" ", "_")).is_dir()


def test_train_smoke_loads_as_local_dir(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    import torch

    from slugkit.world import train

    report = train.train_embedded(tmp_path, steps=2, per_class=2, eval_per_class=1, progress=False)
    assert report["steps"] == 2 and set(report["test_metrics"]) >= {"identity_top1", "identity_top5", "utility_top1"}
    cfg = json.loads((tmp_path / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["layers"] == 4 and cfg["model_cfg"]["text_cfg"]["layers"] == 4
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path))  # strict load
    tok = open_clip.get_tokenizer("local-dir:" + str(tmp_path))
    assert tok(["a photo of a red circle."]).shape == (1, 20)
    img = world.make_samples("test", "identity", 1, classes=[0])[0].image
    assert torch.equal(preprocess(img)[None], train.normalise(train.images_to_uint8([img])))
    with torch.no_grad():
        assert model.encode_image(preprocess(img)[None]).shape == (1, 64)


def test_trainers_out_keeps_what_is_not_theirs(tmp_path, capsys):
    """`slug world train` wrote into any folder (a user's model replaced, no --overwrite) and wrote no manifest, so
    `train-vlm --overwrite` then deleted the CLIP and the user's notes beside its train_report.json (fifteenth
    trial). Now: --overwrite replaces only a model of the same kind, the user's files are kept, a run folder is
    refused, and a folder written without a manifest keeps every entry the new model does not write."""
    pytest.importorskip("open_clip")
    from slugkit.common.files import atomic_dir
    from slugkit.common.outguard import check_model_out
    from slugkit.world import train

    out = tmp_path / "clip"
    train.train_embedded(out, steps=1, per_class=2, eval_per_class=1, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        train.train_embedded(out, steps=1, per_class=2, eval_per_class=1, progress=False)
    train.train_embedded(out, steps=1, per_class=2, eval_per_class=1, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "open_clip_model.safetensors").is_file()
    with pytest.raises(FileExistsError, match=r"holds another model slug wrote \(train_report.json; no "
                                              r"processor_config.json\)"):
        check_model_out(out, True, "train_report.json", "processor_config.json")  # train-vlm's check
    run = tmp_path / "run"
    (run / "patch").mkdir(parents=True)
    (run / "result.json").write_text("{}")
    for where in (run, run / "patch" / "m"):
        with pytest.raises(FileExistsError, match="slug run folder"):
            check_model_out(where, True, "train_report.json")
    old = tmp_path / "old"  # written before the manifest: only what the new write writes is replaced
    old.mkdir()
    for name in ("train_report.json", "open_clip_model.safetensors", "notes.txt"):
        (old / name).write_text("old " + name)
    with atomic_dir(old, True, marker="train_report.json") as tmp:
        (tmp / "train_report.json").write_text("new")
    assert sorted(p.name for p in old.iterdir() if not p.name.startswith(".")) == [
        "notes.txt", "open_clip_model.safetensors", "train_report.json"]
    assert (old / "train_report.json").read_text() == "new" and (old / "notes.txt").read_text() == "old notes.txt"
    assert "note: kept in" in capsys.readouterr().err


def test_replacing_a_shipped_model_says_so(capsys, tmp_path, monkeypatch):
    """`slug world train-t2i --out <package>/assets/embedded_t2i --overwrite` replaced the shipped UNet without a word
    (sixteenth trial): it is allowed (that is how the shipped model is retrained) and noted."""
    from slugkit.common.outguard import check_model_out
    from slugkit.world.t2i import CONFIG_FILE, T2I_DIR

    check_model_out(T2I_DIR, True, CONFIG_FILE)
    assert "is inside the slugkit package: this replaces the model slugkit ships" in capsys.readouterr().err
    (tmp_path / CONFIG_FILE).write_text("{}")
    check_model_out(tmp_path, True, CONFIG_FILE)
    assert capsys.readouterr().err == ""


def test_a_stale_world_json_is_named_with_why(tmp_path):
    """Twenty-third trial: a damaged world.json in --data-dir made slug rewrite the whole folder without a word."""
    from slugkit.world.demo_data import _spec, _stale

    f, spec = tmp_path / "world.json", _spec()
    for text, said in (("{nope", "is unreadable (JSONDecodeError)"),
                       (json.dumps({"spec": [1]}), "is not a world.json slug wrote (no spec object)"),
                       (json.dumps({"spec": {**spec, "version": -1}}), "describes another world (version -1, this "
                                                                       f"slugkit's is {spec['version']!r})"),
                       (json.dumps({"spec": {**spec, "counts": {}}}), "its counts differ")):
        f.write_text(text)
        assert said in _stale(f, spec), text
