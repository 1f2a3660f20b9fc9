"""Finding a CLIP tower inside the model that consumes it (a diffusers text encoder, a LLaVA vision tower), mapping the
CLIP model's tensor names onto it, and applying or reverting a patch through that renamed view (see
:mod:`slugkit.integrations`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..common.weights import check_weights_file
from ..patch import (Patch, PatchMismatchError, apply_patch, as_patch, cast_patch, check_architecture, model_of,
                     revert_patch, tensor_sha256)

__all__ = ["CLIP_TOWER_PREFIX", "TowerMismatchError", "apply_to_consumer", "cast_patch", "check_weight_files",
           "checkpoint_tower_view", "consumer_view", "find_tower", "layer_names", "num_layers", "tower_map",
           "verify_tower", "write_provenance"]

# Attribute names of the two towers inside transformers' CLIPModel (4.x and 5.x alike).
CLIP_TOWER_PREFIX = {"text": "text_model.", "vision": "vision_model."}
_LONE = {"text": "embeddings.token_embedding.weight", "vision": "embeddings.patch_embedding.weight"}  # unprefixed
_MARKERS = {"text": ("embeddings", "encoder", "final_layer_norm"),
            "vision": ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")}


class TowerMismatchError(PatchMismatchError):
    """The consumer's tower is not the CLIP tower the edit was made on (names the first differing tensor)."""


def takes_patch_path(fn):
    """Let ``fn``'s second argument, ``patch``, be a patch folder too (:func:`slugkit.patch.as_patch`; a path said
    "'str' object has no attribute 'names'": trial 29)."""
    import functools

    @functools.wraps(fn)
    def wrapper(target, patch, *args, **kwargs):
        return fn(target, as_patch(patch), *args, **kwargs)

    return wrapper


def check_out_outside(src_dir: Path | None, out_dir, what: str) -> None:
    """Refuse an ``out_dir`` inside the model folder ``src_dir`` it is written from (``slug apply`` refused it; the
    Python call wrote into the user's model folder: trial 29), inside the slugkit package or another slug run, or
    starting with an unexpanded ``~`` (trial 31: a model object's folder was written into the shipped assets)."""
    from ..common.outputs import out_inside_model, out_inside_run

    why = out_inside_model(out_dir, {}, "out_dir (--out)") or out_inside_run(out_dir, "out_dir (--out)")
    if why:
        raise ValueError(why)
    from ..common.outguard import is_run

    # a run folder itself: the refusal said it "holds files slug did not write" of the run's own files (verify 62)
    if os.path.isdir(out_dir) and is_run(Path(os.path.realpath(out_dir))) is not None:
        raise ValueError(f"out_dir (--out) {out_dir} is a slug run folder; write the {what} outside that run")
    if src_dir is not None and (os.path.realpath(out_dir) + os.sep).startswith(os.path.realpath(src_dir) + os.sep):
        raise ValueError(f"out_dir {out_dir} is inside {src_dir}, the {what} it is written from; write it beside "
                         "that folder")


def find_tower(module: nn.Module, kind: str) -> tuple[str, nn.Module]:
    """``(prefix, submodule)`` of the shallowest CLIP ``kind`` ("text" / "vision") transformer inside ``module`` (a
    slugkit adapter: inside its model). ``TypeError`` for an object that is no torch module."""
    if kind not in _MARKERS:
        raise ValueError(f"kind must be 'text' or 'vision', not {kind!r}")
    module = model_of(module)
    if not isinstance(module, nn.Module):  # "'EmbeddedT2IPipeline' object has no attribute 'named_modules'"
        raise TypeError(f"expected a torch module holding a CLIP {kind} tower (a CLIPModel, a pipeline's text encoder, "
                        f"a LLaVA), got {type(module).__name__}")
    best = None
    for name, mod in module.named_modules():
        if all(hasattr(mod, a) for a in _MARKERS[kind]) and hasattr(getattr(mod, "encoder"), "layers"):
            depth = 0 if not name else name.count(".") + 1
            if best is None or depth < best[0]:
                best = (depth, name, mod)
    if best is None:
        oc = hasattr(module, "visual") and hasattr(module, "transformer")  # an open_clip model (trial 30)
        raise TypeError(f"{type(module).__name__} holds no CLIP {kind} transformer (a module with "
                        f"{', '.join(_MARKERS[kind])})" + ("; this is an open_clip model: pass the transformers CLIP, "
                                                           "slugkit.load_model(..., family='hf_clip')" if oc else ""))
    _, name, mod = best
    return (name + "." if name else ""), mod


