"""The slugkit patch: a small, verifiable edit of one parameter tensor (or a group that moves together).

SLUG unlearns a concept by changing a single layer once. What the user gets is therefore not a new
checkpoint but a *patch*, a folder with two files:

``patch.safetensors``
    For every edited tensor ``<name>``: ``patched/<name>`` (the new values) and ``original/<name>`` (the
    values of the base model). Keeping the originals makes :func:`revert_patch` bit-exact without access to
    the base checkpoint, and lets :func:`apply_patch` be checked end to end. The price is that the patch is
    twice the size of the edited tensor(s); for one layer of a CLIP model that is still a tiny fraction of the
    model (a ViT-B/32 MLP matrix is ~9 MB in float32 against ~600 MB for the whole model).

``patch.json``
    Everything else, human readable: ``format``/``format_version``, ``base_model`` (the id the patch was made
    for), ``adapter``, ``concept``, ``method``, ``step_size`` (η), ``metrics`` (headline numbers), ``extra``,
    library versions, and ``tensors``: for each name its ``shape``, ``dtype``, ``sha256_original`` and
    ``sha256_patched`` (sha256 of the tensor's raw bytes, see :func:`tensor_sha256`). It also records
    ``safetensors_sha256``, the sha256 of the bytes of ``patch.safetensors``.

Guarantees
----------
* **Wrong base is refused.** Before anything is written, every tensor of the target is hashed and compared
  with ``sha256_original``; a difference raises :class:`PatchMismatchError` and leaves the model untouched.
* **Revert is exact.** :func:`revert_patch` checks the model holds the patched values, then copies the stored
  originals back byte for byte.
* **Patches compose** when they touch different tensors (:func:`compose_patches`, :func:`apply_patches`) and
  are refused, naming the tensor and both concepts, when they overlap.
* **Nothing is unpickled.** Tensors are read with ``safetensors``, metadata with ``json``; ``.pt``/``.bin``
  pickle checkpoints are refused (:func:`load_state_dict_file`).
* **Nothing is written half-way.** Files go to a temporary sibling and are renamed into place.
* **Deterministic.** No timestamps, sorted keys: the same inputs give byte-identical files.
* **Loading is paranoid.** :func:`load_patch` checks the file checksum, the tensor set, shapes, dtypes and
  every tensor hash; any corruption becomes a :class:`PatchFormatError` that names the file (and tensor).

Typical use::

    patch = make_patch(model, {name: new_value}, base_model={"id": "ViT-B-32", "pretrained": "openai"},
                       adapter="open_clip", concept="Elon Musk", step_size=eta, metrics=metrics)
    save_patch(patch, "runs/elon/patch")
    ...
    apply_patch(model, load_patch("runs/elon/patch"))   # refuses a different base
    revert_patch(model, patch)                           # back to the exact original bytes
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

import safetensors.torch
import torch
from torch import nn

from slugkit.data.shards import atomic_write_bytes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PATCH_JSON",
    "PATCH_SAFETENSORS",
    "Patch",
    "PatchError",
    "PatchFormatError",
    "PatchMismatchError",
    "apply_patch",
    "apply_patches",
    "compose_patches",
    "describe",
    "load_patch",
    "load_state_dict_file",
    "make_patch",
    "revert_patch",
    "save_patch",
    "save_state_dict_file",
    "tensor_sha256",
]

FORMAT = "slugkit-patch"
FORMAT_VERSION = 1
PATCH_JSON = "patch.json"
PATCH_SAFETENSORS = "patch.safetensors"

_PATCHED = "patched/"
_ORIGINAL = "original/"
_SHA_PREFIX = 12  # hex digits shown in error messages

# Dtypes safetensors can store, by the name we write in patch.json (``str(dtype)`` without ``torch.``).
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)

# Suffixes of pickle-based checkpoints we refuse to open.
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


# --------------------------------------------------------------------------------------------------- errors


class PatchError(ValueError):
    """A patch cannot be made, composed, saved or used; the message says why and what to do."""


class PatchMismatchError(PatchError):
    """The target model is not the one the patch was made for (or is not in the state the operation needs)."""


class PatchFormatError(PatchError):
    """A patch (or checkpoint) file is corrupt, inconsistent or of an unsupported format; names the file."""


# --------------------------------------------------------------------------------------------------- hashing


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in C order, native (little-endian) byte order.

    Shape and dtype are *not* part of the hash; the patch records them separately. Works for any dtype
    (float32, float16, bfloat16, ints, bool) and on any device (the tensor is copied to the CPU).
    """
    if t.is_meta:
        raise PatchError("cannot hash a tensor on the 'meta' device: the model's weights are not materialised")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def _short(sha: str) -> str:
    return sha[:_SHA_PREFIX] + "…"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------- the patch


