"""The adapter protocol: what the SLUG core needs to know about a model family.

An adapter wraps a loaded model and declares, as data:

* its **towers** (``vision`` / ``language``) and which parameter tensor belongs to which;
* its **candidate tensors** (the tensors SLUG may edit) and **groups** of tensors that move together;
* **encode** functions returning L2-normalised embeddings;
* the **forget loss** (per-sample cosine of each image with its own caption) and the **retain loss**
  (CLIP contrastive loss);
* a **staged forward** per tower (``stages(tower)``): the tower as a list of callables whose composition is the
  tower's encoder. The step-size search uses it to cache the activations entering the edited stage once and
  re-run only the stages the edit can change (spec §9.3);
* a **precision** (``fp32``, ``bf16``, ``fp16``) and the one context manager :meth:`Adapter.autocast` that applies it.

Precision (``--precision``, trust case E3) is **autocast, never a cast of the weights**. The weights stay float32 in
memory whatever the precision, so the patch, its sha256 hashes and the fingerprint of a gradient pass are those of
the float32 model: a patch made with ``--precision bf16`` applies to the same float32 checkpoint (open_clip's own
``precision="bf16"`` converts the weights to bf16, "pure" low precision, which is what made an fp32 input crash).
With ``bf16``/``fp16`` every *model forward* an adapter runs — ``encode_image``, ``encode_text``, and each
``stages()`` callable — runs inside ``self.autocast()`` = ``torch.autocast(device.type, dtype, cache_enabled=False)``:
matmuls and convolutions in the low dtype, reductions and norms as autocast decides. What the SLUG core sees stays
float32: ``encode_*`` return float32 embeddings (cast before the L2 normalisation), the last stage of each tower
returns float32, so the losses, the logits and the metrics are float32, and each parameter's ``.grad`` is float32
(autograd casts it back through the autocast weight cast), added to float32 sums by ``slug.gradients``. Callers
therefore need no wrapping of their own; a caller that runs ``adapter.model`` directly wraps it in
``adapter.autocast()``. The weight-cast cache is off because the step-size search edits weights in place between
evaluations: a cached bf16 copy would be stale under an autocast region that spans several evaluations. ``fp16`` is
for CUDA devices: on the CPU it is refused with "use bf16 on CPU" (:func:`check_precision` says why).

The SLUG core (``slugkit.slug``) only talks to this protocol, never to a library directly.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..common.errors import ModelLoadError  # noqa: F401  (re-exported: slugkit.models.ModelLoadError)

TOWERS = ("vision", "language")
# --precision -> the autocast dtype of the forwards (None: none); the weights are float32 in every case.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for ``fp32``).

    Raises ``ValueError`` naming the valid strings for anything else (``amp``, ``pure_bf16`` … of open_clip are not
    accepted: they would mean other things, or weights that are not float32)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)} (the weights stay float32; "
                         "bf16/fp16 run the forward passes under torch.autocast)")
    return PRECISIONS[precision]


@functools.lru_cache(maxsize=None)
def _autocast_problem(device_type: str, dtype: torch.dtype) -> str | None:
    """Why ``torch.autocast(device_type, dtype)`` does not run a matmul in ``dtype`` here (None when it does).

    A probe rather than a version table: torch versions that lack fp16 CPU autocast only warn and run in float32,
    and CUDA devices without bf16 raise; both cases are reported instead of silently computing something else."""
    try:
        x = torch.ones(4, 4, device=device_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                y = x @ x
    except Exception as e:  # e.g. "Current CUDA Device does not support bfloat16"
        return f"{type(e).__name__}: {e}"
    return None if y.dtype == dtype else f"autocast ran the matmul in {y.dtype}"


def check_precision(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """Validate ``precision`` for ``device``; return its autocast dtype (None for ``fp32``).

    Raises ``ValueError``: for an unknown string (listing the valid ones); for ``fp16`` on the CPU
    (``--precision fp16 needs a CUDA device; use bf16 on CPU``); and when this torch cannot run the autocast on the
    device (e.g. bf16 on a GPU without it). fp16 on the CPU is refused even where torch runs it (torch 2.14 does, for
    every op the adapters use): without fp16 matrix units it is far slower than fp32 (a ViT-B-32 gradient pass, batch
    16: 454 s against 9 s on our 2-core machine), while bf16 is faster than fp32 there."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return None
    dev = torch.device(device).type
    why = _autocast_problem(dev, dtype)
    if dev == "cpu" and dtype == torch.float16:
        detail = (f"torch {torch.__version__} cannot run fp16 autocast on the CPU: {why}" if why else
                  "torch runs fp16 autocast on the CPU, but far slower than fp32 on CPUs without fp16 matrix units: "
                  "a ViT-B-32 gradient pass took 50x as long")
        raise ValueError(f"--precision fp16 needs a CUDA device; use bf16 on CPU ({detail})")
    if why is not None:
        other = "fp32" if dev == "cpu" else ("fp16 or fp32" if dtype == torch.bfloat16 else "bf16 or fp32")
        raise ValueError(f"--precision {precision} is not supported on {dev} by torch {torch.__version__} ({why}); "
                         f"use {other}")
    return dtype


