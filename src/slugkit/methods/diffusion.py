"""What the diffusion baselines (UCE, ESD; issue 15) share: prompt encoding the way a Stable Diffusion pipeline does
it, the result record with the cost columns UnlearnCanvas reports, and a temporary edit of a UNet.

They take the parts of a text-to-image pipeline — ``text_encoder`` (a ``CLIPTextModel``), ``tokenizer``, ``unet``
(a diffusers ``UNet2DConditionModel``) — so the same code runs on a diffusers SD pipeline, on the tiny stand-ins of
the tests and on the embedded text-to-image model (``slugkit.world.t2i``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


def context_length(tokenizer, max_length: int | None = None) -> int:
    """The tokenizer's padded length: ``max_length`` if given, else its ``model_max_length`` capped at 77 (CLIP)."""
    return max_length or min(getattr(tokenizer, "model_max_length", 77) or 77, 77)


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> dict:
    """``input_ids`` / ``attention_mask`` ``[N, L]`` padded to :func:`context_length`, as SD pipelines pad."""
    return tokenizer(list(prompts), padding="max_length", max_length=context_length(tokenizer, max_length),
                     truncation=True, return_tensors="pt")


@torch.no_grad()
def encode(text_encoder, tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """``[N, L, d]``: the text encoder's last hidden state, what the UNet cross-attends to."""
    return text_encoder(input_ids=tokenize(tokenizer, prompts, max_length)["input_ids"]).last_hidden_state


@dataclass
class DiffusionEdit:
    """A baseline's edited UNet tensors (``{parameter name: new weight}``, float32 on the CPU) and its cost:
    ``time_s`` (wall, the unlearning alone), ``storage_bytes`` (the edited tensors in float32, as a patch stores
    them), ``peak_mem_bytes`` (the process's peak resident memory growth during the run, or None)."""

    tensors: dict[str, torch.Tensor]
    time_s: float
    storage_bytes: int
    peak_mem_bytes: int | None = None
    info: dict = field(default_factory=dict)


def storage(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in tensors.values())


@contextlib.contextmanager
def applied(unet: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    """``tensors`` written into ``unet`` (by parameter name) for the ``with`` block; the exact bytes back on exit.
    ``KeyError`` names a tensor the UNet does not have."""
    params = dict(unet.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise KeyError(f"the UNet has no parameter {missing[0]!r} (edit made for another UNet?)")
    saved = {n: params[n].detach().clone() for n in tensors}
    try:
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(params[n].dtype))
        yield unet
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