@dataclass(eq=False)
class Patch:
    """An edit of a few named tensors, with the original values kept for verification and exact revert.

    ``original`` and ``patched`` map tensor name → CPU tensor (same names, shapes and dtypes). ``meta`` is the
    content of ``patch.json`` minus the file checksum ``safetensors_sha256`` (a property of the saved file, not
    of the patch); ``meta["tensors"][name]`` holds ``shape``, ``dtype``, ``sha256_original`` and
    ``sha256_patched``. Build one with :func:`make_patch` or :func:`load_patch`, not by hand.
    """

    original: dict[str, torch.Tensor]
    patched: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The edited tensor names, sorted."""
        return sorted(self.meta.get("tensors", self.patched))

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held by the patch: original + patched values of every tensor.

        This is the size of ``patch.safetensors`` minus its small JSON header (a few hundred bytes).
        """
        return sum(t.numel() * t.element_size() for d in (self.original, self.patched) for t in d.values())

    @property
    def base_model(self) -> dict:
        return dict(self.meta.get("base_model") or {})

    @property
    def concept(self) -> str | list:
        return self.meta.get("concept", "")

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of ``meta``; it covers every tensor hash, so it identifies the content."""
        return hashlib.sha256(_canonical_json(self.meta).encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return (f"Patch(concept={self.concept!r}, method={self.meta.get('method')!r}, "
                f"base_model={_base_label(self.meta)!r}, tensors={self.names!r})")


# --------------------------------------------------------------------------------------------------- JSON helpers


def _json_default(o: Any) -> Any:
    """Make numpy / torch scalars and paths JSON-able; anything else is an error."""
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    item = getattr(o, "item", None)  # numpy scalars
    if callable(item) and getattr(o, "shape", None) in ((), None):
        return item()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, default=_json_default) + "\n"


def _normalise_meta(meta: dict) -> dict:
    """Round-trip through JSON so the in-memory meta equals what :func:`load_patch` will read back."""
    try:
        return json.loads(_canonical_json(meta))
    except (TypeError, ValueError) as e:
        raise PatchError(f"patch metadata must be JSON-serialisable (metrics, extra, base_model …): {e}") from e


def _base_label(meta: Mapping) -> str:
    """A short human name of the base model recorded in a patch (for messages)."""
    base = meta.get("base_model")
    if not isinstance(base, Mapping) or not base:
        return str(base) if base else "<unknown base model>"
    for key in ("id", "model_id", "name_or_path", "repo_id"):
        if base.get(key):
            label = str(base[key])
            break
    else:
        arch = base.get("arch") or base.get("model") or base.get("name") or base.get("architecture")
        label = str(arch) if arch else json.dumps(base, sort_keys=True, default=str)
    if base.get("pretrained") and str(base["pretrained"]) not in label:
        label += f" (pretrained={base['pretrained']})"
    return label


def _toolkit_version() -> str:
    try:
        return _importlib_metadata.version("slugkit")
    except _importlib_metadata.PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------------------------------- target access


def _named_tensors(target: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name → live tensor of a module (parameters, then buffers, then other state-dict entries) or a dict.

    The tensors returned share storage with the target, so an in-place ``copy_`` edits the target.
    """
    if isinstance(target, nn.Module):
        out: dict[str, torch.Tensor] = dict(target.named_parameters())
        for name, buf in target.named_buffers():
            out.setdefault(name, buf)
        for name, t in target.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor):
                out.setdefault(name, t)
        return out
    if isinstance(target, Mapping):
        bad = [k for k, v in target.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise PatchError(f"state dict entries must be tensors; not a tensor: {bad[:5]}")
        return dict(target)
    raise TypeError(f"target must be an nn.Module or a dict of tensors, not {type(target).__name__}")


def _missing_hint(missing: Iterable[str], available: Iterable[str]) -> str:
    available = list(available)
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, available, n=2, cutoff=0.75)
        if f"module.{name}" in available:
            close = [f"module.{name}"]
        elif name.startswith("module.") and name.removeprefix("module.") in available:
            close = [name.removeprefix("module.")]
        if close:
            hints.append(f"{name!r} (did you mean {', '.join(map(repr, close))}?)")
        else:
            hints.append(repr(name))
    return ", ".join(hints)