def num_layers(module: nn.Module, kind: str) -> int:
    """Number of encoder layers of the CLIP ``kind`` tower inside ``module``."""
    return len(find_tower(module, kind)[1].encoder.layers)


def tower_map(clip_model: nn.Module, consumer: nn.Module, kind: str) -> dict[str, str]:
    """CLIPModel parameter name → consumer parameter name, for every parameter the consumer's tower holds.

    Raises :class:`TowerMismatchError` if the consumer holds a tensor the CLIP tower lacks or has another shape.
    """
    src_prefix, src = find_tower(clip_model, kind)
    dst_prefix, dst = find_tower(consumer, kind)
    src_params = dict(src.named_parameters())
    out = {}
    for rel, p in dst.named_parameters():
        if rel not in src_params:
            raise TowerMismatchError(f"the consumer's {kind} tower has {dst_prefix}{rel}, which the CLIP model lacks "
                                     f"(more layers than CLIP, or another architecture)")
        if tuple(src_params[rel].shape) != tuple(p.shape):
            raise TowerMismatchError(f"{dst_prefix}{rel} has shape {tuple(p.shape)}, the CLIP tensor {src_prefix}{rel} "
                                     f"{tuple(src_params[rel].shape)}: not the same model")
        out[src_prefix + rel] = dst_prefix + rel
    return out


def verify_tower(clip_model: nn.Module, consumer: nn.Module, kind: str, what: str) -> dict[str, str]:
    """Check that every tensor of the consumer's tower equals (SHA-256) the CLIP tensor it corresponds to.

    The CLIP tensor is cast to the consumer's dtype first (an fp16 consumer of fp32 CLIP weights passes). A consumer
    with fewer layers (SD 2.x) is checked on the layers it has. Returns the name map; raises
    :class:`TowerMismatchError` naming the first tensor that differs.
    """
    clip_model, consumer = model_of(clip_model), model_of(consumer)  # an adapter for its model (trial 29)
    mapping = tower_map(clip_model, consumer, kind)
    src = dict(clip_model.named_parameters())
    dst = dict(consumer.named_parameters())
    for clip_name, dst_name in mapping.items():
        a, b = src[clip_name].detach(), dst[dst_name].detach()
        if tensor_sha256(a.to(b.dtype)) != tensor_sha256(b):
            raise TowerMismatchError(
                f"{what} tensor {dst_name} differs from the CLIP tensor {clip_name} (sha256 "
                f"{tensor_sha256(b)[:12]}… vs {tensor_sha256(a.to(b.dtype))[:12]}…): this {what} was not built from "
                f"this CLIP model, so an edit of the CLIP model cannot be carried over. Use the CLIP checkpoint the "
                f"{what} was made from.")
    return mapping


def layer_names(names, kind: str, n_layers: int) -> list[str]:
    """The names among ``names`` that live in encoder layers ``0 .. n_layers-1`` of CLIP's ``kind`` tower."""
    prefix = CLIP_TOWER_PREFIX[kind] + "encoder.layers."
    out = []
    for n in names:
        if n.startswith(prefix):
            i = int(n[len(prefix):].split(".", 1)[0])
            if i < n_layers:
                out.append(n)
    return out


