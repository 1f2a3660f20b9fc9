"""The human-readable side of ``slug compare``: ``compare.md`` (the Table-1-style table per section, the time
ratios, the methods reaching FA@5 = 0) and ``tradeoff.png`` (utility vs forgetting per method), written next to
``compare.json`` by :func:`write_compare_report`. Everything here reads the report dict built by
:mod:`slugkit.workflows.compare`; nothing runs a method.

A single-concept report holds ``methods``; a several-concept one holds one report per mode (``joint``,
``sequential``), each shaped like the single-concept one, and gets one section per mode."""

from __future__ import annotations

import io
from pathlib import Path

from ..common.files import atomic_write_bytes, write_json

COMPARE_FILES = ("compare.json", "compare.md", "tradeoff.png")
MODES = ("joint", "sequential")  # the several-concept modes, in run and report order


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


def _selected(epochs: list[dict], selected: int | None, config: dict | None,
              metric: str = "forget_top5") -> tuple[str, str]:
    """('selected/run' epochs, the learning rate (gradient methods) or the (α, λ) point (SSD)); when the selected
    epoch's validation ``metric`` is not 0 (no epoch met the rule: the minimum was kept), that is said too — "15/16
    (α 1, λ 0.2)" read like the rows that met it (trial 46)."""
    sel = next((e for e in epochs if e.get("epoch") == selected), {})
    v = (sel.get("val") or {}).get(metric)
    unmet = (f"; rule not met: validation {'FA@5' if metric == 'forget_top5' else 'FA@1'} {v:.2f}"
             if isinstance(v, (int, float)) and v > 0 else "")
    if "alpha" in sel:
        return f"{selected}/{len(epochs)}", f"α {sel['alpha']:g}, λ {sel['lambda']:g}{unmet}"
    lr = (config or {}).get("lr")
    note = f"lr {_lr(lr)}" if isinstance(lr, float) else ""
    return f"{selected}/{len(epochs)}", (note + unmet).lstrip("; ")


def _epoch_cell(name: str, e: dict, metric: str = "forget_top5") -> str:
    if name == "slug":  # a second layer is said (compare.json named one layer of a two-layer edit: trial 46)
        n = sum(len(s.get("layers") or [1]) for s in e["steps"]) if "steps" in e else len(e.get("layers") or [1])
        layers = f" ({n} layers)" if n > (len(e["steps"]) if "steps" in e else 1) else ""
        return (f"search ×{len(e['steps'])}" if "steps" in e else "search") + layers
    cells = [_selected(s["epochs"], s["selected_epoch"], s.get("config"), metric) for s in e["steps"]] \
        if "steps" in e else [_selected(e["epochs"], e["selected_epoch"], e.get("config"), metric)]
    notes = [n for _, n in cells]
    if len(set(notes)) == 1:
        return " + ".join(c for c, _ in cells) + (f" ({notes[0]})" if notes[0] else "")
    return " + ".join(f"{c} ({n})" if n else c for c, n in cells)


def _worst(e: dict) -> str:
    """``name −drop%`` of the method's most damaged other identity (``result.json → collateral``)."""
    w = (e.get("collateral") or {}).get("worst")
    return "–" if not w else f"{w['concept']} {w['before']:.2f} → {w['after']:.2f}"