# --------------------------------------------------------------------------------------------------- make


def make_patch(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    patched: Mapping[str, torch.Tensor],
    *,
    base_model: dict | str,
    adapter: str,
    concept: str | list,
    method: str = "slug",
    step_size: float | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Patch:
    """Build a :class:`Patch` from the unmodified model and the new values of the edited tensors.

    ``model_or_state`` must still hold the *original* values (the patch records their hashes and bytes);
    ``patched`` maps tensor name → new value, same shape and dtype. All tensors are cloned to the CPU.
    ``base_model`` identifies the checkpoint (e.g. ``{"id": "ViT-B-32", "pretrained": "openai"}``; a string
    is taken as ``{"id": ...}``). ``metrics`` / ``extra`` must be JSON-serialisable (numpy/torch scalars are
    converted). Raises :class:`PatchError` for an unknown name, a shape/dtype mismatch, a tensor the patch
    leaves unchanged, or non-finite new values where the original is finite.
    """
    if not patched:
        raise PatchError("a patch needs at least one tensor; `patched` is empty")
    if isinstance(base_model, str):
        base_model = {"id": base_model}
    if not isinstance(base_model, Mapping) or not base_model:
        raise PatchError("base_model must be a non-empty dict identifying the checkpoint, e.g. {'id': 'ViT-B-32'}")
    live = _named_tensors(model_or_state)
    missing = [n for n in sorted(patched) if n not in live]
    if missing:
        raise PatchError(f"the model has no tensor named {_missing_hint(missing, live)}")

    original_out: dict[str, torch.Tensor] = {}
    patched_out: dict[str, torch.Tensor] = {}
    tensors_meta: dict[str, dict] = {}
    for name in sorted(patched):
        new = patched[name]
        if not isinstance(new, torch.Tensor):
            raise PatchError(f"patched value of {name!r} must be a tensor, not {type(new).__name__}")
        cur = live[name]
        if tuple(new.shape) != tuple(cur.shape):
            raise PatchError(f"patched value of {name!r} has shape {tuple(new.shape)}, the model's has {tuple(cur.shape)}")
        if new.dtype != cur.dtype:
            raise PatchError(f"patched value of {name!r} is {_dtype_name(new.dtype)}, the model's is "
                             f"{_dtype_name(cur.dtype)}; cast it before making the patch")
        if _dtype_name(cur.dtype) not in _DTYPES:
            raise PatchError(f"tensor {name!r} has dtype {cur.dtype}, which a patch cannot store")
        orig_c = cur.detach().to("cpu", copy=True).contiguous()
        new_c = new.detach().to("cpu", copy=True).contiguous()
        if orig_c.is_floating_point() and bool(torch.isfinite(orig_c).all()) and not bool(torch.isfinite(new_c).all()):
            raise PatchError(f"patched value of {name!r} contains NaN/inf; the step size is probably too large")
        sha_o, sha_p = tensor_sha256(orig_c), tensor_sha256(new_c)
        if sha_o == sha_p:
            raise PatchError(f"patched value of {name!r} is identical to the model's; drop it from the patch "
                             f"(or check that the model still holds the original, unedited weights)")
        original_out[name], patched_out[name] = orig_c, new_c
        tensors_meta[name] = {"shape": list(cur.shape), "dtype": _dtype_name(cur.dtype),
                              "sha256_original": sha_o, "sha256_patched": sha_p}

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": "slugkit",
        "toolkit_version": _toolkit_version(),
        "torch_version": torch.__version__,
        "base_model": dict(base_model),
        "adapter": str(adapter),
        "concept": concept,
        "method": str(method),
        "step_size": None if step_size is None else float(step_size),
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
        "tensors": tensors_meta,
    }
    return Patch(original=original_out, patched=patched_out, meta=_normalise_meta(meta))


