"""The console summary and the ``report.md`` section of ``slug demo --target vlm``
(:mod:`slugkit.workflows.vlm_demo`)."""

from __future__ import annotations

from ..common.text import group_label
from .fallback import edited_phrase, fallback_lines
from .sd import cost_lines
from .search_lines import apply_hint
from .unlearn import outputs_line, worst_line

SAMPLES = 4  # sample answers per target in report.md


def _table(b: dict, a: dict, others: int) -> list[str]:
    return ["| the VLM's answers (test images) | before | after |", "|---|---|---|",
            f"| target named | {b['target_named']:.3f} | {a['target_named']:.3f} |",
            f"| other identities named (mean of {others}) | {b['other_named']:.3f} | {a['other_named']:.3f} |",
            f"| utility questions answered | {b['utility_accuracy']:.3f} | {a['utility_accuracy']:.3f} |"]


def print_vlm_summary(result: dict, out: str) -> None:
    """Headline (from the verdict), the VLM's before/after table, worst other identity and nearest neighbours, the
    CLIP figures, timing, outputs and the verdict's reasons."""
    from .unlearn import headline, verdict_lines

    v = result["vlm"]
    print()
    print(headline(result, "the embedded VLM (LLaVA)", edited_phrase(result, "of its CLIP vision tower")))
    print("\n".join(_table(v["before"], v["after"], v["collateral"]["concepts"])))
    for t, x in v["after"]["target_named_by_concept"].items():
        if len(v["after"]["target_named_by_concept"]) > 1:
            print(f"  {t}: named {v['before']['target_named_by_concept'][t]:.2f} -> {x:.2f}")
    line = worst_line(v["collateral"])
    if line:
        print(line)
    if result.get("chooser"):
        print(search_criterion(result["chooser"]).replace("`", ""))
        for line in fallback_lines(result["chooser"]):
            print(line.replace("`", "").replace("**", ""))
    m = result["metrics"]
    print(f"CLIP (test): FA@1 {m['before']['forget_top1']:.3f} -> {m['after']['forget_top1']:.3f}, other identities "
          f"top-1 {m['before']['related_top1']:.3f} -> {m['after']['related_top1']:.3f}")
    t = result["timing_s"]
    who = "SLUG + the fine-tune" if result.get("method") == "layer-finetune" else "SLUG"
    print(f"time: {who} {t['slug_total']:.1f} s, VLM evaluation {t['vlm_eval']:.1f} s; "
          f"patch {result['patch']['bytes']:,} bytes")
    print(f"{outputs_line(out)}; {apply_hint(result, out)}")
    for line in verdict_lines(result.get("verdict")):
        print(line)


def render_vlm_report(result: dict, samples: dict) -> str:
    """The ``report.md`` section: the table, worst and nearest identities, the VLM search, sample answers."""
    v = result["vlm"]
    c = v["collateral"]
    ch = result.get("chooser") or {}
    qs = v["images"]["utility_questions"]
    lines = ["", "## The embedded VLM (LLaVA) before and after the patch", "",
             f"Question: \"{v['images']['question']}\" on held-out test images ({v['images']['target']} per target, "
             f"{v['images']['per_other_identity']} per other identity); a name counts when the answer holds the full "
             "or the last name (the official notebook's rule). Utility: "
             + ", ".join(f"\"{q}\"" for q in qs.values())
             + f" on {v['images']['utility_per_class']} images per object class.", ""]
    lines += _table(v["before"], v["after"], c["concepts"]) + [""]
    line = worst_line(c)
    if line:
        lines += [line[0].upper() + line[1:] + ".", ""]
    rounds = ch.get("rounds") or [ch]
    lines += [search_criterion(ch), ""]
    likely = (rounds[0].get("vlm_search") or {}).get("name_prob") is not None
    finetuned = result.get("method") == "layer-finetune"  # SLUG's rounds refused: their steps are not the edit
    for rd in rounds:
        if len(rounds) > 1:
            part = rd.get("partial_step")
            lines.append(f"- **round {rd['round']}**" + (
                f": partial step {part['applied_step']:.4g} of `{group_label(part, short=False)}` "
                + ("tried (not in the patch)" if finetuned else "kept") if part else ""))
        lines += _search_lines((rd.get("vlm_search") or {}).get("layers", []), likely)
    lines += [""] + fallback_lines(ch) if ch.get("fallback") else []
    lines += ["", "Sample answers (before -> after):", ""]
    for t in v["before"]["target_named_by_concept"]:
        for i in range(SAMPLES):
            lines.append(f"- {t}, test image {i}: {samples['before']['name'][t][i]!r} -> "
                         f"{samples['after']['name'][t][i]!r}")
    for cname in list(samples["before"]["object"])[:2]:
        lines.append(f"- {cname} (\"{qs['object']}\"): {samples['before']['object'][cname][0]!r} -> "
                     f"{samples['after']['object'][cname][0]!r}")
    lines += ["", *cost_lines(result, "vlm_eval", "VLM evaluation")]
    return "\n".join(lines) + "\n"


def search_criterion(chooser: dict) -> str:
    """What the VLM step search counted as naming the target (``--vlm-name-prob``), one sentence."""
    rounds = chooser.get("rounds") or [chooser]
    p = (rounds[0].get("vlm_search") or {}).get("name_prob")
    if p is None:
        return ("The VLM step search counted a validation image as naming the target when its answer names it "
                "(`--vlm-name-prob off`).")
    return (f"The VLM step search counted a validation image as naming the target (\"named or likely\") when its "
            f"answer names it or the VLM gives the full and the last name a summed probability >= {p:g} "
            "(`--vlm-name-prob`, a margin for unseen images; the test figures are the answers alone).")


def _search_lines(layers: list[dict], likely: bool = False) -> list[str]:
    lines = []
    said = "named or likely" if likely else "named"
    for L in layers:
        steps = "; ".join(f"{t['step_size']:.4g}: {said} {t['target_recognised']:.2f}, others {-t['other_drop']:+.3f}"
                          + (f", utility {-t['utility_drop']:+.3f}" if "utility_drop" in t else "")
                          + (" (accepted)" if t["accepted"] else " (probe)" if t.get("probe") else "")
                          for t in L["trajectory"])
        clip = L.get("clip_step_size")  # None: the layer had no accepted CLIP step (the VLM gradient's search)
        start = f"CLIP step {clip:.4g}" if clip is not None else \
            f"no CLIP step; started at {L.get('start_step') or 0:.4g}"
        lines.append(f"- VLM step search on `{group_label(L, short=False)}` ({start}): {steps}")
    return lines
