"""Stable Diffusion 1.x / 2.x: carry a SLUG patch of a transformers ``CLIPModel`` into ``pipe.text_encoder``.

SD conditions its UNet on ``text_encoder(ids).last_hidden_state`` — every encoder layer of the ``CLIPTextModel`` plus
``final_layer_norm``, never the pooled output or ``text_projection`` (spec §6). Pairings:

* SD 1.x (e.g. ``runwayml/stable-diffusion-v1-5``): gradients on ``openai/clip-vit-large-patch14``; the pipeline
  reads all 12 text layers;
* SD 2.x (e.g. ``stabilityai/stable-diffusion-2-1``): gradients on ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; the
  pipeline reads 23 of its 24 text layers (SD 2 conditions on the penultimate OpenCLIP layer, so diffusers ships
  ``text_encoder/config.json`` with ``num_hidden_layers = 23``).

An edit of CLIP-H's text layer 23 (or of ``text_projection``, or of any vision tensor) therefore cannot change SD 2.x
— the official notebook's candidate set allows it (spec §6.1 [BUG]). :func:`consumed_text_candidates` gives the
candidates that *do* reach the pipeline; restrict the adapter to them before the SLUG run
(``adapter.restrict_candidates(consumed_text_candidates(adapter, pipe.text_encoder))`` or
``slug unlearn --family hf_clip --consumer sd:PIPELINE_DIR``).

Where the official notebook copies every parameter of the edited CLIP text model into the pipeline with ``.half()``,
:func:`apply_patch_to_pipeline` writes only the patched tensors, in place, after checking the encoder holds the
patch's original values; :func:`revert_patch_from_pipeline` restores the exact bytes. Works for fp16 encoders (see
:mod:`slugkit.integrations`, "Half precision"). Only ``pipe.text_encoder`` is touched (SDXL's ``text_encoder_2`` is
not handled).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..patch import Patch
from . import apply_to_consumer, layer_names, num_layers, tower_map, verify_tower

WHAT = "text encoder"


def _encoder(pipe_or_encoder) -> nn.Module:
    te = getattr(pipe_or_encoder, "text_encoder", pipe_or_encoder)
    if not isinstance(te, nn.Module):
        raise TypeError(f"expected a pipeline with a .text_encoder or a CLIPTextModel, got {type(pipe_or_encoder)}")
    return te


def text_encoder_map(clip_model: nn.Module, text_encoder: nn.Module) -> dict[str, str]:
    """CLIPModel name → ``text_encoder`` name for every text-encoder parameter, e.g. (transformers 5)
    ``text_model.encoder.layers.3.self_attn.q_proj.weight`` → ``encoder.layers.3.self_attn.q_proj.weight``."""
    return tower_map(clip_model, _encoder(text_encoder), "text")


def verify_text_encoder(clip_model: nn.Module, text_encoder: nn.Module) -> dict[str, str]:
    """Refuse (:class:`~slugkit.integrations.TowerMismatchError`, naming the first differing tensor) unless every
    ``text_encoder`` tensor equals the corresponding CLIP text tensor (SHA-256, after casting to the encoder's dtype).
    An encoder with fewer layers (SD 2.x) is checked on the layers it has. Returns :func:`text_encoder_map`."""
    return verify_tower(clip_model, _encoder(text_encoder), "text", WHAT)


def consumed_text_layers(text_encoder: nn.Module, clip_skip: int | None = None) -> int:
    """Encoder layers whose output reaches the UNet: all of the encoder's, minus ``clip_skip`` if the pipeline is
    called with it (diffusers then reads ``hidden_states[-(clip_skip + 1)]``)."""
    n = num_layers(_encoder(text_encoder), "text")
    return n - int(clip_skip or 0)


def consumed_text_candidates(adapter, text_encoder: nn.Module, clip_skip: int | None = None) -> list[str]:
    """The adapter's HF candidates that the pipeline consumes: ``text_model.encoder.layers.{i}.*`` for
    ``i < consumed_text_layers``. ``text_projection``, every vision tensor and (by the HF filter) norms, biases and
    embeddings are out."""
    names = adapter.all_candidate_names() if hasattr(adapter, "all_candidate_names") else adapter.candidate_names()
    return layer_names(names, "text", consumed_text_layers(text_encoder, clip_skip))


def apply_patch_to_pipeline(pipe, patch: Patch, *, check: bool = True):
    """Write the patch into ``pipe.text_encoder`` in place (no copy); refused, untouched, unless the encoder holds
    the patch's original values (``check=False`` skips that comparison). Accepts a pipeline or the
    ``CLIPTextModel`` itself; returns it."""
    apply_to_consumer(_encoder(pipe), patch, "text", WHAT, check=check)
    return pipe


def revert_patch_from_pipeline(pipe, patch: Patch):
    """Restore the original bytes of the patched text-encoder tensors (refused unless they hold the patch)."""
    apply_to_consumer(_encoder(pipe), patch, "text", WHAT, revert=True)
    return pipe


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_patched_text_encoder(pipe_or_dir, patch: Patch, out_dir: str | os.PathLike, *, full_pipeline: bool = False,
                              revert: bool = False, overwrite: bool = False) -> Path:
    """Write the patched ``text_encoder/`` (``config.json`` + ``model.safetensors``) in diffusers' folder layout.

    ``pipe_or_dir`` is a pipeline object or a diffusers pipeline folder (only its ``text_encoder/`` is loaded, in its
    stored dtype). By default ``out_dir`` holds just ``text_encoder/`` and ``slugkit_patch.json`` (provenance); load
    it with ``CLIPTextModel.from_pretrained(out_dir, subfolder="text_encoder")`` and pass it to
    ``StableDiffusionPipeline.from_pretrained(base, text_encoder=...)``. With ``full_pipeline=True`` every other
    component is added too (hard links where possible, from a folder; ``save_pretrained`` from an object), so
    ``out_dir`` loads as a pipeline by itself. ``revert=True`` writes the reverted encoder instead.

    A pipeline object is patched in place for the write and reverted afterwards (bit-exact). The folder appears
    atomically (temporary sibling, then rename); an existing non-empty ``out_dir`` is refused unless ``overwrite``.
    Weights are saved by the installed transformers in its own key layout (5.x: no ``text_model.`` prefix; 5.x reads
    both layouts).
    """
    from transformers import CLIPTextModel

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) or another path")
    src_dir = None
    if isinstance(pipe_or_dir, (str, os.PathLike)):
        src_dir = Path(pipe_or_dir)
        if not (src_dir / "text_encoder").is_dir():
            raise FileNotFoundError(f"{src_dir} is not a diffusers pipeline folder (no text_encoder/ in it)")
        te, pipe = CLIPTextModel.from_pretrained(src_dir, subfolder="text_encoder", dtype="auto"), None
    else:
        pipe, te = pipe_or_dir, _encoder(pipe_or_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    changed = False
    try:
        apply_to_consumer(te, patch, "text", WHAT, revert=revert)
        changed = True
        if full_pipeline and pipe is not None and pipe is not te:
            pipe.save_pretrained(tmp)
        else:
            te.save_pretrained(tmp / "text_encoder")
            if full_pipeline:
                if src_dir is None:
                    raise ValueError("full_pipeline needs a pipeline object or a pipeline folder, not a bare encoder")
                for entry in src_dir.iterdir():
                    if entry.name == "text_encoder" or entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(str(entry), str(tmp / entry.name))
        if pipe is not None and changed:  # the caller's pipeline goes back to its exact bytes
            apply_to_consumer(te, patch, "text", WHAT, revert=not revert)
            changed = False
        info = {"patch_fingerprint": patch.fingerprint, "concept": patch.concept, "base_model": patch.base_model,
                "tensors": patch.names, "reverted": revert, "source": str(src_dir) if src_dir else None}
        (tmp / "slugkit_patch.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.rmdir(old)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if pipe is not None and changed:
            apply_to_consumer(te, patch, "text", WHAT, revert=not revert)
        raise
    return out_dir


__all__ = ["apply_patch_to_pipeline", "consumed_text_candidates", "consumed_text_layers", "revert_patch_from_pipeline",
           "save_patched_text_encoder", "text_encoder_map", "verify_text_encoder"]
