"""``slug compare``: SLUG and the baselines (FT, GA, GA+FT, SalUn, SSD) on the same data, with their cost.

One process, one model load. Before every method the pristine weights are copied back and their sha256 (over every
state-dict tensor, in name order) is checked against the hash taken right after loading, so every method starts from
identical weights. All methods see the same forget/retain pairs (curated once), the same validation suite (for the
search / per-epoch selection) and the same test suite (the reported metrics).

Per method (``compare.json``):

* ``metrics.before`` / ``metrics.after``: test-suite metrics, the keys of ``result.json``; ``metrics.validation_*``;
* ``time_s``: wall clock of the unlearning procedure **including** the validation it needs to pick its result —
  SLUG: gradients + layer ranking + step-size search (``timing_s`` of ``run_unlearn``); baselines: pre-computation
  (SalUn's mask, SSD's importances) + updates + per-epoch validation. Excluded: model and data loading, the test
  evaluation, the MIA;
* ``cpu_s``: CPU seconds of the process over the same work (``time.process_time``; SLUG: over the replay below).
  With one torch thread this is close to the wall time on an idle machine and, unlike it, barely moves when other
  jobs share the CPU;
* ``peak_mem_bytes``: peak resident-set growth of the process over the method, sampled every 5 ms from
  ``/proc/self/statm`` (``resource.getrusage`` ``ru_maxrss`` is a process-lifetime high-water mark and says nothing
  about the second method of a run; ``tracemalloc`` does not see torch's allocator). On CUDA devices
  ``torch.cuda.max_memory_allocated`` is recorded as well. Freed heap memory is handed back to the OS
  (``malloc_trim``) before each window. For SLUG the window is a replay of its gradient / ranking / search stages with
  the same functions on the data already in memory (``run_unlearn`` also loads data and builds evaluators). RSS
  growth is a coarse measure (allocator reuse can hide memory): read it as an order of magnitude;
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

Any other model (or the embedded one with explicit data) takes the data flags of ``slug unlearn`` through
``CompareConfig.unlearn`` (an ``UnlearnConfig``); the MIA then needs ``mia_heldout_pairs`` (captioned pairs of the
concept the model never saw, e.g. a held-out LAION/CC3M shard) and is skipped without it.

**Which result a baseline reports.** Each iterative baseline is validated after every epoch and reports the first
epoch whose validation ``select_metric`` is 0, else the epoch of its minimum; it stops there. The paper's rule is
FA@1 (``scripts/analyze_performance.py``); ``slug compare`` defaults to **FA@5** (``select_metric="forget_top5"``,
ties of the minimum broken by FA@1): that is SLUG's own search criterion (validation FA@5 = 0), so every method is
held to the same forgetting, and the issue's question is which methods reach FA@5 = 0. Under the FA@1 rule GA+FT
and SalUn stop one epoch early on the embedded model, with a quarter of the concept's test images still in the top
5 (FA@1 = 0 and FA@5 = 0 coincide in the paper's Table 1, so there the rules agree). ``--select-metric
forget_top1`` restores the paper's rule. Learning rates are each method's documented default (chosen on the
default identity's validation images, see ``slugkit.methods``) or, with ``lr_sweep``, the smallest rate of a grid
that meets the rule on this run's validation images, the whole sweep counted in the method's time
(:class:`slugkit.methods.LRSweep`). SSD sweeps its own α × λ grid unless ``ssd_alpha`` fixes α.

**Several concepts** (``concepts=[A, B, ...]``, ``slug compare --concepts A,B``), in one or both ``modes``:

* ``joint``: one forget set holding every concept (100 pairs each on the embedded world), a retain set naming none
  of them, one validation criterion over all the concepts' images (each scored against its own name); every method
  runs once. Outputs in ``out/joint/`` (SLUG's run in ``out/joint/slug``);
* ``sequential``: the concepts one after another, each step with its own forget and retain sets (curated for that
  concept, the retain pairs that name an earlier concept removed), validated on its own concept. SLUG runs
  :func:`slugkit.unlearn.run_sequential` (one run per concept on the already patched model; the patches folded with
  :func:`slugkit.patch.chain_patches` into ``out/sequential/slug/patch``); every baseline runs step k from the
  weights step k−1 left (a fresh optimizer per step). Time, passes and storage are summed / taken over all steps;
  peak memory is the largest step's.

Both modes report, on the same test images, each concept's FA@1/FA@5 (``per_concept``) and the shared utility and
related accuracy (identities that are none of the concepts). ``compare.json`` then holds ``{"concepts", "joint":
<report>, "sequential": <report>}``, each report shaped like the single-concept one. Sequential mode needs the
embedded world (one forget set per concept); with explicit data only ``joint`` is available.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

DEFAULT_METHODS = ("slug", "ft", "ga", "gaft", "salun", "ssd")
COMPARE_FILES = ("compare.json", "compare.md", "tradeoff.png")
MODES = ("joint", "sequential")


@dataclass
class CompareConfig:
    concept: str
    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    model: str = "embedded"
    data_dir: str | None = None
    epochs: int | None = None  # baselines; None: each method's default
    lr: dict = field(default_factory=dict)  # method -> lr override
    batch_size: int = 32  # baselines (official 32); SLUG keeps `slug unlearn`'s default so its numbers match
    select_metric: str = "forget_top5"  # baselines' epoch rule: first validation metric = 0 (paper: forget_top1)
    salun_threshold: float = 0.5
    forget_loss: str = "cos"  # GA / GA+FT / SalUn forget pass: mean cos (SLUG convention) or "clip" (the repo's _o)
    rl_forget_fraction: float | None = None  # salun-rl: share of relabelled pairs per batch (None: natural mix)
    importance_batch_size: int = 16  # SalUn saliency gradient and SSD importances (the repo's calc_grad batch)
    ssd_importance_loss: str = "split"  # SSD: split (cos on D_f, CLIP on D_r, the repo's), clip or cos on both
    ssd_alpha: float | None = None  # None: SSD sweeps ALPHA_GRID x LAMBDA_GRID; a number: that α with λ = 1
    lr_sweep: list[float] | None = None  # gradient baselines (not FT): smallest lr of this grid meeting the rule
    concepts: list[str] = field(default_factory=list)  # two or more: several identities (see ``modes``)
    modes: list[str] = field(default_factory=lambda: list(MODES))  # with ``concepts``: joint and/or sequential
    mia_heldout: int = 100  # held-out pairs for the MIA (embedded world: samples per concept; else a cap)
    mia_heldout_pairs: str | None = None  # real data: shards/folder of captioned pairs of the concept, never trained on
    unlearn: object | None = None  # an UnlearnConfig with explicit data (real models); None: the embedded world
    forget_samples: int | None = None  # caps (tests)
    retain_samples: int | None = None
    retain_identity_fraction: float | None = None  # embedded world: retain share of other identities (None: curated)
    device: str = "cpu"  # the model's device (data stays in CPU memory; every batch is moved before its forward)
    seed: int = 0
    threads: int | None = None
    overwrite: bool = False
    progress: bool = False

    def concept_list(self) -> list[str]:
        return list(self.concepts) if len(self.concepts) > 1 else [self.concept]


def state_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _release_free_memory() -> None:
    """gc + glibc ``malloc_trim(0)``: hand freed heap pages back to the OS so that RSS growth measures new memory."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class PeakRSS:
    """Peak growth of the resident set size over a ``with`` block, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()
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
        self.start = self._rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def bytes(self) -> int:
        return max(0, self.peak - self.start)


def _start_method(cc: CompareConfig, base: "_Base", name: str, mode: str = "") -> dict:
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


def _record_cuda_peak(entry: dict) -> None:
    """``cuda_max_memory_allocated``: the method's peak GPU memory (since :func:`_reset_cuda_peak`), when a GPU
    exists."""
    if torch.cuda.is_available():  # pragma: no cover - no GPU here
        entry["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()


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


def _slug_replay(adapter, cfg, f_img, f_tok, r_img, r_tok, val_eval, val_before) -> tuple[int, float]:
    """Peak RSS growth and CPU seconds of SLUG's unlearning stages (gradients, layer ranking, search) replayed with
    the functions ``run_unlearn`` calls, on the data and validation evaluator already in memory (``run_unlearn``
    itself also loads data and builds evaluators, which the baselines' window does not include)."""
    from ..slug.gradients import compute_gradients
    from ..slug.layers import rank_layers
    from ..slug.search import choose_layer, search_layers
    from .unlearn import _batches

    names, bs = adapter.candidate_names(), cfg.batch_size
    with PeakRSS() as pm:
        c0 = time.process_time()
        grads = compute_gradients(adapter, _batches(f_img, f_tok, bs), _batches(r_img, r_tok, bs), names,
                                  progress=False, n_forget_batches=-(-len(f_img) // bs),
                                  n_retain_batches=-(-len(r_img) // bs))
        table = rank_layers(adapter, grads, names)
        ratios = {r.name: r.ratio for r in table.rows}
        searches = search_layers(adapter, grads, table.front_names(), ratios, val_eval, cfg.search,
                                 cached=cfg.cached_search, progress=False)
        choose_layer(searches, cfg.search.selection, val_before)
        cpu = time.process_time() - c0
    return pm.bytes, cpu


def _heldout_pairs(adapter, concepts: list[str], k: int):
    """``k`` held-out captioned pairs of each concept from the world's test split (never trained on)."""
    from ..world import render as world

    classes = [world.identity_by_name(c).index for c in concepts]
    samples = world.make_samples("test", "identity", k, classes=classes)
    imgs = torch.stack([adapter.preprocess(s.image) for s in samples])
    return imgs, adapter.tokenize([s.caption for s in samples])


def _slug_passes(result: dict) -> dict:
    n_f, n_r = result["data"]["n_forget"], result["data"]["n_retain"]
    val = result["data"]["val_sizes"]
    n_eval = len(result["search"])
    return {"forward_samples": n_f + n_r, "backward_samples": n_f + n_r,
            "search_evaluations": n_eval,
            "eval_forward_images_upper_bound": n_eval * (val["forget"] + val["related"] + val["utility"]),
            "note": "one gradient pass over D_f and D_r; each search evaluation re-runs only the edited tower "
                    "from the cached activations entering the edited block"}


def _add_passes(total: dict, more: dict) -> dict:
    for k, v in more.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            total[k] = total.get(k, 0) + v
        else:
            total.setdefault(k, v)
    return total


def _per_concept(before: dict, after: dict) -> dict | None:
    """{concept: {"before": {FA@1, FA@5}, "after": {...}}} when the suite has several concepts."""
    b, a = before.get("forget_by_concept"), after.get("forget_by_concept")
    if not b or not a:
        return None
    return {c: {"before": b[c], "after": a[c]} for c in b}


def check_compare_out(out: Path, overwrite: bool) -> None:
    from ..common.errors import OutputExistsError

    if out.exists() and any((out / f).exists() for f in COMPARE_FILES + ("slug",) + MODES) and not overwrite:
        raise OutputExistsError(f"{out} already holds a comparison; pass --overwrite or choose another --out")


def make_baseline(cc: CompareConfig, name: str):
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


class _Base:
    """The pristine weights and their hash; :meth:`restore` puts them back and checks the hash."""

    def __init__(self, adapter):
        from ..methods.base import snapshot

        self.adapter = adapter
        self.state = snapshot(adapter.model)
        self.sha256 = state_sha256(adapter.model)

    def restore(self, what: str) -> str:
        self.adapter.model.load_state_dict(self.state)
        h = state_sha256(self.adapter.model)
        if h != self.sha256:
            raise RuntimeError(f"{what}: the model does not start from the base weights (sha256 mismatch)")
        return h


def _evaluator(adapter, cfg, identities: str, utility: str | None, cache: dict | None):
    """``(suite, SuiteEvaluator)`` for these folders and ``cfg``'s concepts; built on the base weights and shared
    between the modes of one comparison through ``cache`` (the evaluator's base features are those weights')."""
    from ..eval.zeroshot import SuiteEvaluator
    from .unlearn import build_suite

    key = (identities, utility, tuple(cfg.concept_list()), cfg.names, cfg.related_names,
           tuple(cfg.identity_templates), str(cfg.utility_templates), cfg.utility_classnames, cfg.eval_batch_size)
    if cache is not None and key in cache:
        return cache[key]
    suite = build_suite(adapter, cfg, identities, utility)
    pair = (suite, SuiteEvaluator(adapter, suite, cfg.eval_batch_size))
    if cache is not None:
        cache[key] = pair
    return pair


def _world_config(cc: CompareConfig, concept, out: Path):
    from .world_runs import world_config

    return world_config(concept, out, cc.data_dir, progress=cc.progress, seed=cc.seed, threads=cc.threads,
                        overwrite=cc.overwrite, forget_samples=cc.forget_samples, retain_samples=cc.retain_samples,
                        retain_identity_fraction=cc.retain_identity_fraction, device=cc.device)


def run_compare(cc: CompareConfig) -> dict:
    from ..methods import make_method
    from ..models import load_adapter

    concepts = cc.concept_list()
    multi = len(concepts) > 1
    if cc.retain_identity_fraction is not None and cc.unlearn is not None:
        raise ValueError("--retain-identity-fraction builds the embedded world's retain set; with explicit data "
                         "compose --retain yourself")
    if cc.unlearn is None and cc.model != "embedded":
        raise ValueError("slug compare needs the data flags of `slug unlearn` (--forget, --retain, --val-identities, "
                         "--test-identities, ...) for a model other than 'embedded'")
    for m in cc.methods:
        if m != "slug":
            make_method(m)  # raises ValueError on unknown names before any work
    if multi:
        bad = [m for m in cc.modes if m not in MODES]
        if bad or not cc.modes:
            raise ValueError(f"unknown mode(s) {bad or cc.modes}; choose from {', '.join(MODES)}")
        if "sequential" in cc.modes and cc.unlearn is not None:
            raise ValueError("sequential multi-concept comparison needs one forget set per concept: it runs on the "
                             "embedded world only; with explicit data use --modes joint (one --forget holding "
                             "every concept)")
    out = Path(cc.out)
    check_compare_out(out, cc.overwrite)
    if cc.threads:
        torch.set_num_threads(cc.threads)

    def config_for(concept, where: Path):
        if cc.unlearn is None:
            return _world_config(cc, concept, where)
        extra = {"concepts": list(concept), "concept": " + ".join(concept)} if isinstance(concept, list) else {}
        return replace(cc.unlearn, out=str(where), overwrite=cc.overwrite, progress=cc.progress, seed=cc.seed,
                       threads=cc.threads, **extra), None, None

    if not multi:
        cfg, cur, data_dir = config_for(cc.concept, out)
        adapter = load_adapter(cfg.model, cfg.pretrained, device=cfg.device, precision=cfg.precision)
        base = _Base(adapter)
        report = _compare_joint(cc, cfg, cur, data_dir, adapter, base, out, concepts, None)
        report.update({"config": asdict(cc), "threads": torch.get_num_threads()})
        out.mkdir(parents=True, exist_ok=True)
        _write_report(report, out)
        return report

    adapter, base, parts, cache = None, None, {}, {}
    for mode in [m for m in MODES if m in cc.modes]:
        if mode == "joint":
            cfg, cur, data_dir = config_for(concepts, out / "joint")
            if adapter is None:
                adapter = load_adapter(cfg.model, cfg.pretrained, device=cfg.device, precision=cfg.precision)
                base = _Base(adapter)
            parts["joint"] = _compare_joint(cc, cfg, cur, data_dir, adapter, base, out / "joint", concepts, cache)
        else:
            if adapter is None:
                adapter = load_adapter("embedded", device=cc.device)
                base = _Base(adapter)
            parts["sequential"] = _compare_sequential(cc, concepts, adapter, base, out / "sequential", cache)
    first = next(iter(parts.values()))
    report = {"concept": " + ".join(concepts), "concepts": concepts, "model": first["model"],
              "base_sha256": base.sha256, "original": first["original"], **parts,
              "config": asdict(cc), "threads": torch.get_num_threads()}
    out.mkdir(parents=True, exist_ok=True)
    _write_report(report, out)
    return report


def _write_report(report: dict, out: Path) -> None:
    from ..common.files import atomic_write_bytes
    from ..common.files import write_json

    write_json(out / "compare.json", report)
    plotted = report if "methods" in report else report.get("joint")
    if plotted is not None:
        tradeoff_plot(plotted, out / "tradeoff.png")
    atomic_write_bytes(out / "compare.md", render_compare(report).encode())


def _compare_joint(cc: CompareConfig, cfg, cur, data_dir, adapter, base: _Base, out: Path,
                   concepts: list[str], cache: dict | None) -> dict:
    """Every method once on one forget set (one concept, or several jointly); returns the report (not written)."""
    from ..methods import MethodData
    from ..patch import apply_patch, load_patch, revert_patch
    from .unlearn import load_pairs, run_unlearn

    f_img, f_tok, _ = load_pairs(adapter, cfg.forget, cfg.forget_samples, cfg.strict, "forget")
    r_img, r_tok, _ = load_pairs(adapter, cfg.retain, cfg.retain_samples, cfg.strict, "retain")
    val_suite, val_eval = _evaluator(adapter, cfg, cfg.val_identities, cfg.utility_val, cache)
    test_suite, test_eval = _evaluator(adapter, cfg, cfg.test_identities, cfg.utility_test, cache)
    before, val_before = test_eval.base_metrics(), val_eval.base_metrics()
    heldout = _mia_heldout(cc, adapter, cfg, concepts)
    run_mia = _mia_runner(adapter, (f_img, f_tok), heldout)
    mia_before = run_mia()
    data = MethodData(f_img, f_tok, r_img, r_tok, batch_size=cc.batch_size, seed=cc.seed)

    entries = {}
    for name in cc.methods:
        entry = _start_method(cc, base, name)
        if name == "slug":
            scfg = replace(cfg, out=str(out / "slug"), progress=False, overwrite=cc.overwrite)
            result = run_unlearn(scfg, adapter=adapter)
            t = result["timing_s"]
            entry.update({
                "metrics": result["metrics"],
                "time_s": t["gradients"] + t["layers"] + t["search"],
                "timing_s": {"precompute": t["gradients"] + t["layers"], "search": t["search"], "run_unlearn": t},
                **dict(zip(("peak_mem_bytes", "cpu_s"),
                           _slug_replay(adapter, cfg, f_img, f_tok, r_img, r_tok, val_eval, val_before))),
                "storage_bytes": result["patch"]["bytes"],
                "passes": _slug_passes(result),
                "epochs": [{"epoch": i + 1, "layer": e["layer"], "step_size": e["step_size"], "val": e["metrics"],
                            "accepted": e["accepted"]} for i, e in enumerate(result["search"])],
                "selected_epoch": None, "layer": result["layer"], "step_size": result["step_size"],
                "config": result["config"], "result": "slug/result.json",
            })
            if state_sha256(adapter.model) != base.sha256:
                raise RuntimeError("run_unlearn left the model edited")
            patch = load_patch(out / "slug" / "patch")
            apply_patch(adapter.model, patch)
            entry["changed_params"] = changed_storage(adapter.model, base.state)["changed_params"]
            entry["mia"] = run_mia()
            revert_patch(adapter.model, patch)
        else:
            method = make_baseline(cc, name)
            with PeakRSS() as pm:
                t0, c0 = time.perf_counter(), time.process_time()
                res = method.run(adapter, data, val_eval)
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            sel = next((e for e in res.epochs if e["epoch"] == res.selected_epoch), None)
            after = test_eval.evaluate_naive()
            entry.update({
                "metrics": {"before": before, "after": after, "validation_before": val_before,
                            "validation_after": sel["val"] if sel else None},
                "time_s": elapsed, "cpu_s": cpu, "timing_s": res.timing_s, "peak_mem_bytes": pm.bytes,
                **changed_storage(adapter.model, base.state),
                "passes": res.passes.as_dict(), "epochs": res.epochs, "selected_epoch": res.selected_epoch,
                "config": res.config, "info": res.info,
            })
            entry["mia"] = run_mia()
        _record_cuda_peak(entry)
        pc = _per_concept(entry["metrics"]["before"], entry["metrics"]["after"])
        if pc:
            entry["per_concept"] = pc
        entries[name] = entry
    base.restore("after the comparison")

    return {
        "concept": cfg.concept, "concepts": concepts, "mode": "joint" if len(concepts) > 1 else "single",
        "model": adapter.model_id, "base_sha256": base.sha256,
        "original": {"metrics": {"before": before, "validation_before": val_before}, "mia": mia_before},
        "data": {"n_forget": int(f_img.shape[0]), "n_retain": int(r_img.shape[0]), "val_sizes": val_suite.sizes(),
                 "test_sizes": test_suite.sizes(), "mia_heldout": int(heldout[0].shape[0]) if heldout is not None else 0,
                 "world_data": str(data_dir), "curate": cur},
        "peak_mem_note": PEAK_MEM_NOTE,
        "methods": entries,
    }


PEAK_MEM_NOTE = ("peak RSS growth over the method, sampled every 5 ms from /proc/self/statm after gc + malloc_trim; "
                 "SLUG: replay of its gradient/ranking/search stages")


def _mia_heldout(cc: CompareConfig, adapter, cfg, concepts: list[str]):
    from .unlearn import load_pairs

    if cc.mia_heldout_pairs:
        return load_pairs(adapter, cc.mia_heldout_pairs, cc.mia_heldout, cfg.strict, "held-out")[:2]
    if cc.unlearn is None:
        return _heldout_pairs(adapter, concepts, cc.mia_heldout)
    return None  # no held-out pairs given: no MIA


def _mia_runner(adapter, forget_pairs, heldout):
    from ..eval.mia import mia

    def run():
        return mia(adapter, forget_pairs, heldout) if heldout is not None else None

    return run


def _sequential_configs(cc: CompareConfig, concepts: list[str], out: Path) -> list[tuple]:
    """One ``UnlearnConfig`` per step, as ``slug demo --sequential`` builds them
    (:func:`slugkit.world.demo_data.sequential_world_configs`: each step's retain set drops the pairs naming an
    earlier concept — with them, a baseline's retain pass would teach an already forgotten concept again)."""
    from .world_runs import sequential_world_configs

    steps = sequential_world_configs(
        concepts, lambda k, c: out / "slug" / f"{k + 1}-{c.replace(' ', '_')}", cc.data_dir, progress=cc.progress,
        seed=cc.seed, threads=cc.threads, overwrite=cc.overwrite, forget_samples=cc.forget_samples,
        retain_samples=cc.retain_samples, retain_identity_fraction=cc.retain_identity_fraction, device=cc.device)
    return [(replace(cfg, progress=False), cur, data) for cfg, cur, data in steps]


def _compare_sequential(cc: CompareConfig, concepts: list[str], adapter, base: _Base, out: Path,
                        cache: dict | None) -> dict:
    """Every method over the concepts one after another (see the module docstring); returns the report."""
    from ..eval.zeroshot import SuiteEvaluator
    from ..methods import MethodData
    from ..patch import apply_patch, load_patch, revert_patch
    from .unlearn import load_pairs, run_sequential

    steps = _sequential_configs(cc, concepts, out)
    cfgs = [s[0] for s in steps]
    joint = replace(cfgs[0], concepts=list(concepts), concept=" + ".join(concepts))
    test_suite, test_eval = _evaluator(adapter, joint, joint.test_identities, joint.utility_test, cache)
    before = test_eval.base_metrics()
    pairs = [load_pairs(adapter, c.forget, c.forget_samples, c.strict, "forget")[:2] +
             load_pairs(adapter, c.retain, c.retain_samples, c.strict, "retain")[:2] for c in cfgs]
    val_suites, val_evals = zip(*[_evaluator(adapter, c, c.val_identities, c.utility_val, cache) for c in cfgs])
    heldout = _mia_heldout(cc, adapter, joint, concepts)
    run_mia = _mia_runner(adapter, (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])), heldout)
    mia_before = run_mia()

    entries = {}
    for name in cc.methods:
        entry = _start_method(cc, base, name, "sequential ")
        if name == "slug":
            result = run_sequential(cfgs, out / "slug", adapter=adapter, overwrite=cc.overwrite)
            if state_sha256(adapter.model) != base.sha256:
                raise RuntimeError("run_sequential left the model edited")
            step_results = [json.loads((Path(c.out) / "result.json").read_text()) for c in cfgs]
            # peak memory: replay each step's stages on the model carrying the earlier steps' patches
            patches, peak, cpu = [load_patch(Path(c.out) / "patch") for c in cfgs], 0, 0.0
            for k, (c, (fi, ft, ri, rt)) in enumerate(zip(cfgs, pairs)):
                if k:
                    apply_patch(adapter.model, patches[k - 1])
                ve = SuiteEvaluator(adapter, val_suites[k], c.eval_batch_size)
                mem, c_s = _slug_replay(adapter, c, fi, ft, ri, rt, ve, ve.base_metrics())
                peak, cpu = max(peak, mem), cpu + c_s
            for p in reversed(patches[:-1]):
                revert_patch(adapter.model, p)
            chained = load_patch(out / "slug" / "patch")
            apply_patch(adapter.model, chained)
            after = test_eval.evaluate_naive()
            entry.update({
                "metrics": {"before": before, "after": after},
                "time_s": sum(r["timing_s"][k] for r in step_results for k in ("gradients", "layers", "search")),
                "cpu_s": cpu,
                "timing_s": {"per_step": [r["timing_s"] for r in step_results],
                             "run_sequential_total": result["timing_s"]["total"]},
                "peak_mem_bytes": peak, "storage_bytes": result["patch"]["bytes"],
                "changed_params": changed_storage(adapter.model, base.state)["changed_params"],
                "passes": _slug_seq_passes(step_results),
                "steps": [{"concept": c.concept, "layer": r["layer"], "step_size": r["step_size"],
                           "time_s": r["timing_s"]["gradients"] + r["timing_s"]["layers"] + r["timing_s"]["search"],
                           "validation_after": r["metrics"]["validation_after"],
                           "result": str(Path(c.out).relative_to(out) / "result.json")}
                          for c, r in zip(cfgs, step_results)],
                "epochs": [], "selected_epoch": None, "result": "slug/result.json",
            })
            entry["mia"] = run_mia()
            revert_patch(adapter.model, chained)
        else:
            total, cpu, timing, passes, peak, step_info = 0.0, 0.0, {}, {}, 0, []
            for k, (c, (fi, ft, ri, rt)) in enumerate(zip(cfgs, pairs)):
                method = make_baseline(cc, name)
                data = MethodData(fi, ft, ri, rt, batch_size=cc.batch_size, seed=cc.seed)
                with PeakRSS() as pm:
                    t0, c0 = time.perf_counter(), time.process_time()
                    res = method.run(adapter, data, val_evals[k])
                    elapsed = time.perf_counter() - t0
                total, cpu = total + elapsed, cpu + time.process_time() - c0
                peak = max(peak, pm.bytes)
                for key, v in res.timing_s.items():
                    timing[key] = timing.get(key, 0.0) + v
                _add_passes(passes, res.passes.as_dict())
                sel = next((e for e in res.epochs if e["epoch"] == res.selected_epoch), None)
                step_info.append({"concept": c.concept, "time_s": elapsed, "epochs": res.epochs,
                                  "selected_epoch": res.selected_epoch, "epochs_run": len(res.epochs),
                                  "validation_after": sel["val"] if sel else None, "config": res.config,
                                  "info": res.info})
            after = test_eval.evaluate_naive()
            entry.update({
                "metrics": {"before": before, "after": after}, "time_s": total, "cpu_s": cpu, "timing_s": timing,
                "peak_mem_bytes": peak, **changed_storage(adapter.model, base.state), "passes": passes,
                "steps": step_info, "epochs": [], "selected_epoch": None,
            })
            entry["mia"] = run_mia()
        entry["per_concept"] = _per_concept(before, entry["metrics"]["after"])
        _record_cuda_peak(entry)
        entries[name] = entry
    base.restore("after the sequential comparison")

    return {
        "concept": joint.concept, "concepts": concepts, "mode": "sequential", "model": adapter.model_id,
        "base_sha256": base.sha256, "original": {"metrics": {"before": before}, "mia": mia_before},
        "data": {"steps": [{"concept": c.concept, "n_forget": int(p[0].shape[0]), "n_retain": int(p[2].shape[0]),
                            "val_sizes": s.sizes(), "curate": st[1]}
                           for c, p, s, st in zip(cfgs, pairs, val_suites, steps)],
                 "n_forget": sum(int(p[0].shape[0]) for p in pairs), "n_retain": [int(p[2].shape[0]) for p in pairs],
                 "test_sizes": test_suite.sizes(),
                 "mia_heldout": int(heldout[0].shape[0]) if heldout is not None else 0,
                 "world_data": str(steps[0][2])},
        "peak_mem_note": PEAK_MEM_NOTE + "; sequential: the largest step's",
        "methods": entries,
    }


def _slug_seq_passes(step_results: list[dict]) -> dict:
    total = {}
    for r in step_results:
        _add_passes(total, _slug_passes(r))
    return total


def _mia(m) -> str:
    return "–" if not m else f"{m['mean']:.2f} ± {m['std']:.2f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _bytes(n: int) -> str:
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= s:
            return f"{n / s:.2f} {unit}"
    return f"{n} B"


def _cpu(e: dict) -> str:
    return "–" if e.get("cpu_s") is None else f"{e['cpu_s']:.1f}"


def _lr(x: float) -> str:
    m, e = f"{x:.2e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def _selected(epochs: list[dict], selected: int | None, config: dict | None) -> tuple[str, str]:
    """('selected/run' epochs, the learning rate (gradient methods) or the (α, λ) point (SSD))."""
    sel = next((e for e in epochs if e.get("epoch") == selected), {})
    if "alpha" in sel:
        return f"{selected}/{len(epochs)}", f"α {sel['alpha']:g}, λ {sel['lambda']:g}"
    lr = (config or {}).get("lr")
    return f"{selected}/{len(epochs)}", (f"lr {_lr(lr)}" if isinstance(lr, float) else "")


def _epoch_cell(name: str, e: dict) -> str:
    if name == "slug":
        return f"search ×{len(e['steps'])}" if "steps" in e else "search"
    cells = [_selected(s["epochs"], s["selected_epoch"], s.get("config")) for s in e["steps"]] if "steps" in e \
        else [_selected(e["epochs"], e["selected_epoch"], e.get("config"))]
    notes = [n for _, n in cells]
    if len(set(notes)) == 1:
        return " + ".join(c for c, _ in cells) + (f" ({notes[0]})" if notes[0] else "")
    return " + ".join(f"{c} ({n})" if n else c for c, n in cells)


def compare_table(report: dict) -> str:
    """The Table-1-style markdown table (test metrics in %, MIA mean ± std, time, storage); with several concepts
    each concept's FA@1/FA@5 follow the pooled ones."""
    o = report["original"]
    concepts = report.get("concepts") or [report["concept"]]
    per = len(concepts) > 1
    pc_head = "".join(f" {c} FA@1 | {c} FA@5 |" for c in concepts) if per else ""
    rows = [f"| method | FA@1 | FA@5 |{pc_head} TA_IN@1 (utility) | TA_CA@1 (related) | MIA | time (s) | CPU (s) "
            "| peak mem | storage | epoch |",
            "|---|---|---|" + "---|---|" * len(concepts) * per + "---|---|---|---|---|---|---|---|"]

    def pc_cells(m: dict) -> str:
        if not per:
            return ""
        by = m.get("forget_by_concept") or {}
        return "".join(f" {_pct(by.get(c, {}).get('forget_top1'))} | {_pct(by.get(c, {}).get('forget_top5'))} |"
                       for c in concepts)

    b = o["metrics"]["before"]
    rows.append(f"| original | {_pct(b['forget_top1'])} | {_pct(b['forget_top5'])} |{pc_cells(b)} "
                f"{_pct(b.get('utility_top1'))} | {_pct(b.get('related_top1'))} | {_mia(o['mia'])} | – | – | – | – "
                "| – |")
    for name, e in report["methods"].items():
        a = e["metrics"]["after"]
        rows.append(f"| {name} | {_pct(a['forget_top1'])} | {_pct(a['forget_top5'])} |{pc_cells(a)} "
                    f"{_pct(a.get('utility_top1'))} | {_pct(a.get('related_top1'))} | {_mia(e['mia'])} "
                    f"| {e['time_s']:.1f} | {_cpu(e)} | {_bytes(e['peak_mem_bytes'])} | {_bytes(e['storage_bytes'])} "
                    f"| {_epoch_cell(name, e)} |")
    return "\n".join(rows)


def time_ratios(report: dict, key: str = "time_s") -> dict:
    """SLUG's time over each other method's: ``time_s`` (wall clock) or ``cpu_s`` (CPU seconds of the process)."""
    m = report["methods"]
    if "slug" not in m or key not in m["slug"]:
        return {}
    return {k: m["slug"][key] / m[k][key] for k in m if k != "slug" and m[k].get(key, 0) > 0}


def reaching_fa5_zero(report: dict) -> list[str]:
    """Methods whose test FA@5 is 0 (with several concepts: for every concept, i.e. pooled FA@5 = 0)."""
    return [k for k, e in report["methods"].items() if e["metrics"]["after"]["forget_top5"] == 0]


def _rule(report: dict) -> str:
    metric = (report.get("config") or {}).get("select_metric", "forget_top5")
    return {"forget_top5": "FA@5", "forget_top1": "FA@1"}.get(metric, metric)


def _render_section(report: dict, rule: str) -> list[str]:
    d = report["data"]
    if report.get("mode") == "sequential":
        sizes = ", ".join(f"{s['concept']}: {s['n_forget']} forget / {s['n_retain']} retain" for s in d["steps"])
        what = (f"Sequential: one step per concept ({sizes}); each step's retain set names none of the concepts "
                "unlearned so far; SLUG's patches are chained into one. ")
    else:
        what = (f"Forget pairs {d['n_forget']}" + (" (all concepts, jointly)" if report.get("mode") == "joint" else "")
                + f", retain pairs {d['n_retain']}. ")
    t = d["test_sizes"]
    lines = [what + f"Test: {t['forget']} images of the concept(s), {t['related']} of other identities, "
             f"{t['utility']} utility images. Metrics in % on the **test** images; each method's result was chosen "
             f"on the validation images (baselines: first epoch with validation {rule} = 0, else the minimum). Time "
             "includes the validation each method needs (SLUG's search, the baselines' per-epoch evaluation). MIA: "
             "forget vs held-out pairs, 50 = indistinguishable.", "", compare_table(report), ""]
    ratios = time_ratios(report)
    if ratios:
        lines.append("SLUG time / method time: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        cpu = time_ratios(report, "cpu_s")
        if cpu:
            lines.append("SLUG CPU seconds / method CPU seconds (one thread; insensitive to other load on the "
                         "machine): " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))
        lines.append("")
    lines.append(f"Methods reaching test FA@5 = 0: {', '.join(reaching_fa5_zero(report)) or 'none'}.")
    return lines


def render_compare(report: dict) -> str:
    rule = _rule(report)
    if "methods" in report:
        lines = [f"# Unlearning methods compared: {report['concept']} ({report['model'].get('model')})", ""]
        lines += _render_section(report, rule)
        lines += ["", "![trade-off](tradeoff.png)", ""]
        return "\n".join(lines)
    lines = [f"# Unlearning methods compared: {', '.join(report['concepts'])} ({report['model'].get('model')})", ""]
    for mode in MODES:
        if mode in report:
            lines += [f"## {mode.capitalize()}", ""] + _render_section(report[mode], rule) + [""]
    if "joint" in report:
        lines += ["![trade-off (joint)](tradeoff.png)", ""]
    return "\n".join(lines)


def tradeoff_plot(report: dict, path: str | Path) -> None:
    """Validation utility top-1 vs validation FA@1 per method and epoch (SLUG: its chosen step — the search scores
    utility only there); stars: the selected results on the test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..common.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (name, e) in enumerate(report["methods"].items()):
        c = f"C{i}"
        eps = [ep for ep in e["epochs"] if "utility_top1" in ep["val"] and ep.get("layer", e.get("layer")) == e.get("layer")]
        pts = [(ep["val"]["forget_top1"], ep["val"]["utility_top1"]) for ep in eps]
        va = e["metrics"].get("validation_after") or {}
        if name == "slug" and "utility_top1" in va:  # the search scores utility only at the chosen step
            pts.append((va["forget_top1"], va["utility_top1"]))
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o" if name == "slug" else "-o", color=c, ms=3, alpha=0.6, lw=1,
                    label=f"{name} (validation, {'chosen step' if name == 'slug' else 'per epoch'})")
        a = e["metrics"]["after"]
        ax.plot([a["forget_top1"]], [a.get("utility_top1", float("nan"))], "*", color=c, ms=14, mec="k")
    b = report["original"]["metrics"]["before"]
    ax.plot([b["forget_top1"]], [b.get("utility_top1", float("nan"))], "ks", ms=8, label="original (test)")
    ax.set_xlabel("forget accuracy FA@1 (lower = more forgotten)")
    ax.set_ylabel("utility top-1 (TA_IN analogue)")
    ax.set_title(f"Utility vs forgetting: {report['concept']} (stars: selected result, test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
