"""The gradient pass at scale: streamed from shards, spread over ranks with ``torch.distributed``, resumable.

``compute_gradients`` takes in-memory batches; this module runs the *same* per-batch accumulation
(:func:`slugkit.slug.gradients.accumulate_batch`, the one copy of the loss logic) over webdataset shards or a
captioned folder, and is what ``slug grads`` runs (alone, or under ``torchrun``).

Work split and batches
    Each split (forget, retain) is a list of shards (``expand_urls``; a captioned folder is one "shard").
    Batches are formed **within a shard** (consecutive samples, the last batch of a shard may be partial), so the set
    of batches does not depend on the number of ranks. With ``W`` ranks, rank ``r`` takes shards ``r, r+W, ...``.
    If a split has fewer shards than ranks, every rank reads every shard of that split and keeps the batches whose
    index within the shard is ``≡ r (mod W)`` (batch, not sample, modulo: splitting samples would change the
    contrastive retain batches). Either way the union of the ranks' batches is exactly the single-process batches,
    so after the all-reduce the sums equal the single-process sums up to float32 summation order (≈1e-7 relative).
    The forget gradient is batch-size invariant anyway; the retain gradient depends on the batches (CLIP loss).

Distributed
    Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set) the process
    group is initialised with NCCL on GPUs, gloo on CPU; per-rank float32 sums and int64 sample counts are
    all-reduced (SUM) at the end of each split; rank 0 writes the output (atomically), the other ranks write nothing
    but their own checkpoints. Without those variables it is one plain process.

Resume
    After every finished shard (work unit) each rank writes ``<ckpt>/rank{r}-of-{W}.safetensors`` (temp file +
    ``os.replace``): its running float32 sums, its sample count and the ids of its completed units. At the end of the
    forget split rank 0 writes the all-reduced forget sums to ``<ckpt>/forget.safetensors`` and every rank starts the
    retain split from zero. Every file carries a fingerprint of the command (resolved shard paths, sizes and
    modification times, batch size, world size, strictness, model id, a SHA-256 of the candidate tensors and their
    names); a checkpoint directory holding a different fingerprint is refused (:class:`CheckpointMismatchError`),
    naming the shard that changed. A restart with the same command skips completed units and continues from the
    stored sums, so the result is bit-identical to an uninterrupted run; the output records the pass's provenance
    (:mod:`slugkit.slug.gradfile`). The checkpoint directory (default ``<out>.ckpt``) is deleted after success.
    Multi-node runs
    need it on a shared filesystem. Only safetensors + JSON are written or read (no pickle).

    ``SLUGKIT_TEST_SLEEP_AFTER_SHARD=<seconds>`` (test-only) sleeps after each checkpoint write, so a test can kill
    the process reliably mid-pass.

Memory: full mode vs ``stats_first``
    Common to both: each tensor's gradient is added to its float32 sum by a post-accumulate-grad hook as soon as
    backward produces it and then freed (no full ``.grad`` copy next to the sums), and checkpoints / outputs are
    written tensor by tensor (no serialised copy in memory). Full mode returns both mean gradients of every candidate
    tensor, like ``compute_gradients``: its peak is the model + one batch's activations + TWO float32 copies of the
    candidate tensors (ḡ_f and ḡ_r at the end).

    ``stats_first`` keeps, per candidate tensor, only the three float64 scalars ‖ḡ_f‖², ‖ḡ_r‖², ⟨ḡ_f, ḡ_r⟩ (from
    which importance, alignment and the Pareto front follow exactly) and full gradients only for the front tensors.
    A squared norm of a mean gradient is quadratic in the sum, so it cannot be accumulated from per-batch scalars:
    each split's sum must be formed first. The design: the forget split accumulates the full forget sum (one float32
    copy of the candidates), all-reduces it, spills it to ``<ckpt>/forget.safetensors`` (it is that split's
    checkpoint anyway) and frees it; the retain split accumulates the full retain sum in a fresh accumulator; then
    the scalars are computed tensor by tensor, reading the forget sum back from the spill one tensor at a time (plain
    reads, no memory map). Peak: the model + one batch's activations + ONE float32 copy of the candidates + one
    tensor + the front tensors' gradients; disk: one float32 copy. It never costs a second forward/backward over the
    forget set, because the forget sum is on disk. Without that spill it would: with one accumulator, the forget
    pass gives ‖ḡ_f‖², the retain pass gives ḡ_r and ‖ḡ_r‖², and ⟨ḡ_f, ḡ_r⟩ (linear in ḡ_f) then needs a second
    forget pass streaming ⟨g_batch, ḡ_r⟩ — and the front tensors' ḡ_f one more (not implemented). Measured on a
    random CLIP with 145 MB of float32 candidates (ViT and text width 512 x 6 layers, 32 px, batch 4, CPU): extra
    peak RSS over the loaded model 320 MB full, 198 MB stats-first. Output: :func:`save_stats_first` (front
    gradients + ``stats/<name>`` scalars); :func:`rank_from_stats` gives the same
    :class:`~slugkit.slug.layers.LayerTable` as ``rank_layers`` on the full gradients.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..common.errors import EmptyForgetSetError, ShardError
from ..common.files import check_file_target, check_folder_target
from ..common.progress import vanishing_bar
from ..common.tensorfile import read_metadata as _read_meta
from ..common.tensorfile import read_tensors
from ..data.shards import ReadStats
from .distributed import all_reduce_sums, barrier, dist_info, gather_objects
from .gradfile import (list_shards, load_stats, provenance, save_full, save_stats_first,  # noqa: F401 (load_stats)
                       state_sha256)
from .checkpoint import (FORMAT, CheckpointMismatchError, check_checkpoint_dir, drop_checkpoint,  # noqa: F401
                         fingerprint, fingerprint_digest, gathered_stats, load_seen, load_sums, save_sums)
from .gradients import Gradients, NonFiniteGradientError, accumulate_batch, candidate_grads, check_finite, new_sums

SLEEP_ENV = "SLUGKIT_TEST_SLEEP_AFTER_SHARD"  # test-only: seconds to sleep after each checkpoint write
SPLITS = ("forget", "retain")


@dataclass
class PassConfig:
    forget: str
    retain: str
    out: str | None = None  # output .safetensors (written by rank 0); None: only return the result
    batch_size: int = 64
    checkpoint_dir: str | None = None  # default: <out>.ckpt
    stats_first: bool = False
    strict: bool = False
    progress: bool = False


@dataclass
class PassResult:
    grads: Gradients  # full mode: every candidate; stats_first: the front tensors only
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # stats_first: name -> [|g_f|^2, |g_r|^2, <g_f,g_r>]
    front: list[str] = field(default_factory=list)  # stats_first: front names (vision then language)
    read_stats: dict = field(default_factory=dict)  # split -> ReadStats
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- work units
@dataclass(frozen=True)
class Unit:
    split: str
    index: int  # shard index in the split
    path: str
    part: int = -1  # -1: the whole shard; else keep batches with index % world == part

    @property
    def id(self) -> str:
        return f"{self.split}:{self.index}" + (f":{self.part}" if self.part >= 0 else "")


def assign_units(split: str, shards: list[str], rank: int, world: int) -> list[Unit]:
    if len(shards) >= world:
        return [Unit(split, i, s) for i, s in enumerate(shards) if i % world == rank]
    return [Unit(split, i, s, rank) for i, s in enumerate(shards)]


def unit_batches(adapter, unit: Unit, batch_size: int, world: int, strict: bool, stats: ReadStats, device,
                 seen: set[bytes] | None = None):
    """``(images, tokens)`` batches of consecutive samples of one shard (the rank's share of them); ``seen``: the
    digests of the pairs this rank read in earlier shards of the split (a repeated pair is read once, as
    :func:`~slugkit.data.folders.iter_pairs` reads a whole spec)."""
    from ..data.folders import iter_pairs

    def make(buf):
        images = torch.stack([adapter.preprocess(s.image) for s in buf]).to(device)
        return images, adapter.tokenize([s.caption for s in buf]).to(device)

    buf, j = [], 0
    for s in iter_pairs(unit.path, strict=strict, stats=stats, seen=seen):
        buf.append(s)
        if len(buf) == batch_size:
            if unit.part < 0 or j % world == unit.part:
                yield make(buf)
            buf, j = [], j + 1
    if buf and (unit.part < 0 or j % world == unit.part):
        yield make(buf)


def small_shards_warning(n: int, batches: int, batch_size: int) -> list[str]:
    """The retain split's batches are formed within each shard: shards of fewer pairs than ``batch_size`` make smaller
    contrastive batches than ``slug unlearn``'s, which batches across shards — another retain gradient, maybe another
    layer (50 shards of 3 pairs at batch 64: cosine 0.82 to the in-process gradient, another layer; trial 24). Said
    when the pass formed more than 1.5 × the batches one stream of the same pairs would."""
    whole = -(-n // batch_size)
    if batches <= 1.5 * whole:
        return []
    return [f"the {n} retain pairs made {batches} batches of {n / batches:.1f} pairs on average (batches are formed "
            f"within each shard, and the shards hold fewer than --batch-size {batch_size}); `slug unlearn` forms "
            f"{whole} of up to {batch_size} across shards, so its retain gradient, and the layer it chooses, may "
            "differ from this file's: give the pairs as fewer, larger shards (a captioned folder is read as one), or "
            "let `slug unlearn` compute the gradients"]


# ---------------------------------------------------------------------------------------------- the pass
def _run_split(adapter, params, names, units, state, cfg, world, rank_file, fp, digest, rank, read_stats, device):
    """Accumulate one split over this rank's units, resuming from ``state`` and checkpointing after each unit."""
    split = units[0].split if units else None
    if state is not None:
        sums, count, done, seen, n_batches = state
    else:
        sums, count, done, seen, n_batches = new_sums(params, names), 0, [], set(), 0
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    for unit in units:
        if unit.id in done:
            continue
        batches = unit_batches(adapter, unit, cfg.batch_size, world, cfg.strict, read_stats, device, seen)
        if cfg.progress and rank == 0:
            batches = vanishing_bar(batches, desc=f"gradients: {unit.id}", unit="batch")
        for images, tokens in batches:
            count += accumulate_batch(adapter, params, names, sums, images, tokens, unit.split)
            n_batches += 1
        done.append(unit.id)
        save_sums(rank_file, sums, names, {"digest": digest, "fingerprint": fp, "split": split, "done": done,
                                           "count": count, "batches": n_batches, "read_stats": read_stats.to_json()},
                  seen)
        if sleep:
            time.sleep(sleep)
    return sums, count, seen, n_batches


def run_gradpass(adapter, cfg: PassConfig, names: list[str] | None = None) -> PassResult | None:
    """Run the pass on this rank; rank 0 returns the result (and writes ``cfg.out``), other ranks return None."""
    rank, world = dist_info()
    names = list(names if names is not None else adapter.candidate_names())
    dropped = {"forget": [], "retain": []}
    shards = {split: list_shards(getattr(cfg, split), dropped[split]) for split in ("forget", "retain")}
    for split, rows in dropped.items():
        for path, same in rows if rank == 0 else []:
            print(f"note: --{split}: {path} " + ("is listed twice" if path == same else f"is a copy of {same}")
                  + "; read once", file=sys.stderr)
    if cfg.checkpoint_dir is None and cfg.out is None:
        raise ValueError("the gradient pass needs an output file or a checkpoint directory")
    ckdir = Path(cfg.checkpoint_dir if cfg.checkpoint_dir is not None else f"{cfg.out}.ckpt")
    check_file_target(cfg.out, "--out names the .safetensors file to write")  # before any work or checkpoint
    check_folder_target(ckdir, "--checkpoint-dir names a folder")
    fp = fingerprint(adapter, names, shards["forget"], shards["retain"], cfg, world)
    digest = fingerprint_digest(fp)
    check_checkpoint_dir(ckdir, fp)
    rank_file = ckdir / f"rank{rank}-of-{world}.safetensors"
    spill = ckdir / "forget.safetensors"
    device = adapter.device

    state = None
    if rank_file.is_file():
        meta = _read_meta(rank_file)
        # a forget-split state is stale once the spill (the reduced forget sums) exists: do not load it
        if not (meta["split"] == "forget" and spill.is_file()):
            sums, _ = load_sums(rank_file, names, device)
            state = (meta["split"], (sums, int(meta["count"]), list(meta["done"]), load_seen(rank_file),
                                     int(meta.get("batches", 0))),
                     ReadStats.from_json(meta.get("read_stats") or {}))
    if rank == 0 and (state or spill.is_file()):
        print(f"resuming from {ckdir}: forget split {'done' if spill.is_file() else 'in progress'}, "
              f"{len(state[1][2]) if state else 0} unit(s) of the current split done on rank 0", file=sys.stderr)
    read_stats = {s: state[2] if state and state[0] == s else ReadStats() for s in SPLITS}
    timing = {}
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with candidate_grads(adapter.model, names) as params:
            t0 = time.perf_counter()
            if spill.is_file():  # forget split finished in an earlier run (the spill exists only after it)
                n_f = int(_read_meta(spill)["n"])
                read_stats["forget"] = ReadStats.from_json(_read_meta(spill).get("read_stats") or {})
            else:
                st = state[1] if state and state[0] == "forget" else None
                units = assign_units("forget", shards["forget"], rank, world)
                f_sums, n_f, seen, _ = _run_split(adapter, params, names, units, st, cfg, world, rank_file, fp,
                                                  digest, rank, read_stats["forget"], device)
                n_f = all_reduce_sums(f_sums, n_f, names, device)
                read_stats["forget"] = gathered_stats(read_stats["forget"], units, seen)
                if n_f == 0:
                    raise EmptyForgetSetError(
                        f"the forget set {cfg.forget} yielded no usable image–caption pairs "
                        f"({read_stats['forget'].diagnosis()}); a zero gradient would silently unlearn nothing")
                if rank == 0:
                    save_sums(spill, f_sums, names, {"digest": digest, "fingerprint": fp, "split": "forget",
                                                      "n": n_f, "read_stats": read_stats["forget"].to_json()})
                del f_sums
                barrier()
            timing["forget"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            st = state[1] if state and state[0] == "retain" else None
            units = assign_units("retain", shards["retain"], rank, world)
            r_sums, n_r, seen, r_batches = _run_split(adapter, params, names, units, st, cfg, world, rank_file, fp,
                                                      digest, rank, read_stats["retain"], device)
            r_batches = sum(gather_objects(r_batches))  # a rank's share of a shard's batches: their sum is all
            n_r = all_reduce_sums(r_sums, n_r, names, device)
            read_stats["retain"] = gathered_stats(read_stats["retain"], units, seen)
            if n_r == 0:
                raise ValueError(f"the retain set {cfg.retain} yielded no usable image–caption pairs "
                                 f"({read_stats['retain'].diagnosis()}); alignment cannot be measured")
            timing["retain"] = time.perf_counter() - t1
    except (ShardError, ValueError):  # bad input: the data must change, and with it the fingerprint, so the
        # checkpoint could never be resumed — it blocked the corrected rerun ("holds a checkpoint of a different
        # command"; trial 25)
        drop_checkpoint(ckdir, rank_file, spill if rank == 0 else None)
        raise
    finally:
        adapter.model.train(was_training)

    result = None
    if rank == 0:
        # what was read and skipped, and the batching (the gradients depend on it: gradfile.batching_record), kept
        # in the file: `slug grads` said nothing of the pairs it skipped (trial 24)
        prov = {**provenance(fp, names, adapter), "batch_size": cfg.batch_size, "retain_batches": r_batches,
                "read_stats": {s: read_stats[s].as_dict() for s in SPLITS},
                "shards_read_once": {s: [list(x) for x in dropped[s]] for s in SPLITS if dropped[s]}}
        retain = r_sums  # divided in place: no second copy (same op, same bits as compute_gradients' sum / n)
        for n in names:
            retain[n].div_(n_r)
        if cfg.stats_first:
            result = _stats_first_result(adapter, names, spill, n_f, retain, n_r, device)
            if cfg.out:
                save_stats_first(cfg.out, result, prov)
        else:
            forget, _ = load_sums(spill, names, device)
            for n in names:
                forget[n].div_(n_f)
            check_finite(forget, retain)
            result = PassResult(Gradients(forget, retain, n_f, n_r))
            if cfg.out:
                save_full(cfg.out, result.grads, prov)
        result.grads.seconds = timing
        result.read_stats = {s: read_stats[s] for s in SPLITS}
        result.warnings = small_shards_warning(n_r, r_batches, cfg.batch_size)
    barrier()  # rank 0 has written the output: the checkpoints can go
    rank_file.unlink(missing_ok=True)
    barrier()
    if rank == 0:
        drop_checkpoint(ckdir, rank_file, spill)  # the spill, temp files of writes cut short by a kill, the folder
    return result


# ---------------------------------------------------------------------------------------------- stats-first
def _stats_first_result(adapter, names, spill: Path, n_f: int, retain: dict, n_r: int, device) -> PassResult:
    stats = {}
    for k, f_sum in read_tensors(spill, [f"sums/{n}" for n in names], device):
        n = k[len("sums/"):]
        gf = (f_sum / n_f).double()
        gr = retain[n].double()
        stats[n] = torch.stack([gf.pow(2).sum(), gr.pow(2).sum(), (gf * gr).sum()]).cpu()
        del f_sum, gf, gr
    bad = [n for n, s in stats.items() if not torch.isfinite(s).all()]
    if bad:
        raise NonFiniteGradientError(f"gradient has NaN/inf in {len(bad)} tensor(s), e.g. {bad[0]}; check the data "
                                     "(a corrupt image?) and use fp32 precision")
    table = rank_from_stats(adapter, stats, names)
    front = table.front_names()
    # full gradients of the front tensors and of the tensors that move with them (HF q/k/v, fc1/fc2 groups)
    keep = list(dict.fromkeys(m for n in front for m in adapter.group_of(n) if m in retain))
    forget = {k[len("sums/"):]: t / n_f for k, t in read_tensors(spill, [f"sums/{n}" for n in keep], device)}
    grads = Gradients(forget, {n: retain[n] for n in keep}, n_f, n_r)
    return PassResult(grads, stats, front)


def rank_from_stats(adapter, stats: dict[str, torch.Tensor], names: list[str] | None = None):
    """``rank_layers`` from the per-tensor scalars [‖ḡ_f‖², ‖ḡ_r‖², ⟨ḡ_f, ḡ_r⟩] (same rules, same order)."""
    from .layers import rank_from_scalars

    names = list(names if names is not None else adapter.candidate_names())
    scalars = {}
    for n in names:
        if n in stats:
            ff, rr, fr = (float(x) for x in stats[n].tolist())
            # torch.cosine_similarity: <x, y> / sqrt(max(|x|^2 |y|^2, eps^2)), eps = 1e-6 (as layers.alignment)
            scalars[n] = (math.sqrt(ff), math.sqrt(rr), abs(fr / math.sqrt(max(ff * rr, 1e-12))))
    return rank_from_scalars(adapter, scalars, names)
