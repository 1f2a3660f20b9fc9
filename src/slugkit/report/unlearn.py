"""Human-readable outputs of a run: the Pareto plot (PNG) and ``report.md``; ``result.json`` is the machine twin."""

from __future__ import annotations

import io
from pathlib import Path

from ..common.files import atomic_write_bytes
from ..common.text import group_label, printable
from .search_lines import FINETUNED, _fmt, _why_heading, apply_command, trajectory_lines  # noqa: F401  (re-exported)
from .search_lines import later_fronts

METRIC_LABELS = [
    ("forget_top1", "FA@1 (forget top-1)", "lower is better"),
    ("forget_top5", "FA@5 (forget top-5)", "lower is better"),
    ("related_top1", "TA_CA@1 (other identities top-1)", "keep"),
    ("utility_top1", "TA_IN@1 (utility top-1)", "keep"),
]


def pareto_plot(table_json: dict, path: str | Path, title: str = "", chosen: str | None = None) -> None:
    """Log-log scatter of alignment vs importance per tower, front layers labelled (like the official PDFs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = [t for t in ("vision", "language") if any(c["tower"] == t for c in table_json["candidates"])]
    fig, axes = plt.subplots(1, max(1, len(towers)), figsize=(6.5 * max(1, len(towers)), 5.2), squeeze=False)
    for ax, tower in zip(axes[0], towers):
        rows = [c for c in table_json["candidates"] if c["tower"] == tower]
        off = [r for r in rows if not r["on_front"]]
        on = sorted([r for r in rows if r["on_front"]], key=lambda r: r["alignment"])
        ax.scatter([r["alignment"] for r in off], [r["importance"] for r in off], s=14, c="#9aa5b1",
                   label="candidate")
        ax.plot([r["alignment"] for r in on], [r["importance"] for r in on], "-o", c="#d1495b", ms=5,
                label="Pareto front")
        for r in on:
            short = r["name"].replace("transformer.resblocks.", "b").replace("visual.", "v.")
            ax.annotate(short, (r["alignment"], r["importance"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if chosen and any(r["name"] == chosen for r in rows):
            r = next(r for r in rows if r["name"] == chosen)
            ax.scatter([r["alignment"]], [r["importance"]], s=140, facecolors="none", edgecolors="#00798c",
                       linewidths=2, label="chosen layer")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gradient alignment |cos(g_f, g_r)|  (lower is better)")
        ax.set_ylabel("layer importance ||g_f|| / ||θ||  (higher is better)")
        ax.set_title(f"{tower} tower")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def metrics_table(before: dict, after: dict) -> str:
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for key, label, _ in METRIC_LABELS:
        if key in before or key in after:
            b, a = before.get(key), after.get(key)
            d = None if a is None or b is None else a - b
            lines.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {'–' if d is None else f'{d:+.3f}'} |")
    return "\n".join(lines)


def broke_the_model(verdict: dict | None) -> bool:
    """A ``fail`` verdict whose concept went but whose edit broke the model (``model_broken`` without a forgetting
    failure): the headline says so rather than "did NOT unlearn"."""
    codes = {r.get("code") for r in (verdict or {}).get("reasons", [])}
    return (verdict or {}).get("status") == "fail" and "model_broken" in codes \
        and not codes & {"not_forgotten", "nothing_to_unlearn"}


# result["method"] -> who made the edit, for a headline and a report title (SLUG unless the run says otherwise)
METHOD_WORDS = {"layer-finetune": "A one-layer fine-tune (NOT SLUG: SLUG's search refused; {option})"}


def method_words(result: dict) -> str:
    """Who made the edit: "SLUG", or e.g. the fine-tune fallback with the option that asked for it."""
    option = ((result.get("chooser") or {}).get("fallback") or {}).get("option", "--vlm-fallback finetune")
    return METHOD_WORDS.get(result.get("method"), "SLUG").format(option=option)


def headline(result: dict, subject: str, edit: str) -> str:
    """The one line a run opens its summary with; it says "unlearned" only when the verdict is not ``fail``."""
    status = result.get("verdict", {}).get("status", "pass")
    who = method_words(result)
    if broke_the_model(result.get("verdict")):
        return (f"{who} removed {result['concept']!r} from {subject} by editing {edit}, but the edit BROKE the model "
                "(see the verdict); do not ship the patch")
    if status == "fail":
        return f"{who} did NOT unlearn {result['concept']!r} from {subject} (edit of {edit} kept for inspection)"
    return (f"{who} unlearned {result['concept']!r} from {subject} by editing {edit}"
            + (" — with warnings" if status == "warn" else ""))


def edit_tensors(e: dict) -> str:
    """The tensors one edit changed: its layer, or its whole group (an MLP's fc1 and fc2 are one edit: it named
    fc2 alone; trial 26)."""
    group = e.get("group") or [e["layer"]]
    return e["layer"] if len(group) <= 1 else " + ".join(group)


def edit_label(result: dict) -> str:
    """``layer (step η, relative change η/R)`` (a group: its tensors joined by `` + ``), or every edited layer so
    (multi-layer fallback)."""
    edits = result.get("layers_edited") or [{"layer": result["layer"], "group": result.get("group"),
                                             "step_size": result["step_size"],
                                             "relative_change": result["relative_change"]}]
    step = (lambda e: FINETUNED) if result.get("method") == "layer-finetune" else (
        lambda e: f"step {e['step_size']:.4g}")
    return " + ".join(f"{edit_tensors(e)} ({step(e)}, relative change {e['relative_change']:.3f}" + _of(e)
                      + _largest(e) + ")" for e in edits)


def _of(e: dict) -> str:
    """`` of fc1``: which tensor a group's relative change is (it read as the group's: verification 67)."""
    group = e.get("group") or [e["layer"]]
    return f" of {_short(e['layer'])}" if len(group) > 1 else ""


def _short(name: str) -> str:
    """``fc1`` of ``…mlp.fc1.weight``."""
    return name.rsplit('.', 2)[-2] if name.endswith('.weight') else name


def _largest(e: dict) -> str:
    """``; largest: v_proj 0.172`` when another tensor of the edit's group changed more than the named one (the
    headline said the q_proj's 0.032 of a q/k/v edit: trial 43)."""
    top, name = e.get("relative_change_max"), e.get("relative_change_max_tensor")
    if top is None or name == e["layer"] or top <= e["relative_change"] * 1.005:
        return ""
    return f"; largest: {_short(name)} {top:.3f}"