def consumer_view(consumer: nn.Module, patch: Patch, kind: str, what: str,
                  extra: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """CLIP name → the consumer's live tensor, for every tensor of ``patch`` (refusing tensors it does not hold).

    ``extra``: CLIP names outside the tower that the consumer also holds → their names in the consumer (SDXL's
    ``text_encoder_2`` keeps ``text_projection.weight``)."""
    clip_prefix = CLIP_TOWER_PREFIX[kind]
    dst_prefix, dst = find_tower(consumer, kind)
    params = dict(dst.named_parameters())
    outside = dict(consumer.named_parameters()) if extra else {}
    view = {}
    for name in patch.names:
        if extra and name in extra:
            view[name] = outside[extra[name]]
            continue
        if not name.startswith(clip_prefix) and patch.meta.get("adapter") == "open_clip":  # not "not in the tower"
            raise PatchMismatchError(
                f"the patch is of an open_clip model (it edits {name}, open_clip's name); the {what} is a transformers "
                "CLIP, whose tensors are named otherwise. Unlearn on the transformers CLIP it holds (`slug demo "
                "--target sd|vlm`, or `slug unlearn --family hf_clip --consumer sd:DIR|llava:DIR`)")
        if not name.startswith(clip_prefix):
            raise PatchMismatchError(
                f"the patch edits {name}, which is not part of CLIP's {kind} tower ({clip_prefix}*) and does not exist "
                f"in the {what}: it would have no effect there. Restrict the candidates to what the {what} consumes "
                f"(slugkit.integrations) and unlearn again.")
        rel = name[len(clip_prefix):]
        if rel not in params:
            raise PatchMismatchError(
                f"the patch edits {name}, but the {what} has no {dst_prefix}{rel} (it has "
                f"{len(dst.encoder.layers)} encoder layers): the edit would have no effect on it. Restrict the "
                f"candidates to the consumed layers and unlearn again.")
        view[name] = params[rel]
    return view


def checkpoint_tower_view(state: Mapping[str, torch.Tensor], names) -> tuple[dict[str, torch.Tensor], str | None]:
    """``state`` (a ``--checkpoint`` state dict) seen under the CLIPModel names a patch uses, when it is a lone tower
    saved without its prefix: transformers 5 saves a ``CLIPTextModel`` (SD's ``text_encoder/model.safetensors``) as
    ``encoder.layers.3…``, where the patch says ``text_model.encoder.layers.3…`` (``apply --checkpoint`` on it had
    failed on "no tensor named"). Returns ``(view, prefix)``: the view's tensors are ``state``'s own (an in-place
    apply edits ``state``), and ``prefix`` is the tower prefix added, or None when ``state`` is returned as it is
    (the names are there, or some are missing under either spelling: the patch check then names them)."""
    names = list(names)
    if all(n in state for n in names):
        return dict(state), None
    lone = [k for k, marker in _LONE.items() if marker in state]  # which tower the file is, by its embeddings
    for kind, prefix in CLIP_TOWER_PREFIX.items():
        if names and all(n.startswith(prefix) for n in names) and lone and kind not in lone:
            raise PatchMismatchError(  # the layer names fit either tower: a vision patch was mapped onto text layers
                f"the checkpoint is a lone CLIP {lone[0]} tower; the patch edits the {kind} tower ({names[0]}): give "
                f"the checkpoint of the {kind} tower, or the whole CLIP")
        if names and all(n.startswith(prefix) and n.removeprefix(prefix) in state for n in names):
            return {**{prefix + k: v for k, v in state.items()}, **state}, prefix
    return dict(state), None


def check_weight_files(folder: str | Path, what: str, recursive: bool = False) -> None:
    """Check every ``*.safetensors`` in ``folder`` (``recursive``: in its subfolders too) before a library loads it:
    a Git LFS pointer, a pickle, an empty or truncated file raises
    :class:`~slugkit.common.weights.WeightsFileError` (a ``ValueError``) naming the file and what to do, instead of a
    loader's traceback. ``what`` names the files in messages."""
    folder = Path(folder)
    for f in sorted(folder.rglob("*.safetensors") if recursive else folder.glob("*.safetensors")):
        check_weights_file(f, what)


def apply_to_consumer(consumer: nn.Module, patch: Patch, kind: str, what: str, *, revert: bool = False,
                      check: bool = True, extra: Mapping[str, str] | None = None) -> None:
    """Apply (or revert) a CLIPModel patch in place on ``consumer``'s tower tensors (hash-checked, bit-exact).

    The patch is cast to the consumer's dtype (:func:`slugkit.patch.cast_patch`: an fp16 encoder is checked against
    the cast originals). On apply, the architecture facts the patch records are checked against the consumer's
    config (:func:`slugkit.patch.check_architecture`, e.g. ``hidden_act``: :class:`PatchMismatchError` naming both).
    ``check=False`` (apply only) skips both comparisons, as :func:`slugkit.patch.apply_patch` does, for deliberately
    patching a fine-tuned relative; a later revert then restores the patch's (CLIP's) originals.
    ``extra``: as in :func:`consumer_view`.
    """
    patch = as_patch(patch)
    view = consumer_view(consumer, patch, kind, what, extra)
    p = cast_patch(patch, {n: t.dtype for n, t in view.items()})
    if revert:
        revert_patch(view, p)
    else:
        if check:
            check_architecture(consumer, patch, what)
        apply_patch(view, p, check=check)


def write_provenance(folder: Path, patch: Patch, reverted: bool, source: Path | None, **extra) -> None:
    """``slugkit_patch.json`` next to a written model: which patch, on what, applied or reverted, and (``earlier``)
    the records of the folder it was written from, oldest first — a folder patched twice named only the second
    patch. Written as a new file (by rename): a hard link to the source folder's record (``--full-pipeline`` links
    what it copies) was written through, and an apply or revert rewrote the records of the folders before it
    (fifteenth trial)."""
    import json

    from ..common.files import atomic_write_bytes

    earlier = []
    try:
        prev = json.loads((Path(source) / "slugkit_patch.json").read_text(encoding="utf-8")) if source else None
    except (OSError, ValueError):
        prev = None
    if isinstance(prev, dict):
        earlier = [*(prev.pop("earlier", None) or []), prev]
    info = {"patch_fingerprint": patch.fingerprint, "concept": patch.concept, "base_model": patch.base_model,
            "method": patch.meta.get("method"),
            "tensors": patch.names, "reverted": reverted, "source": os.path.abspath(source) if source else None,
            **extra,
            **({"earlier": earlier} if earlier else {})}
    text = json.dumps(info, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(Path(folder) / "slugkit_patch.json", text.encode())


def patched_folder_hint(folder: str | Path) -> str:
    """For a mismatch refusal: ``" — DIR holds slugkit_patch.json: `slug apply` wrote it … "`` when the folder is one
    ``slug apply`` wrote (its encoder differs from the CLIP because a patch is in it: the refusal said "not built from
    this CLIP", trial 48); ``""`` otherwise."""
    import json

    rec = Path(folder) / "slugkit_patch.json"
    try:
        info = json.loads(rec.read_text(encoding="utf-8")) if rec.is_file() else None
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return ""
    how = "reverted" if info.get("reverted") else "patched"
    src = f" from {info['source']}" if info.get("source") else ""
    return (f" — {folder} holds slugkit_patch.json: `slug apply` wrote it {how} ({info.get('concept')!r} patch){src}; "
            "give the folder it was written from" if how == "patched" else "")


def check_pipeline_folder(folder: str | Path) -> None:
    """Raise :class:`~slugkit.common.errors.ModelLoadError` naming ``folder`` when it is not a diffusers pipeline
    folder (missing, a file, or no ``model_index.json``), with how to get one."""
    from ..common.errors import ModelLoadError

    p = Path(folder)
    what = ("no such folder" if not p.exists() else "is a file, not a folder" if not p.is_dir()
            else "not a diffusers pipeline folder (no model_index.json)")
    if not (p / "model_index.json").is_file():
        raise ModelLoadError(f"{folder}: {what}; pass a folder written by pipe.save_pretrained(DIR) or downloaded with "
                             "`hf download ID --local-dir DIR`, or 'embedded' (the CLI's name of the "
                             "shipped model)")


def same_tower(adapter, cfg, tower: str, what: str) -> None:
    """Refuse a consumer whose tower is not ``adapter``'s: another width, or more layers than the CLIP has (a
    consumer may read fewer: SD 2.x's 23 of CLIP-H's 24). ``adapter`` None: not checked."""
    mine = getattr(getattr(getattr(adapter, "model", None), "config", None), f"{tower}_config", None)
    if mine is None:
        return
    if cfg.hidden_size != mine.hidden_size or cfg.num_hidden_layers > mine.num_hidden_layers:
        raise ValueError(f"--consumer: {what} ({cfg.num_hidden_layers} layers, width {cfg.hidden_size}) is not this "
                         f"CLIP's {tower} tower ({mine.num_hidden_layers} layers, width {mine.hidden_size}); give the "
                         "downstream model built on this CLIP")
