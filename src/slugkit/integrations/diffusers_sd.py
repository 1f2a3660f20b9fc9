"""Stable Diffusion 1.x / 2.x: carry a SLUG patch of a transformers ``CLIPModel`` into ``pipe.text_encoder``.

SD conditions its UNet on ``text_encoder(ids).last_hidden_state`` — every encoder layer of the ``CLIPTextModel`` plus
``final_layer_norm``, never the pooled output or ``text_projection`` (spec §6). Pairings: SD 1.x (e.g.
``runwayml/stable-diffusion-v1-5``): gradients on ``openai/clip-vit-large-patch14``, the pipeline reads all 12 text
layers; SD 2.x (e.g. ``stabilityai/stable-diffusion-2-1``): gradients on ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
the pipeline reads 23 of its 24 text layers (SD 2 conditions on the penultimate OpenCLIP layer, so diffusers ships
``text_encoder/config.json`` with ``num_hidden_layers = 23``).

An edit of CLIP-H's text layer 23 (or of ``text_projection``, or of any vision tensor) therefore cannot change SD 2.x
— the official notebook's candidate set allows it (spec §6.1 [BUG]). :func:`consumed_text_candidates` gives the
candidates that *do* reach the pipeline; restrict the adapter to them before the SLUG run
(``adapter.restrict_candidates(consumed_text_candidates(adapter, pipe.text_encoder))`` or
``slug unlearn --family hf_clip --consumer sd:PIPELINE_DIR``).

Where the official notebook copies every parameter of the edited CLIP text model into the pipeline with ``.half()``,
:func:`apply_patch_to_pipeline` writes only the patched tensors, in place, after checking the encoder holds the
patch's original values; :func:`revert_patch_from_pipeline` restores the exact bytes (fp16 encoders too). Each
function takes a :class:`~slugkit.patch.Patch` or its folder.

**SDXL** has two text encoders, and each function takes ``encoder="text_encoder" | "text_encoder_2"`` (apply, revert
and save pick the one that holds the patch's tensors when there is no doubt). SDXL reads them differently from SD
1.x/2.x (diffusers ``StableDiffusionXLPipeline.encode_prompt``, :func:`encoder_reads`): ``text_encoder``
(``openai/clip-vit-large-patch14``'s text tower) only at ``hidden_states[-2]`` — the last layer and
``final_layer_norm`` never reach the UNet; ``text_encoder_2`` (a ``CLIPTextModelWithProjection``,
``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k``'s text tower) at ``hidden_states[-2]`` for the cross-attention **and**
through the projected pooled output for the added time embedding — so every layer and ``text_projection`` are read.
A patch of a layer the pipeline never reads is refused by :func:`apply_patch_to_pipeline`: it would change nothing.

**CLIP skip.** ``clip_skip`` follows diffusers exactly (``StableDiffusionPipeline.encode_prompt(clip_skip=k)``):
``None`` or 0 reads the last hidden state; ``k`` reads ``hidden_states[-(k + 1)]`` (SD 1.x/2.x, then
``final_layer_norm``) or ``hidden_states[-(k + 2)]`` (SDXL), so the last ``k`` layers are not read. diffusers' 1 is
what A1111 / ComfyUI call "CLIP skip 2". Pass the value the pipeline is run with to :func:`consumed_layer_count`,
``--consumer sd:DIR`` (:func:`slugkit.integrations.consumer_restriction`), :func:`apply_patch_to_pipeline` and
:func:`save_patched_text_encoder` (``slug apply --pipeline DIR --clip-skip N``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from ..common.files import atomic_dir, check_replaceable
from ..patch import Patch, PatchMismatchError, model_of, tensor_sha256
from .sd_reads import PROJECTION, READS, consumed_extra, consumed_layer_count, encoder_reads, is_sdxl  # noqa: F401
from .towers import (CLIP_TOWER_PREFIX, TowerMismatchError, apply_to_consumer, check_out_outside,
                     check_pipeline_folder, check_weight_files, consumer_view, layer_names, num_layers,
                     same_tower, takes_patch_path, tower_map, verify_tower, write_provenance)

WHAT = "text encoder"
ENCODERS = ("text_encoder", "text_encoder_2")


def _encoder(pipe_or_encoder, encoder: str = "text_encoder") -> nn.Module:
    """The pipeline's ``encoder`` attribute, or the object itself when it is the encoder (a module without one)."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, not {encoder!r}")
    te = getattr(pipe_or_encoder, encoder, None)
    if isinstance(te, nn.Module):
        return te
    if isinstance(pipe_or_encoder, nn.Module):
        return pipe_or_encoder
    raise TypeError(f"expected a pipeline with a .{encoder} or a CLIPTextModel, got {type(pipe_or_encoder)}")


