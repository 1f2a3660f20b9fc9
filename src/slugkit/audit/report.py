"""``audit.md``: the audit record of :func:`slugkit.audit.run.run_audit` as markdown — a summary table (one row per
probe: what it tried, its budget, before → after, the graded number, the status) and a short section per probe."""

from __future__ import annotations

from .representation import EXPLANATION

TITLES = {"prompts": "Prompt variants", "attack": "Adversarial prompt search", "precision": "Reduced precision",
          "relearn": "Relearning", "representation": "Representation (linear probe)"}
MARK = {"pass": "pass", "warn": "**warn**", "fail": "**FAIL**", "skipped": "skipped"}


def _f(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _steps(v, rec: dict) -> str:
    return f"> {rec['budget']['steps']}" if v is None else str(v)


def _before_after(rec: dict) -> str:
    p = rec["probe"]
    if rec["status"] == "skipped":
        return "–"
    if p == "prompts" and rec.get("worst"):
        return f"{_f(rec['worst']['before'])} → {_f(rec['worst']['after'])}"
    if p == "precision" and rec.get("worst"):
        return f"{_f(rec['worst']['before'])} → {_f(rec['worst']['after'])}"
    if p == "attack" and "natural_before" not in rec["concept"]:  # text-to-image: recognition at checkpoints
        c = rec["concept"]["recognised"]
        return f"from the name: {', '.join(f'{v:.2f}' for _, v in sorted(c.items(), key=lambda x: int(x[0])))}"
    if p == "attack":
        c = rec["concept"]
        ctl = rec.get("control")
        return (f"{_f(c['natural_before'])} → {_f(c['natural_after'])} (attack {_f(c['success'])}"
                + (f"; from control names {_f(ctl['success'])})" if ctl else "; no control)"))
    if p == "relearn":
        return "; ".join(f"n={r['n']}: {_steps(r['concept_steps'], rec)} vs {_steps(r.get('control_steps'), rec)}"
                         for r in rec["rows"]) + " steps"
    if p == "representation":
        return f"{_f(rec['before']['concept'])} → {_f(rec['after']['concept'])}"
    return "–"


def _audited_model(result: dict) -> str:
    """"Model: … (weights …). " — what was audited, as audit.json records it (empty when it records no model)."""
    if not result.get("model"):
        return ""
    weights = f" (weights {result['pretrained']})" if result.get("pretrained") else ""
    return f"Model: {result['model']}{weights}. "


def bound_mark(graded: dict | None) -> str:
    """``"≤ "`` / ``"≥ "`` before a graded speed-up that is a bound: the concept (upper) or a control (lower) never
    reached the level within the budget and counts as iterations + 1 (trial 44, verify 45); ``""`` otherwise."""
    g = graded or {}
    return "≤ " if g.get("upper_bound") else "≥ " if g.get("lower_bound") else ""


def _own(x: dict) -> str:
    """A found prompt's own test top-1 and the mean over the restarts (the line gave the mean as the prompt's: 0.84
    for a prompt at 0.90; trial 44). An older audit.json without ``prompt_success``: the mean, said as such."""
    n = len(x.get("runs") or [])
    mean = f"mean over the {n} restarts {x['success']:.2f}" if n > 1 else f"test top-1 {x['success']:.2f}"
    return (f"its test top-1 {x['prompt_success']:.2f}; {mean}" if "prompt_success" in x and n > 1 else
            f"test top-1 {x['prompt_success']:.2f}" if "prompt_success" in x else mean)


def audit_markdown(result: dict) -> str:
    """The markdown text (ends with a newline)."""
    lines = [f"## Audit: does the removal of {result['concept']} hold?", "",
             f"Overall (gating probes): **{result['status']}**"
             + (f" ({result['status_note']})" if result.get("status_note") else "") + ". Control names (never "
             f"learned): {', '.join(result.get('controls') or []) or 'none'}. Data: {result.get('data', '')}. "
             + _audited_model(result) + f"Time: {result['seconds']:.0f} s."
             + (f" **The patch's method is {result['method']}, not SLUG.**"
                if result.get("method") not in (None, "slug", "composed") else "")
             + (f" Not run: {', '.join(result['not_run'])}." if result.get("not_run") else ""), "",
             *([f"**Note: the run that made this patch had verdict fail** ({_why(result)}; see its result.json): "
                f"{audit_scope(result)}.", ""]
               if result.get("patch_run_verdict") == "fail" else
               ["Note: the run that made this patch had verdict warn"
                + (f" ({result['patch_run_why']})" if result.get("patch_run_why") else "")
                + "; its warnings are in that run's result.json.", ""]
               if result.get("patch_run_verdict") == "warn" else []),
             *(["| probe | tried | before → after | graded | thresholds (pass ≤ / fail >) | status |",
                "|---|---|---|---|---|---|"] if result["probes"] else
               ["No probe ran on this patch (see \"Not run\" above for why)."])]
    for rec in result["probes"]:
        g = rec.get("graded")
        graded = f"{g['name']}: {bound_mark(g)}{g['value']:.2f}" if g else "–"
        th = f"{g['pass_at']:g} / {g['fail_at']:g}" if g else "–"
        gate = "" if rec.get("gating") else " (not gating)"
        lines.append(f"| {TITLES[rec['probe']]} | {rec.get('tried', '–')} | {_before_after(rec)} | {graded} | {th} | "
                     f"{MARK[rec['status']]}{gate} |")
    lines.append("")
    for rec in result["probes"]:
        lines += [f"### {TITLES[rec['probe']]}: {rec['status']}", "", rec["summary"] + ".", ""]
        p = rec["probe"]
        vlm = result.get("target") == "vlm"  # the VLM's answers name the person or not: no top-5
        if p == "prompts" and rec.get("rows"):
            lines += (["| kind | question | named before | named after |", "|---|---|---|---|"] if vlm else
                      ["| kind | variant | before top-1 | after top-1 | after top-5 |", "|---|---|---|---|---|"])
            for r in sorted((r for r in rec["rows"] if "after" in r), key=lambda r: -r["after"]["top1"]):
                tag = "" if r["informative"] else " (uninformative)"
                lines.append(f"| {r['kind']} | `{r['variant']}`{tag} | {_f(r['before']['top1'])} | "
                             f"{_f(r['after']['top1'])} |" + ("" if vlm else f" {_f(r['after'].get('top5'))} |"))
            same = [r["variant"] for r in rec["rows"] if r.get("same_tokens")]
            if same:
                lines.append(f"\nSame tokens as the name (not scored): {', '.join(f'`{v}`' for v in same)}.")
            lines.append("")
        elif p == "precision" and rec.get("rows"):
            lines += (["| condition | named before | named after |", "|---|---|---|"] if vlm else
                      ["| condition | before top-1 | after top-1 | after top-5 |", "|---|---|---|---|"])
            for r in rec["rows"]:
                if "skipped" in r:
                    lines.append(f"| {r['condition']} | skipped: {r['skipped']} |" + (" |" if vlm else " | |"))
                else:
                    tag = "" if r.get("informative", True) else " (uninformative)"
                    lines.append(f"| {r['condition']}{tag} | {_f(r['before']['top1'])} | {_f(r['after']['top1'])} |"
                                 + ("" if vlm else f" {_f(r['after'].get('top5'))} |"))
            lines.append("")
        elif p == "attack" and "controls" in rec:  # text-to-image
            for x in [rec["concept"]] + rec["controls"]:
                marks = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(x["recognised"].items(), key=lambda y: int(y[0])))
                lines.append(f"- from `{x['start']}`: best prompt `{x['prompt']}`; recognised at iterations {marks}")
            lines.append("")
        elif p == "attack":
            c, ctl = rec["concept"], rec.get("control")
            lines.append(f"Found prompt starting from the concept's name: `{c['prompt']}` ({_own(c)}, loss "
                         f"{c['loss']:.3f}).")
            for x in (ctl["each"] if ctl else []):
                lines.append(f"Same search, same images, from the never-learned name {x['name']!r}: `{x['prompt']}` "
                             f"({_own(x)}).")
            k = rec["budget"]["iterations"]
            steps = sorted({0, 1, 2, 3, 5, 10, 20, k} & set(range(0, k + 1)))
            lines += ["", "| iteration | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|",
                      "| concept top-1 | " + " | ".join(f"{c['curve'][i]:.2f}" for i in steps) + " |"]
            if ctl:
                lines.append("| control names top-1 | " + " | ".join(f"{ctl['curve'][i]:.2f}" for i in steps) + " |")
            lines.append("")
        elif p == "relearn" and rec.get("rows"):
            lines += ["| n pairs | concept top-1 at start | steps to 0.5 | controls' steps to 0.5 | speed-up |",
                      "|---|---|---|---|---|"]
            for r in rec["rows"]:
                ctl = _steps(r.get("control_steps"), rec) if "control" in r else "–"
                lines.append(f"| {r['n']} | {_f(r['concept'][0])} | {_steps(r['concept_steps'], rec)} | {ctl} | "
                             f"{r['speedup']:.2f} |")
            lines.append("")
        elif p == "representation" and rec["status"] != "skipped":
            lines.append(f"Other identities: {_f(rec['before']['others_mean'])} → {_f(rec['after']['others_mean'])} "
                         f"(worst {_f(rec['after']['others_worst'])}). What a high value means: {EXPLANATION}.")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _why(result: dict) -> str:
    return (result.get("patch_run_why")
            or "the concept was not forgotten on its test images, or the edit broke the model")


def audit_scope(result: dict) -> str:
    """What the audit of a failed run's patch does not tell: whether the removal happened, or (a broken model: the
    removal happened; fourteenth trial) the damage the edit did."""
    why = result.get("patch_run_why") or ""
    if "broke the model" in why:
        return "this audit tests how well the removal holds, not the damage the edit did to the rest of the model"
    if why.startswith("the audit run with the run") and ";" not in why:  # the run passed; its own audit failed
        return ("the run's own checks passed; the audit run with it (its audit.json) found the removal does not "
                "hold, and this audit tests the same")
    return "this audit tests how well the removal holds, not whether it happened"
