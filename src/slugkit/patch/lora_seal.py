"""Two small pieces of :mod:`slugkit.patch.lora` kept apart (its module stays under 400 lines): the seal of a LoRA
file (sha256 over its metadata and tensors, checked by :func:`slugkit.patch.lora.read_lora`) and the one-thread
block its factoring runs in."""

from __future__ import annotations

import contextlib
import json

import torch

from .format import tensor_sha256

SEAL_KEY = "slugkit.seal"


def lora_seal(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over a LoRA file's metadata (every entry but the seal, as stored) and its tensors' hashes: a hand edit
    of ``slugkit.verdict`` (``warn`` → ``pass``) was shown by ``slug inspect`` as the LoRA's own (trial 48). Like
    ``patch.json``'s fingerprint it catches edits, it is not a signature."""
    import hashlib

    doc = {"metadata": {k: v for k, v in sorted(metadata.items()) if k != SEAL_KEY},
           "tensors": {k: tensor_sha256(t) for k, t in sorted(tensors.items())}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside the block (BLAS / LAPACK results may depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
