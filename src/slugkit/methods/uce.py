"""UCE — Unified Concept Editing (Gandikota et al., WACV 2024; spec ``baselines.md`` §6.1): a closed-form edit of
every cross-attention key and value projection of a diffusion UNet, the strongest efficiency peer of SLUG on the
text-to-image side (issue 15). No images, no gradients: one text-encoder pass over the prompts and one d×d solve per
matrix.

For each ``attn2.to_k`` / ``attn2.to_v`` weight W (``[out, d]``, d the text width), with erase keys k_i (one per erase
prompt), their targets v_i* = W_old·k_i^guide (the guide prompt's key through the *unedited* W) and preserve keys
k_j::

    W_new = [λ·W_old + s_e·Σ_i v_i*·k_iᵀ + s_p·Σ_j (W_old·k_j)·k_jᵀ] · [λ·I + s_e·Σ_i k_i·k_iᵀ + s_p·Σ_j k_j·k_jᵀ]⁻¹

the exact minimiser of s_e·Σ‖W·k_i − v_i*‖² + s_p·Σ‖W·k_j − W_old·k_j‖² + λ·‖W − W_old‖²_F (tested numerically).

As the current official code (``uce_sd_erase.py``): one key per prompt, the text encoder's last hidden state at the
last real token (the token before the end-of-text token; for ``""`` the start token); defaults s_e = 1, s_p = 1,
λ = 0.5; guide ``""`` (objects) — ``"art"`` is the official guide for artistic styles; the solve in float64 here
(the official code uses float32; the difference is below float32 rounding of the result on the sizes tested).
Not copied: the older UnlearnCanvas port's padding-position keys (``train_erase.py``); its s_p = max(0.1, 1/|P|) is
``preserve_scale=None``.
"""

from __future__ import annotations

import time

import torch

from .diffusion import DiffusionEdit, applied, storage, tokenize

DEFAULT_LAMBDA = 0.5
DEFAULT_ERASE_SCALE = 1.0
DEFAULT_PRESERVE_SCALE = 1.0
KV_SUFFIXES = ("attn2.to_k.weight", "attn2.to_v.weight")