def _extra_map(te: nn.Module) -> dict[str, str]:
    """``text_projection`` of a ``CLIPTextModelWithProjection`` (same name in ``CLIPModel``)."""
    return {PROJECTION: PROJECTION} if PROJECTION in dict(te.named_parameters()) else {}


def text_encoder_map(clip_model: nn.Module, text_encoder, encoder: str = "text_encoder") -> dict[str, str]:
    """CLIPModel name → ``text_encoder`` name for every text-encoder parameter, e.g. (transformers 5)
    ``text_model.encoder.layers.3.self_attn.q_proj.weight`` → ``encoder.layers.3.self_attn.q_proj.weight``
    (``text_projection.weight`` too for a ``CLIPTextModelWithProjection``). ``text_encoder``: the encoder or a
    pipeline (then ``encoder`` names which of its encoders)."""
    te, clip_model = _encoder(text_encoder, encoder), model_of(clip_model)  # an adapter: its model (trial 29)
    out = tower_map(clip_model, te, "text")
    extra = _extra_map(te)
    if extra:
        src, dst = dict(clip_model.named_parameters()), dict(te.named_parameters())
        if PROJECTION not in src or tuple(src[PROJECTION].shape) != tuple(dst[PROJECTION].shape):
            raise TowerMismatchError(f"the {WHAT}'s {PROJECTION} {tuple(dst[PROJECTION].shape)} has no counterpart of "
                                     "that shape in the CLIP model: not the same model")
        out.update(extra)
    return out


def verify_text_encoder(clip_model: nn.Module, text_encoder, encoder: str = "text_encoder") -> dict[str, str]:
    """Refuse (:class:`~slugkit.integrations.TowerMismatchError`, naming the first differing tensor) unless every
    ``text_encoder`` tensor equals the corresponding CLIP text tensor (SHA-256, after casting to the encoder's dtype).
    An encoder with fewer layers (SD 2.x) is checked on the layers it has; SDXL's ``text_encoder_2`` also on
    ``text_projection``. Returns :func:`text_encoder_map`."""
    te, clip_model = _encoder(text_encoder, encoder), model_of(clip_model)
    mapping = text_encoder_map(clip_model, te)
    verify_tower(clip_model, te, "text", WHAT)
    if PROJECTION in mapping:
        a = dict(clip_model.named_parameters())[PROJECTION].detach()
        b = dict(te.named_parameters())[PROJECTION].detach()
        if tensor_sha256(a.to(b.dtype)) != tensor_sha256(b):
            raise TowerMismatchError(f"{WHAT} tensor {PROJECTION} differs from the CLIP model's: this {WHAT} was not "
                                     "built from this CLIP model. Use the CLIP checkpoint it was made from.")
    return mapping


def consumed_text_layers(text_encoder, clip_skip: int | None = None, encoder: str = "text_encoder") -> int:
    """Encoder layers whose output reaches the UNet (:func:`consumed_layer_count` for how the pipeline reads this
    encoder; a bare encoder is read as SD 1.x/2.x read theirs)."""
    n = num_layers(_encoder(text_encoder, encoder), "text")
    return consumed_layer_count(n, encoder_reads(is_sdxl(text_encoder), encoder), clip_skip)


def consumed_text_candidates(adapter, text_encoder, clip_skip: int | None = None,
                             encoder: str = "text_encoder") -> list[str]:
    """The adapter's HF candidates that the pipeline consumes: ``text_model.encoder.layers.{i}.*`` for
    ``i < consumed_text_layers``, plus ``text_projection`` for SDXL's ``text_encoder_2``. Every vision tensor and
    (by the HF filter) norms, biases and embeddings are out."""
    names = adapter.all_candidate_names() if hasattr(adapter, "all_candidate_names") else adapter.candidate_names()
    extra = consumed_extra(encoder_reads(is_sdxl(text_encoder), encoder))
    return (layer_names(names, "text", consumed_text_layers(text_encoder, clip_skip, encoder))
            + [n for n in names if n in extra])


