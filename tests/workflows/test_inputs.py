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

    from slugkit.workflows.unlearn import UnlearnConfig, _check_inputs

    val, test = tmp_path / "val" / "A", tmp_path / "test" / "A"
    val.mkdir(parents=True)
    test.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(val / f"{i}.png")
        Image.new("RGB", (8, 8), (0, i * 40 + 1, 0)).save(test / f"{i}.png")
    cfg = UnlearnConfig(concept="A", out=str(tmp_path / "o"), forget="f", retain="r", val_identities=str(val.parent),
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
