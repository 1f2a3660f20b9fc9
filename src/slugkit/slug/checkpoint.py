"""The gradient pass's checkpoints (:mod:`slugkit.slug.gradpass`, "Resume"): the command's fingerprint, the check
that a checkpoint directory belongs to this command, each rank's running sums with the digests of the pairs it read
(so that a resumed pass still reads each pair once) and its read counts, gathered over the ranks at the end of a
split. Only safetensors + JSON are written or read."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..common.tensorfile import read_metadata as _read_meta
from ..common.tensorfile import read_header, read_tensors, write_safetensors
from ..data.shards import ReadStats
from .distributed import gather_objects
from .gradfile import state_sha256

FORMAT = "slugkit-gradpass-1"


class CheckpointMismatchError(ValueError):
    """The checkpoint directory belongs to a different command (other data, model, batch size or world size)."""


def fingerprint(adapter, names: list[str], forget: list[str], retain: list[str], cfg, world: int) -> dict:
    """What identifies a pass (``cfg``: its :class:`~slugkit.slug.gradpass.PassConfig`): a checkpoint written under
    another fingerprint is not resumed (:func:`check_checkpoint_dir`)."""
    def files(paths):  # size and modification time: a shard rewritten in place at the same size (re-curated with
        # --overwrite, a caption edited) resumed with the old sums (twelfth trial)
        return [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] if os.path.isfile(p) else [p, *folder_stat(p)]
                for p in paths]

    return {
        "format": FORMAT,
        "model": json.loads(json.dumps(getattr(adapter, "model_id", {}), sort_keys=True, default=str)),
        "weights_sha256": state_sha256(adapter.model),
        "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "forget": files(forget),
        "retain": files(retain),
        "batch_size": cfg.batch_size,
        "world_size": world,
        "strict": cfg.strict,
        # the float sums' order, hence the bits, follow the CPU thread count: a resume under another count gave a
        # file matching neither uninterrupted run (trial 49); on a GPU it does not enter
        "cpu_threads": torch.get_num_threads() if _on_cpu(adapter) else None,
    }


def _on_cpu(adapter) -> bool:
    p = next(iter(adapter.model.parameters()), None)
    return p is None or p.device.type == "cpu"


def folder_stat(path: str) -> list[int]:
    """A captioned folder's [total bytes, newest modification time] (it was [-1, -1]: 50 images replaced in the
    folder resumed with the old sums; fourteenth trial)."""
    from ..data.folders import folder_files

    st = [q.stat() for q in folder_files(path)] if os.path.isdir(path) else []
    return [sum(x.st_size for x in st), max((x.st_mtime_ns for x in st), default=-1)] if st else [-1, -1]


def fingerprint_digest(fp: dict) -> str:
    """sha256 of a :func:`fingerprint` (its JSON, keys sorted)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def check_checkpoint_dir(ckdir: Path, fp: dict) -> None:
    """Refuse a checkpoint directory that holds files of another command, or files that are no gradient-pass
    checkpoint at all (a patch, a model, gradients: trial 48 was told to delete its patch folder) — the directory is
    the pass's working folder, emptied and removed on success, so it is not advised to delete one holding those."""
    if not ckdir.is_dir():
        return
    want = fingerprint_digest(fp)
    foreign = []
    for path in sorted(ckdir.glob("*.safetensors")):
        try:
            meta = _read_meta(path)
        except Exception:  # unreadable header: not ours to overwrite or delete
            foreign.append(path.name)
            continue
        if not str((meta.get("fingerprint") or {}).get("format", "")).startswith("slugkit-gradpass"):
            foreign.append(path.name)
    if foreign:
        raise CheckpointMismatchError(
            f"--checkpoint-dir {ckdir} holds {', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}, which "
            f"{'is' if len(foreign) == 1 else 'are'} no `slug grads` checkpoint: the checkpoint directory is the "
            "pass's own working folder (emptied and removed when the pass ends); pass a new folder, or leave the "
            "option out for OUT.ckpt beside the gradients file")
    for path in sorted(ckdir.glob("*.safetensors")):
        meta = _read_meta(path)
        if meta.get("digest") == want:
            continue
        old = meta.get("fingerprint", {})
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        changed = [f"{n[0]} ({'size' if n[1] != o[1] else 'modified since'})" for k in ("forget", "retain")
                   for n, o in zip(fp.get(k) or [], old.get(k) or []) if n[0] == o[0] and n != o]
        for k in ("forget", "retain"):  # a shard added or removed was not named ("differs in: retain"; trial 24)
            now, then = [e[0] for e in fp.get(k) or []], [e[0] for e in old.get(k) or []]
            changed += [f"{p} (added)" for p in now if p not in then] + [f"{p} (gone)" for p in then if p not in now]
        raise CheckpointMismatchError(
            f"checkpoint directory {ckdir} holds a checkpoint of a different command ({path.name} differs in: "
            f"{', '.join(diff) or 'format'}" + (f"; changed shards: {', '.join(changed)}" if changed else "")
            + "); rerun the original command to resume it" + (
                f" — with --threads {old['cpu_threads']}: it was written with {old['cpu_threads']} CPU "
                f"thread{'' if old['cpu_threads'] == 1 else 's'}, and "
                "the sums' bits follow the thread count" if "cpu_threads" in diff and old.get("cpu_threads") else "")
            + ", or delete the directory / pass another --checkpoint-dir to start over"
            + (" (the shards changed: the checkpoint's sums are of the old data)" if changed else ""))


