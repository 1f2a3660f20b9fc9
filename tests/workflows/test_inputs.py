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