def _holds(te: nn.Module, patch: Patch) -> bool:
    try:
        view = consumer_view(te, patch, "text", WHAT, _extra_map(te))
    except PatchMismatchError:
        return False
    return all(tuple(view[n].shape) == tuple(patch.patched[n].shape) for n in patch.names)


def pick_encoder(pipe, patch: Patch, encoder: str | None = None) -> str:
    """``encoder`` if given (``ValueError`` when the pipeline lacks it); else the pipeline's only text encoder, or
    (SDXL) the one whose tensors have the patch's names and shapes — refused when neither or both do."""
    present = [e for e in ENCODERS if isinstance(getattr(pipe, e, None), nn.Module)]
    if encoder is not None and present and encoder not in present:  # a TypeError had ended `export` (17th trial)
        raise ValueError(f"--text-encoder {encoder}: this pipeline has no {encoder} (it has {', '.join(present)}); "
                         "leave --text-encoder out, or name one it has")
    if encoder is not None:
        return encoder
    if len(present) <= 1:
        return present[0] if present else "text_encoder"
    fits = [e for e in present if _holds(getattr(pipe, e), patch)]
    if len(fits) == 1:
        return fits[0]
    raise PatchMismatchError(
        f"{'none' if not fits else 'each'} of the pipeline's text encoders ({', '.join(present)}) holds the patch's "
        f"tensors ({patch.names[0]}, ...) with their shapes; "
        + ("the patch was made on another CLIP model" if not fits else "name the encoder (encoder= / --text-encoder)"))


def _check_consumed(sdxl: bool, encoder: str, te: nn.Module, patch: Patch, clip_skip: int | None = None) -> None:
    """Refuse a patch of a layer (or projection) the pipeline never reads from ``te`` (SDXL ``text_encoder``'s last
    layer; the last ``clip_skip`` layers): applying it would change nothing."""
    reads = encoder_reads(sdxl, encoder)
    n = consumed_layer_count(num_layers(te, "text"), reads, clip_skip)
    layer_prefix = CLIP_TOWER_PREFIX["text"] + "encoder.layers."
    read = set(layer_names(patch.names, "text", n)) | set(consumed_extra(reads))
    unread = [x for x in patch.names if (x.startswith(layer_prefix) or x == PROJECTION) and x not in read]
    if unread:
        raise PatchMismatchError(
            f"the patch edits {unread[0]}, which the pipeline never reads from its {encoder} (read as {reads}"
            f"{f', clip_skip={clip_skip}' if clip_skip else ''}: layers 0..{n - 1}"
            f"{' and ' + PROJECTION if consumed_extra(reads) else ''}): the edit would have no effect. "
            "Restrict the candidates to what the pipeline reads (--consumer sd:DIR, with the same clip skip) and "
            "unlearn again.")


@takes_patch_path
def apply_patch_to_pipeline(pipe, patch: Patch, *, check: bool = True, encoder: str | None = None,
                            clip_skip: int | None = None):
    """Write the patch into the pipeline's text encoder in place (no copy); refused (:class:`PatchMismatchError`),
    untouched, unless the encoder holds the patch's original values and architecture (``check=False`` skips those
    comparisons) and the pipeline, run with ``clip_skip`` (diffusers' meaning; module docstring), reads every
    patched tensor. ``encoder``: which of SDXL's encoders (default: :func:`pick_encoder`). Accepts a pipeline or the
    ``CLIPTextModel`` itself; returns it."""
    encoder = pick_encoder(pipe, patch, encoder)
    te = _encoder(pipe, encoder)
    _check_consumed(is_sdxl(pipe), encoder, te, patch, clip_skip)
    apply_to_consumer(te, patch, "text", WHAT, check=check, extra=_extra_map(te))
    return pipe