def save_sums(path: Path, sums: dict[str, torch.Tensor], names: list[str], meta: dict,
              seen: set[bytes] | None = None) -> None:
    """Write a rank's checkpoint (or the forget spill): ``sums/<name>`` float32 sums, ``seen`` the [N, 16] uint8
    digests of the pairs read so far, ``meta`` as JSON (temp file + rename)."""
    tensors = {f"sums/{n}": sums[n] for n in names}
    if seen is not None:  # the split's pair digests so far, so that a resumed pass still reads each pair once
        tensors["seen"] = torch.frombuffer(bytearray(b"".join(seen)), dtype=torch.uint8).reshape(-1, 16) \
            if seen else torch.zeros(0, 16, dtype=torch.uint8)
    write_safetensors(path, tensors, {"slugkit": json.dumps(meta, sort_keys=True)})


def load_sums(path: Path, names: list[str], device) -> tuple[dict[str, torch.Tensor], dict]:
    """The sums :func:`save_sums` wrote, and its metadata."""
    sums = {k[len("sums/"):]: t for k, t in read_tensors(path, [f"sums/{n}" for n in names], device)}
    return sums, _read_meta(path)


def load_seen(path: Path) -> set[bytes]:
    """The pair digests :func:`save_sums` wrote (empty for a checkpoint of an older slugkit, which kept none)."""
    if "seen" not in read_header(path)[0]:
        return set()
    t = next(iter(read_tensors(path, ["seen"])))[1]
    return {bytes(row) for row in t.numpy()}


def gathered_stats(stats: ReadStats, units: list, seen: set[bytes]) -> ReadStats:
    """This split's read counts over every rank (rank 0's alone when every rank read every shard and kept its
    share of the batches), and the pairs that ranks read in different shards — each rank reads a pair once, so a
    pair repeated in a shard of another rank counts once per rank (a one-rank pass reads it once)."""
    everyone = gather_objects(stats.to_json())
    out = ReadStats.from_json(everyone[0])
    if any(u.part >= 0 for u in units) or len(everyone) == 1:
        return out
    for d in everyone[1:]:
        out.absorb(d)
    sets = gather_objects(seen)
    n_across = sum(len(a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    if n_across:
        out.note("across_ranks", f"{n_across} pair(s) are repeated in shards that different ranks read and count "
                                 "once per rank (a one-rank pass reads each once): remove the repeats from the shards")
    return out


def drop_checkpoint(ckdir: Path, rank_file: Path, spill: Path | None) -> None:
    """Remove this rank's checkpoint (and, with ``spill``: rank 0's part, the forget spill and the temp files of
    writes cut short by a kill), and the directory once empty (files not ours keep it)."""
    rank_file.unlink(missing_ok=True)
    if spill is not None:
        spill.unlink(missing_ok=True)
        for stale in ckdir.glob(".*.safetensors.*.tmp"):
            stale.unlink(missing_ok=True)
    try:
        ckdir.rmdir()
    except OSError:  # not empty (another rank's file, foreign files) or not there
        pass