def consumer_shift_lines(rec: dict | None) -> list[str]:
    """Markdown of ``result.json → consumer_shift`` (:mod:`slugkit.workflows.consumer_shift`), or nothing."""
    if not rec:
        return []
    rows = [("the target's prompts", rec["target"], 1.0), ("empty prompt", rec["empty"], rec["empty_ratio"])]
    if rec.get("others_mean") is not None:
        rows.append(("other concepts (mean)", rec["others_mean"], rec["others_ratio"]))
        name, v = rec["worst_other"]
        rows.append((f"worst other: {name}", v, v / max(rec["target"], 1e-12)))
    rows += [(f"nearest: {n}", v, v / max(rec["target"], 1e-12)) for n, v in rec.get("nearest", {}).items()]
    if rec.get("utility") is not None:
        rows.append(("utility class names", rec["utility"], rec["utility"] / max(rec["target"], 1e-12)))
    return ["## What the pipeline reads (`--consumer sd`)", "",
            f"Relative shift of the text encoder's {rec['reads']} (‖ΔH‖/‖H‖ over all tokens), the CLIP checks above "
            f"do not see it; a warning at {rec['warn_at']:g} × the target's for the others' mean, "
            f"{rec.get('empty_warn_at', 1):g} × for the empty prompt. Generated images: `slug eval-sd`.", "",
            "| prompts | shift | × target's |", "|---|---|---|",
            *(f"| {w} | {v:.3f} | {r:.2f} |" for w, v, r in rows), ""]


