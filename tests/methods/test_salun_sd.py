"""SalUn for diffusion (spec baselines.md §2.2, §2.5) on the tiny Stable Diffusion stand-in (latents through its VAE):
the global top-ρ mask, masked-out weights that never move, determinism, and the input checks."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slugkit.methods.salun_sd import salun_sd  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from hf_tiny import build_adapter, tiny_sd_pipeline

    p = tiny_sd_pipeline(build_adapter(seed=6))
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.rand(3, 32, 32, generator=g) * 2 - 1  # noqa: E731
    forget = [(img(), "a photo of alice abbott.") for _ in range(4)]
    retain = [(img(), f"a photo of {n}.") for n in ("bob brown", "carol clark", "dan dale") for _ in range(2)]

    def to_latent(x):
        return p.vae.encode(x).latent_dist.mean * p.vae.config.scaling_factor

    return p, forget, retain, to_latent


def _run(t, **kw):
    p, forget, retain, to_latent = t
    args = dict(steps=3, lr=1e-3, batch_size=2, to_latent=to_latent, progress=False)
    return salun_sd(p.text_encoder, p.tokenizer, p.unet, p.scheduler, forget, retain, "a photo of a person.",
                    **{**args, **kw})


def test_mask_bounds_the_update_and_runs_repeat(tiny):
    p = tiny[0]
    before = {n: t.detach().clone() for n, t in p.unet.named_parameters()}
    a, b = _run(tiny), _run(tiny)
    assert all(torch.equal(t, before[n]) for n, t in p.unet.named_parameters())  # the caller's UNet is untouched
    total = sum(t.numel() for t in before.values())
    assert a.info["params"] == total and a.info["masked_params"] == total // 2  # global top 50 %
    moved = sum(int((a.tensors[n] != before[n]).sum()) for n in a.tensors)
    assert 0 < moved <= a.info["masked_params"]  # only masked scalars can move
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert a.storage_bytes == sum(t.numel() * 4 for t in a.tensors.values())
    assert a.info["log"][-1]["step"] == 3


def test_fraction_controls_the_mask(tiny):
    small = _run(tiny, fraction=0.01, steps=2)
    p = tiny[0]
    total = sum(t.numel() for t in p.unet.parameters())
    assert small.info["masked_params"] == int(0.01 * total)
    before = dict(p.unet.named_parameters())
    moved = sum(int((small.tensors[n] != before[n].detach()).sum()) for n in small.tensors)
    assert 0 < moved <= small.info["masked_params"]


def test_salun_sd_input_errors(tiny):
    p, forget, retain, _ = tiny
    with pytest.raises(ValueError, match="needs forget pairs"):
        salun_sd(p.text_encoder, p.tokenizer, p.unet, p.scheduler, [], retain, "x")
    with pytest.raises(ValueError, match="2 pseudo prompts for 4 forget pairs"):
        salun_sd(p.text_encoder, p.tokenizer, p.unet, p.scheduler, forget, retain, ["a", "b"])
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        _run(tiny, fraction=0.0)
    with pytest.raises(ValueError, match="images must be"):
        salun_sd(p.text_encoder, p.tokenizer, p.unet, p.scheduler, [(torch.zeros(32, 32), "a")], retain, "x")