def cross_attention_kv(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every cross-attention key/value projection weight of a diffusers UNet (``...attn2.to_k.weight`` /
    ``...attn2.to_v.weight``), by parameter name, in module order. ``ValueError`` when there is none (a UNet without
    text cross-attention cannot be edited by UCE)."""
    out = {n: p for n, p in unet.named_parameters() if n.endswith(KV_SUFFIXES)}
    if not out:
        raise ValueError("the UNet has no cross-attention key/value projections (…attn2.to_k/to_v.weight); UCE "
                         "edits only those")
    return out


@torch.no_grad()
def prompt_keys(text_encoder: torch.nn.Module, tokenizer, prompts: list[str], max_length: int | None = None
                ) -> torch.Tensor:
    """``[N, d]`` float32: for each prompt the text encoder's last hidden state at its last real token (the one
    before the end-of-text token; the start token for ``""``), as the official UCE takes its keys. The text
    encoders used (CLIP) are causal, so the key does not depend on the padding length. ``ValueError`` for no
    prompts."""
    if not prompts:
        raise ValueError("UCE needs at least one prompt here (got none)")
    enc = tokenize(tokenizer, prompts, max_length)
    h = text_encoder(input_ids=enc["input_ids"]).last_hidden_state
    idx = enc["attention_mask"].sum(1) - 2
    return h[torch.arange(h.shape[0]), idx.clamp(min=0)].float()


def closed_form(w_old: torch.Tensor, k_erase: torch.Tensor, v_target: torch.Tensor, k_preserve: torch.Tensor | None,
                erase_scale: float = DEFAULT_ERASE_SCALE, preserve_scale: float = DEFAULT_PRESERVE_SCALE,
                lamb: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """UCE's W_new (module docstring) in float64, returned in ``w_old``'s dtype. ``w_old``: ``[out, d]``;
    ``k_erase``: ``[E, d]``; ``v_target``: ``[E, out]``; ``k_preserve``: ``[P, d]`` or None. ``ValueError`` for
    mismatched shapes or ``lamb`` <= 0 with a singular system."""
    w = w_old.double()
    ke, vt = k_erase.double(), v_target.double()
    if ke.shape[1] != w.shape[1] or vt.shape != (ke.shape[0], w.shape[0]):
        raise ValueError(f"shapes do not match: W {tuple(w.shape)}, erase keys {tuple(ke.shape)}, targets "
                         f"{tuple(vt.shape)}")
    d = w.shape[1]
    lhs = lamb * w + erase_scale * vt.T @ ke
    rhs = lamb * torch.eye(d, dtype=torch.float64) + erase_scale * ke.T @ ke
    if k_preserve is not None and len(k_preserve):
        kp = k_preserve.double()
        lhs = lhs + preserve_scale * (w @ kp.T) @ kp
        rhs = rhs + preserve_scale * kp.T @ kp
    try:
        return torch.linalg.solve(rhs, lhs.T).T.to(w_old.dtype)  # lhs · rhs⁻¹ (rhs symmetric)
    except RuntimeError as e:  # pragma: no cover - only with lamb <= 0
        raise ValueError(f"UCE's system is singular (lamb={lamb}); use lamb > 0") from e


def uce(text_encoder, tokenizer, unet, erase: list[str], preserve: list[str] = (), guide: str | list[str] = "", *,
        erase_scale: float = DEFAULT_ERASE_SCALE, preserve_scale: float | None = DEFAULT_PRESERVE_SCALE,
        lamb: float = DEFAULT_LAMBDA, max_length: int | None = None) -> DiffusionEdit:
    """UCE on ``unet`` (module docstring): erase the concepts named by the ``erase`` prompts toward the ``guide``
    prompt(s) (one string for all, or one per erase prompt) while keeping the ``preserve`` prompts' keys. The UNet is
    **not** modified; apply the result with :func:`slugkit.methods.diffusion.applied`. ``preserve_scale=None``: the
    UnlearnCanvas port's max(0.1, 1/|P|). Raises ``ValueError`` for no erase prompts, a guide list of another
    length, or a prompt that is also in the preserve set (it would be both erased and kept)."""
    t0 = time.perf_counter()
    erase, preserve = list(erase), list(preserve)
    if not erase:
        raise ValueError("UCE needs at least one erase prompt (the concept to remove)")
    guides = [guide] * len(erase) if isinstance(guide, str) else list(guide)
    if len(guides) != len(erase):
        raise ValueError(f"{len(guides)} guide prompts for {len(erase)} erase prompts: give one, or one per prompt")
    both = sorted(set(erase) & set(preserve))
    if both:
        raise ValueError(f"prompts both erased and preserved: {both}; remove them from the preserve set")
    s_p = max(0.1, 1.0 / max(1, len(preserve))) if preserve_scale is None else preserve_scale
    k_e = prompt_keys(text_encoder, tokenizer, erase, max_length)
    k_g = prompt_keys(text_encoder, tokenizer, guides, max_length)
    k_p = prompt_keys(text_encoder, tokenizer, preserve, max_length) if preserve else None
    out = {}
    for name, p in cross_attention_kv(unet).items():
        w = p.detach().float().cpu()
        out[name] = closed_form(w, k_e, k_g @ w.T, k_p, erase_scale, s_p, lamb).contiguous()
    return DiffusionEdit(out, time.perf_counter() - t0, storage(out), None,
                     {"erase": erase, "guide": guides, "preserve": len(preserve), "erase_scale": erase_scale,
                      "preserve_scale": s_p, "lamb": lamb, "tensors": len(out),
                      "params": sum(t.numel() for t in out.values())})


__all__ = ["DEFAULT_ERASE_SCALE", "DEFAULT_LAMBDA", "DEFAULT_PRESERVE_SCALE", "applied", "closed_form",
           "cross_attention_kv", "prompt_keys", "uce"]