@takes_patch_path
def revert_patch_from_pipeline(pipe, patch: Patch, *, encoder: str | None = None):
    """Restore the original bytes of the patched text-encoder tensors (refused unless they hold the patch)."""
    te = _encoder(pipe, pick_encoder(pipe, patch, encoder))
    apply_to_consumer(te, patch, "text", WHAT, revert=True, extra=_extra_map(te))
    return pipe


def pipeline_consumption(where: str, adapter, kw: dict, clip_skip: int | None = None) -> tuple[int, set, str]:
    """For ``--consumer sd:WHERE`` (configs only): (consumed text layers, consumed tensors outside the text
    transformer, description) when the pipeline is run with ``clip_skip`` (diffusers' meaning, module docstring).
    An SDXL folder / id (with ``text_encoder_2/``) is matched to ``adapter`` by text width. Raises ``ValueError``
    for an SDXL pipeline without ``adapter`` or that fits it ambiguously, or a ``clip_skip`` that leaves no layer."""
    from transformers import CLIPTextConfig

    cfg1, cfg2 = CLIPTextConfig.from_pretrained(where, subfolder="text_encoder", **kw), None
    if not Path(where).is_dir() or (Path(where) / "text_encoder_2" / "config.json").is_file():
        try:
            cfg2 = CLIPTextConfig.from_pretrained(where, subfolder="text_encoder_2", **kw)
        except OSError:
            if Path(where).is_dir():
                raise
    skip = f", clip_skip={clip_skip}" if clip_skip else ""
    if cfg2 is None:
        same_tower(adapter, cfg1, "text", f"the text encoder of {where}")
        _same_weights(where, adapter, "text_encoder")
        n = consumed_layer_count(cfg1.num_hidden_layers, "last", clip_skip)
        return n, set(), (f"Stable Diffusion text encoder {where} ({cfg1.num_hidden_layers} layers{skip}"
                          + (f": layers 0..{n - 1})" if skip else ")"))
    if adapter is None:
        raise ValueError(f"{where} is an SDXL pipeline (two text encoders): the CLIP model is needed to tell which "
                         "one it is")
    width = adapter.model.config.text_config.hidden_size
    fits = [(e, c) for e, c in (("text_encoder", cfg1), ("text_encoder_2", cfg2)) if c.hidden_size == width]
    if len(fits) != 1:
        raise ValueError(f"--consumer sd:{where}: the SDXL text encoders are {cfg1.hidden_size} and "
                         f"{cfg2.hidden_size} wide, this CLIP model's text tower {width}: it is "
                         f"{'neither' if not fits else 'ambiguous'} (SDXL pairs openai/clip-vit-large-patch14 with "
                         "text_encoder and laion/CLIP-ViT-bigG-14-laion2B-39B-b160k with text_encoder_2)")
    enc, cfg = fits[0]
    _same_weights(where, adapter, enc)
    reads = encoder_reads(True, enc)
    n = consumed_layer_count(cfg.num_hidden_layers, reads, clip_skip)
    return n, set(consumed_extra(reads)), (f"SDXL {enc} of {where} ({cfg.num_hidden_layers} layers, read as "
                                           f"{reads}{skip})")


def _same_weights(where: str, adapter, encoder: str) -> None:
    """A local pipeline folder's ``encoder`` must hold this CLIP's text tower, tensor for tensor
    (:func:`verify_text_encoder`): configs alone let a run be judged on one CLIP and its patch applied to a pipeline
    whose encoder differs elsewhere (a fine-tuned layer 1; only the edited tensors are hash-checked at apply, trial
    43). Loads that encoder's weights (SD 1.5: ~0.5 GB); a hub id is not fetched for it, nor is a folder holding the
    encoder's config without weights read further (the restriction is the config's; applying needs the weights and
    hash-checks the edited tensors there). Raises :class:`~slugkit.integrations.TowerMismatchError` naming the first
    differing tensor."""
    src = Path(where)
    if adapter is None or not src.is_dir() or not any(
            f.suffix in (".safetensors", ".bin") for f in (src / encoder).glob("*")):
        return
    check_weight_files(src / encoder, "pipeline weights file", False)
    try:
        verify_text_encoder(adapter.model, _folder_text_encoder(src, encoder))
    except TowerMismatchError as e:
        from .towers import patched_folder_hint

        raise TowerMismatchError(f"--consumer sd:{where} ({encoder}): {e}{patched_folder_hint(src)}") from None