def collateral_lines(coll: dict | None, what: str = "identity", whats: str = "identities", top: int = 5) -> list[str]:
    """Markdown for a :func:`slugkit.eval.collateral.collateral_record`: the mean next to the worst, the nearest
    neighbours' before/after, and the ``top`` largest drops."""
    if not coll:
        return [f"Per-{what} accuracy was not measured (no images of other {whats}), so the worst case is unknown."]
    w = coll["worst"]
    lines = [f"Metric: {coll['metric']}, over {coll['concepts']} other {whats}. Mean drop "
             f"{coll['mean_drop']:.3f} ({coll['mean_before']:.3f} → {coll['mean_after']:.3f}); **worst: "
             f"{w['concept']} {w['before']:.2f} → {w['after']:.2f} (drop {w['drop']:.2f})**.", "",
             f"Nearest {whats} to the target (k = {coll['neighbours']['k']}, by {coll['neighbours']['similarity']}):",
             "", f"| {what} | similarity | before | after | drop |", "|---|---|---|---|---|"]
    lines += [f"| {n['concept']} | {n['similarity']:.3f} | {n['before']:.2f} | {n['after']:.2f} | {n['drop']:.2f} |"
              for n in coll["neighbours"]["concepts"]]
    hit = sorted(coll["per_concept"].items(), key=lambda kv: (-kv[1]["drop"], kv[0]))[:top]
    lines += ["", "Largest drops (before − after): " + ", ".join(f"{c} {v['drop']:.2f}" for c, v in hit) + "."]
    return lines


def outputs_line(out: str | Path) -> str:
    """``outputs: OUT/result.json, report.md, …, patch/``: what the finished run folder holds at its top level
    (its marker first, folders last), read from the folder so that the line cannot drift from what a run writes —
    only the run's own entries (:func:`slugkit.common.outguard.own_entries`), not a user's files kept in it."""
    from ..common.outguard import MANIFEST, RUN_MARKERS, own_entries

    own = own_entries(Path(out)) - {MANIFEST}
    entries = sorted((p for p in Path(out).iterdir() if p.name in own),
                     key=lambda p: (p.name not in RUN_MARKERS, p.is_dir(), p.name))
    shown = printable(out)  # a newline in --out split the line
    return f"outputs: {shown}/" + ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries)


def two(x: float) -> str:
    """``x`` with two decimals, never ``-0.00`` (a drop of -0.001 is no drop)."""
    return f"{round(x, 2) + 0.0:.2f}"


def worst_line(coll: dict | None, what: str = "identity") -> str | None:
    """The terminal summary's collateral line, the same for the CLIP, SD and VLM demos: the worst other concept's
    before → after and drop (before − after, as in report.md), then the nearest neighbours'; None when not measured."""
    if not coll or not coll.get("worst"):
        return None
    w = coll["worst"]
    return (f"worst other {what}: {w['concept']} {w['before']:.2f} -> {w['after']:.2f} (drop {two(w['drop'])}); "
            "nearest: " + ", ".join(f"{n['concept']} {n['before']:.2f} -> {n['after']:.2f}"
                                    for n in coll["neighbours"]["concepts"]))


def verdict_lines(verdict: dict | None) -> list[str]:
    """``verdict: STATUS`` and one ``fail:`` / ``warning:`` line per reason, and a ``note:`` when the worst-drop check
    was off (``--worst-budget off``: a bare "pass" beside Hasa Malwick 1.00 → 0.42; trial 44)."""
    if not verdict:
        return []
    off = (verdict.get("budgets") or {}).get("worst_drop", 0) >= 1.0
    return [f"verdict: {verdict['status']}"] + [
        f"{'fail' if r['severity'] == 'fail' else 'warning'}: {r['message']}" for r in verdict["reasons"]] + (
        ["note: the worst single-concept drop was not checked (--worst-budget off); see the collateral above"]
        if off else [])


