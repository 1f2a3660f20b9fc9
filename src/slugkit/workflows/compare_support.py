"""What ``slug compare`` measures and how each method is started, shared by the joint and the sequential runs.

Per method (``compare.json``):

* ``metrics.before`` / ``metrics.after``: test-suite metrics, the keys of ``result.json``; ``metrics.validation_*``;
* ``time_s``: wall clock of the unlearning procedure **including** the validation it needs to pick its result —
  SLUG: gradients + layer ranking + step-size search (``timing_s`` of ``run_unlearn``); baselines: pre-computation
  (SalUn's mask, SSD's importances) + updates + per-epoch validation. Excluded: model and data loading, the test
  evaluation, the MIA;
* ``cpu_s``: CPU seconds of the process over the same work (``time.process_time``; SLUG: over the same stages of
  ``run_unlearn`` — every round's gradients, the neighbour projection, every search — its ``result.json → cpu_s``;
  it was taken over a replay of round 1 alone, a third of a two-layer run's: eleventh trial). With one torch thread
  this is close to the wall time on an idle machine and, unlike it, barely moves when other jobs share the CPU;
* ``peak_mem_bytes``: peak resident-set growth of the process over the method (:class:`PeakRSS`: the kernel's
  high-water mark ``VmHWM``, reset at the method's start; where that cannot be reset, sampled every 5 ms from
  ``/proc/self/statm``) (``resource.getrusage`` ``ru_maxrss`` is a process-lifetime high-water mark and says nothing
  about the second method of a run; ``tracemalloc`` does not see torch's allocator). On CUDA devices
  ``torch.cuda.max_memory_allocated`` is recorded as well. Freed heap memory is handed back to the OS
  (``malloc_trim``) before each window. For SLUG the window is a replay of its gradient / ranking / search stages with
  the same functions on the data already in memory (``run_unlearn`` also loads data and builds evaluators) — round
  1's paper step only, so a lower bound for a run the neighbour projection or a second layer adds to. RSS growth is a
  coarse measure (allocator reuse can hide memory): read it as an order of magnitude;
* ``storage_bytes``: what a user must keep to hold the result: SLUG's ``patch.safetensors``; for the baselines the
  bytes of every tensor whose values changed (``changed_params`` counts the changed scalars; a sparse form — SalUn's
  values + bit-packed mask — would be smaller, see ``storage_sparse_bytes``);
* ``passes``: forward/backward passes (batches and samples) of training/gradient computation, plus evaluation
  forwards; SLUG's are derived from its data sizes and search trajectory;
* ``mia``: the SLUG-repo MIA (``slugkit.eval.mia``) on forget pairs vs held-out pairs of the concept;
* ``epochs`` (per-epoch validation metrics), ``selected_epoch``.

Held-out (non-member) pairs for the embedded world: the first ``mia_heldout`` (default 100) samples of the
concept from the world's ``test`` split with their captions (``world.make_samples("test", "identity", k,
classes=[target])``); no test-split image is ever trained on. The first 50 of them are the concept's test images.

The functions here take the comparison's :class:`~slugkit.workflows.compare.CompareConfig` as ``cc``.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from ..slug.gradfile import state_sha256

PEAK_MEM_NOTE = ("peak RSS growth over the method after gc + malloc_trim: the kernel's VmHWM, reset at the start "
                 "(/proc/self/clear_refs), else sampled every 5 ms from /proc/self/statm; "
                 "SLUG: replay of its gradient/ranking/search stages")


def peak_mem_method() -> str:
    """What :class:`PeakRSS` measures with in this process: ``"hwm"`` (the kernel's mark can be reset) or
    ``"sampled"``. Probes by resetting the mark, so call it when no window is open (else: ``"sampled"``)."""
    with _OPEN_LOCK:
        if _OPEN_WINDOWS[0]:
            return "sampled"
        return "hwm" if _reset_hwm() else "sampled"


def _release_free_memory() -> None:
    """gc + glibc ``malloc_trim(0)``: hand freed heap pages back to the OS so that RSS growth measures new memory."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _status_kib(field: str) -> int | None:
    """``field`` (e.g. ``"VmHWM"``) of ``/proc/self/status`` in KiB, None where there is no such file or line."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0); True when the reset took
    (``VmHWM`` now within 4 MiB of ``VmRSS``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm - rss <= 4096


_OPEN_WINDOWS = [0]  # PeakRSS windows open in this process (a nested one must not reset the outer one's mark)
_OPEN_LOCK = threading.Lock()


class PeakRSS:
    """Peak growth of the resident set size over a ``with`` block, in bytes (:attr:`bytes`, read after the block).

    ``method="auto"``: the kernel's own high-water mark (``VmHWM`` of ``/proc/self/status``), reset at entry through
    ``/proc/self/clear_refs`` — exact, and free for the measured code. Where the reset is refused or not honoured
    (not Linux, some sandboxes), inside another open window (a reset would erase the outer window's peak), or with
    ``method="sampled"``: RSS sampled every ``interval`` seconds (> 0) by a thread. That thread takes the GIL 200
    times a second; measured on SLUG on the embedded canvas (2 torch threads, many small operations), the watched run
    took 3.4 s instead of 2.7 s — which is why it is only the fallback (a peak shorter than ``interval`` can also
    escape it). :attr:`mode` says which was used: ``"hwm"`` or ``"sampled"``. Side effect of the reset: the
    process's lifetime peak (``getrusage`` ``ru_maxrss``, ``/usr/bin/time``'s maximum RSS) afterwards reports the
    largest peak since the last window opened, not since the process started. ``ValueError`` for another
    ``method`` or a non-positive ``interval``. An instance can be entered again (each window starts afresh)."""

    def __init__(self, interval: float = 0.005, *, method: str = "auto"):
        if method not in ("auto", "sampled"):
            raise ValueError(f"PeakRSS method must be 'auto' or 'sampled', not {method!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise ValueError(f"PeakRSS interval must be a number of seconds > 0, not {interval!r}")
        self.interval = float(interval)
        self.method = method
        self.mode = None
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
        self._thread = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # pragma: no cover - non-Linux
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        _release_free_memory()
        with _OPEN_LOCK:
            outermost = _OPEN_WINDOWS[0] == 0
            _OPEN_WINDOWS[0] += 1
        self.mode = "hwm" if self.method == "auto" and outermost and _reset_hwm() else "sampled"
        self.start = self._rss()
        self.peak = self.start
        self._stop.clear()
        self._thread = None
        if self.mode == "sampled":
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        with _OPEN_LOCK:
            _OPEN_WINDOWS[0] -= 1
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        hwm = _status_kib("VmHWM") if self.mode == "hwm" else None
        self.peak = max(self.peak, self._rss(), (hwm or 0) * 1024)

    @property
    def bytes(self) -> int:
        """The peak growth in bytes (0 if the set shrank); final once the ``with`` block has exited."""
        return max(0, self.peak - self.start)


class Base:
    """The pristine weights and their hash; :meth:`restore` puts them back and checks the hash."""

    def __init__(self, adapter):
        from ..methods.base import snapshot

        self.adapter = adapter
        self.state = snapshot(adapter.model)
        self.sha256 = state_sha256(adapter.model)

    def restore(self, what: str) -> str:
        """Load the base weights and return their hash; raise (naming ``what``) if it is not the base's."""
        self.adapter.model.load_state_dict(self.state)
        h = state_sha256(self.adapter.model)
        if h != self.sha256:
            raise RuntimeError(f"{what}: the model does not start from the base weights (sha256 mismatch)")
        return h

    def check_unchanged(self, what: str) -> None:
        """Raise if ``what`` (SLUG's run, which must revert its own patch) left the model edited."""
        if state_sha256(self.adapter.model) != self.sha256:
            raise RuntimeError(f"{what} left the model edited")


def start_method(cc, base: Base, name: str, mode: str = "") -> dict:
    """Before each method: the base weights restored (hash-checked), the seed set, the CUDA peak reset; returns the
    method's entry with its start hash."""
    start_hash = base.restore(name)
    torch.manual_seed(cc.seed)
    if cc.progress:
        print(f"[compare] {mode}{name} ...", flush=True)
    _reset_cuda_peak()
    return {"method": name, "start_sha256": start_hash}


def _reset_cuda_peak() -> None:
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        torch.cuda.reset_peak_memory_stats()  # each method's own peak, not the whole run's


def record_cuda_peak(entry: dict) -> None:
    """``cuda_max_memory_allocated``: the method's peak GPU memory (since :func:`start_method`), when a GPU
    exists."""
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        entry["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()


def make_baseline(cc, name: str):
    """The baseline ``name`` with the comparison's settings (epochs, lr or lr sweep, selection rule, SalUn/SSD)."""
    from ..methods import ALPHA_GRID, LRSweep, make_method

    kw = {"epochs": cc.epochs, "select_metric": cc.select_metric}
    if name in ("ga", "gaft") or name.startswith("salun"):
        kw["forget_loss"] = cc.forget_loss
    if name.startswith("salun"):
        kw.update(threshold=cc.salun_threshold, importance_batch_size=cc.importance_batch_size)
    if name == "salun-rl":
        kw["rl_forget_fraction"] = cc.rl_forget_fraction
    if name.startswith("ssd"):
        kw.update(importance_loss=cc.ssd_importance_loss, importance_batch_size=cc.importance_batch_size)
    if name == "ssd":
        kw.update({"alpha": cc.ssd_alpha} if cc.ssd_alpha is not None else {"alphas": ALPHA_GRID})
    elif name == "ssd-cumulative" and cc.ssd_alpha is not None:
        kw["alpha"] = cc.ssd_alpha
    sweep = cc.lr_sweep and not name.startswith("ssd") and name != "ft" and cc.lr.get(name) is None
    if sweep:
        return LRSweep(lambda lr: make_method(name, lr=lr, **kw), cc.lr_sweep, cc.select_metric)
    return make_method(name, lr=cc.lr.get(name), **kw)


def evaluator(adapter, cfg, identities: str, utility: str | None, cache: dict | None):
    """``(suite, SuiteEvaluator)`` for these folders and ``cfg``'s concepts; built on the base weights and shared
    between the modes of one comparison through ``cache`` (the evaluator's base features are those weights')."""
    from ..eval.zeroshot import SuiteEvaluator
    from .inputs import build_suite

    key = (identities, utility, tuple(cfg.concept_list()), cfg.names, cfg.related_names,
           tuple(cfg.identity_templates), str(cfg.utility_templates), cfg.utility_classnames, cfg.eval_batch_size)
    if cache is not None and key in cache:
        return cache[key]
    suite = build_suite(adapter, cfg, identities, utility)
    pair = (suite, SuiteEvaluator(adapter, suite, cfg.eval_batch_size))
    if cache is not None:
        cache[key] = pair
    return pair


def mia_heldout(cc, adapter, cfg, concepts: list[str]):
    """The MIA's held-out (non-member) pairs: ``cc.mia_heldout_pairs`` if given, the world's test-split samples of
    the concepts on the embedded world, else None (no MIA)."""
    from .inputs import load_pairs

    if cc.mia_heldout_pairs:
        return load_pairs(adapter, cc.mia_heldout_pairs, cc.mia_heldout, cfg.strict, "held-out")[:2]
    if cc.unlearn is None:
        return _heldout_pairs(adapter, concepts, cc.mia_heldout)
    return None  # no held-out pairs given: no MIA


def _heldout_pairs(adapter, concepts: list[str], k: int):
    """``k`` held-out captioned pairs of each concept from the world's test split (never trained on)."""
    from ..world import render as world

    classes = [world.identity_by_name(c).index for c in concepts]
    samples = world.make_samples("test", "identity", k, classes=classes)
    imgs = torch.stack([adapter.preprocess(s.image) for s in samples])
    return imgs, adapter.tokenize([s.caption for s in samples])


def mia_runner(adapter, forget_pairs, heldout):
    """A function running the MIA of ``forget_pairs`` vs ``heldout`` on the model as it is then (None without
    held-out pairs)."""
    from ..eval.mia import mia

    def run():
        return mia(adapter, forget_pairs, heldout) if heldout is not None else None

    return run


def changed_storage(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> dict:
    """Bytes of the tensors whose values differ from ``base``, the number of changed scalars, a sparse estimate."""
    dense, changed, sparse, tensors = 0, 0, 0, 0
    for k, v in model.state_dict().items():
        b = base[k]
        if torch.equal(v, b):
            continue
        diff = int((v != b).sum())
        changed += diff
        tensors += 1
        dense += v.numel() * v.element_size()
        sparse += min(v.numel() * v.element_size(), diff * v.element_size() + (v.numel() + 7) // 8)
    return {"storage_bytes": dense, "changed_params": changed, "changed_tensors": tensors,
            "storage_sparse_bytes": sparse}


METHOD_STAGES = ("gradients", "layers", "neighbours", "search")  # SLUG's unlearning procedure in run_unlearn's timings


def slug_cost(result: dict) -> tuple[float, float]:
    """``(time_s, cpu_s)`` of SLUG's unlearning procedure in a ``result.json``: its :data:`METHOD_STAGES`, every
    round (a later round's gradients are in "gradients", its search in "search")."""
    t, c = result["timing_s"], result.get("cpu_s") or {}
    return sum(t.get(k, 0.0) for k in METHOD_STAGES), sum(c.get(k, 0.0) for k in METHOD_STAGES)


def slug_replay(adapter, cfg, f_img, f_tok, r_img, r_tok, val_eval, val_before) -> tuple[int, float]:
    """Peak RSS growth and CPU seconds of SLUG's round-1 paper step (gradients, layer ranking, search) replayed
    with the functions ``run_unlearn`` calls, on the data and validation evaluator already in memory (``run_unlearn``
    itself also loads data and builds evaluators, which the baselines' window does not include). Its memory is
    what ``compare.json`` records (a lower bound: module docstring); its CPU seconds are not (:func:`slug_cost`)."""
    from ..slug.gradients import compute_gradients
    from ..slug.layers import rank_layers
    from ..slug.search import choose_layer, search_layers
    from .inputs import batches

    names, bs = adapter.candidate_names(), cfg.batch_size
    with PeakRSS() as pm:
        c0 = time.process_time()
        grads = compute_gradients(adapter, batches(f_img, f_tok, bs), batches(r_img, r_tok, bs), names,
                                  progress=False, n_forget_batches=-(-len(f_img) // bs),
                                  n_retain_batches=-(-len(r_img) // bs))
        table = rank_layers(adapter, grads, names)
        ratios = {r.name: r.ratio for r in table.rows}
        searches = search_layers(adapter, grads, table.front_names(), ratios, val_eval, cfg.search,
                                 cached=cfg.cached_search, progress=False)
        choose_layer(searches, cfg.search.selection, val_before)
        cpu = time.process_time() - c0
    return pm.bytes, cpu


def slug_passes(result: dict) -> dict:
    """SLUG's passes, derived from a ``result.json``'s data sizes, rounds and search trajectory: one gradient pass
    over D_f and D_r per round (``layers_edited``; it said "one" for a two-layer run: eleventh trial)."""
    n_f, n_r = result["data"]["n_forget"], result["data"]["n_retain"]
    val = result["data"]["val_sizes"]
    n_eval = len(result["search"])
    rounds = max([e.get("round", 1) for e in result.get("layers_edited") or []] + [1])
    nb = (result.get("neighbour_protection") or {}).get("k") or 0
    return {"forward_samples": rounds * (n_f + n_r), "backward_samples": rounds * (n_f + n_r),
            "gradient_passes": rounds, "search_evaluations": n_eval,
            "eval_forward_images_upper_bound": n_eval * (val["forget"] + val["related"] + val["utility"]),
            "note": f"{rounds} gradient pass(es) over D_f and D_r (one per edited layer's round)"
                    + (f", plus the alignment gradients of the {nb} nearest neighbours' retain pairs the step is "
                       "projected off" if nb else "")
                    + "; each search evaluation re-runs only the edited tower from the cached activations entering "
                      "the edited block"}


def add_passes(total: dict, more: dict) -> dict:
    """``more``'s counts added into ``total`` (other values kept from the first)."""
    for k, v in more.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v
        else:
            total.setdefault(k, v)
    return total


def per_concept(before: dict, after: dict) -> dict | None:
    """{concept: {"before": {FA@1, FA@5}, "after": {...}}} when the suite has several concepts."""
    b, a = before.get("forget_by_concept"), after.get("forget_by_concept")
    if not b or not a:
        return None
    return {c: {"before": b[c], "after": a[c]} for c in b}
