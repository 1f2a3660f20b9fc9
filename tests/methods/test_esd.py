"""ESD (spec baselines.md §3) on the tiny Stable Diffusion stand-in: parameter sets, the sign of the negative
guidance (a target equal to the frozen conditional prediction gives a zero loss), determinism, and
the caller's UNet left untouched."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slugkit.methods.esd import PARAM_SETS, esd, esd_parameters  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipe():
    from hf_tiny import build_adapter, tiny_sd_pipeline

    return tiny_sd_pipeline(build_adapter(seed=4))


def test_parameter_sets(tiny_pipe):
    unet = tiny_pipe.unet
    x, u = esd_parameters(unet, "esd-x"), esd_parameters(unet, "esd-u")
    strict, every = esd_parameters(unet, "esd-x-strict"), esd_parameters(unet, "esd-all")
    assert x and all("attn2" in n for n in x) and any(n.endswith("attn2.to_q.weight") for n in x)
    assert u and not any("attn2" in n or n.startswith(("conv_out", "time_embedding")) for n in u)
    assert any(".attn1." in n for n in u) and any("resnets" in n for n in u)
    assert set(strict) < set(x) and all(n.endswith(("to_k.weight", "to_v.weight")) for n in strict)
    assert set(x) | set(u) < set(every) and not set(x) & set(u)
    assert PARAM_SETS == ("esd-x", "esd-u", "esd-x-strict", "esd-all")
    with pytest.raises(ValueError, match="unknown ESD parameter set 'xattn'"):
        esd_parameters(unet, "xattn")


def _run(p, **kw):
    args = dict(which="esd-x", iterations=3, lr=1e-3, ddim_steps=4, seed=0, progress=False)
    return esd(p.text_encoder, p.tokenizer, p.unet, p.scheduler, "a photo of alice abbott.", **{**args, **kw})


def test_esd_trains_a_copy_deterministically(tiny_pipe):
    p = tiny_pipe
    before = {n: t.detach().clone() for n, t in p.unet.state_dict().items()}
    a, b = _run(p), _run(p)
    assert all(torch.equal(t, before[n]) for n, t in p.unet.state_dict().items())  # the caller's UNet is untouched
    assert set(a.tensors) == set(esd_parameters(p.unet, "esd-x"))
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)  # seeded: identical reruns
    assert any(not torch.equal(a.tensors[n], before[n]) for n in a.tensors)
    assert a.storage_bytes == sum(t.numel() * 4 for t in a.tensors.values())
    assert len(a.info["log"]) == 1 and a.info["log"][0]["iteration"] == 3
    c = _run(p, seed=1)
    assert any(not torch.equal(a.tensors[n], c.tensors[n]) for n in a.tensors)


def test_negative_guidance_sign(tiny_pipe):
    """η = −1 makes the target ε*(z, ∅) + (ε*(z, c) − ε*(z, ∅)) = ε*(z, c): the copy already predicts it, so the loss
    is 0 up to kernel rounding (the trainable forward runs with gradients, the frozen one without); η = 1 (ESD's)
    asks for the negatively guided prediction, far from it."""
    p = tiny_pipe
    still = _run(p, negative_guidance=-1.0)
    moved = _run(p, negative_guidance=1.0)
    assert still.info["log"][0]["loss"] < 1e-8
    assert moved.info["log"][0]["loss"] > 1e4 * still.info["log"][0]["loss"] and moved.info["log"][0]["loss"] > 1e-4


def test_esd_input_errors(tiny_pipe):
    p = tiny_pipe
    with pytest.raises(ValueError, match="concept's prompt"):
        esd(p.text_encoder, p.tokenizer, p.unet, p.scheduler, "  ")
    with pytest.raises(ValueError, match="iterations and ddim_steps must be >= 1"):
        _run(p, iterations=0)