def _unprotected(result: dict, prot: dict) -> str:
    """The clause for edited layers the projection did not reach (``prot["groups"]``: the Pareto layers', and each
    later round's; a layer ``--null-space-layers all`` took in kept its raw gradient, and the line claimed the
    protection for it: verification 67)."""
    done = {n for g in [prot.get("groups") or {}] + [r["groups"] for r in prot.get("later_rounds") or []] for n in g}
    edits = result.get("layers_edited") or [{"layer": result["layer"]}]
    left = [e["layer"] for e in edits if e["layer"] not in done]
    if not done or not left:
        return ""
    return (f" It was projected on the Pareto layers ({', '.join(f'`{n}`' for n in sorted(done))}) only; the edited "
            f"{', '.join(f'`{n}`' for n in left)} {'is' if len(left) == 1 else 'are'} not among them (taken in by "
            "`--null-space-layers all`), so the applied edit was not projected off the neighbours.")


def _protection_lines(result: dict) -> list[str]:
    """The neighbour-protected step and the layers edited, when the run used them."""
    lines = []
    prot = result.get("neighbour_protection") or {}
    if prot and not prot.get("k"):
        lines += ["Neighbour protection off: the paper's step (`--protect-neighbours 0`, or precomputed gradients, "
                  "which carry no retain pairs). The defaults project the step off the nearest identities' "
                  "gradients; see the README's \"The nearest neighbours\".", ""]
    if prot.get("k") and result.get("method") == "layer-finetune":
        lines += [f"The edit is not SLUG's step, so no projection applies to it: SLUG's refused search was projected "
                  f"off the {prot['k']} nearest concepts' gradients; the fine-tune protects the other concepts through "
                  "its retain set (`chooser.fallback` in result.json).", ""]
    elif prot.get("k"):
        used = ", ".join(f"{n['concept']} ({n['pairs']} pairs)" for n in prot["neighbours"])
        lines += [f"Step projected off the alignment gradients of the {prot['k']} nearest identities ({used})"
                  + (f"; skipped for too few retain pairs: {', '.join(str(n['concept']) for n in prot['skipped'])}"
                     if prot.get("skipped") else "")
                  + ("; the later rounds' steps too, off the same neighbours" if prot.get("later_rounds") else "")
                  + " — `--protect-neighbours 0` is the paper's step."
                  + _unprotected(result, prot), ""]
    edits = result.get("layers_edited") or []
    if len(edits) > 1 or any(e.get("why", "").startswith("single layer kept") for e in edits):
        lines += ["Layers edited (multi-layer fallback, `--max-layers 1` is the paper's method):", "",
                  "| round | layer | η | η/R | why |", "|---|---|---|---|---|"]
        lines += [f"| {e['round']} | `{e['layer']}` | {e['step_size']:.4g} | {e['relative_change']:.3f} | {e['why']} |"
                  for e in edits]
        lines.append("")
    return lines


def clip_section(text: str, result: dict | None = None, out=None) -> str:
    """The CLIP run's ``report.md`` as a section of a downstream run's report: its ``**verdict: X**`` line relabelled
    as the CLIP's own (the only bare verdict line of an SD report said "fail" while the run's verdict, in the banner
    and result.json, was warn: trial 44), a broken CLIP's "do not ship this patch" said of the CLIP used on its own
    (it stood under a run whose verdict was warn: verification 64), and with the downstream run's ``result`` its
    "Apply it" command for the model the run used (the CLIP section is written before the run records it) — with the
    run folder ``out``, one to paste in that folder, writing ``../<run>-pipeline`` (``-vlm``) beside it (it said
    ``--out DIR``: verification 65)."""
    import re

    text = (text.replace("**verdict: ", "**the CLIP's own verdict, used on its own (not this run's, see above): ", 1)
            .replace("the edit broke the model; do not ship this patch", "the edit broke the CLIP as a standalone "
                     "model: do not use the patched CLIP on its own (this run is judged on the downstream model's "
                     "outputs, see above)"))
    if result is None:
        return text
    said = (apply_command(result, "patch/", f"../{Path(out).name}") + " in this folder" if out is not None
            else apply_command(result))
    return re.sub(r"Apply it: `slug apply [^`]*`( \([A-Z_]+: [^)]*\))?", lambda _: f"Apply it: {said}", text, count=1)