def _check_consistent(patch: Patch, where: str = "patch") -> None:
    """Tensors agree with ``meta['tensors']`` (names, shapes, dtypes, hashes); raises PatchError otherwise."""
    tmeta = patch.meta.get("tensors")
    if not isinstance(tmeta, dict) or not tmeta:
        raise PatchError(f"{where}: meta['tensors'] is missing or empty")
    for label, store, key in (("patched", patch.patched, "sha256_patched"),
                              ("original", patch.original, "sha256_original")):
        if set(store) != set(tmeta):
            diff = sorted(set(store) ^ set(tmeta))
            raise PatchError(f"{where}: {label} tensors and meta['tensors'] name different tensors: {diff}")
        for name, t in store.items():
            info = tmeta[name]
            if list(t.shape) != list(info["shape"]) or _dtype_name(t.dtype) != info["dtype"]:
                raise PatchError(f"{where}: {label} tensor {name!r} is {_dtype_name(t.dtype)}{list(t.shape)}, "
                                 f"meta says {info['dtype']}{info['shape']}")
            if tensor_sha256(t) != info[key]:
                raise PatchError(f"{where}: {label} tensor {name!r} does not match its sha256 in meta")


# --------------------------------------------------------------------------------------------------- save / load


def _safetensors_bytes(patch: Patch) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(patch.patched):
        tensors[_ORIGINAL + name] = patch.original[name].detach().to("cpu").contiguous()
        tensors[_PATCHED + name] = patch.patched[name].detach().to("cpu").contiguous()
    tensors = {k: tensors[k] for k in sorted(tensors)}
    # Exactly one metadata entry: safetensors keeps ``__metadata__`` in a Rust HashMap, so with two or more keys
    # their order in the header (hence the file bytes) changes from call to call.
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_patch(patch: Patch, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``patch`` as a folder ``out_dir/{patch.safetensors, patch.json}``; returns ``out_dir``.

    Both files are written into a temporary sibling folder which is then renamed into place, so ``out_dir``
    is either absent, the old patch, or the complete new one. Refuses (``FileExistsError``) a non-empty
    ``out_dir`` unless ``overwrite=True``; even then it only replaces a folder that holds nothing but patch
    files (it never deletes a folder of other things). The tensors are re-verified against ``meta`` first.
    Output is deterministic: same patch → byte-identical files.
    """
    out_dir = Path(out_dir)
    _check_consistent(patch)
    st_bytes = _safetensors_bytes(patch)
    doc = {k: v for k, v in patch.meta.items() if k != "safetensors_sha256"}
    doc["safetensors_sha256"] = hashlib.sha256(st_bytes).hexdigest()
    json_bytes = _canonical_json(doc).encode("utf-8")

    existing = None
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder; choose another output path")
        contents = sorted(p.name for p in out_dir.iterdir())
        if contents:
            if not overwrite:
                raise FileExistsError(f"{out_dir} already exists and is not empty ({', '.join(contents[:5])}); "
                                      f"pass overwrite=True to replace the patch in it, or choose another folder")
            foreign = [c for c in contents if c not in (PATCH_JSON, PATCH_SAFETENSORS)]
            if foreign:
                raise FileExistsError(f"refusing to replace {out_dir}: it holds files that are not part of a "
                                      f"patch ({', '.join(foreign[:5])}); remove them or choose another folder")
            existing = out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = None
    try:
        _write_file(tmp / PATCH_SAFETENSORS, st_bytes)
        _write_file(tmp / PATCH_JSON, json_bytes)
        if existing is not None:
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.rmdir(old)
            os.rename(out_dir, old)
        elif out_dir.is_dir():
            os.rmdir(out_dir)  # empty: make room (os.rename onto an empty dir is POSIX-only)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.rename(old, out_dir)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _resolve_patch_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if p.name in (PATCH_JSON, PATCH_SAFETENSORS) or p.suffix in (".json", ".safetensors"):
        if p.exists() or p.parent.is_dir():
            return p.parent
    raise FileNotFoundError(f"no patch at {p}: expected a folder holding {PATCH_JSON} and {PATCH_SAFETENSORS}")


def _format_error(file: Path, msg: str, tensor: str | None = None) -> PatchFormatError:
    where = f"{file}" + (f", tensor {tensor!r}" if tensor else "")
    return PatchFormatError(f"{where}: {msg}")


def _validate_json(doc: Any, jf: Path) -> dict:
    """Check patch.json's structure; returns ``doc['tensors']``."""
    if not isinstance(doc, dict):
        raise _format_error(jf, "not a JSON object")
    if doc.get("format") != FORMAT:
        raise _format_error(jf, f"not a slugkit patch (format={doc.get('format')!r}, expected {FORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _format_error(jf, f"invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise _format_error(jf, f"written by a newer slugkit (format_version {version}; this slugkit reads up to "
                                f"{FORMAT_VERSION}); upgrade slugkit to use this patch")
    if not isinstance(doc.get("safetensors_sha256"), str):
        raise _format_error(jf, "missing safetensors_sha256")
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict) or not tensors:
        raise _format_error(jf, "missing or empty 'tensors'")
    for name, info in tensors.items():
        if not isinstance(info, dict):
            raise _format_error(jf, "tensor entry is not an object", name)
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise _format_error(jf, f"invalid shape {shape!r}", name)
        if info.get("dtype") not in _DTYPES:
            raise _format_error(jf, f"unsupported dtype {info.get('dtype')!r}", name)
        for key in ("sha256_original", "sha256_patched"):
            sha = info.get(key)
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                raise _format_error(jf, f"invalid {key} {sha!r}", name)
        if info["sha256_original"] == info["sha256_patched"]:
            raise _format_error(jf, "sha256_original == sha256_patched (the patch would change nothing)", name)
    return tensors


def load_patch(path: str | os.PathLike) -> Patch:
    """Read and fully verify a patch folder (``path`` may also be its ``patch.json`` or ``patch.safetensors``).

    Checks, in order: ``patch.json`` parses and is a slugkit patch of a supported ``format_version`` (a newer
    one is refused with "upgrade slugkit"); the sha256 of ``patch.safetensors`` equals ``safetensors_sha256``;
    the file parses; it holds exactly ``patched/<name>`` and ``original/<name>`` for the names in JSON; shapes,
    dtypes and the sha256 of every tensor agree with JSON. Any failure raises :class:`PatchFormatError`
    naming the file (and tensor). A missing folder raises ``FileNotFoundError``. Never unpickles.
    """
    folder = _resolve_patch_dir(path)
    jf, sf = folder / PATCH_JSON, folder / PATCH_SAFETENSORS
    for f in (jf, sf):
        if not f.is_file():
            raise _format_error(f, f"missing; a patch folder holds {PATCH_JSON} and {PATCH_SAFETENSORS}")

    try:
        doc = json.loads(jf.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _format_error(jf, f"not valid JSON ({e})") from e
    tmeta = _validate_json(doc, jf)

    data = sf.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != doc["safetensors_sha256"]:
        raise _format_error(sf, f"sha256 {_short(actual)} does not match safetensors_sha256 "
                                f"{_short(doc['safetensors_sha256'])} recorded in {PATCH_JSON}; "
                                f"the file is corrupt or was edited")
    try:
        stored = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises SafetensorError and friends for a bad header; wrap them all
        raise _format_error(sf, f"cannot be parsed as safetensors ({type(e).__name__}: {e})") from e

    expected_keys = {p + n for n in tmeta for p in (_PATCHED, _ORIGINAL)}
    if set(stored) != expected_keys:
        missing = sorted(expected_keys - set(stored))
        unexpected = sorted(set(stored) - expected_keys)
        raise _format_error(sf, f"tensor set disagrees with {PATCH_JSON}: missing {missing}, unexpected {unexpected}")

    original: dict[str, torch.Tensor] = {}
    patched: dict[str, torch.Tensor] = {}
    for name in sorted(tmeta):
        info = tmeta[name]
        for prefix, key, store in ((_ORIGINAL, "sha256_original", original), (_PATCHED, "sha256_patched", patched)):
            t = stored[prefix + name]
            if list(t.shape) != info["shape"] or _dtype_name(t.dtype) != info["dtype"]:
                raise _format_error(sf, f"{prefix}{name} is {_dtype_name(t.dtype)}{list(t.shape)} but {PATCH_JSON} "
                                        f"says {info['dtype']}{info['shape']}", name)
            if tensor_sha256(t) != info[key]:
                raise _format_error(sf, f"{prefix}{name} does not match its {key} in {PATCH_JSON}", name)
            store[name] = t

    meta = {k: v for k, v in doc.items() if k != "safetensors_sha256"}
    return Patch(original=original, patched=patched, meta=meta)


# --------------------------------------------------------------------------------------------------- apply / revert


def _verify_state(target, patch: Patch, want: str, *, check_hash: bool = True) -> dict[str, torch.Tensor]:
    """Check every tensor of ``patch`` in ``target`` before anything is touched; return name → live tensor.

    ``want`` is ``"original"`` (for apply) or ``"patched"`` (for revert). Raises :class:`PatchMismatchError`
    listing every problem.
    """
    live = _named_tensors(target)
    tmeta = patch.meta["tensors"]
    base = _base_label(patch.meta)
    concept = patch.meta.get("concept")
    verb = "apply" if want == "original" else "revert"
    missing = [n for n in sorted(tmeta) if n not in live]
    if missing:
        raise PatchMismatchError(
            f"cannot {verb} patch (concept {concept!r}): the model has no tensor named {_missing_hint(missing, live)}; "
            f"load the base model the patch was made for: {base} (adapter {patch.meta.get('adapter')!r})")
    problems: list[str] = []
    already = 0
    not_applied = 0
    for name in sorted(tmeta):
        info, t = tmeta[name], live[name]
        if list(t.shape) != info["shape"] or _dtype_name(t.dtype) != info["dtype"]:
            problems.append(f"tensor {name!r} is {_dtype_name(t.dtype)}{list(t.shape)} in the model, the patch "
                            f"expects {info['dtype']}{info['shape']}")
            continue
        if not check_hash:
            continue
        sha = tensor_sha256(t)
        if sha == info[f"sha256_{want}"]:
            continue
        other = "patched" if want == "original" else "original"
        if sha == info[f"sha256_{other}"]:
            if want == "original":
                already += 1
                problems.append(f"tensor {name!r} already holds the patched values (the patch is already applied)")
            else:
                not_applied += 1
                problems.append(f"tensor {name!r} holds the original values (the patch is not applied)")
        else:
            problems.append(f"tensor {name!r}: expected sha256 {_short(info[f'sha256_{want}'])}, found {_short(sha)}")
    if not problems:
        return {n: live[n] for n in sorted(tmeta)}

    if want == "original":
        if already == len(tmeta):
            advice = "The patch is already applied to this model; nothing to do (use revert_patch to undo it)"
        else:
            advice = (f"Load the base model the patch was made for: {base}. "
                      f"If this tensor was already patched (by this or another patch), use revert first")
        head = f"cannot apply patch (concept {concept!r}) to this model"
    else:
        if not_applied == len(tmeta):
            advice = "The model is not in the patched state: the patch is not applied, there is nothing to revert"
        else:
            advice = (f"The model is not in the patched state: revert only a model this patch was applied to "
                      f"(base: {base})")
        head = f"cannot revert patch (concept {concept!r})"
    shown = "; ".join(problems[:8]) + (f"; … and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise PatchMismatchError(f"{head}: {shown}. {advice}. The model was not modified.")


def _copy_all(live: dict[str, torch.Tensor], values: dict[str, torch.Tensor], undo: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into ``live`` in place; if a copy fails, restore the ones done from ``undo``."""
    done: list[str] = []
    with torch.no_grad():
        try:
            for name, dst in live.items():
                dst.copy_(values[name])
                done.append(name)
        except BaseException:
            for name in done:
                live[name].copy_(undo[name])
            raise


def apply_patch(target, patch: Patch, *, check: bool = True):
    """Write the patched values into ``target`` (an ``nn.Module`` or a state dict), in place; returns ``target``.

    Module tensors are looked up by ``named_parameters()``, then buffers / ``state_dict()`` keys. Before
    anything is written every tensor is checked: it exists, its shape and dtype match, and (``check=True``)
    its sha256 equals the patch's ``sha256_original``. Otherwise :class:`PatchMismatchError` is raised — naming
    the tensor, the expected and found hash prefixes and the base model — and the model is left untouched.
    ``check=False`` skips only the hash comparison (for deliberately applying to a fine-tuned relative of the
    base; revert will then restore the *base* values, not the fine-tuned ones).
    """
    live = _verify_state(target, patch, "original", check_hash=check)
    _copy_all(live, patch.patched, patch.original)
    return target


def revert_patch(target, patch: Patch):
    """Restore the original values of the patched tensors, bit-exactly; returns ``target``.

    Refuses (:class:`PatchMismatchError`, model untouched) unless every tensor currently holds exactly the
    patched values.
    """
    live = _verify_state(target, patch, "patched")
    _copy_all(live, patch.original, patch.patched)
    return target


# --------------------------------------------------------------------------------------------------- compose


def compose_patches(patches: list[Patch]) -> Patch:
    """Merge patches that edit disjoint tensors of the same base model into one patch.

    The result's ``meta['components']`` lists each part (concept, method, step_size, metrics, tensors and
    ``fingerprint`` = sha256 of its canonical meta); ``concept`` is the list of the components' concepts and
    ``method`` is ``"composed"``. Composing composed patches flattens the components. Raises
    :class:`PatchError` when two patches touch the same tensor (naming it and both concepts), or were made for
    different base models / adapters. A single patch is returned unchanged.
    """
    patches = list(patches)
    if not patches:
        raise PatchError("compose_patches needs at least one patch")
    if len(patches) == 1:
        return patches[0]
    first = patches[0].meta
    owner: dict[str, Patch] = {}
    for p in patches:
        if p.meta.get("base_model") != first.get("base_model") or p.meta.get("adapter") != first.get("adapter"):
            raise PatchError(f"cannot compose patches made for different base models: {_base_label(first)} "
                             f"({first.get('adapter')}) vs {_base_label(p.meta)} ({p.meta.get('adapter')})")
        for name in p.names:
            if name in owner:
                raise PatchError(f"patches overlap on tensor {name!r}: concept {owner[name].concept!r} and concept "
                                 f"{p.concept!r} both edit it; apply one, or re-run unlearning for both concepts")
            owner[name] = p

    components: list[dict] = []
    for p in patches:
        if p.meta.get("method") == "composed" and p.meta.get("components"):
            components.extend(p.meta["components"])
        else:
            components.append({"concept": p.meta.get("concept"), "method": p.meta.get("method"),
                               "step_size": p.meta.get("step_size"), "metrics": p.meta.get("metrics", {}),
                               "tensors": p.names, "fingerprint": p.fingerprint})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": "slugkit",
        "toolkit_version": _toolkit_version(),
        "torch_version": torch.__version__,
        "base_model": first.get("base_model"),
        "adapter": first.get("adapter"),
        "concept": [c["concept"] for c in components],
        "method": "composed",
        "step_size": None,
        "metrics": {},
        "extra": {},
        "components": components,
        "tensors": {n: owner[n].meta["tensors"][n] for n in sorted(owner)},
    }
    return Patch(original={n: owner[n].original[n] for n in sorted(owner)},
                 patched={n: owner[n].patched[n] for n in sorted(owner)},
                 meta=_normalise_meta(meta))


def chain_patches(patches: list[Patch]) -> Patch:
    """Fold patches made **one after another** (each on the model the previous one produced) into one patch from
    the first base to the final weights — sequential unlearning of several concepts.

    Unlike :func:`compose_patches`, the patches may touch the same tensor: a later patch must then have been made on
    top of the earlier one (its ``sha256_original`` equals the chain's current ``sha256_patched``), else
    :class:`PatchError`. ``meta['components']`` lists the steps in order; ``method`` is ``"chained"``.
    """
    patches = list(patches)
    if not patches:
        raise PatchError("chain_patches needs at least one patch")
    first = patches[0].meta
    originals: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}
    for p in patches:
        if p.meta.get("adapter") != first.get("adapter"):
            raise PatchError(f"cannot chain patches of different adapters: {first.get('adapter')} vs "
                             f"{p.meta.get('adapter')}")
        for name in p.names:
            if name in current:
                want = p.meta["tensors"][name]["sha256_original"]
                if tensor_sha256(current[name]) != want:
                    raise PatchError(f"patch for {p.concept!r} was not made on top of the earlier patches: tensor "
                                     f"{name!r} differs from what they produce ({_short(want)}…)")
            else:
                originals[name] = p.original[name]
            current[name] = p.patched[name]
    changed = {n: t for n, t in current.items() if tensor_sha256(t) != tensor_sha256(originals[n])}
    components = [{"concept": p.meta.get("concept"), "method": p.meta.get("method"),
                   "step_size": p.meta.get("step_size"), "metrics": p.meta.get("metrics", {}), "tensors": p.names,
                   "fingerprint": p.fingerprint} for p in patches]
    chained = make_patch(originals, changed, base_model=first.get("base_model") or {"id": "unknown"},
                         adapter=first.get("adapter", ""), concept=[c["concept"] for c in components],
                         method="chained", extra={"order": [c["concept"] for c in components]})
    chained.meta["components"] = components
    chained.meta = _normalise_meta(chained.meta)
    return chained


def apply_patches(target, patches: list[Patch], *, check: bool = True):
    """Apply several disjoint patches all-or-nothing: everything is checked before any tensor is written."""
    return apply_patch(target, compose_patches(patches), check=check)


# --------------------------------------------------------------------------------------------------- checkpoints


def _pickle_refusal(path: Path) -> PatchFormatError:
    return PatchFormatError(
        f"{path}: looks like a pickle checkpoint (.pt/.pth/.bin/.ckpt). slugkit never unpickles files, because "
        f"unpickling can run arbitrary code. If you trust this file, convert it yourself, e.g.\n"
        f"    import torch, safetensors.torch\n"
        f"    sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True)\n"
        f"    safetensors.torch.save_file(sd, {str(path.with_suffix('.safetensors'))!r})\n"
        f"(unwrap a nested 'state_dict' key first if there is one), and pass the .safetensors file instead.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` checkpoint into a CPU state dict. Pickle files are refused, never opened as pickle."""
    path = Path(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / raw pickle
        raise _pickle_refusal(path)
    try:
        return dict(safetensors.torch.load_file(str(path), device="cpu"))
    except Exception as e:
        raise PatchFormatError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from e


def save_state_dict_file(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict as a ``.safetensors`` file, atomically (temp file + rename) and deterministically.

    Tensors that share storage (tied weights, views) are cloned so safetensors accepts them.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise PatchFormatError(f"{path}: slugkit writes checkpoints only as .safetensors (never pickle); "
                               f"use a path ending in .safetensors")
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise PatchError(f"state dict entry {name!r} is not a tensor ({type(t).__name__})")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    return path


# --------------------------------------------------------------------------------------------------- describe


def describe(patch: Patch) -> str:
    """A short human summary: concept, method, base model, tensors (shape, dtype, relative change), η, metrics."""
    m = patch.meta
    lines = [
        f"slugkit patch (format {m.get('format_version')}, slugkit {m.get('toolkit_version')})",
        f"  concept:    {m.get('concept')}",
        f"  method:     {m.get('method')}",
        f"  base model: {_base_label(m)}  [adapter: {m.get('adapter')}]",
        f"  step size:  {m.get('step_size')}",
        f"  tensors ({len(patch.names)}, {patch.nbytes / 2**20:.2f} MiB incl. originals):",
    ]
    for name in patch.names:
        info = m["tensors"][name]
        rel = ""
        if name in patch.patched and name in patch.original and patch.original[name].is_floating_point():
            o = patch.original[name].double()
            d = (patch.patched[name].double() - o).norm()
            rel = f"  ‖Δ‖/‖θ‖={float(d / o.norm().clamp_min(1e-30)):.3g}"
        lines.append(f"    {name}  {info['dtype']}{tuple(info['shape'])}{rel}")
    for comp in m.get("components") or []:
        lines.append(f"  component: {comp.get('concept')} ({comp.get('method')}, η={comp.get('step_size')}) "
                     f"→ {', '.join(comp.get('tensors', []))}")
    metrics = m.get("metrics") or {}
    if metrics:
        lines.append("  metrics:")
        for k in sorted(metrics):
            v = metrics[k]
            lines.append(f"    {k}: {v:.4g}" if isinstance(v, float) else f"    {k}: {v}")
    return "\n".join(lines)
