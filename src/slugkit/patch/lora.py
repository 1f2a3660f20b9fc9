"""A text-encoder patch as a LoRA file that diffusers' ``pipe.load_lora_weights(path)`` loads (``slug export --lora``).

A patch stores the original and the new values of every edited tensor (:mod:`slugkit.patch`), so the edit of each
Linear weight is ``ΔW = W_patched − W_base`` (``[out, in]``), taken from the patch in float64. It is factored by SVD
(``torch.linalg.svd`` in float64, ``ΔW = U·diag(S)·Vᵀ``; each singular pair's sign is fixed so that the largest
``|U|`` entry is positive, and the arithmetic runs on one thread, so the file depends neither on the SVD's sign choice
nor on the thread count) and split evenly:

    ``lora_B = U_r·diag(√S_r)`` ``[out, r]``,   ``lora_A = diag(√S_r)·V_rᵀ`` ``[r, in]``   (stored as float32)

**Rank and error.** The relative error of a module is ``‖ΔW − lora_B·lora_A‖_F / ‖ΔW‖_F`` of the *stored* (float32)
factors, computed in float64. By default the rank is the smallest ``r`` whose error is ≤ ``max_error``
(:data:`DEFAULT_MAX_ERROR` = 1e-3; Eckart–Young gives the starting ``r``, the stored factors are then measured);
``rank=N`` forces ``min(N, full rank)`` and records whatever error that gives. At full rank the LoRA is exact up to
float32 rounding (≈1e-7). Both the rank and the error of every module are recorded in the file and printed.

**Key layout** (diffusers / peft; ComfyUI's loader maps ``text_encoder.text_model.encoder.layers.N.*`` too, by its
source, not run here): ``<prefix>.<module>.lora_{A,B}.weight``, where ``prefix`` is the pipeline's encoder
(``text_encoder``; SDXL's second: ``text_encoder_2``) and ``module`` the Linear's path in a transformers 4.x
``CLIPTextModel``, the CLIPModel tensor name without ``.weight`` (``text_model.encoder.layers.3.mlp.fc1``;
``text_projection``); diffusers strips ``text_model.`` for transformers 5's flattened encoder.

**Scale 1.** peft scales a LoRA by ``lora_alpha / r``. The file holds no ``.alpha`` tensors (diffusers refuses
non-``lora`` keys; ComfyUI's and kohya sd-scripts' code take a missing alpha as scale 1), and its
``lora_adapter_metadata`` entry (read by diffusers into ``LoraConfig``) sets ``lora_alpha = r`` for every module
(``rank_pattern`` = ``alpha_pattern``): the loaded weight is ``W_base + lora_B·lora_A`` exactly in scale.

**What cannot be exported** (:class:`LoraExportError`, one line naming the tensor and what to do): tensors of CLIP's
vision tower, tensors that are not a transformers CLIP text encoder's (an open_clip patch), biases, LayerNorm
weights, embeddings, what is not an ``nn.Linear`` weight of the text encoder: ``slug apply --pipeline`` carries them.

This module imports only torch and :mod:`slugkit.patch` / :mod:`slugkit.common`; :func:`lora_from_patch` checks that
the text encoder it is given holds the patch's original weights (``slug export`` also runs ``slug apply``'s check).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..common.errors import check_flag
from ..common.outputs import out_inside_model, out_inside_run
from .carriers import save_state_dict_file
from .format import Patch, PatchError, PatchFormatError, tensor_sha256
from .lora_seal import SEAL_KEY, lora_seal, one_thread as _one_thread
from .ops import _toolkit_version

__all__ = ["DEFAULT_MAX_ERROR", "LORA_FORMAT", "Lora", "LoraExportError", "LoraModule", "check_exportable",
           "export_lora", "factor_delta", "lora_from_patch", "read_lora", "save_lora"]

LORA_FORMAT = "slugkit-lora"
LORA_FORMAT_VERSION = 2  # 2: the file carries slugkit.seal (format 1 LoRAs read unsealed)
DEFAULT_MAX_ERROR = 1e-3
VERDICT_KEYS = ("verdict", "verdict_codes", "warning_codes", "clip_warning_codes")  # what a LoRA carries of them
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_TEXT = "text_model."
_PROJECTION = "text_projection"
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_APPLY_INSTEAD = "carry this patch with `slug apply --pipeline DIR --patch P --out DIR2` instead"


class LoraExportError(PatchError):
    """The patch edits a tensor a LoRA cannot express, or is not a patch of a CLIP text encoder; names the tensor."""


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One factored edit: ``lora_B @ lora_A ≈ ΔW`` of the Linear at ``module``.

    ``tensor``: the patch's tensor name (``text_model.encoder.layers.0.self_attn.q_proj.weight``); ``module``: the key
    stem (``text_model.encoder.layers.0.self_attn.q_proj``); ``lora_A`` ``[rank, in]`` and ``lora_B`` ``[out, rank]``,
    float32; ``full_rank`` = ``min(out, in)``; ``relative_error`` = ``‖ΔW − B·A‖_F / ‖ΔW‖_F`` (float64, unitless)."""

    tensor: str
    module: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    full_rank: int
    relative_error: float