def downstream_head(result: dict, judged: str, section: str, started: str, terms: str = "") -> str:
    """The first lines of ``report.md`` for a run judged on a downstream model (``judged``: "the generated images"
    for ``--target sd``, "the VLM's answers" for ``--target vlm``): the run's verdict **with its reasons**
    (:func:`downstream_reason_lines`), and that the CLIP sections below measure the CLIP with the patch applied, used
    on its own (their verdict, worst identity and step are the CLIP's), and the CLIP run the downstream search
    ``started`` from — a reader took the CLIP section's "fail" for the run's (eighth trial), and the sections of a
    fine-tune run for the CLIP run before it (verification 64). The reasons were on the console and in result.json
    only, and a warning that was the CLIP's own alone read as the images' ("This run's verdict is the generated
    images': warn"; verification 66). ``terms``: what the CLIP tables' words mean here (the SD demo's
    "identities" are object concepts; it was said at the report's end)."""
    edits = result.get("layers_edited") or [{"layer": result["layer"], "group": result.get("group")}]
    edited = " + ".join(f"`{edit_tensors(e)}`" for e in edits)
    applied = (f"applied {FINETUNED} of {edited}" if result.get("method") == "layer-finetune" else
               f"applied step {result['step_size']:.4g} on {edited}" if len(edits) == 1 else  # one step for two
               "applied " + ", then ".join(f"step {e['step_size']:.4g} on `{edit_tensors(e)}`" for e in edits))
    return (f"> **This run's verdict, judged on {judged}: {result['verdict']['status']}** (section \"{section}\" "
            f"below; {applied}).\n"
            + "".join(f"> {line}\n" for line in downstream_reason_lines(result["verdict"], judged))
            + ">\n> The CLIP sections that follow measure the CLIP with this patch applied, used on its own (zero-shot"
            + (f"; {terms}" if terms else "") + "), and describe the CLIP "
            f"run whose gradient and layers the {started} started from; their own verdict, worst case and step are "
            f"the CLIP's (their \"Cost\" counts the {started} in \"search\"; the whole run's cost ends this report)."
            "\n\n")


def downstream_reason_lines(verdict: dict, judged: str) -> list[str]:
    """The banner's reason lines (``- fail: …`` / ``- warning: …``, as :func:`verdict_lines` words them), and, when
    every reason is the CLIP's own (``"on": "clip"``), that ``judged`` passed every check of its own."""
    reasons = verdict.get("reasons") or []
    lines = [f"- {line}" for line in verdict_lines({**verdict, "reasons": reasons})[1:]]
    if reasons and all(r.get("on") == "clip" for r in reasons):
        lines.append(f"- {judged[0].upper() + judged[1:]} pass every check of their own: the "
                     f"{'warning is' if len(reasons) == 1 else 'warnings are'} the CLIP's, used on its own.")
    return lines


