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
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

DEFAULT_METHODS = ("slug", "ft", "ga", "gaft", "salun", "ssd")
COMPARE_FILES = ("compare.json", "compare.md", "tradeoff.png")


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
    select_metric: str = "forget_top1"
    salun_threshold: float = 0.5
    ssd_alpha: float = 10.0
    mia_heldout: int = 100  # held-out pairs for the MIA (embedded world: samples of the concept; else a cap)
    mia_heldout_pairs: str | None = None  # real data: shards/folder of captioned pairs of the concept, never trained on
    unlearn: object | None = None  # an UnlearnConfig with explicit data (real models); None: the embedded world
    forget_samples: int | None = None  # caps (tests)
    retain_samples: int | None = None
    seed: int = 0
    threads: int | None = None
    overwrite: bool = False
    progress: bool = False


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


def _slug_peak_memory(adapter, cfg, f_img, f_tok, r_img, r_tok, val_eval, val_before) -> int:
    """Peak RSS growth of SLUG's unlearning stages (gradients, layer ranking, search) replayed with the functions
    ``run_unlearn`` calls, on the data and validation evaluator already in memory (``run_unlearn`` itself also loads
    data and builds evaluators, which the baselines' window does not include)."""
    from .slug.gradients import compute_gradients
    from .slug.layers import rank_layers
    from .slug.search import choose_layer, search_layers
    from .unlearn import _batches

    names, bs = adapter.candidate_names(), cfg.batch_size
    with PeakRSS() as pm:
        grads = compute_gradients(adapter, _batches(f_img, f_tok, bs), _batches(r_img, r_tok, bs), names,
                                  progress=False, n_forget_batches=-(-len(f_img) // bs),
                                  n_retain_batches=-(-len(r_img) // bs))
        table = rank_layers(adapter, grads, names)
        ratios = {r.name: r.ratio for r in table.rows}
        searches = search_layers(adapter, grads, table.front_names(), ratios, val_eval, cfg.search,
                                 cached=cfg.cached_search, progress=False)
        choose_layer(searches, cfg.search.selection, val_before)
    return pm.bytes


def _heldout_pairs(adapter, concept: str, k: int):
    from .data import world

    ident = world.identity_by_name(concept)
    samples = world.make_samples("test", "identity", k, classes=[ident.index])
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


def check_compare_out(out: Path, overwrite: bool) -> None:
    from .unlearn import OutputExistsError

    if out.exists() and any((out / f).exists() for f in COMPARE_FILES + ("slug",)) and not overwrite:
        raise OutputExistsError(f"{out} already holds a comparison; pass --overwrite or choose another --out")


def run_compare(cc: CompareConfig) -> dict:
    from .eval.mia import mia
    from .eval.zeroshot import SuiteEvaluator
    from .methods import MethodData, make_method
    from .methods.base import snapshot
    from .models import load_adapter
    from .patch import apply_patch, load_patch
    from .unlearn import _write_json, build_suite, load_pairs, run_unlearn
    from .world.demo_data import world_config

    if cc.unlearn is None and cc.model != "embedded":
        raise ValueError("slug compare needs the data flags of `slug unlearn` (--forget, --retain, --val-identities, "
                         "--test-identities, ...) for a model other than 'embedded'")
    unknown = [m for m in cc.methods if m != "slug"]
    for m in unknown:
        make_method(m)  # raises ValueError on unknown names before any work
    out = Path(cc.out)
    check_compare_out(out, cc.overwrite)
    if cc.threads:
        torch.set_num_threads(cc.threads)
    if cc.unlearn is None:
        cfg, cur, data_dir = world_config(cc.concept, out, cc.data_dir, progress=cc.progress, seed=cc.seed,
                                          threads=cc.threads, overwrite=cc.overwrite,
                                          forget_samples=cc.forget_samples, retain_samples=cc.retain_samples)
    else:
        cfg = replace(cc.unlearn, out=str(out), overwrite=cc.overwrite, progress=cc.progress, seed=cc.seed,
                      threads=cc.threads)
        cur, data_dir = None, None
    adapter = load_adapter(cfg.model, cfg.pretrained, device=cfg.device, precision=cfg.precision)
    base_state = snapshot(adapter.model)
    base_hash = state_sha256(adapter.model)

    f_img, f_tok, _ = load_pairs(adapter, cfg.forget, cfg.forget_samples, cfg.strict, "forget")
    r_img, r_tok, _ = load_pairs(adapter, cfg.retain, cfg.retain_samples, cfg.strict, "retain")
    val_suite = build_suite(adapter, cfg, cfg.val_identities, cfg.utility_val)
    test_suite = build_suite(adapter, cfg, cfg.test_identities, cfg.utility_test)
    val_eval = SuiteEvaluator(adapter, val_suite, cfg.eval_batch_size)
    test_eval = SuiteEvaluator(adapter, test_suite, cfg.eval_batch_size)
    before, val_before = test_eval.base_metrics(), val_eval.base_metrics()
    if cc.mia_heldout_pairs:
        heldout = load_pairs(adapter, cc.mia_heldout_pairs, cc.mia_heldout, cfg.strict, "held-out")[:2]
    elif cc.unlearn is None:
        heldout = _heldout_pairs(adapter, cfg.concept, cc.mia_heldout)
    else:
        heldout = None  # no held-out pairs given: no MIA

    def run_mia():
        return mia(adapter, (f_img, f_tok), heldout) if heldout is not None else None

    mia_before = run_mia()
    data = MethodData(f_img, f_tok, r_img, r_tok, batch_size=cc.batch_size, seed=cc.seed)

    entries = {}
    for name in cc.methods:
        adapter.model.load_state_dict(base_state)
        start_hash = state_sha256(adapter.model)
        if start_hash != base_hash:
            raise RuntimeError(f"{name}: the model does not start from the base weights (sha256 mismatch)")
        torch.manual_seed(cc.seed)
        if cc.progress:
            print(f"[compare] {name} ...", flush=True)
        entry = {"method": name, "start_sha256": start_hash}
        if name == "slug":
            scfg = replace(cfg, out=str(out / "slug"), progress=False, overwrite=cc.overwrite)
            result = run_unlearn(scfg, adapter=adapter)
            t = result["timing_s"]
            entry.update({
                "metrics": result["metrics"],
                "time_s": t["gradients"] + t["layers"] + t["search"],
                "timing_s": {"precompute": t["gradients"] + t["layers"], "search": t["search"], "run_unlearn": t},
                "peak_mem_bytes": _slug_peak_memory(adapter, cfg, f_img, f_tok, r_img, r_tok, val_eval, val_before),
                "storage_bytes": result["patch"]["bytes"],
                "passes": _slug_passes(result),
                "epochs": [{"epoch": i + 1, "layer": e["layer"], "step_size": e["step_size"], "val": e["metrics"],
                            "accepted": e["accepted"]} for i, e in enumerate(result["search"])],
                "selected_epoch": None, "layer": result["layer"], "step_size": result["step_size"],
                "config": result["config"], "result": "slug/result.json",
            })
            if state_sha256(adapter.model) != base_hash:
                raise RuntimeError("run_unlearn left the model edited")
            apply_patch(adapter.model, load_patch(out / "slug" / "patch"))
            entry["changed_params"] = changed_storage(adapter.model, base_state)["changed_params"]
        else:
            method = make_method(name, lr=cc.lr.get(name), epochs=cc.epochs, select_metric=cc.select_metric,
                                 **({"threshold": cc.salun_threshold} if name.startswith("salun") else {}),
                                 **({"alpha": cc.ssd_alpha} if name.startswith("ssd") else {}))
            with PeakRSS() as pm:
                t0 = time.perf_counter()
                res = method.run(adapter, data, val_eval)
                elapsed = time.perf_counter() - t0
            sel = next((e for e in res.epochs if e["epoch"] == res.selected_epoch), None)
            after = test_eval.evaluate_naive()
            entry.update({
                "metrics": {"before": before, "after": after, "validation_before": val_before,
                            "validation_after": sel["val"] if sel else None},
                "time_s": elapsed, "timing_s": res.timing_s, "peak_mem_bytes": pm.bytes,
                **changed_storage(adapter.model, base_state),
                "passes": res.passes.as_dict(), "epochs": res.epochs, "selected_epoch": res.selected_epoch,
                "config": res.config, "info": res.info,
            })
        if torch.cuda.is_available():  # pragma: no cover - CPU here
            entry["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        entry["mia"] = run_mia()
        entries[name] = entry
    adapter.model.load_state_dict(base_state)

    report = {
        "concept": cfg.concept, "model": adapter.model_id, "base_sha256": base_hash,
        "original": {"metrics": {"before": before, "validation_before": val_before}, "mia": mia_before},
        "data": {"n_forget": int(f_img.shape[0]), "n_retain": int(r_img.shape[0]), "val_sizes": val_suite.sizes(),
                 "test_sizes": test_suite.sizes(), "mia_heldout": int(heldout[0].shape[0]) if heldout is not None else 0,
                 "world_data": str(data_dir), "curate": cur},
        "config": asdict(cc), "threads": torch.get_num_threads(),
        "peak_mem_note": "peak RSS growth over the method, sampled every 5 ms from /proc/self/statm after gc + "
                         "malloc_trim; SLUG: replay of its gradient/ranking/search stages",
        "methods": entries,
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "compare.json", report)
    tradeoff_plot(report, out / "tradeoff.png")
    from .data.shards import atomic_write_bytes

    atomic_write_bytes(out / "compare.md", render_compare(report).encode())
    return report


def _mia(m) -> str:
    return "–" if not m else f"{m['mean']:.2f} ± {m['std']:.2f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _bytes(n: int) -> str:
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= s:
            return f"{n / s:.2f} {unit}"
    return f"{n} B"


def compare_table(report: dict) -> str:
    """The Table-1-style markdown table (test metrics in %, MIA mean ± std, time, storage)."""
    o = report["original"]
    rows = ["| method | FA@1 | FA@5 | TA_IN@1 (utility) | TA_CA@1 (related) | MIA | time (s) | peak mem | storage | "
            "epoch |", "|---|---|---|---|---|---|---|---|---|---|"]
    b = o["metrics"]["before"]
    rows.append(f"| original | {_pct(b['forget_top1'])} | {_pct(b['forget_top5'])} | {_pct(b.get('utility_top1'))} "
                f"| {_pct(b.get('related_top1'))} | {_mia(o['mia'])} | – | – | – | – |")
    for name, e in report["methods"].items():
        a = e["metrics"]["after"]
        ep = "search" if name == "slug" else f"{e['selected_epoch']}/{len(e['epochs'])}"
        rows.append(f"| {name} | {_pct(a['forget_top1'])} | {_pct(a['forget_top5'])} | {_pct(a.get('utility_top1'))} "
                    f"| {_pct(a.get('related_top1'))} | {_mia(e['mia'])} "
                    f"| {e['time_s']:.1f} | {_bytes(e['peak_mem_bytes'])} | {_bytes(e['storage_bytes'])} | {ep} |")
    return "\n".join(rows)


def time_ratios(report: dict) -> dict:
    m = report["methods"]
    if "slug" not in m:
        return {}
    return {k: m["slug"]["time_s"] / m[k]["time_s"] for k in m if k != "slug" and m[k]["time_s"] > 0}


def render_compare(report: dict) -> str:
    d = report["data"]
    lines = [f"# Unlearning methods compared: {report['concept']} ({report['model'].get('model')})", "",
             f"Forget pairs {d['n_forget']}, retain pairs {d['n_retain']}; test: {d['test_sizes']['forget']} "
             f"images of the concept, {d['test_sizes']['related']} of other identities, "
             f"{d['test_sizes']['utility']} utility images. Metrics in % on the **test** images; each method's "
             "result was chosen on the validation images. Time includes the validation each method needs "
             "(SLUG's search, the baselines' per-epoch evaluation). MIA: forget vs held-out pairs, 50 = "
             "indistinguishable.", "", compare_table(report), ""]
    ratios = time_ratios(report)
    if ratios:
        lines.append("SLUG time / method time: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        lines.append("")
    zero = [k for k, e in report["methods"].items() if e["metrics"]["after"]["forget_top5"] == 0]
    lines.append(f"Methods reaching test FA@5 = 0: {', '.join(zero) or 'none'}.")
    lines += ["", "![trade-off](tradeoff.png)", ""]
    return "\n".join(lines)


def tradeoff_plot(report: dict, path: str | Path) -> None:
    """Validation utility top-1 vs validation FA@1 per method and epoch (SLUG: its chosen step — the search scores
    utility only there); stars: the selected results on the test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.shards import atomic_write_bytes

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
