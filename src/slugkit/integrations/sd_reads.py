"""How a Stable Diffusion pipeline reads its text encoders: which layers' output reaches the UNet (SD 1.x/2.x: the
last hidden state; SDXL: ``hidden_states[-2]``, and ``text_encoder_2``'s projected pooled output), moved back by
diffusers' ``clip_skip`` (:mod:`slugkit.integrations.diffusers_sd`, module docstring). Re-exported there.
"""

from __future__ import annotations

from torch import nn

READS = ("last", "penultimate", "penultimate+pooled")
PROJECTION = "text_projection.weight"


def is_sdxl(pipe) -> bool:
    """A pipeline object with a second text encoder (SDXL)."""
    return isinstance(getattr(pipe, "text_encoder_2", None), nn.Module)


def encoder_reads(sdxl: bool, encoder: str = "text_encoder") -> str:
    """How the UNet reads an encoder: ``last`` (SD 1.x/2.x: ``last_hidden_state``, every layer and the final norm),
    ``penultimate`` (SDXL ``text_encoder``: ``hidden_states[-2]``) or ``penultimate+pooled`` (SDXL
    ``text_encoder_2``: ``hidden_states[-2]`` and the projected pooled output, so every layer and the projection)."""
    if not sdxl:
        return "last"
    return "penultimate+pooled" if encoder == "text_encoder_2" else "penultimate"


def consumed_layer_count(n_layers: int, reads: str = "last", clip_skip: int | None = None) -> int:
    """Encoder layers whose output reaches the UNet. ``clip_skip`` (a pipeline call argument; None or 0: none) moves
    the hidden state read back by that many layers (diffusers: ``hidden_states[-(clip_skip + 1)]``, SDXL
    ``[-(clip_skip + 2)]``); SDXL's pooled output still reads every layer. Raises ``ValueError`` for an unknown
    ``reads``, a negative ``clip_skip`` or one that leaves no layer read."""
    skip = int(clip_skip or 0)
    if skip < 0:
        raise ValueError(f"clip_skip must be >= 0 (diffusers: 1 reads the penultimate layer), not {skip}")
    if reads not in READS:
        raise ValueError(f"reads must be one of {', '.join(READS)}, not {reads!r}")
    n = {"last": n_layers - skip, "penultimate": n_layers - 1 - skip, "penultimate+pooled": n_layers}[reads]
    if n < 1:
        top = n_layers - 1 - (reads == "penultimate")
        raise ValueError(f"clip_skip={skip} skips every layer of the {n_layers}-layer text encoder (the pipeline reads "
                         f"its {'penultimate' if reads == 'penultimate' else 'last'} hidden state, moved back {skip} "
                         f"layers); use a clip_skip of at most {top}")
    return n


def consumed_extra(reads: str) -> tuple[str, ...]:
    """CLIP tensors outside the text transformer that the pipeline reads (SDXL ``text_encoder_2``: the projection)."""
    return (PROJECTION,) if reads == "penultimate+pooled" else ()
