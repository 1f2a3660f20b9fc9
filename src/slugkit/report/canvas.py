"""The ``slug canvas lite`` / ``slug canvas run`` report: UnlearnCanvas's table (one row per method) as markdown and
a plot; the JSON is written beside it by the workflow."""

from __future__ import annotations

import io
from pathlib import Path

from ..common.files import atomic_write_bytes


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _bytes(n) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _overrides(o: dict) -> str:
    """``"esd iterations 100, salun steps 10"``: the settings given on the command line (``options.overridden``;
    they were in canvas.json only: eleventh trial)."""
    return ", ".join(f"{m} {k} {v}" for m, kv in sorted((o.get("overridden") or {}).items()) for k, v in kv.items())


def _changed(o: dict, method: str) -> str:
    kv = (o.get("overridden") or {}).get(method)
    return f" — at {', '.join(f'{k} {v}' for k, v in kv.items())}, not the default" if kv else ""


def unrecognised_warning(targets: list[str], bold: bool = False, protocol: str | None = "official") -> str:
    """The one sentence ``canvas.md`` and the CLI's stderr give for targets the judges recognise on none of the
    unedited model's answer-set images (``canvas.json → base.unrecognised_targets``); what to check depends on the
    ``protocol``: the user's classifiers and pipeline (``"official"``), or on the embedded canvas, whose judges
    are shipped, the sampler steps and the canvas model (``"lite"``: it pointed a `--sampling-steps 2` run at
    classifiers it was never given, verification 52)."""
    b = "**" if bold else ""
    check = ("check --sampling-steps — the shipped judges recognise the shipped canvas's images at its default 20 "
             "DDIM steps — and --canvas-model" if protocol == "lite" else
             "check the classifiers — labels, image size — and the pipeline")
    return (f"{b}The judges recognise none of the unedited model's answer-set images of {', '.join(targets)}{b}: "
            f"their UA reads 100 % for any method and says nothing of the method ({check}).")


def _edited(info: dict) -> str:
    """``"edited: <every tensor of the layer's group>"`` (the note named the group's first tensor alone, while the
    edit and its storage covered q, k and v: trial 51)."""
    group = info.get("group") or [info.get("layer")]
    out = "edited: " + ", ".join(f"`{str(n).removeprefix('text_model.encoder.')}`" for n in group)
    first = info.get("start_fraction")
    row = next((L for L in info.get("search") or [] if L.get("layer") == info.get("layer")), None)
    if first and row and row.get("start_step") and info.get("step_size"):  # the step used, in R (verification 52)
        out += f"; step {first * info['step_size'] / row['start_step']:.3g} R (first step {first:g} R)"
    return out


