"""The errors a user can cause, each with a message that names the file, sample or option and what to do.

The CLI (:mod:`slugkit.cli`) prints these as one line ``error: ...`` with exit status 2; library callers catch them
by class. Errors that belong to one component stay with it (``PatchError`` in :mod:`slugkit.patch.format`, which
imports nothing of ours; ``SearchFailed`` in :mod:`slugkit.slug.search`); the ones shared across layers live here.
"""

from __future__ import annotations

import math

__all__ = ["EmptyForgetSetError", "ModelLoadError", "OutputExistsError", "ShardError", "check_device", "check_flag",
           "check_number", "device_error_hint"]


class ShardError(RuntimeError):
    """A shard (or a sample in it) cannot be read; the message names the file and what to do."""


class EmptyForgetSetError(ValueError):
    """No sample of the forget set matched; a zero gradient would silently do nothing (official bug, spec §2.4)."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names what is missing and how to supply it offline."""


class OutputExistsError(FileExistsError):
    """``--out`` already holds a run; pass ``--overwrite`` or choose another folder."""


def check_device(device: str | None) -> str | None:
    """Why ``--device`` cannot work on this machine (an unknown device string, CUDA not available), or None."""
    if device is None or device == "cpu":
        return None
    import torch

    try:
        d = torch.device(device)
    except RuntimeError:  # torch's message lists twenty device types slugkit cannot use
        return f"--device {device}: not a device; slugkit runs on cpu, cuda (cuda:N) or mps"
    if d.type not in ("cpu", "cuda", "mps"):
        return f"--device {device}: slugkit runs on cpu, cuda or mps ({d.type!r} holds no data to compute with)"
    if d.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: torch sees no Apple GPU (mps); use --device cpu"
    if d.type == "cuda":
        if not torch.cuda.is_available():
            return (f"--device {device}: torch sees no CUDA device (torch {torch.__version__}, built for CUDA "
                    f"{torch.version.cuda or 'none'}); use --device cpu or a CUDA build of torch on a GPU machine")
        if d.index is not None and d.index >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def device_error_hint(e: RuntimeError) -> str | None:
    """A hint for a RuntimeError caused by devices (tensors on different devices, CUDA errors, out of GPU memory),
    or None for any other RuntimeError."""
    import torch

    text = str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text:
        return "the GPU ran out of memory: lower --batch-size or run with --device cpu"
    if any(k in text for k in ("on the same device", "Input type", "weight type", "device", "CUDA", "cuda")):
        return ("this is a device problem (data and model on different devices, or a CUDA error); please report it "
                "with the command line. `--device cpu` avoids it; `slug grads --device cuda` + `--gradients` runs "
                "only the gradient pass on the GPU")
    return None


def check_flag(name: str, v) -> None:
    """``name`` (``overwrite``) must be True or False: ``overwrite="no"`` or ``"False"`` is truthy and replaced a
    folder. Raises ``TypeError`` naming it."""
    if not isinstance(v, bool) and not (type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")):
        raise TypeError(f"{name}: expected True or False, got {type(v).__name__} {v!r}")


def check_number(owner: str, name: str, v, lo: float = 0.0, hi: float = 1.0, hi_open: bool = False,
                 flag: str | None = None) -> None:
    """``owner.name`` must be a finite number in [lo, hi] (or [lo, hi) with ``hi_open``): ``TypeError`` for a str (it
    failed later, in a comparison deep in the search), ``ValueError`` naming the field and ``flag`` otherwise."""
    where = f"{owner}.{name}" + (f" ({flag})" if flag else "")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{where}: expected a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v) or v < lo or v > hi or (hi_open and v >= hi):  # margin=inf passed (trial 30)
        top = "∞)" if math.isinf(hi) else f"{hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{where}: must be a finite number in [{lo:g}, {top}, got {v}")