def compare_table(report: dict) -> str:
    """The Table-1-style markdown table (test metrics in %, MIA mean ± std, time, storage); with several concepts
    each concept's FA@1/FA@5 follow the pooled ones."""
    o = report["original"]
    concepts = report.get("concepts") or [report["concept"]]
    per = len(concepts) > 1
    pc_head = "".join(f" {c} FA@1 | {c} FA@5 |" for c in concepts) if per else ""
    rows = [f"| method | FA@1 | FA@5 |{pc_head} TA_IN@1 (utility) | TA_CA@1 (related) | worst other identity | MIA "
            "| time (s) | CPU (s) | peak mem | storage | epoch |",
            "|---|---|---|" + "---|---|" * len(concepts) * per + "---|---|---|---|---|---|---|---|---|"]

    def pc_cells(m: dict) -> str:
        if not per:
            return ""
        by = m.get("forget_by_concept") or {}
        return "".join(f" {_pct(by.get(c, {}).get('forget_top1'))} | {_pct(by.get(c, {}).get('forget_top5'))} |"
                       for c in concepts)

    b = o["metrics"]["before"]
    rows.append(f"| original | {_pct(b['forget_top1'])} | {_pct(b['forget_top5'])} |{pc_cells(b)} "
                f"{_pct(b.get('utility_top1'))} | {_pct(b.get('related_top1'))} | – | {_mia(o['mia'])} | – | – | – "
                "| – | – |")
    for name, e in report["methods"].items():
        a = e["metrics"]["after"]
        rows.append(f"| {name} | {_pct(a['forget_top1'])} | {_pct(a['forget_top5'])} |{pc_cells(a)} "
                    f"{_pct(a.get('utility_top1'))} | {_pct(a.get('related_top1'))} | {_worst(e)} | {_mia(e['mia'])} "
                    f"| {e['time_s']:.1f} | {_cpu(e)} | {_bytes(e['peak_mem_bytes'])} | {_bytes(e['storage_bytes'])} "
                    f"| {_epoch_cell(name, e, (report.get('config') or {}).get('select_metric', 'forget_top5'))} |")
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


# the verdict's defaults (Budgets; a test keeps them so)
DAMAGE_BUDGETS = {"utility_drop": 0.02, "related_drop": 0.05, "worst_drop": 0.20}


def _with_damage(report: dict, names: list[str]) -> list[str]:
    """Each name, with what it broke beyond the verdict's default budgets (utility 0.02, other identities 0.05 on
    average, any single other identity 0.20): a GA at lr 1 "reached FA@5 = 0" at utility 3 % (eleventh trial), an
    SSD with one other identity at 1.00 → 0.00 (seventeenth trial)."""
    out = []
    for k in names:
        e = report["methods"][k]
        m = e["metrics"]
        worse = [f"{label} {m['before'][key]:.2f} → {m['after'][key]:.2f}"
                 for key, label, budget in (("utility_top1", "utility", DAMAGE_BUDGETS["utility_drop"]),
                                            ("related_top1", "other identities", DAMAGE_BUDGETS["related_drop"]))
                 if m["before"].get(key) is not None and m["after"].get(key) is not None
                 and m["before"][key] - m["after"][key] > budget + 1e-6]
        w = (e.get("collateral") or {}).get("worst")
        if w and w["before"] - w["after"] > DAMAGE_BUDGETS["worst_drop"] + 1e-6:
            worse.append(f"{w['concept']} {w['before']:.2f} → {w['after']:.2f}")
        out.append(k + (f" (but {', '.join(worse)})" if worse else ""))
    return out


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
             "includes the validation each method needs (SLUG's search, the baselines' per-epoch evaluation). "
             + (MIA_SKIPPED if mia_skipped(report) else "MIA: forget vs held-out pairs, 50 = indistinguishable."),
             "", compare_table(report), ""]
    ratios = time_ratios(report)
    if ratios:
        lines.append("SLUG time / method time: " + ", ".join(  # one line, one direction (the CLI printed the
            f"{k} {v:.3f} (SLUG {1 / v:.1f}× faster)" if 0 < v <= 1 else  # inverse beside it: trial 33)
            f"{k} {v:.3f} (SLUG {v:.1f}× slower)" if v > 1 else f"{k} {v:.3f}" for k, v in ratios.items()))
        cpu = time_ratios(report, "cpu_s")
        if cpu:
            lines.append("SLUG CPU seconds / method CPU seconds (one thread; insensitive to other load on the "
                         "machine): " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))
        lines.append("")
    reached = _with_damage(report, reaching_fa5_zero(report))
    lines.append(f"Methods reaching test FA@5 = 0: {', '.join(reached) or 'none'}.")
    if any("audit" in e for e in report["methods"].values()):
        lines += ["", *audit_table(report)]
    return lines


def _iters(v, unit: str) -> str:
    return f"never (> budget) {unit}" if v is None else f"{v} {unit}"