def render_canvas(report: dict) -> str:
    """Markdown: the method table (style UA/IRA/CRA, object UA/IRA/CRA in %, time, peak memory, storage), the
    worst target per method and domain, the cost ratios against SLUG, then every row."""
    o = report["options"]
    official = report.get("protocol") == "official"
    seeds = (f"seeds {', '.join(map(str, o['answer_seeds']))}" if o.get("answer_seeds") else
             f"{o['per_pair']} fixed seed(s)")
    guidance = f", guidance {o['guidance']}" if o.get("guidance") is not None else ""
    lines = ["# UnlearnCanvas, the official protocol (`slug canvas run`)" if official else
             "# UnlearnCanvas on the embedded canvas (`slug canvas lite`)", "",
             f"Answer set: every (style, object) pair × {seeds}, DDIM {o.get('sampling_steps', 20)} steps{guidance}, "
             "shared by every method; base model: style accuracy "
             f"{_pct(report['base']['style_accuracy'])} %, object "
             f"accuracy {_pct(report['base']['object_accuracy'])} %. Targets: {', '.join(o['targets'])}.", "",
             *([unrecognised_warning(report["base"]["unrecognised_targets"], bold=True,
                                    protocol=report.get("protocol")), ""]
               if report["base"].get("unrecognised_targets") else []),
             f"Grid: {len(o.get('styles', []))} styles ({', '.join(o.get('styles', []))}) × "
             f"{len(o.get('objects', []))} objects ({', '.join(o.get('objects', []))})"
             + (" — **a declared subset of the official protocol** (its answer set: 51 styles × 20 objects × 5 seeds, "
                "DDIM 100, guidance 9.0)." if o.get("declared_subset") else "."), "",
             "Storage: the changed tensors (float32) / the checkpoint as UnlearnCanvas stores it (the whole edited "
             "UNet; SLUG's is its patch). Peak memory: how far the process's resident set grew above where it stood "
             "when the method began (its peak during the call, minus its start), the models and the answer set "
             "already loaded not counted; `peak_mem_method` in the JSON says how it was read.", "",
             *([f"**Settings changed on the command line** (the times and UA below are for these, not the defaults): "
                f"{_overrides(o)}.", ""] if o.get("overridden") else []),
             "| method | targets (refused) | style UA | style IRA | style CRA | object UA | object IRA | object CRA "
             "| time (s, mean) | slowest (s) | peak memory growth | storage (changed / checkpoint) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for row in report["rows"]:  # the unedited model, averaged over the distinct targets of the table
        base.setdefault(row["domain"], {})[row["target"]] = row["base"]
    cells = []
    for dom in ("style", "object"):
        vals = list(base.get(dom, {}).values())
        cells += [_pct(sum(v[k] for v in vals) / len(vals)) if vals else "—" for k in ("ua", "ira", "cra")]
    lines.append("| unedited (every target above) | — | " + " | ".join(cells) + " | — | — | — | — |")
    for m, r in report["methods"].items():
        s, ob = r.get("style", {}), r.get("object", {})
        slow = r.get("slowest")
        slowest = "—" if not slow else (f"{slow['time_s']:.2f} ({slow['target']}"
                                        + (", refused)" if slow.get("refused") else ")"))
        lines.append(f"| {m} | {r['targets']} ({r['refused']}) | {_pct(s.get('ua'))} | {_pct(s.get('ira'))} | "
                     f"{_pct(s.get('cra'))} | {_pct(ob.get('ua'))} | {_pct(ob.get('ira'))} | {_pct(ob.get('cra'))} | "
                     f"{'—' if r.get('time_s') is None else format(r['time_s'], '.2f')} | "
                     f"{slowest} | "
                     f"{_bytes(r.get('peak_mem_bytes'))} | {_bytes(r.get('storage_bytes'))} / "
                     f"{_bytes(r.get('storage_full_bytes'))} |")
    lines += ["", "Worst target by in-domain retention (IRA):", ""]
    for m, r in report["methods"].items():
        for dom in ("style", "object"):
            if dom in r:
                w = r[dom]["worst_ira"]
                lines.append(f"- {m}, {dom}: {w['target']} (IRA {_pct(w['ira'])} %)")
    if report.get("slug_on_baseline_targets") or report.get("slug_null_space_on_baseline_targets"):
        lines += ["", f"The baselines ran on {', '.join(o['baseline_targets'])} only; the ratios below compare SLUG "
                      "on those targets (paired), the table above averages each method over its own targets."]
    if "slug-null-space" in report["methods"]:
        first = next((r["info"]["start_fraction"] for r in report["rows"] if r["method"] == "slug-null-space"
                      and (r.get("info") or {}).get("start_fraction") is not None), None)
        lines += ["", "`slug-null-space` is SLUG with the null-space step (`slugkit.slug.nullspace`), not the paper's: "
                      "the forget gradient projected off the other prompts' text-layer inputs (their conditioning is "
                      "kept), layers tried by how far the projected edit moves the target's"
                      + (f", searched from a first step of {first:g} R (the paper's: 0.4 R)" if first else "")
                      + ("; `slug` is the paper's step." if "slug" in report["methods"] else ".")]
    for slug, key in (("slug", "ratios"), ("slug-null-space", "ratios_null_space")):
        ratios, label = report.get(key) or {}, "SLUG" if slug == "slug" else slug
        if slug not in report["methods"]:
            continue
        if ratios:
            lines += ["", f"Cost against {label} (the paper: ESD 6163 s : SalUn 667 s : SLUG 39 s; storage 4.3 GB : "
                          "4.0 GB : 0.04 GB):", ""]
            for m, r in ratios.items():
                lines.append(f"- {m}: time × {r['time']:.3g}, storage × {r['storage']:.3g} of {label}'s (checkpoint "
                             f"against SLUG's edited layer, the paper's comparison; a slugkit patch file, which keeps "
                             f"the original values too, is 2× that; changed tensors only: × "
                             f"{r['storage_minimal']:.3g})" + _changed(o, m))
        elif any(m not in ("slug", "slug-null-space") for m in report["methods"]):
            lines += ["", f"No cost ratios against {label}: every {label} search on the baselines' targets was "
                          "refused, so there is no SLUG edit to compare with (its search times are in the table "
                          "above)."]
    lines += ["", "## Every run", "", "Base: the unedited model's values on the same answer set.", "",
              "| method | target | UA (base) | IRA (base) | CRA (base) | time (s) | storage | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        note = ("refused: " + r["refused"][:400]) if r.get("refused") else \
            (_edited(r["info"]) if r["method"] in ("slug", "slug-null-space") else "")
        took = "—" if r["time_s"] is None else f"{r['time_s']:.2f}"
        b = r["base"]
        lines.append(f"| {r['method']} | {r['target']} | {_pct(r['ua'])} ({_pct(b['ua'])}) | {_pct(r['ira'])} "
                     f"({_pct(b['ira'])}) | {_pct(r['cra'])} ({_pct(b['cra'])}) | {took} | "
                     f"{_bytes(r['storage_bytes'])} | {note} |")
    lines += ["", "![UA against IRA](canvas.png)", ""]
    return "\n".join(lines)


def plot_series(report: dict) -> list[dict]:
    """The points of :func:`canvas_plot`: per method and domain the edited runs (``refused=False``) and, apart,
    the refused SLUG runs (``refused=True``; they score as the unedited model), each ``{"method", "domain",
    "refused", "points": [(IRA, UA)]}``; and per domain the unedited model's mean over the targets
    (``method="unedited"``)."""
    out = []
    for m in report["methods"]:
        for dom in ("style", "object"):
            for refused in (False, True):
                pts = [(r["ira"], r["ua"]) for r in report["rows"]
                       if r["method"] == m and r["domain"] == dom and bool(r.get("refused")) == refused]
                if pts:
                    out.append({"method": m, "domain": dom, "refused": refused, "points": pts})
    for dom in ("style", "object"):
        base = {r["target"]: r["base"] for r in report["rows"] if r["domain"] == dom}
        if base:
            pt = (sum(b["ira"] for b in base.values()) / len(base), sum(b["ua"] for b in base.values()) / len(base))
            out.append({"method": "unedited", "domain": dom, "refused": False, "points": [pt]})
    return out


def marker_sizes(methods: list[str]) -> dict[str, float]:
    """Per method a marker size (points), each smaller than the one before, so that two methods' runs at the same
    (IRA, UA) — 10 answer-set images per concept make ties common — show as a dot inside a ring, not as one point
    (slug's wesley hid under UCE's: trial 51)."""
    return {m: max(11.0 - 1.6 * i, 3.0) for i, m in enumerate(methods)}


def canvas_plot(report: dict, path: str | Path) -> None:
    """UA against IRA per run (one colour and size per method, :func:`marker_sizes`; circles styles, squares objects;
    refused SLUG runs hollow), the unedited model's mean over the targets as a black × (styles) and + (objects)
    (:func:`plot_series`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    colour = {m: f"C{i}" for i, m in enumerate(report["methods"])}
    size = marker_sizes(list(report["methods"]))
    for ser in plot_series(report):
        xs, ys = zip(*ser["points"])
        mk = "o" if ser["domain"] == "style" else "s"
        if ser["method"] == "unedited":
            ax.plot(xs, ys, "x" if ser["domain"] == "style" else "+", color="black", markersize=10,
                    label=f"unedited ({ser['domain']}, mean)")
        elif ser["refused"]:
            ax.plot(xs, ys, mk, markerfacecolor="none", color=colour[ser["method"]],
                    markersize=size[ser["method"]], label=f"{ser['method']} ({ser['domain']}) refused: scored unedited")
        else:
            ax.plot(xs, ys, mk, color=colour[ser["method"]], alpha=0.8, markersize=size[ser["method"]],
                    label=f"{ser['method']} ({ser['domain']})")
    ax.set_xlabel("IRA: in-domain retention (higher is better)")
    ax.set_ylabel("UA: unlearning accuracy (higher is better)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("UnlearnCanvas: every unlearning run" if report.get("protocol") == "official" else
                 "Embedded canvas: every unlearning run")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
