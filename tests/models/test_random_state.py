"""Loading a model leaves torch's global random state as it was (:mod:`slugkit.common.rng`): building a module drew
its throw-away random initialisation from it, so a seeded script got other samples when it loaded a model first."""

import pytest
import torch


def _loaders():
    import slugkit
    from slugkit.models import load_adapter
    from slugkit.models.convert import embedded_hf_clip
    from slugkit.models.hf_clip import embedded_hf_adapter
    from slugkit.world import canvas
    from slugkit.world.t2i import EmbeddedT2IPipeline

    return {"load_adapter open_clip": lambda: load_adapter("embedded"),
            "load_model hf_clip": lambda: slugkit.load_model("embedded", family="hf_clip"),
            "embedded_hf_clip": embedded_hf_clip, "embedded_hf_adapter": embedded_hf_adapter,
            "EmbeddedT2IPipeline.load": EmbeddedT2IPipeline.load,
            "CanvasPipeline.load": lambda: canvas.CanvasPipeline.load(None),
            "CanvasJudges.load": lambda: canvas.CanvasJudges.load(None)}


@pytest.mark.parametrize("name", list(_loaders()))
def test_a_loader_leaves_the_callers_random_state(name):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    _loaders()[name]()
    assert torch.equal(torch.rand(4), expected), f"{name} moved torch's random state"


def test_a_failed_load_leaves_it_too(tmp_path):
    from slugkit.models import ModelLoadError, load_adapter

    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    with pytest.raises((ModelLoadError, ValueError, OSError)):
        load_adapter(str(tmp_path / "nope"))
    assert torch.equal(torch.rand(2), expected)
