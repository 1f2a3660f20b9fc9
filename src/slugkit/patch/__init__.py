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
    ``safetensors_sha256``, the sha256 of the bytes of ``patch.safetensors``, and ``fingerprint``, the sha256 of the
    rest (:attr:`Patch.fingerprint`; a hand edit of the metadata is refused on load — not a signature). When made
    with ``architecture=`` (:func:`architecture_facts`), ``architecture`` records what the hashes cannot see: the
    activation and other facts that change the model's outputs (e.g. ``{"text.activation": "gelu", ...}``).

Guarantees
----------
* **Wrong base is refused.** Before anything is written, every tensor of the target is hashed and compared
  with ``sha256_original``; a difference raises :class:`PatchMismatchError` and leaves the model untouched. So
  is a model whose architecture facts contradict the patch's ``architecture`` (same weights, other activation).
* **Half precision works.** An fp16 / bf16 model or checkpoint gets the patch cast to its dtype
  (:func:`cast_patch`), hash-checked against the cast originals and reverted bit-exactly.
* **Revert is exact.** :func:`revert_patch` checks the model holds the patched values, then copies the stored
  originals back byte for byte.
* **Patches compose** when they touch different tensors (:func:`compose_patches`, :func:`apply_patches`) and
  are refused, naming the tensor and both concepts, when they overlap — unless they are a sequential run's steps
  in the order they were made, which :func:`apply_patches` / :func:`combine_patches` chain (:func:`chain_patches`).
* **Nothing is unpickled.** Tensors are read with ``safetensors``, metadata with ``json``; checkpoints are
  recognised by parsing their header, and pickles and Git LFS pointers are refused by name
  (:func:`load_state_dict_file`). A checkpoint written back after apply / revert keeps its header (metadata and
  layout): revert after apply gives the original file byte for byte (:func:`save_state_dict_file`).
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

from .architecture import architecture_facts, check_architecture
from .carriers import load_state_dict_file, save_state_dict_file
from .combine import apply_patches, chain_patches, combine_patches, compose_patches
from .format import (FORMAT, FORMAT_VERSION, PATCH_JSON, PATCH_SAFETENSORS, Patch, PatchError, PatchFormatError,
                     PatchMismatchError, load_patch, tensor_sha256)
from .lora import LoraExportError, export_lora, lora_from_patch, read_lora
from .ops import apply_patch, as_patch, cast_patch, make_patch, model_of, revert_patch, save_patch
from .summary import describe

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoraExportError",
    "PATCH_JSON",
    "PATCH_SAFETENSORS",
    "Patch",
    "PatchError",
    "PatchFormatError",
    "PatchMismatchError",
    "apply_patch",
    "apply_patches",
    "architecture_facts",
    "as_patch",
    "cast_patch",
    "chain_patches",
    "check_architecture",
    "combine_patches",
    "compose_patches",
    "describe",
    "export_lora",
    "load_patch",
    "load_state_dict_file",
    "lora_from_patch",
    "make_patch",
    "model_of",
    "read_lora",
    "revert_patch",
    "save_patch",
    "save_state_dict_file",
    "tensor_sha256",
]
