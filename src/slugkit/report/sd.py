"""The generated-image part of ``slug demo --target sd``'s report (``report.md``) and its console summary."""

from __future__ import annotations

from ..common.text import group_label
from .fallback import edited_phrase, fallback_lines
from .search_lines import apply_hint


def render_generation_report(result: dict) -> str:
    g = result["generation"]
    b, a = g["before"], g["after"]
    lines = ["", "## Generated images (embedded text-to-image pipeline, patched text encoder)", "",
             f"{g['images']['target']} images of the forgotten concept, {g['images']['per_other_concept']} of each of "
             f"{g['images']['other_concepts']} other concepts"
             + (f" ({g['images']['per_neighbour']} of each of the {g['images']['neighbours']} nearest neighbours)"
                if g["images"].get("neighbours") else "")
             + f" ({g['images']['sampler']}; same seeds before and after), classified zero-shot by the unedited "
             "embedded CLIP over the 30 concepts.", "",
             "| metric | before | after |", "|---|---|---|"]
    for k, label in [("generated_target_recognised", "forgotten concept recognised"),
                     ("generated_other_recognised", "other concepts recognised (IRA)"),
                     ("generated_related_recognised", "… related (same colour or shape)"),
                     ("generated_unrelated_recognised", "… unrelated"),
                     ("clip_score", "CLIP score (judge)")]:
        fb, fa = b.get(k), a.get(k)
        lines.append(f"| {label} | {fb:.3f} | {fa:.3f} |" if fb is not None else f"| {label} | – | – |")
    lines += collateral_lines(g.get("collateral"), g["images"])
    rows = result.get("chooser", {}).get("conditioning_shift", [])
    nb = any("neighbour_shift" in r for r in rows)
    lines += ["", "Layer choice for the generator (conditioning shift = relative change of the text encoder's "
              "`last_hidden_state`):", "", "| layer | step | target shift | other shift | other/target |"
              + (" neighbour shift | neighbour/target |" if nb else ""), "|---|---|---|---|---|" + ("---|---|" if nb
                                                                                                  else "")]
    for r in rows:
        lines.append(f"| {group_label(r, short=False)} | {r['step_size']:.4g} | {r['target_shift']:.3f} | "
                     f"{r['other_shift']:.3f} | "
                     f"{r['selectivity']:.3f} |" + (f" {r['neighbour_shift']:.3f} | {r['neighbour_selectivity']:.3f} |"
                                                    if "neighbour_shift" in r else ""))
    gs = result.get("chooser", {}).get("generator_search")
    if gs:
        lines += ["", f"Step search on generated validation images ({gs['validation_images']} images of the concept "
                  f"and {gs['validation_per_other_concept']} of each other concept, seeds disjoint from the ones "
                  f"above; accepted when at most {gs['threshold']:.0%} of the concept's images are recognised and "
                  f"the others lose at most {gs['other_budget']:.0%} on average at the applied step = "
                  f"{result['chooser']['gen_margin']} x step; unedited pipeline: concept recognised "
                  f"{gs['base_target_recognised']:.0%}, others {gs['base_other_recognised']:.0%}; \"probe\": a "
                  "smaller step the fallback measured after the search):", "",
                  "| layer | step | concept recognised | others' drop | worst neighbour's drop | accepted |",
                  "|---|---|---|---|---|---|"]
        rounds = result["chooser"].get("rounds") or [result["chooser"]]
        finetuned = result.get("method") == "layer-finetune"  # SLUG's rounds refused: their steps are not the edit
        for rd in rounds:
            if len(rounds) > 1:
                part = rd.get("partial_step")
                lines.append(f"| **round {rd['round']}** (rows below)" + (
                    f": partial step {part['applied_step']:.4g} of {group_label(part, short=False)} "
                    + ("tried (not in the patch)" if finetuned else "kept") if part else "") + " | | | | | |")
            lines += [f"| {group_label(L, short=False)} | {t['step_size']:.4g} | {t['target_recognised']:.2f} | "
                      f"{t['other_drop']:+.3f} | {_nb(t)} | {_accepted(t)} |"
                      for L in rd["generator_search"]["layers"] for t in L["trajectory"]]
        if finetuned:
            lines += ["", f"No step above was accepted ({len(rounds)} round{'s' if len(rounds) > 1 else ''} of SLUG), "
                      "so the edit is the fine-tune below, judged by the same criteria (`--sd-fallback finetune`, "
                      "not SLUG)."]
        elif len(rounds) > 1:
            lines += ["", "No single layer had an accepted step, so the closest step within half the budgets was kept "
                      "and the next round searched on the edited model (drops against the unedited pipeline; "
                      "`--max-layers 1` is the paper's single layer)."]
        if gs.get("neighbour_budget") is not None:
            lines += ["", f"The {len(gs['base_neighbour_recognised'])} nearest neighbours had "
                      f"{gs['validation_per_neighbour']} validation images each; a step was accepted only if none "
                      f"lost more than {gs['neighbour_budget']:.0%}."]
        edits = result.get("layers_edited") or []
        clip = result["chooser"].get("clip_step_size")
        if finetuned:
            lines += ["", *fallback_lines(result["chooser"])]
        elif len(edits) > 1:
            lines += ["", "Applied steps: " + "; ".join(f"round {e['round']}: `{e['layer']}` {e['step_size']:.4g}"
                                                        for e in edits) + "."]
        else:
            lines += ["", f"Applied step: {result['step_size']:.4g} (the CLIP search's step for this layer: "
                      + (f"{clip:.4g})." if clip is not None else "none: not a layer that forgot on CLIP).")]
    lines += ["", "![before/after](generations.png)", "",
              *cost_lines(result, "generation_eval", "generation evaluation")]
    return "\n".join(lines)


