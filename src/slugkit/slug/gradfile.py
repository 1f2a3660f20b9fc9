"""The gradients file of ``slug grads`` and ``slug unlearn --save-gradients``: its layout (``forget/<tensor>``,
``retain/<tensor>``, with ``--stats-first`` also ``stats/<tensor>``), its metadata, and the **provenance** that lets
``slug unlearn --gradients`` check the file belongs to its run: the sha256 of the model's parameters and of the
candidate tensors' names, and of each forget/retain shard's content. A file from another model or other pairs ran
silently — another person's gradients against this forget set lost 0.24 of the other identities (thirteenth
trial). Only safetensors + JSON are written or read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..common.tensorfile import write_safetensors
from ..data.shards import expand_urls
from .gradients import Gradients

FORMAT = "slugkit-gradients-1"


def list_shards(spec: str, dropped: list | None = None) -> list[str]:
    """Resolved shard paths of a spec, each read once; a captioned folder (no ``.tar`` inside) is one shard.

    A shard listed twice, and a shard file byte-identical to an earlier one (a copy under another name; only files
    of equal size are hashed), is left out — the streaming pass read it twice, its pairs weighted double in the
    gradients — as the in-process readers skip byte-identical pairs
    (:func:`slugkit.data.folders.iter_pairs`). Each one left out is appended to ``dropped`` as ``(path, the earlier
    path it repeats)``."""
    from ..data.folders import is_captioned_folder

    # a captioned folder is one shard, alone or as a part of a '::' list (`pool.tar::my_folder` was refused by
    # `slug grads` as "holds no .tar shards" while `slug unlearn` read it; trial 24)
    paths = [x for part in str(spec).split("::") if part.strip()
             for x in ([part.strip()] if is_captioned_folder(part.strip()) else expand_urls(part.strip()))]
    kept, by_size, digests = [], {}, {}
    for x in (str(Path(x).resolve()) for x in paths):
        same = x if x in kept else None
        if same is None and os.path.isfile(x):
            for other in by_size.get(os.path.getsize(x), []):
                for q in (other, x):
                    if q not in digests:
                        digests[q] = content_sha256(q)
                if digests[other] == digests[x]:
                    same = other
                    break
        if same is not None:
            if dropped is not None:
                dropped.append((x, same))
            continue
        kept.append(x)
        if os.path.isfile(x):
            by_size.setdefault(os.path.getsize(x), []).append(x)
    return kept


def state_sha256(model: torch.nn.Module) -> str:
    """sha256 over **every** state-dict tensor of ``model`` (name, dtype, shape, bytes), in name order: a gradient
    depends on the biases, norms and buffers too, not only on the candidate tensors it is taken of (a file computed
    with other biases passed a candidates-only check: fourteenth trial). Also ``slug compare``'s base-weights check."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(v.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def content_sha256(path: str) -> str:
    """sha256 of a shard's bytes (read in 1 MiB chunks); of a captioned folder, over its files' relative names and
    bytes, in name order."""
    from ..data.folders import folder_files

    h = hashlib.sha256()
    files = [Path(path)] if Path(path).is_file() else folder_files(path)
    for f in files:
        if f != Path(path):
            h.update(f"{f.relative_to(path)}\0".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _shards(paths: list[str]) -> list[list]:
    """``[[file name, sha256 of its content], ...]``: what travels with a shard to another machine (not its path,
    not its modification time). One more read of the pairs, which both commands read anyway."""
    return [[os.path.basename(p), content_sha256(p)] for p in paths]


def provenance(fp: dict, names: list[str], adapter=None) -> dict:
    """What a gradients file records of its pass (``fp``: :func:`slugkit.slug.gradpass.fingerprint`'s; ``adapter``:
    its family and precision, read back by :func:`check_provenance` and :func:`batching_record`)."""
    return {"weights_sha256": fp["weights_sha256"], "names_sha256": fp["names_sha256"],
            "forget": _shards([e[0] for e in fp["forget"]]), "retain": _shards([e[0] for e in fp["retain"]]),
            **_model_record(adapter)}


def _model_record(adapter) -> dict:
    """``{"family", "precision"}`` of the adapter a file's gradients were computed with (trial 39: a file of the
    hf_clip family was said to be "for other model weights", and one computed in bf16 was used in fp32 silently)."""
    if adapter is None:
        return {}
    return {"family": getattr(adapter, "family", None), "precision": getattr(adapter, "precision", None)}


def run_provenance(adapter, names: list[str], specs: dict[str, str | None], batching: dict | None = None) -> dict:
    """The provenance of gradients computed in-process (``slug unlearn --save-gradients``): the unedited model's
    weights, the candidate names, each given split's shards (``specs``: ``{"forget": spec or None, ...}``; the
    world's generated pairs have none) and ``batching`` (``{"batch_size", "retain_batches"}``).
    (An older slugkit's file recorded none of it, so only its pair counts are checked when it is read back with
    ``--gradients``.)"""
    prov = {"weights_sha256": state_sha256(adapter.model),
            "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
    prov.update({split: _shards(list_shards(spec)) for split, spec in specs.items() if spec})
    prov.update(batching or {})
    prov.update(_model_record(adapter))
    return prov


def read_provenance(path: str | Path) -> dict | None:
    """The provenance a gradients file records (None: a file of an older slugkit's, which recorded none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("slugkit", "{}"))
    return meta.get("provenance")


def batching_record(path: str | Path, batch_size: int, n_retain: int, precision: str | None = None) -> dict:
    """How the gradients file at ``path`` batched its retain pairs, beside this run's ``batch_size`` (``n_retain``:
    the retain pairs the run read): ``{"batch_size", "retain_batches", "run_batch_size", "run_retain_batches",
    "warnings"}`` (a file of an older slugkit records no batching: ``None`` values, no warning).

    The retain loss is CLIP's contrastive loss, whose negatives are the batch's other pairs, so the retain gradient —
    and the alignments and the layer it chooses — depends on how the pairs were batched (the forget gradient, an exact
    sample mean, does not; spec §1): a file computed at another ``--batch-size``, or over shards of fewer pairs than
    a batch (``slug grads`` forms batches within each shard; :func:`slugkit.slug.gradpass.small_shards_warning`),
    holds another gradient than this run would compute, and ``slug unlearn --gradients`` used it without a word.
    Said, not refused: it is still a valid SLUG gradient of the same pairs."""
    prov = read_provenance(path) or {}
    bs, made = prov.get("batch_size"), prov.get("retain_batches")
    rec = {"batch_size": bs, "retain_batches": made, "run_batch_size": batch_size,
           "run_retain_batches": -(-n_retain // batch_size), "warnings": []}
    why = ("the retain loss is CLIP's contrastive loss, whose negatives are the batch's other pairs, so the retain "
           "gradient, and the layer it chooses, may differ from the one this run would compute")
    if bs is not None and bs != batch_size:
        rec["warnings"].append(f"{path} was computed at --batch-size {bs}, this run's is {batch_size}: {why}; pass "
                               f"--batch-size {bs} (the later stages batch with it too), or recompute the file")
    elif made and n_retain and made > 1.5 * rec["run_retain_batches"]:
        rec["warnings"].append(
            f"{path} formed its {n_retain} retain pairs into {made} batches of {n_retain / made:.1f} pairs on average "
            f"(`slug grads` batches within each shard), this run would form {rec['run_retain_batches']} of up to "
            f"{batch_size}: {why}; give the pairs as fewer, larger shards (a captioned folder is read as one), or let "
            "`slug unlearn` compute the gradients")
    made_in = prov.get("precision")
    if precision is not None and made_in is not None and made_in != precision:  # said, not refused, as batching
        rec["warnings"].append(f"{path} was computed in {made_in} (--precision), this run is {precision}: the "
                               "gradients carry that precision's rounding, so the layer ranking may differ from the "
                               f"one this run would compute; pass --precision {made_in}, or recompute the file")
    return rec


def check_provenance(path: str | Path, adapter, names: list[str], specs: dict[str, str]) -> None:
    """Raise ``ValueError`` when the gradients file at ``path`` was computed for other candidate weights than
    ``adapter``'s or on other forget/retain shards than ``specs`` (``{"forget": spec, "retain": spec}``) name; a file
    without provenance is not checked (its pair counts still are)."""
    prov = read_provenance(path)
    if not prov:
        return
    made_by = prov.get("family")
    if made_by and made_by != getattr(adapter, "family", made_by):  # it blamed the weights (trial 39)
        raise ValueError(f"{path} was computed with --family {made_by} (its tensors carry that family's names), "
                         f"this run is --family {adapter.family}: pass --family {made_by}, or recompute it (slug "
                         "grads)")
    if prov.get("weights_sha256") == state_sha256(adapter.model) and \
            prov.get("names_sha256") != hashlib.sha256("\n".join(names).encode()).hexdigest():
        # the same weights, other candidates: it blamed the weights (trial 26)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:  # its full gradients: every candidate, or a stats-first front
            held = sum(1 for k in f.keys() if k.startswith("forget/"))
        raise ValueError(f"{path} was computed for other candidate tensors than this run's (it holds the gradients "
                         f"of {held} tensors; this run has {len(names)} candidates; the model's weights are the "
                         "same): pass the --consumer / --clip-skip it was computed with, or recompute it (slug grads)")
    if prov.get("names_sha256") != hashlib.sha256("\n".join(names).encode()).hexdigest() or \
            prov.get("weights_sha256") != state_sha256(adapter.model):
        raise ValueError(f"{path} was computed for other model weights than this run's (the sha256 of its "
                         "parameters differs): pass the --model/--pretrained it was computed with, or recompute it "
                         "(slug grads)")
    for split, spec in specs.items():
        here = _shards(list_shards(spec))
        if split in prov and [d for _, d in here] != [d for _, d in prov[split]]:  # names may differ: a copy
            raise ValueError(f"{path} was computed on other {split} pairs ({_names(prov[split])}) than --{split} "
                             f"{spec} holds ({_names(here)}; compared by content): pass the pairs it was computed on, "
                             "or recompute it (slug grads)")


def _names(entries) -> str:
    shown = ", ".join(f"{n} sha256 {d[:12]}" for n, d in entries[:3])
    return shown + (f", … {len(entries)} in all" if len(entries) > 3 else "")


def save_full(path: str | Path, g: Gradients, prov: dict | None = None) -> None:
    """``Gradients.save``'s layout and metadata, written tensor by tensor (no serialised copy in memory), with the
    pass's provenance."""
    tensors = {f"forget/{k}": v for k, v in g.forget.items()}
    tensors.update({f"retain/{k}": v for k, v in g.retain.items()})
    meta = {"format": FORMAT, "n_forget": g.n_forget, "n_retain": g.n_retain, **({"provenance": prov} if prov else {})}
    write_safetensors(path, tensors, {"slugkit": json.dumps(meta, sort_keys=True)})


def save_stats_first(path: str | Path, result, prov: dict | None = None) -> None:
    """Front gradients (``forget/``, ``retain/``; readable by ``Gradients.load``) + ``stats/<name>`` scalars."""
    g = result.grads
    tensors = {f"forget/{k}": v for k, v in g.forget.items()}
    tensors.update({f"retain/{k}": v for k, v in g.retain.items()})
    tensors.update({f"stats/{k}": v for k, v in result.stats.items()})
    meta = {"format": FORMAT, "n_forget": g.n_forget, "n_retain": g.n_retain, "stats_first": True,
            "front": result.front, "stats": "float64 [|g_f|^2, |g_r|^2, <g_f, g_r>] of the mean gradients",
            **({"provenance": prov} if prov else {})}
    write_safetensors(path, tensors, {"slugkit": json.dumps(meta, sort_keys=True)})


def load_stats(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k.split("/", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith("stats/")}