def render_report(result: dict) -> str:
    m = result["metrics"]
    chosen = result["layer"]
    lines = [
        f"# {'SLUG' if result.get('method', 'slug') == 'slug' else result['method']} unlearning report: "
        f"{result['concept']}",
        "",
        *(f"**{x}**" if i == 0 else f"- {x}" for i, x in enumerate(verdict_lines(result.get("verdict")))),
        "",
        f"Model: `{result['model_label']}` · method: {method_words(result)} · edit: "
        f"{edit_label(result)}",
        "",
        "## Before / after (held-out test images)",
        "",
        metrics_table(m["before"], m["after"]),
        "",
        f"Test set: {result['data']['test_sizes']['forget']} images of the concept, "
        f"{result['data']['test_sizes']['related']} images of {result['data']['test_sizes']['related_identities']} "
        f"other identities, {result['data']['test_sizes']['utility']} utility images over "
        f"{result['data']['test_sizes']['utility_classes']} classes. Validation images (used by the search) are "
        f"disjoint from these."
        + "".join(f" **{what} folders holding no image, not evaluated: "
                  f"{', '.join(result['data'][k]['empty_folders'])}.**"
                  for what, k in (("Test", "test_sizes"), ("Validation", "val_sizes"))
                  if result["data"][k].get("empty_folders")),
        "",
        "## Collateral: the other identities, worst first",
        "",
        *collateral_lines(result.get("collateral")),
        "",
        *consumer_shift_lines(result.get("consumer_shift")),
        *_protection_lines(result),
        *_why_heading(result),
        f"{len(result['pareto_front'])} tensors are on the Pareto fronts (low gradient alignment, high importance)"
        + "".join(f"; round {r}'s, on the edited model: {n}" for r, n in later_fronts(result)) + ". "
        f"The step-size search ran on each; selection policy `{result['config']['selection']}`: "
        + {"utility": "best validation utility retention at the applied step (ties: related, then the smaller "
                      "relative change).",
           "mean": "best mean retention (after/before) of validation utility and related top-1 at the applied step.",
           "min": "best worst-case retention (after/before) of validation utility and related-identity top-1 at "
                  "the applied step.",
           "deepest": "the deepest front layer that reached the criterion."}[result["config"]["selection"]],
        "",
        f"Each layer below is scored at {result['config'].get('margin', 1.1):g} × its smallest accepted step"
        + ("; an edited layer's applied step is in \"Layers edited\" when the fallback took only part of it"
           if len(result.get("layers_edited") or []) > 1 else "")
        + (". Round 2+ rows were searched on the model with the earlier edits applied."
           if any(s.get("round", 1) > 1 for s in result["layers_searched"]) else "."),
        "",
        "| round | layer | tower | accepted η | η at scoring | η/R | val FA@5 | val related | val utility | val worst "
        "identity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    edited_in = {(e["round"], e["layer"]) for e in result.get("layers_edited") or []}
    for s in result["layers_searched"]:
        vm = s.get("val_metrics") or {}
        rnd = s.get("round", 1)
        mark = " **(edited)**" if (rnd, s["name"]) in edited_in or (not edited_in and s["name"] == chosen) else ""
        if mark and result.get("method") == "layer-finetune":
            mark = f" **(edited: {FINETUNED}, not this row's step)**"
        rel = None if s["step_size"] is None else s["step_size"] / s["ratio"]
        w = s.get("val_worst")
        lines.append(
            f"| {rnd} | `{group_label({'layer': s['name'], 'group': s.get('group')}, short=False)}`{mark} | "
            f"{s['tower']} | "
            f"{_fmt(s['accepted_step']) if s['accepted_step'] else 'none'} | "
            f"{_fmt(s['step_size']) if s['step_size'] else '–'} | {_fmt(rel)} | {_fmt(vm.get('forget_top5'))} | "
            f"{_fmt(vm.get('related_top1'))} | {_fmt(vm.get('utility_top1'))} | "
            f"{'–' if not w else w['concept'] + ' drop ' + two(w['drop'])} |")
    lines += ["", "![Pareto fronts](pareto.png)", "", *trajectory_lines(result, chosen)]
    t = result["timing_s"]
    lines += ["", "## Cost", "",
              f"Gradients {t['gradients']:.1f} s · layers {t['layers']:.2f} s · search {t['search']:.1f} s · "
              f"evaluation {t['evaluation']:.1f} s · total {t['total']:.1f} s. Patch: {result['patch']['bytes']:,} "
              f"bytes ({100 * result['patch']['bytes'] / result['model_bytes']:.3f}% of the model's "
              f"{result['model_bytes']:,} bytes).", "",
              f"Apply it: {apply_command(result)} or `slugkit.apply_patch(model, slugkit.load_patch('patch'))`; "
              "revert is bit-exact.", ""]
    return "\n".join(lines)