def _folder_text_encoder(src: Path, encoder: str):
    """The ``encoder`` sub-folder of a pipeline folder as transformers loads it, in its stored dtype
    (``CLIPTextModelWithProjection`` when its config says so: SDXL's ``text_encoder_2``)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    archs = json.loads((src / encoder / "config.json").read_text()).get("architectures") or []
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in archs else CLIPTextModel
    return cls.from_pretrained(src, subfolder=encoder, dtype="auto")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _folder_encoder(src_dir: Path, patch: Patch, encoder: str | None) -> str:
    """The encoder subfolder of a pipeline folder to patch: ``encoder``, the only one, or (SDXL) the one whose config
    fits the patch's shapes (text width in every tensor's shape, layer indices below its layer count)."""
    if not src_dir.is_dir():  # "no such folder; pass a folder written by …", as `slug export` says (eleventh trial)
        check_pipeline_folder(src_dir)
    present = [e for e in ENCODERS if (src_dir / e / "config.json").is_file()]
    if encoder is not None:
        if encoder not in present:
            raise FileNotFoundError(f"{src_dir} has no {encoder}/ (it has {', '.join(present) or 'none'})")
        return encoder
    if not present:
        raise FileNotFoundError(f"{src_dir} is not a diffusers pipeline folder (no text_encoder/ in it)")
    if len(present) == 1:
        return present[0]
    prefix = CLIP_TOWER_PREFIX["text"] + "encoder.layers."

    def fits(e):
        cfg = json.loads((src_dir / e / "config.json").read_text())
        width, n = cfg.get("hidden_size"), cfg.get("num_hidden_layers", 0)
        for name in patch.names:
            if width not in tuple(patch.patched[name].shape):
                return False
            if name.startswith(prefix) and int(name[len(prefix):].split(".", 1)[0]) >= n:
                return False
        return True

    ok = [e for e in present if fits(e)]
    if len(ok) != 1:
        raise PatchMismatchError(f"{'none' if not ok else 'each'} of {src_dir}'s text encoders ({', '.join(present)}) "
                                 f"fits the patch's tensor shapes; name it with --text-encoder")
    return ok[0]


@takes_patch_path
def save_patched_text_encoder(pipe_or_dir, patch: Patch, out_dir: str | os.PathLike, *, full_pipeline: bool = False,
                              revert: bool = False, overwrite: bool = False, encoder: str | None = None,
                              clip_skip: int | None = None) -> Path:
    """Write the patched ``text_encoder/`` (``config.json`` + ``model.safetensors``) in diffusers' folder layout
    (SDXL: ``text_encoder/`` or ``text_encoder_2/``, see :func:`pick_encoder`; ``encoder`` names it).

    ``pipe_or_dir`` is a pipeline object or a diffusers pipeline folder (only its ``text_encoder/`` is loaded, in its
    stored dtype). By default ``out_dir`` holds just ``text_encoder/`` and ``slugkit_patch.json`` (provenance); load
    it with ``CLIPTextModel.from_pretrained(out_dir, subfolder="text_encoder")`` and pass it to
    ``StableDiffusionPipeline.from_pretrained(base, text_encoder=...)``. With ``full_pipeline=True`` every other
    component is added too (hard links where possible, from a folder; ``save_pretrained`` from an object), so
    ``out_dir`` loads as a pipeline by itself. ``revert=True`` writes the reverted encoder instead.

    A pipeline object is patched in place for the write and reverted afterwards (bit-exact). The folder appears
    atomically (temporary sibling, then rename); an existing non-empty ``out_dir`` is refused unless ``overwrite``.
    Weights are saved by the installed transformers in its own key layout (5.x: no ``text_model.`` prefix; 5.x reads
    both layouts). ``clip_skip``: as in :func:`apply_patch_to_pipeline` (apply only; recorded in
    ``slugkit_patch.json``). From a folder, its ``*.safetensors`` (every component's with ``full_pipeline``) are
    checked first (:func:`~slugkit.integrations.check_weight_files`): a Git LFS pointer raises ``ValueError`` naming
    it. Refusals raise :class:`PatchMismatchError` and write nothing.
    """
    src_dir = None
    check_out_outside(Path(pipe_or_dir) if isinstance(pipe_or_dir, (str, os.PathLike)) and pipe_or_dir != "embedded"
                      else None, out_dir, "pipeline")  # the package, a run, the pipeline's own folder
    if os.path.isdir(out_dir):  # a non-empty out is refused before the text encoder loads (verification 61)
        check_replaceable(out_dir, overwrite, "slugkit_patch.json")
    if isinstance(pipe_or_dir, (str, os.PathLike)):
        if pipe_or_dir == "embedded":  # the CLI's name (trial 29); this layer cannot load that model
            raise ValueError("'embedded' names the shipped text-to-image model in the CLI; from Python pass its "
                             "pipeline object, slugkit.world.t2i.EmbeddedT2IPipeline.load()")
        src_dir = Path(pipe_or_dir)
        encoder = _folder_encoder(src_dir, patch, encoder)
        check_weight_files(src_dir if full_pipeline else src_dir / encoder, "pipeline weights file", full_pipeline)
        te, pipe = _folder_text_encoder(src_dir, encoder), None
    else:
        encoder = pick_encoder(pipe_or_dir, patch, encoder)
        pipe, te = pipe_or_dir, _encoder(pipe_or_dir, encoder)
    if full_pipeline and pipe is not None and pipe is not te and not hasattr(pipe, "save_pretrained"):
        raise ValueError(f"full_pipeline: a {type(pipe).__name__} is no diffusers pipeline (no save_pretrained); "
                         "leave full_pipeline out to write its text encoder")
    extra = _extra_map(te)
    if not revert:
        _check_consumed(is_sdxl(pipe) if src_dir is None else (src_dir / "text_encoder_2").is_dir(), encoder, te, patch,
                        clip_skip)

    changed = False
    try:
        with atomic_dir(out_dir, overwrite, marker="slugkit_patch.json") as tmp:
            apply_to_consumer(te, patch, "text", WHAT, revert=revert, extra=extra)
            changed = True
            if full_pipeline and pipe is not None and pipe is not te:
                pipe.save_pretrained(tmp)
            else:
                te.save_pretrained(tmp / encoder)
                if full_pipeline:
                    if src_dir is None:
                        raise ValueError("full_pipeline needs a pipeline object or a pipeline folder, not a bare "
                                         "encoder")
                    for entry in src_dir.iterdir():
                        if entry.name in (encoder, "slugkit_patch.json") or entry.name.startswith("."):
                            continue
                        if entry.is_dir():
                            shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                        else:
                            _link_or_copy(str(entry), str(tmp / entry.name))
            write_provenance(tmp, patch, revert, src_dir, encoder=encoder,
                             **({"clip_skip": clip_skip} if clip_skip is not None else {}))
    finally:
        if pipe is not None and changed:  # the caller's pipeline goes back to its exact bytes
            apply_to_consumer(te, patch, "text", WHAT, revert=not revert, extra=extra)
    return Path(out_dir)


def load_pipeline_folder(folder: str, device: str = "cpu"):
    """A local diffusers pipeline folder (``model_index.json`` inside), offline, without the safety checker, on
    ``device``. Raises :class:`~slugkit.common.errors.ModelLoadError` naming the folder when it is not one, and
    ``ValueError`` naming the file when a ``*.safetensors`` in it is a Git LFS pointer (or otherwise unreadable)."""
    p = Path(folder)
    check_pipeline_folder(p)
    check_weight_files(p, "pipeline weights file", recursive=True)
    from diffusers import DiffusionPipeline, utils

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":  # --no-progress; diffusers reads no variable of its own
        utils.logging.disable_progress_bar()
    pipe = DiffusionPipeline.from_pretrained(str(p), local_files_only=True, safety_checker=None,
                                             requires_safety_checker=False)
    return pipe.to(device)


__all__ = ["ENCODERS", "apply_patch_to_pipeline", "check_pipeline_folder", "load_pipeline_folder",
           "consumed_layer_count", "consumed_text_candidates", "consumed_text_layers", "encoder_reads", "is_sdxl",
           "pick_encoder", "pipeline_consumption", "revert_patch_from_pipeline", "save_patched_text_encoder",
           "text_encoder_map", "verify_text_encoder"]

