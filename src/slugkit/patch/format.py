"""The patch format: :class:`Patch`, its files (``patch.safetensors`` + ``patch.json``), hashing, load, save
and the consistency checks; see :mod:`slugkit.patch` for the layout and the guarantees. This module imports nothing
of slugkit's: a patch can be read and verified with torch, safetensors and json alone (``slugkit.patch.save_patch``,
:func:`slugkit.patch.ops.save_patch`, also refuses the package's and runs' folders before it writes)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch

FORMAT = "slugkit-patch"
FORMAT_VERSION = 2  # 2: patch.json records the fingerprint (format 1 patches load, unsealed)
PATCH_JSON = "patch.json"
PATCH_SAFETENSORS = "patch.safetensors"

_PATCHED = "patched/"
_ORIGINAL = "original/"
_SHA_PREFIX = 12  # hex digits shown in error messages
_SEALS = ("safetensors_sha256", "fingerprint")  # patch.json fields that check the rest (not part of Patch.meta)

# Dtypes safetensors can store, by the name we write in patch.json (``str(dtype)`` without ``torch.``).
_DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)


# --------------------------------------------------------------------------------------------------- errors
class PatchError(ValueError):
    """A patch cannot be made, composed, saved or used; the message says why and what to do."""


class PatchMismatchError(PatchError):
    """The target model is not the one the patch was made for (or is not in the state the operation needs)."""


class PatchFormatError(PatchError):
    """A patch (or checkpoint) file is corrupt, inconsistent or of an unsupported format; names the file."""


# --------------------------------------------------------------------------------------------------- hashing
def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in C order, native (little-endian) byte order. Shape and dtype are *not*
    part of the hash; the patch records them separately. Any dtype, any device (the tensor is copied to the CPU)."""
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
    ``sha256_patched``. Build one with :func:`make_patch` or :func:`load_patch`, not by hand."""

    original: dict[str, torch.Tensor]
    patched: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The edited tensor names, sorted."""
        return sorted(self.meta.get("tensors", self.patched))

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data: original + patched values of every tensor (``patch.safetensors`` minus its header)."""
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
    """Write ``patch`` as a folder ``out_dir/{patch.safetensors, patch.json}``; returns ``out_dir``. Both files are
    written into a temporary sibling folder then renamed into place, so ``out_dir`` is either absent, the old patch,
    or the complete new one. Refuses (``FileExistsError``) a non-empty ``out_dir`` unless ``overwrite=True``, and
    then any folder but a patch's; ``TypeError`` for a path as ``patch``, a non-bool ``overwrite``, ``out_dir`` None;
    ``ValueError`` for an empty ``out_dir``. Tensors re-verified first; same patch → byte-identical files."""
    if not isinstance(patch, Patch):  # a path (trial 30)
        raise TypeError(f"save_patch takes a Patch (slugkit.load_patch(path) reads one), not {type(patch).__name__}")
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir).strip():  # None; "" meant "."
        raise (ValueError if isinstance(out_dir, str) else TypeError)(f"save_patch: out_dir is {out_dir!r}: give one")
    if type(overwrite).__name__ not in ("bool", "bool_"):  # "no" is truthy; numpy's bool is a bool
        raise TypeError(f"save_patch: overwrite: expected True or False, got {type(overwrite).__name__} {overwrite!r}")
    out_dir = Path(out_dir)
    _check_consistent(patch)
    st_bytes = _safetensors_bytes(patch)
    doc = {k: v for k, v in patch.meta.items() if k not in _SEALS} | {"format_version": FORMAT_VERSION}
    doc["fingerprint"] = hashlib.sha256(_canonical_json(doc).encode("utf-8")).hexdigest()  # = Patch.fingerprint
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
                                      "pass --overwrite (overwrite=True) to replace the patch in it, or choose another "
                                      "folder")
            foreign = [c for c in contents if c not in (PATCH_JSON, PATCH_SAFETENSORS)]
            if foreign:
                more = " …" if len(foreign) > 5 else ""
                raise FileExistsError(f"refusing to replace {out_dir}: it holds files that are not part of a patch "
                                      f"({', '.join(foreign[:5])}{more}); choose another folder")
            existing = out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0o022)  # mkdtemp makes 0700; the folder gets what mkdir() gives under the umask
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
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


def resolve_patch_dir(path: str | os.PathLike) -> Path:
    """The patch folder ``path`` names: itself, the folder of its patch.json/patch.safetensors, or a run's ``patch/``.
    Raises ``ValueError`` (empty), :class:`PatchFormatError` (another file) or ``FileNotFoundError``, naming it."""
    if not os.fspath(path).strip():
        raise ValueError("the patch path is empty; name a patch folder (a run's is RUN/patch)")
    p = Path(path)
    if p.is_dir():
        if not (p / PATCH_JSON).exists() and (p / "patch" / PATCH_JSON).is_file():
            return p / "patch"  # a run folder: its patch
        nested = [] if (p / PATCH_JSON).exists() else sorted(  # a compare run: slug/patch, joint/slug/patch, …
            q.parent for pat in ("*/patch/", "*/*/patch/") for q in p.glob(pat + PATCH_JSON))
        if len(nested) > 1:
            raise FileNotFoundError(f"{p} holds no patch but {len(nested)} below it: {', '.join(map(str, nested))}")
        return nested[0] if nested else p
    if p.name in (PATCH_JSON, PATCH_SAFETENSORS) and p.parent.is_dir():
        return p.parent
    what = f"a patch is a folder holding {PATCH_JSON} and {PATCH_SAFETENSORS} (a run's is RUN/patch)"
    if p.exists():
        raise _format_error(p, f"is a file, not a patch; {what}")
    link = next((q for q in (p, *p.parents) if q.is_symlink() and not q.exists()), None)  # p or a folder above it
    if link is not None:  # "no patch at LINK" hid that the link leads nowhere (eighth and ninth trials)
        try:
            link.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # RuntimeError: a loop (Python < 3.13)
            what = ("it" if link == p else str(link)) + (" is a loop of symbolic links" if isinstance(
                e, RuntimeError) or e.errno == errno.ELOOP else f" is a symbolic link to {os.readlink(link)}, which "
                                                                "does not exist") + f"; {what}"
    raise FileNotFoundError(f"no patch at {p}: {what}")


def _format_error(file: Path, msg: str, tensor: str | None = None) -> PatchFormatError:
    return PatchFormatError(f"{file}" + (f", tensor {tensor!r}" if tensor else "") + f": {msg}")


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
    if not isinstance(doc.get("safetensors_sha256"), str):  # not "missing" of one of another type (23rd trial)
        raise _format_error(jf, f"{'missing' if 'safetensors_sha256' not in doc else 'non-string'} safetensors_sha256")
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
    Checks, in order: ``patch.json`` parses and is a slugkit patch of a supported ``format_version`` (a newer one is
    refused with "upgrade slugkit"); the sha256 of ``patch.safetensors`` equals ``safetensors_sha256``; the file
    parses; it holds exactly ``patched/<name>`` and ``original/<name>`` for the names in JSON; shapes, dtypes and the
    sha256 of every tensor agree with JSON (a mismatch with an edited patch.json blames patch.json); the recorded
    ``fingerprint`` (older patches lack it) equals the metadata's (a hand-edited concept or metric). Never unpickles.
    Failures raise :class:`PatchFormatError` naming the file (and tensor); a missing folder ``FileNotFoundError``."""
    folder = resolve_patch_dir(path)
    jf, sf = folder / PATCH_JSON, folder / PATCH_SAFETENSORS
    for f in (jf, sf):
        if not f.is_file():
            shown = Path(os.path.abspath(folder)) if str(folder) == "." else folder
            raise _format_error(shown, f"holds no {f.name}, so it is not a patch; a patch folder holds {PATCH_JSON} "
                                       f"and {PATCH_SAFETENSORS} (a run's is RUN/patch)")

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
    meta = {k: v for k, v in doc.items() if k not in _SEALS}
    edited = "fingerprint" in doc and doc["fingerprint"] != Patch(original={}, patched={}, meta=meta).fingerprint
    for name in sorted(tmeta):
        info = tmeta[name]
        for prefix, key, store in ((_ORIGINAL, "sha256_original", original), (_PATCHED, "sha256_patched", patched)):
            t = stored[prefix + name]
            if list(t.shape) != info["shape"] or _dtype_name(t.dtype) != info["dtype"]:
                raise _format_error(sf, f"{prefix}{name} is {_dtype_name(t.dtype)}{list(t.shape)} but {PATCH_JSON} "
                                        f"says {info['dtype']}{info['shape']}", name)
            if tensor_sha256(t) != info[key]:  # an edited hash is patch.json's fault (it blamed the tensors: 23rd)
                why = (jf, f"was edited after slug wrote it: its {key} is not the stored tensor's hash") if edited \
                    else (sf, f"{prefix}{name} does not match its {key} in {PATCH_JSON}")
                raise _format_error(*why, name)
            store[name] = t

    patch = Patch(original=original, patched=patched, meta=meta)
    if "fingerprint" not in doc and doc["format_version"] >= 2:  # stripping it must not turn the check off
        raise _format_error(jf, "has no fingerprint, which its format_version requires: it was edited by hand")
    if "fingerprint" in doc and doc["fingerprint"] != patch.fingerprint:  # not a signature: it catches hand edits
        raise _format_error(jf, f"was edited after slug wrote it: its metadata (concept, metrics, verdict…) gives "
                                f"fingerprint {_short(patch.fingerprint)}, not the recorded "
                                f"{_short(str(doc['fingerprint']))}; restore the file (tensors are intact) or rerun")
    return patch