def _audit_cell(p: dict | None) -> str:
    if not p:
        return "–"
    if p["status"] == "skipped":
        return "skipped"
    g = p.get("graded")
    mark = "≤ " if g and g.get("upper_bound") else "≥ " if g and g.get("lower_bound") else ""  # audit.report.bound_mark
    val = "" if not g else f" {mark}{g['value']:.2f}"
    tag = p["status"] if p.get("gating", True) else p["status"] + ", not gating"
    if "concept_iterations" in p:  # attack: the control calibration beside the number
        val += (f" ({_iters(p['concept_iterations'], 'it')} from the name vs "
                f"{_iters(p['control_iterations'], 'it')} from never-learned names)")
    elif "concept_steps" in p:
        val += (f" (n={p['n']}: {_iters(p['concept_steps'], 'steps')} vs "
                f"{_iters(p['control_steps'], 'steps')} for a new name)")
    return f"{tag}:{val}"


MIA_SKIPPED = ("MIA: not measured (–): no held-out pairs of the concept were given; pass --mia-heldout (captioned "
               "pairs of the concept the model never trained on) to measure it")


def mia_skipped(report: dict) -> bool:
    """Whether the comparison ran no MIA (explicit data without ``--mia-heldout``): said in ``compare.md`` and on
    stderr, where the table's "–" and an explanation of the MIA were all there was (trial 39)."""
    return not (report.get("data") or {}).get("mia_heldout", 1)


def audit_table(report: dict) -> list[str]:
    """``slug compare --audit``: one row per method, one column per probe (status, graded number, and for the
    attack and relearning probes the control calibration next to it)."""
    audited = [e["audit"] for e in report["methods"].values() if e.get("audit")]
    probes = list(audited[0]["probes"]) if audited else []
    titles = [audited[0]["probes"][p].get("title", p) for p in probes]
    lines = ["### Audit: does each method's removal hold?", "",
             "Each cell: status and the graded number (thresholds in `slug audit`'s docs: prompt variants and "
             "precision = worst informative top-1 after; attack and relearning = speed-up of the forgotten name "
             "over never-learned control names on the same images, 1 = no head start; representation = linear-probe "
             "accuracy on the concept's test images, not gating). Full records: `audit/<method>/audit.md`.", "",
             "| method | overall | " + " | ".join(titles) + " |",
             "|---|---|" + "---|" * len(probes)]
    for name, e in report["methods"].items():
        a = e.get("audit")
        if not a:
            continue
        lines.append(f"| {name} | **{a['status']}** | "
                     + " | ".join(_audit_cell(a["probes"].get(p)) for p in probes) + " |")
    return lines


def render_compare(report: dict) -> str:
    """``compare.md``: the table and notes of a single-concept report, or one section per mode of a
    several-concept one."""
    rule = _rule(report)
    v = report.get("verdict")
    modes = ", ".join(f"{m}: {s}" for m, s in (v or {}).get("by_mode", {}).items())
    verdict = ([f"SLUG's verdict: **{v['status']}**" + (f" (the more severe of {modes})" if modes else "")
                + "".join(f"; {r['message']}" for r in v["reasons"]), ""] if v else [])
    if "methods" in report:
        lines = [f"# Unlearning methods compared: {report['concept']} ({report['model'].get('model')})", "", *verdict]
        lines += _render_section(report, rule)
        lines += ["", "![trade-off](tradeoff.png)", ""]
        return "\n".join(lines)
    lines = [f"# Unlearning methods compared: {', '.join(report['concepts'])} ({report['model'].get('model')})", "",
             *verdict]
    for mode in MODES:
        if mode in report:
            sv = (report[mode].get("methods", {}).get("slug") or {}).get("verdict")
            lines += [f"## {mode.capitalize()}", "", *([f"SLUG's verdict in this mode: **{sv['status']}**", ""]
                                                      if sv else [])] + _render_section(report[mode], rule) + [""]
    if "joint" in report:
        lines += ["![trade-off (joint)](tradeoff.png)", ""]
    return "\n".join(lines)


def tradeoff_plot(report: dict, path: str | Path) -> None:
    """Validation utility top-1 vs validation FA@1 per method and epoch (SLUG: its chosen step — the search scores
    utility only there); stars: the selected results on the test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def write_compare_report(report: dict, out: Path) -> None:
    """``compare.json``, ``tradeoff.png`` (the single-concept report, or the joint one) and ``compare.md`` in
    ``out``."""
    write_json(out / "compare.json", report)
    plotted = report if "methods" in report else report.get("joint")
    if plotted is not None:
        tradeoff_plot(plotted, out / "tradeoff.png")
    atomic_write_bytes(out / "compare.md", render_compare(report).encode())