@dataclass
class Lora:
    """The LoRA of a patch for one text encoder: ``prefix`` (``text_encoder`` / ``text_encoder_2``), its modules
    (sorted by key) and ``meta`` (the ``slugkit.*`` provenance fields, JSON values)."""

    prefix: str
    modules: list[LoraModule]
    meta: dict = field(default_factory=dict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<prefix>.<module>.lora_A.weight": [r, in], "<prefix>.<module>.lora_B.weight": [out, r]}``."""
        out = {}
        for m in self.modules:
            out[f"{self.prefix}.{m.module}.lora_A.weight"] = m.lora_A
            out[f"{self.prefix}.{m.module}.lora_B.weight"] = m.lora_B
        return out

    def adapter_config(self) -> dict:
        """The peft ``LoraConfig`` keyword arguments (unprefixed): every module's rank in ``rank_pattern`` and the
        same value in ``alpha_pattern``, so peft's scale ``lora_alpha / r`` is 1 for each. Target names drop
        ``text_model.`` so that peft's suffix match finds them in transformers 4.x and 5.x encoders alike."""
        ranks = {m.module.removeprefix(_TEXT): m.rank for m in self.modules}
        top = max(ranks.values())
        return {"r": top, "lora_alpha": top, "rank_pattern": dict(ranks), "alpha_pattern": dict(ranks),
                "target_modules": sorted(ranks), "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
                "lora_bias": False}

    def file_metadata(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` (string → string): ``format``, diffusers' ``lora_adapter_metadata``
        (:meth:`adapter_config`, keys prefixed as diffusers' ``save_lora_weights`` writes them) and ``slugkit.*``,
        each a JSON string: ``ranks``, ``relative_errors`` (per module key), ``tensors`` (module key → patch tensor),
        ``max_error`` (the bound, null with a forced rank), ``rank`` (the forced rank or null), ``patch_fingerprint``,
        ``concept``, ``base_model``, ``base_sha256`` / ``patched_sha256`` (per patch tensor), ``encoder``, ..."""
        adapter = {f"{self.prefix}.{k}": v for k, v in self.adapter_config().items()}
        meta = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True)}
        for key, attr in (("ranks", "rank"), ("relative_errors", "relative_error"), ("tensors", "tensor")):
            meta[f"slugkit.{key}"] = _js({f"{self.prefix}.{m.module}": getattr(m, attr) for m in self.modules})
        meta.update({f"slugkit.{k}": _js(v) for k, v in self.meta.items()})
        meta[SEAL_KEY] = _js(lora_seal(meta, self.state_dict()))
        return meta


def _js(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


# --------------------------------------------------------------------------------------------------- what exports
def _refusal(name: str, adapter: str) -> str | None:
    """Why the patch tensor ``name`` cannot be a LoRA module (one line with what to do), or None."""
    head = f"cannot export {name!r} as a LoRA"
    if name.startswith(("vision_model.", "visual_projection.")):
        return (f"{head}: it is a tensor of CLIP's vision tower, which Stable Diffusion never reads; a LoRA for SD "
                "carries text-encoder edits only (a vision patch goes to a CLIP model or LLaVA with `slug apply`)")
    if not (name.startswith(_TEXT) or name.startswith(_PROJECTION + ".")):
        return (f"{head}: it is not a tensor of a transformers CLIP text encoder (the patch's adapter is {adapter!r}), "
                "so this is not a text-encoder patch; export a patch made with --family hf_clip (`slug demo --target "
                "sd`, or `slug unlearn --family hf_clip --consumer sd:DIR`)")
    stem, _, leaf = name.rpartition(".")
    if leaf != "weight":
        what = "a bias" if leaf == "bias" else f"a {leaf!r} tensor"
        return (f"{head}: it is {what}, and a LoRA (lora_A, lora_B) changes only a Linear layer's weight; "
                f"{_APPLY_INSTEAD}")
    last = stem.rpartition(".")[2]
    kind = ("a LayerNorm" if "layer_norm" in last or "layernorm" in last else
            "an embedding table" if "embedding" in last else None)
    if kind:
        return (f"{head}: it belongs to {kind} ({stem}), not a Linear layer, and a LoRA expresses only the weight "
                f"change of a Linear; {_APPLY_INSTEAD}")
    layer = stem.startswith(_TEXT + "encoder.layers.") and stem.endswith(_LINEARS)
    if not (layer or stem == _PROJECTION):
        return f"{head}: {stem} is not a Linear layer of the CLIP text encoder; {_APPLY_INSTEAD}"
    return None


def check_exportable(patch: Patch) -> None:
    """Refuse, from the tensor names alone (before any model is loaded), a patch with a tensor no LoRA of a CLIP text
    encoder can carry. Raises :class:`LoraExportError` naming the first such tensor (sorted) and what to do."""
    adapter = str(patch.meta.get("adapter", ""))
    for name in patch.names:
        msg = _refusal(name, adapter)
        if msg:
            raise LoraExportError(msg)


def _linear(encoder: nn.Module, name: str, stem: str) -> nn.Linear:
    """The ``nn.Linear`` at ``stem`` in ``encoder`` (also without ``text_model.``: transformers 5 flattens it)."""
    for path in dict.fromkeys((stem, stem.removeprefix(_TEXT))):
        try:
            mod = encoder.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(getattr(mod, "base_layer", None), nn.Linear):
            raise LoraExportError(f"cannot export {name!r} as a LoRA: {path} in the text encoder already carries a "
                                  "(peft) LoRA adapter; export from a text encoder without adapters loaded")
        if not isinstance(mod, nn.Linear):
            raise LoraExportError(f"cannot export {name!r} as a LoRA: {path} is a {type(mod).__name__} in the text "
                                  f"encoder, not a Linear; {_APPLY_INSTEAD}")
        return mod
    raise LoraExportError(f"cannot export {name!r} as a LoRA: the text encoder ({type(encoder).__name__}) has no "
                          f"Linear {stem}, so the pipeline never reads this tensor; restrict the candidates to what "
                          "the pipeline reads (--consumer sd:DIR) and unlearn again")


# --------------------------------------------------------------------------------------------------- factoring
def factor_delta(delta: torch.Tensor, *, max_error: float = DEFAULT_MAX_ERROR, rank: int | None = None,
                 name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factor ``delta`` ``[out, in]`` as ``B @ A`` (module docstring): returns ``(B [out, r], A [r, in], error)``,
    float32 factors and their relative Frobenius error (float64 arithmetic, unitless).

    ``rank=None``: the smallest ``r`` whose stored factors have error ≤ ``max_error``; ``rank=N``: ``min(N, full
    rank)``. Raises :class:`LoraExportError` (naming ``name``) for a tensor that is not 2-D, zero or not finite, and
    when even full rank misses ``max_error`` (a bound below float32 rounding)."""
    d = delta.detach().to("cpu", torch.float64)
    if d.ndim != 2:
        raise LoraExportError(f"cannot export {name!r} as a LoRA: its edit has shape {tuple(d.shape)}, a LoRA needs a "
                              f"2-D Linear weight; {_APPLY_INSTEAD}")
    norm = torch.linalg.matrix_norm(d)
    if not bool(torch.isfinite(d).all()) or float(norm) == 0.0:
        raise LoraExportError(f"cannot export {name!r} as a LoRA: its edit ΔW is zero or not finite")
    with _one_thread():
        return _factor(d, norm, max_error, rank, name)


def _factor(d: torch.Tensor, norm: torch.Tensor, max_error: float, rank: int | None, name: str):
    """:func:`factor_delta` on a checked float64 ``d`` with Frobenius norm ``norm``."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    cols = torch.arange(u.shape[1])
    sign = torch.sign(u[u.abs().argmax(dim=0), cols])
    sign[sign == 0] = 1.0
    u, vh = u * sign, vh * sign[:, None]
    full = s.numel()

    def build(r: int):
        root = s[:r].sqrt()
        b = (u[:, :r] * root).to(torch.float32).contiguous()
        a = (root[:, None] * vh[:r]).to(torch.float32).contiguous()
        err = float(torch.linalg.matrix_norm(d - b.double() @ a.double()) / norm)
        return b, a, err

    if rank is not None:
        return build(max(1, min(int(rank), full)))
    tail = (s.square().flip(0).cumsum(0).flip(0) / norm.square()).sqrt()  # tail[r]: error of rank r (r < full)
    r = next((k for k in range(1, full) if float(tail[k]) <= max_error), full)
    while True:
        b, a, err = build(r)
        if err <= max_error:
            return b, a, err
        if r == full:
            raise LoraExportError(f"cannot export {name!r} within --max-error {max_error:g}: even full rank {full} "
                                  f"reconstructs ΔW to relative error {err:.3g} (float32 rounding); use a larger "
                                  "--max-error")
        r += 1


def lora_from_patch(patch: Patch, text_encoder: nn.Module | None = None, *, prefix: str = "text_encoder",
                    max_error: float | None = None, rank: int | None = None, extra: dict | None = None,
                    check: bool = True) -> Lora:
    """The :class:`Lora` of a text-encoder patch: one module per edited Linear weight, ``ΔW`` from the patch's own
    original and patched values (``patch.original`` / ``patch.patched``, ``[out, in]``). ``patch``: a
    :class:`~slugkit.patch.Patch` or its folder. ``text_encoder``: the consumer (a ``CLIPTextModel`` /
    ``CLIPTextModelWithProjection``); each tensor must be an ``nn.Linear`` weight of that shape in it, holding the
    patch's original values (``check=True``, the default: their sha256 after a cast to its dtype; a LoRA made on
    another or an already patched encoder does not reproduce the patch). None: nothing about the consumer is
    checked. ``prefix``: the pipeline attribute the encoder is (``text_encoder`` / ``text_encoder_2``; another
    prefix wrote a file diffusers loads as a no-op: trial 29). ``max_error`` (None: 1e-3) or ``rank``, not both
    (as ``slug export``): :func:`factor_delta`.
    ``extra``: more ``slugkit.*`` metadata (JSON values). Raises :class:`LoraExportError` (:func:`check_exportable`,
    a module not a Linear of that shape or holding other values, an unreachable bound); ``ValueError`` /
    ``TypeError`` naming a bad ``max_error``, ``rank``, ``prefix``, ``extra`` or a pipeline given as the encoder."""
    from .ops import as_patch

    if isinstance(rank, bool) or not (rank is None or isinstance(rank, int)):
        raise TypeError(f"rank must be an int >= 1 or None, got {type(rank).__name__} {rank!r}")
    if rank is not None and max_error is not None:  # rank=1, max_error=5: the bound was dropped without a word
        raise ValueError("give max_error or rank, not both: a forced rank records the error, it does not bound it")
    max_error = DEFAULT_MAX_ERROR if max_error is None and rank is None else max_error
    if rank is None and (isinstance(max_error, bool) or not isinstance(max_error, (int, float))):
        raise TypeError(f"max_error must be a number in (0, 1), got {type(max_error).__name__} {max_error!r}")
    if (rank is None and not 0.0 < max_error < 1.0) or (rank is not None and rank < 1):
        raise ValueError(f"max_error must be in (0, 1), got {max_error!r}" if rank is None else
                         f"rank must be >= 1, got {rank!r}")
    if prefix not in ("text_encoder", "text_encoder_2"):
        raise ValueError(f"prefix must be 'text_encoder' or 'text_encoder_2' (the pipeline attribute diffusers loads "
                         f"the LoRA into), got {prefix!r}")
    if text_encoder is not None and (hasattr(text_encoder, "text_encoder") or not isinstance(text_encoder, nn.Module)):
        raise TypeError(f"pass the pipeline's encoder (pipe.{prefix}), not a {type(text_encoder).__name__}")
    patch = as_patch(patch)
    check_exportable(patch)
    modules = []
    for name in patch.names:
        stem = name.removesuffix(".weight")
        new, old = patch.patched[name], patch.original[name]
        if text_encoder is not None:
            lin = _linear(text_encoder, name, stem)
            if tuple(lin.weight.shape) != tuple(new.shape):
                raise LoraExportError(f"cannot export {name!r}: the patch's tensor is {tuple(new.shape)}, the text "
                                      f"encoder's Linear {tuple(lin.weight.shape)}: not the model the patch was "
                                      "made on")
            w = lin.weight.detach()
            if check and tensor_sha256(w) != tensor_sha256(old.to(w.dtype)):
                held = "the patched values: it is patched already" if tensor_sha256(w) == tensor_sha256(
                    new.to(w.dtype)) else "other values than the patch's originals: not the model it was made on"
                raise LoraExportError(f"cannot export {name!r}: the text encoder holds {held} (check=False skips "
                                      "this check)")
        delta = new.to(torch.float64) - old.to(torch.float64)
        b, a, err = factor_delta(delta, max_error=max_error, rank=rank, name=name)
        modules.append(LoraModule(tensor=name, module=stem, lora_A=a, lora_B=b, rank=a.shape[0],
                                  full_rank=min(delta.shape), relative_error=err))
    tmeta = patch.meta["tensors"]
    meta = {"format": LORA_FORMAT, "format_version": LORA_FORMAT_VERSION, "created_by": f"slugkit {_toolkit_version()}",
            "encoder": prefix, "max_error": None if rank is not None else float(max_error),  # a forced rank: as used
            "rank": None if rank is None else min(rank, max(m.full_rank for m in modules)),
            "patch_fingerprint": patch.fingerprint,
            "concept": patch.concept, "base_model": patch.base_model,
            "method": patch.meta.get("method", "slug"),  # e.g. layer-finetune: a fallback's, not SLUG (v60)
            "base_sha256": {n: tmeta[n]["sha256_original"] for n in patch.names},
            "patched_sha256": {n: tmeta[n]["sha256_patched"] for n in patch.names},
            **_verdict_of(patch)}
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of JSON values, got {type(extra).__name__}")
    taken = {k.lower() for k in (*meta, *VERDICT_KEYS)}  # any case (trial 32)
    if clash := sorted(str(k) for k in extra or {} if not isinstance(k, str) or k.lower() in taken):  # trial 31
        raise ValueError(f"extra may not set {clash}: the LoRA records those from the patch")
    meta.update(extra or {})
    return Lora(prefix=prefix, modules=sorted(modules, key=lambda m: m.module), meta=meta)


def _verdict_of(patch) -> dict:
    """The verdict of the run that made ``patch`` (``patch.json → extra``: status, fail and warning codes), carried
    into the LoRA file: a fail patch's LoRA said nothing of it once handed on without the patch (twentieth trial)."""
    extra = patch.meta.get("extra") if isinstance(patch.meta.get("extra"), dict) else {}
    return {k: extra[k] for k in VERDICT_KEYS if k in extra}


# --------------------------------------------------------------------------------------------------- files
def save_lora(lora: Lora, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``lora`` as a ``.safetensors`` file (:meth:`Lora.state_dict`, :meth:`Lora.file_metadata`), atomically
    (temporary sibling, then rename) and deterministically (sorted keys and metadata: the same LoRA gives the same
    bytes). Raises ``FileExistsError`` for an existing ``path`` unless ``overwrite``, ``IsADirectoryError`` for a
    folder, :class:`~slugkit.patch.PatchFormatError` for a name not ending in ``.safetensors``."""
    path = _lora_target(path, overwrite)
    return save_state_dict_file(lora.state_dict(), path, metadata=lora.file_metadata())


def _lora_target(path, overwrite: bool) -> Path:
    """Where a LoRA may go (trials 30, 35): a new ``.safetensors`` file or a LoRA slug wrote, outside patch folders."""
    if not os.fspath(path).strip():
        raise ValueError("the LoRA path is empty; give the .safetensors file to write")
    check_flag("overwrite", overwrite)
    why = out_inside_model(path, {}, "path (--out)") or out_inside_run(path, "path (--out)")  # assets, runs (trial 31)
    if why:
        raise ValueError(why)
    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":  # the suffix was refused after the factorisation (trial 35)
        raise (IsADirectoryError if path.is_dir() else PatchFormatError)(f"path (--out) {path}: give the .safetensors "
                                                                         "file to write (a LoRA is safetensors)")
    if (path.parent / "patch.json").is_file():
        raise ValueError(f"{path} is inside the patch folder {path.parent}; write the LoRA outside it")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"path (--out) {path} already exists; pass --overwrite (overwrite=True) to replace "
                                  "it, or choose another path")  # a Python caller has no --out to choose
        try:
            read_lora(path)
        except (PatchError, ValueError, OSError):
            raise FileExistsError(f"{path} is not a LoRA slug wrote; overwrite replaces only those: choose another "
                                  "path, or remove that file yourself") from None
    return path


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a LoRA file written by :func:`save_lora`: tensors by key (CPU), metadata with every
    ``slugkit.*`` entry (prefix dropped) and ``lora_adapter_metadata`` parsed from JSON. Raises
    :class:`~slugkit.patch.PatchFormatError` naming the file when it is not a slugkit LoRA; never unpickles."""
    import safetensors

    from .carriers import load_state_dict_file

    path = Path(path)
    tensors = load_state_dict_file(path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    try:
        meta = {k.removeprefix("slugkit."): json.loads(v) for k, v in raw.items()
                if k.startswith("slugkit.") or k == ADAPTER_METADATA_KEY}
    except ValueError as e:
        raise PatchFormatError(f"{path}: metadata is not valid JSON ({e})") from e
    if meta.get("format") != LORA_FORMAT:
        raise PatchFormatError(f"{path}: not a slugkit LoRA (slugkit.format={meta.get('format')!r})")
    version = meta.get("format_version")
    if "seal" not in meta and not (isinstance(version, int) and version < 2):  # deleting it must not turn it off
        raise PatchFormatError(f"{path}: has no slugkit.seal, which its format_version {version!r} requires: it was "
                               "edited by hand; export it again from the patch (`slug export --lora`)")
    if "seal" in meta and meta["seal"] != lora_seal(raw, tensors):  # a LoRA of an earlier slugkit has none
        raise PatchFormatError(f"{path}: was edited after slug wrote it — its metadata (concept, verdict, ranks…) or "
                               "tensors no longer match the seal slug recorded; export it again from the patch "
                               "(`slug export --lora`)")
    return tensors, meta


def export_lora(patch: Patch, text_encoder: nn.Module | None, path: str | os.PathLike, *, prefix: str = "text_encoder",
                max_error: float | None = None, rank: int | None = None, overwrite: bool = False,
                extra: dict | None = None, check: bool = True) -> Lora:
    """:func:`lora_from_patch` (``check``: that the encoder holds the patch's originals) then :func:`save_lora` (its
    file checks run first); returns the :class:`Lora` written. Raises what those two raise."""
    path = _lora_target(path, overwrite)
    if text_encoder is None and check:  # "checks the encoder" held nothing (trial 30)
        raise TypeError("export_lora: text_encoder is None, so nothing can be checked; pass the pipeline's text "
                        "encoder, or check=False to export the patch unchecked")
    lora = lora_from_patch(patch, text_encoder, prefix=prefix, max_error=max_error, rank=rank, extra=extra,
                           check=check)
    save_lora(lora, path, overwrite=overwrite)
    return lora