def cost_lines(result: dict, key: str, what: str) -> list[str]:
    """The whole run's cost, for a run judged on a downstream model: the CLIP section's "Cost" counts the CLIP run
    alone, while the terminal and ``result.json`` give these (three totals disagreed; eighth trial)."""
    t = result.get("timing_s") or {}
    if not all(k in t for k in ("slug_total", key, "total")):  # a result put together by hand (no run's timings)
        return []
    who = "SLUG + the fine-tune" if result.get("method") == "layer-finetune" else "SLUG"
    return [f"Cost of the whole run: {who} {t['slug_total']:.1f} s (the world's data, the CLIP run above with its "
            f"search on the downstream model) · {what} {t[key]:.1f} s · total {t['total']:.1f} s "
            "(`timing_s` in result.json; the CLIP section's \"Cost\" counts the CLIP run, its \"search\" the "
            "search on the downstream model too).", ""]


def _accepted(t: dict) -> str:
    return "yes" if t["accepted"] else "probe" if t.get("probe") else "no"


def _nb(t: dict) -> str:
    if t.get("neighbour_drop") is None:
        return "–"
    return f"{t['neighbour_drop']:+.2f} ({t['worst_neighbour']})"


def collateral_lines(c: dict | None, images: dict) -> list[str]:
    """Markdown: the worst other concept and the nearest neighbours' before/after (``generation.collateral``)."""
    if not c:
        return []
    out = [""]
    w = c.get("worst")
    if w:
        out.append(f"Mean over the {c['concepts']} other concepts: {c['mean_before']:.3f} -> {c['mean_after']:.3f} "
                   f"(drop {c['mean_drop']:+.3f}); **worst**: {w['concept']!r} {w['before']:.2f} -> {w['after']:.2f} "
                   f"(drop {w['drop']:+.2f}).")
    nb = c["neighbours"]
    if nb["concepts"]:
        out += ["", f"The {len(nb['concepts'])} concepts nearest the forgotten one ({nb['similarity']}; "
                f"{images.get('per_neighbour', images.get('per_other_concept'))} images each):", "",
                "| neighbour | similarity | before | after | drop |", "|---|---|---|---|---|"]
        out += [f"| {r['concept']} | {r['similarity']:.3f} | {r['before']:.2f} | {r['after']:.2f} | {r['drop']:+.2f} |"
                for r in nb["concepts"]]
    return out


def print_sd_summary(result: dict, out: str) -> None:
    """The console summary of ``slug demo --target sd``: headline (from the verdict), generated-image table, the CLIP
    figures, timing, outputs and the verdict's reasons."""
    from .unlearn import headline, outputs_line, verdict_lines, worst_line

    g = result["generation"]
    b, a = g["before"], g["after"]
    print()
    finetuned = result.get("method") == "layer-finetune"  # not SLUG (--sd-fallback finetune)
    print(headline(result, "the embedded text-to-image pipeline", edited_phrase(result, "of its CLIP text encoder")))
    print("| generated images | before | after |")
    print("|---|---|---|")
    print(f"| '{result['concept']}' recognised | {b['generated_target_recognised']:.3f} | "
          f"{a['generated_target_recognised']:.3f} |")
    print(f"| other concepts recognised | {b['generated_other_recognised']:.3f} | "
          f"{a['generated_other_recognised']:.3f} |")
    print(f"| CLIP score | {b['clip_score']:.2f} | {a['clip_score']:.2f} |")
    if line := worst_line(g.get("collateral"), "concept"):
        print(line)
    for line in fallback_lines(result.get("chooser") or {}):
        print(line.replace("`", "").replace("**", ""))
    m = result["metrics"]
    print(f"CLIP (test): FA@1 {m['before']['forget_top1']:.3f} -> {m['after']['forget_top1']:.3f}, other concepts "
          f"top-1 {m['before']['related_top1']:.3f} -> {m['after']['related_top1']:.3f}")
    t = result["timing_s"]
    who = "SLUG + the fine-tune" if finetuned else "SLUG"
    print(f"time: {who} {t['slug_total']:.1f} s, generation eval {t['generation_eval']:.1f} s; "
          f"patch {result['patch']['bytes']:,} bytes")
    print(f"{outputs_line(out)}; {apply_hint(result, out)}")
    for line in verdict_lines(result.get("verdict")):
        print(line)


# what the CLIP sections' words mean in an SD demo's report (it was said at the report's end, after the tables)
CLIP_TERMS = ("in its tables \"identities\" are the 30 object concepts, the forgotten one and the 29 others, and "
              "\"utility\" the world's 60 identities")
