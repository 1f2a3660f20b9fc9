"""A joint run's forget set must hold pairs of every concept it unlearns (ninth new-user trial: `--concepts A,B` with
A's forget set only was unlearned for both, the model's utility fell 0.99 -> 0.45, and the run said "unlearned")."""

from dataclasses import replace

import pytest

from slugkit.workflows.inputs import unnamed_concepts
from slugkit.workflows.unlearn import run_unlearn
from slugkit.workflows.verdict import ForgetCaptionsError
from slugkit.workflows.world_runs import world_config
from slugkit.world import render as world
from slugkit.world.demo_data import ensure_world_data


def test_unnamed_concepts_are_found_by_whole_word():
    caps = ["a photo of Jowen Gormere.", "Serna Maltonia at the beach"]
    assert unnamed_concepts(caps, ["Jowen Gormere", "Serna Malton"]) == ["Serna Malton"]
    assert unnamed_concepts(caps + ["serna malton, smiling"], ["Jowen Gormere", "Serna Malton"]) == []


@pytest.mark.slow
def test_a_joint_run_whose_forget_set_misses_a_concept_is_refused_before_the_gradient_pass(tmp_path):
    a, b = world.IDENTITIES[0].name, world.IDENTITIES[2].name
    cfg, _, _ = world_config(a, tmp_path / "run", ensure_world_data(None, progress=False), progress=False, threads=1)
    with pytest.raises(ForgetCaptionsError, match=f"names '{b}': a joint run unlearns every concept"):
        run_unlearn(replace(cfg, concepts=[a, b]))
    assert not (tmp_path / "run" / "result.json").exists() and not (tmp_path / "run" / "patch").exists()


@pytest.mark.slow
def test_forget_images_in_the_test_folder_are_refused(tmp_path):
    """The forget set's own images copied in as the concept's test images read FA@5 0.00 where the held-out ones read
    0.06, and flipped the verdict to "unlearned" (ninth trial); val/test overlap was caught, forget/test was not."""
    import shutil

    from slugkit.data.folders import iter_pairs

    a = world.IDENTITIES[0].name
    cfg, _, _ = world_config(a, tmp_path / "run", ensure_world_data(None, progress=False), progress=False, threads=1)
    test = tmp_path / "test"
    shutil.copytree(cfg.test_identities, test)
    first = next(iter_pairs(cfg.forget, decode=False))
    (test / a.replace(" ", "_") / "leaked.jpg").write_bytes(first.data)
    with pytest.raises(ValueError, match=r"--test-identities: 1 image\(s\) are forget-set images .*leaked.jpg"):
        run_unlearn(replace(cfg, test_identities=str(test)))
