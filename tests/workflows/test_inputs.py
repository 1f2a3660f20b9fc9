"""The forget-caption check of a run (trust cases A3, D7): how many captions name the concept, and how many name it
only beyond the text context."""

import pytest

from slugkit.models import load_adapter
from slugkit.workflows.inputs import forget_caption_counts


@pytest.fixture(scope="module")
def adapter():
    return load_adapter("embedded")


def test_captions_naming_the_concept_are_counted_with_the_curate_rule(adapter):
    caps = ["a photo of Jowen Gormere.", "JOWEN\u00a0gormere smiling", "a red circle", "Jowen Gormeres",
            "Hasa Malwick."]
    assert forget_caption_counts(adapter, caps, ["Jowen Gormere"]) == (2, 0)
    assert forget_caption_counts(adapter, caps, ["Jowen Gormere", "Hasa Malwick"]) == (3, 0)
    assert forget_caption_counts(adapter, ["a red circle"], ["Jowen Gormere"]) == (0, 0)


def test_names_beyond_the_text_context_are_counted_as_truncated(adapter):
    long_prefix = "word " * 80
    caps = [long_prefix + "Jowen Gormere", "Jowen Gormere " + long_prefix, "a photo of Jowen Gormere."]
    assert forget_caption_counts(adapter, caps, ["Jowen Gormere"]) == (3, 1)


def test_test_images_that_are_validation_images_are_refused(tmp_path):
    """`cp -al val/identities valcopy` passed as the test folder ran, reporting metrics on the images the search saw
    (fifth trial): a link to or a copy of a validation image in the test folder is refused, naming both."""
    import os
    import shutil

    from PIL import Image

    from slugkit.workflows.run_inputs import check_inputs as _check_inputs
    from slugkit.workflows.unlearn import UnlearnConfig

    val, test = tmp_path / "val" / "A", tmp_path / "test" / "A"
    val.mkdir(parents=True)
    test.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(val / f"{i}.png")
        Image.new("RGB", (8, 8), (0, i * 40 + 1, 0)).save(test / f"{i}.png")
    (tmp_path / "f.tar").touch()
    (tmp_path / "r.tar").touch()
    cfg = UnlearnConfig(concept="A", out=str(tmp_path / "o"), forget=str(tmp_path / "f.tar"),
                        retain=str(tmp_path / "r.tar"), val_identities=str(val.parent),
                        test_identities=str(test.parent))
    _check_inputs(cfg)  # disjoint: fine
    for share in (os.link, shutil.copyfile):  # the same file, or the same bytes
        (test / "x.png").unlink(missing_ok=True)
        share(val / "1.png", test / "x.png")
        with pytest.raises(ValueError, match=r"--val-identities/--test-identities: 1 test image\(s\) are validation "
                                             r"images too .* e\.g\. .*x\.png = .*1\.png"):
            _check_inputs(cfg)


def test_a_sample_cap_above_the_set_size_is_said(adapter, tmp_path, capsys):
    """Seventeenth trial: `compare --forget-samples 100000` on 100 pairs recorded 100000 in its config and used 100
    without a word."""
    from PIL import Image

    from slugkit.data.shards import write_shard
    from slugkit.workflows.inputs import load_pairs

    write_shard(tmp_path / "f.tar", [(f"k{i}", Image.new("RGB", (8, 8), (9 * i, 0, 0)), f"a photo {i}")
                                     for i in range(3)])
    images, _, stats = load_pairs(adapter, str(tmp_path / "f.tar"), 100000, False, "forget")
    assert len(images) == 3
    assert "note: --forget-samples 100000: the forget set " in capsys.readouterr().err
    load_pairs(adapter, str(tmp_path / "f.tar"), 2, False, "forget")
    assert capsys.readouterr().err == ""


def test_retain_captions_naming_the_concept_in_any_spelling_are_counted():
    """The retain check counted only whole-word names; "Jowen-Gormere at home" and "#JowenGormere" in a retain set
    pulled against the forget gradient unseen (seventeenth trial)."""
    from slugkit.workflows.inputs import retain_caption_count

    caps = ["a photo of Jowen Gormere.", "Jowen-Gormere at home", "#JowenGormere", "jowen_gormere.jpg", "a red circle",
            "Jowen Gormeres cafe", "Hasa Malwick"]
    assert retain_caption_count(caps, ["Jowen Gormere"]) == 5  # "Jowen Gormeres" too (eighteenth trial)
    assert retain_caption_count(caps, ["Jowen Gormere", "Hasa Malwick"]) == 6