@dataclass
class Stage:
    """One step of a staged tower forward: ``fn(x, ctx) -> x``; ``params`` are the parameter names it reads."""

    name: str
    fn: Callable
    params: list[str] = field(default_factory=list)


class Adapter:
    """Base class; see :class:`slugkit.models.open_clip.OpenClipAdapter` for the reference implementation."""

    family: str = "base"
    model: torch.nn.Module
    model_id: dict
    precision: str = "fp32"  # see the module docstring; set by ``load`` / ``from_config`` / the constructor

    # --- device and precision -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        """The context every model forward of this adapter runs in: ``torch.autocast(self.device.type, dtype,
        cache_enabled=False)`` for ``bf16``/``fp16``, a no-op for ``fp32``.

        ``encode_*`` and the ``stages()`` callables enter it themselves; use it around direct ``self.model`` calls.
        Checked at each entry (cached), so a model moved to a device without that autocast raises ``ValueError``
        (see :func:`check_precision`) instead of running in another precision."""
        dtype = check_precision(self.precision, self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)

    def _forward(self, fn: Callable, *args, **kw) -> torch.Tensor:
        """``fn(*args, **kw)`` under :meth:`autocast`, returned as float32 (a no-op for float32 outputs)."""
        with self.autocast():
            out = fn(*args, **kw)
        return out.float()

    def autocast_stages(self, stages: list[Stage]) -> list[Stage]:
        """``stages`` with each ``fn`` run under :meth:`autocast`; the last one returns float32, like ``encode_*``.

        Inner stages return what autocast produced (bf16/fp16 activations: the cached search keeps them at half
        the memory), so composing the stages performs the same operations, in the same dtypes, as the encoder."""
        out = []
        for i, st in enumerate(stages):
            last = i == len(stages) - 1
            out.append(Stage(st.name, _under_autocast(self, st.fn, last), st.params))
        return out

    # --- declarations -------------------------------------------------------------------------------------
    def tower_of(self, name: str) -> str:
        raise NotImplementedError

    def candidate_names(self) -> list[str]:
        raise NotImplementedError

    def group_of(self, name: str) -> list[str]:
        """Tensors that must move together with ``name`` (itself included). Default: the tensor alone."""
        return [name]

    # --- encoders and losses ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def preprocess(self, image):
        raise NotImplementedError

    def forget_loss_per_sample(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """cos(f_I(x_i), f_T(t_i)) for each pair: L_forget is its mean (spec §2.3, clean sign convention)."""
        fi = self.encode_image(images)
        ft = self.encode_text(tokens)
        return (fi * ft).sum(dim=-1)

    def retain_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- staged forward for the cached search -----------------------------------------------------------
    def stages(self, tower: str) -> list[Stage]:
        raise NotImplementedError

    def stage_index(self, tower: str, name: str) -> int:
        for i, st in enumerate(self.stages(tower)):
            if name in st.params:
                return i
        raise KeyError(f"tensor {name} is not read by any stage of the {tower} tower")

    def parameter(self, name: str) -> torch.nn.Parameter:
        params = dict(self.model.named_parameters())
        if name not in params:
            raise KeyError(f"model has no parameter {name!r}")
        return params[name]

    def model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def _under_autocast(adapter: Adapter, fn: Callable, to_float32: bool) -> Callable:
    def run(x, ctx):
        with adapter.autocast():
            y = fn(x, ctx)
        return y.float() if to_float32 else y

    return run


def check_local_weights(path: Path, family: str | None = None) -> None:
    """Every ``*.safetensors`` of a local folder (or the file itself) must really be safetensors: a Git LFS pointer,
    a pickle or a truncated file is named here (:func:`slugkit.common.weights.check_weights_file`) instead of failing
    deep inside the loader. With ``family``, a folder that is no CLIP of that family is named first
    (:func:`foreign_folder`). Raises :class:`ModelLoadError`."""
    from ..common.weights import WeightsFileError, check_weights_file

    what = foreign_folder(path, family) if family and path.is_dir() else None
    if what:
        raise ModelLoadError(f"{path} {what}")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for f in files:
        try:
            check_weights_file(f, "model weights file")
        except WeightsFileError as e:
            raise ModelLoadError(str(e)) from None


def check_model_folder(folder, what: str) -> None:
    """Raise :class:`ModelLoadError` when ``folder`` (a ``--t2i-model``, ``--canvas-model`` or ``--vlm-model``) is a
    file or does not exist: it was read as a folder and reported ``FILE/canvas_config.json is missing``. ``what``:
    e.g. ``"--canvas-model: give the folder `slug world train-canvas --out DIR` wrote"``."""
    p = Path(folder)
    if p.is_dir():
        return
    raise ModelLoadError(f"{p} is {'a file, not a folder' if p.exists() else 'no such folder'}; {what}")


def foreign_folder(folder: Path, family: str) -> str | None:
    """What a local ``--model`` folder is when it is no CLIP of ``family`` (``"open_clip"`` | ``"hf_clip"``), else
    None. A LLaVA folder loaded as a transformers ``CLIPModel`` with every weight "unexpected" and the rest random,
    and ``slug grads`` wrote gradients of that random CLIP with exit 0; a pipeline's ``text_encoder/`` (a text tower
    alone) became a default-size random CLIP; a diffusers pipeline folder was said to lack model.safetensors
    (trial 43). Reads ``model_index.json`` / ``config.json`` / ``open_clip_config.json`` only."""
    import json

    if (folder / "model_index.json").is_file():
        return ("is a diffusers pipeline folder (model_index.json), not a CLIP: pass the CLIP its text encoder comes "
                "from as --model, and the pipeline as --consumer sd:DIR (slug unlearn / grads) or --pipeline DIR "
                "(slug apply / revert / eval-sd)")
    cfg = folder / "config.json"
    if family == "open_clip":
        if not (folder / "open_clip_config.json").is_file() and cfg.is_file():  # a LLaVA is named as one here too
            return foreign_folder(folder, "hf_clip") or ("holds a transformers config.json, not an "
                                                         "open_clip_config.json: pass --family hf_clip")
        return None
    if not cfg.is_file():
        return ("holds an open_clip_config.json, not a transformers config.json: pass --family open_clip"
                if (folder / "open_clip_config.json").is_file() else None)
    try:
        kind = json.loads(cfg.read_text()).get("model_type")
    except (ValueError, OSError, AttributeError):
        return None  # transformers names a broken config itself
    if kind in (None, "clip"):
        return None
    if kind == "llava":
        return ("is a LLaVA folder (config.json: model_type 'llava'), not a CLIP: pass the CLIP its vision tower "
                "comes from as --model, and this folder as --consumer llava:DIR")
    if kind in ("clip_text_model", "clip_vision_model"):
        tower = "text" if kind == "clip_text_model" else "vision"
        return (f"holds a CLIP {tower} tower alone (config.json: model_type {kind!r}, e.g. a pipeline's "
                f"{'text_encoder/' if tower == 'text' else 'image_encoder/'}); SLUG's gradients need the whole "
                "CLIPModel (both towers): pass the CLIP it comes from as --model")
    return f"is a {kind!r} model (config.json: model_type), not a CLIPModel ('clip')"
