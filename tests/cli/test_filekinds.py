"""A slug file that is no model, given as `slug apply`/`revert --checkpoint`, is named as what it is (trial 48: a
gradients file said "the model has no tensor named … (did you mean 'retain/…')", a LoRA "no tensor named")."""

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from slugkit.cli.patches import _load_target


@pytest.mark.parametrize("meta, said", [
    ({"slugkit": json.dumps({"format": "slugkit-gradients-2"})}, "is a gradients file `slug grads`"),
    ({"slugkit.format": json.dumps("slugkit-lora")}, "is a LoRA `slug export --lora` wrote"),
    ({}, None)])
def test_a_gradients_file_or_a_lora_given_as_the_checkpoint_is_named(tmp_path, meta, said):
    f = tmp_path / "x.safetensors"
    save_file({"retain/w": torch.zeros(2)}, str(f), metadata=meta)
    a = argparse.Namespace(checkpoint=str(f), pretrained=None, model=None, family=None)
    if said is None:  # a plain checkpoint loads
        state, adapter = _load_target(a)
        assert adapter is None and list(state) == ["retain/w"]
        return
    with pytest.raises(ValueError, match=f"--checkpoint {f} {said}.*not a model: give the model's checkpoint"):
        _load_target(a)