def test_a_forget_set_of_someone_else_is_said():
    """Hasa Malwick's images captioned "Jowen Gormere" ran to a warn verdict that blamed the collateral ("'Hasa
    Malwick' dropped 1.000") and never said whose images the forget set held (trial 24): the unedited model's own
    top-1 on the forget images now says it, as a verdict warning."""
    import torch

    from slugkit.models.open_clip import OpenClipAdapter
    from slugkit.workflows.inputs import forget_images_named
    from slugkit.workflows.verdict import Budgets, clip_verdict
    from slugkit.world import render as world

    torch.set_num_threads(1)
    a = OpenClipAdapter.load("embedded")
    names = [i.name for i in world.IDENTITIES]
    with torch.no_grad():
        emb = a.encode_text(a.tokenize([f"{n}." for n in names]))
    jowen, hasa = world.identity_by_name("Jowen Gormere"), world.identity_by_name("Hasa Malwick")

    def named(identity, val):
        ims = [world.make_sample("test", "identity", identity.index, i).image for i in range(12)]
        x = torch.stack([a.preprocess(im) for im in ims])
        return forget_images_named(a, x, emb, names, [names.index(jowen.name)], val)

    own = named(jowen, 1.0)
    assert own["named_as_concept"] >= 0.9 and "warning" not in own and own["most_named"] == "Jowen Gormere"
    other = named(hasa, 1.0)
    assert other["named_as_concept"] < 0.2 and other["most_named"] == "Hasa Malwick"
    assert "names the concept on 0% of the first 12 forget images" in other["warning"]
    assert "'Hasa Malwick' on" in other["warning"] and "someone else" in other["warning"]
    assert "warning" not in named(hasa, 0.3)  # a model that hardly knows the concept: its top-1 says nothing
    m = {"forget_top1": 1.0, "forget_top5": 1.0, "related_top1": 1.0}
    v = clip_verdict(["Jowen Gormere"], "forget_top5", 0.0, m, {**m, "forget_top1": 0.0, "forget_top5": 0.0},
                     Budgets(), {}, {"named": 10, "total": 10, "truncated": 0, "forget_images": other})
    assert v.status == "warn" and "forget_images_not_concept" in [r["code"] for r in v.to_json()["reasons"]]


def test_empty_class_folders_are_said_and_recorded(adapter, tmp_path, capsys):
    """Trial 43: an emptied identity folder (the target's nearest neighbour) vanished from the worst case and the
    nearest neighbours without a word; the target's own empty folder was said to be missing; unknown folders were
    printed as a Python list."""
    from PIL import Image

    from slugkit.common.errors import EmptyForgetSetError
    from slugkit.workflows.inputs import build_suite
    from slugkit.workflows.unlearn import UnlearnConfig

    root = tmp_path / "test"
    for name in ("Ann_Lee", "Bob_Ray", "Cy_Dunn"):
        (root / name).mkdir(parents=True)
    for i in range(2):
        for name in ("Ann_Lee", "Bob_Ray"):
            Image.new("RGB", (8, 8), (i * 40, 9, 0)).save(root / name / f"{i}.png")
    cfg = UnlearnConfig(concept="Ann Lee", out=str(tmp_path / "o"), forget="f", retain="r",
                        val_identities=str(tmp_path / "val"), test_identities=str(root))
    suite = build_suite(adapter, cfg, str(root), None)
    assert suite.sizes()["empty_folders"] == ["test/Cy_Dunn"] and suite.sizes()["related"] == 2
    assert ("warning: " + str(root) + ": 1 identity folder(s) hold no image and are not evaluated: Cy_Dunn"
            in capsys.readouterr().err)
    with pytest.raises(EmptyForgetSetError, match=r"has no images of 'Cy Dunn' \(its folder Cy_Dunn/ holds none\)"):
        build_suite(adapter, UnlearnConfig(concept="Cy Dunn", out=str(tmp_path / "o"), forget="f", retain="r",
                                           val_identities=str(tmp_path / "val"), test_identities=str(root)), str(root),
                    None)
    names = tmp_path / "names.txt"
    names.write_text("Ann Lee\nBob Ray\n")
    with pytest.raises(ValueError, match=r"identity folder\(s\) not in the name list: 'Cy Dunn'; add them to "):
        build_suite(adapter, UnlearnConfig(concept="Ann Lee", out=str(tmp_path / "o"), forget="f", retain="r",
                                           names=str(names), val_identities=str(tmp_path / "val"),
                                           test_identities=str(root)),
                    str(root), None)
