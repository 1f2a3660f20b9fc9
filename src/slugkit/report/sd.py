"""The generated-image part of ``slug demo --target sd``'s report (``report.md``) and its console summary."""

from __future__ import annotations


def render_generation_report(result: dict) -> str:
    g = result["generation"]
    b, a = g["before"], g["after"]
    lines = ["", "## Generated images (embedded text-to-image pipeline, patched text encoder)", "",
             f"{g['images']['target']} images of the forgotten concept, {g['images']['per_other_concept']} of each of "
             f"{g['images']['other_concepts']} other concepts ({g['images']['sampler']}; same seeds before and "
             "after), classified zero-shot by the unedited embedded CLIP over the 30 concepts.", "",
             "| metric | before | after |", "|---|---|---|"]
    for k, label in [("generated_target_recognised", "forgotten concept recognised"),
                     ("generated_other_recognised", "other concepts recognised (IRA)"),
                     ("generated_related_recognised", "… related (same colour or shape)"),
                     ("generated_unrelated_recognised", "… unrelated"),
                     ("clip_score", "CLIP score (judge)")]:
        fb, fa = b.get(k), a.get(k)
        lines.append(f"| {label} | {fb:.3f} | {fa:.3f} |" if fb is not None else f"| {label} | – | – |")
    lines += ["", "Layer choice for the generator (conditioning shift = relative change of the text encoder's "
              "`last_hidden_state`):", "", "| layer | step | target shift | other shift | other/target |",
              "|---|---|---|---|---|"]
    for r in result.get("chooser", {}).get("conditioning_shift", []):
        lines.append(f"| {r['layer']} | {r['step_size']:.4g} | {r['target_shift']:.3f} | {r['other_shift']:.3f} | "
                     f"{r['selectivity']:.3f} |")
    gs = result.get("chooser", {}).get("generator_search")
    if gs:
        lines += ["", f"Step search on generated validation images ({gs['validation_images']} images of the concept and "
                  f"{gs['validation_per_other_concept']} of each other concept, seeds disjoint from the ones above;"
                  " "
                  f"accepted when at most {gs['threshold']:.0%} of the concept's images are recognised and the others "
                  f"lose at most {gs['other_budget']:.0%} at the applied step = {result['chooser']['gen_margin']} x "
                  f"step; unedited: {gs['base_target_recognised']:.0%} / {gs['base_other_recognised']:.0%}):", "",
                  "| layer | step | concept recognised | others' drop | accepted |", "|---|---|---|---|---|"]
        for L in gs["layers"]:
            lines += [f"| {L['layer']} | {t['step_size']:.4g} | {t['target_recognised']:.2f} | "
                      f"{t['other_drop']:+.3f} | {'yes' if t['accepted'] else 'no'} |" for t in L["trajectory"]]
        lines += ["", f"Applied step: {result['step_size']:.4g} (the CLIP search's step for this layer: "
                  f"{result['chooser']['clip_step_size']:.4g})."]
    lines += ["", "In the CLIP table at the top of this report, \"other identities\" are the 29 other object concepts "
              "and \"utility\" the world's 60 identities (the SD demo unlearns an object concept).", "",
              "![before/after](generations.png)", ""]
    return "\n".join(lines)


def print_sd_summary(result: dict, out: str) -> None:
    """The console summary of ``slug demo --target sd``: headline (from the verdict), generated-image table, the CLIP
    figures, timing, outputs and the verdict's reasons."""
    from .unlearn import headline, verdict_lines

    g = result["generation"]
    b, a = g["before"], g["after"]
    print()
    print(headline(result, "the embedded text-to-image pipeline",
                   f"{', '.join(result['group'])} (step {result['step_size']:.4g}) of its CLIP text encoder"))
    print("| generated images | before | after |")
    print("|---|---|---|")
    print(f"| '{result['concept']}' recognised | {b['generated_target_recognised']:.3f} | "
          f"{a['generated_target_recognised']:.3f} |")
    print(f"| other concepts recognised | {b['generated_other_recognised']:.3f} | "
          f"{a['generated_other_recognised']:.3f} |")
    print(f"| CLIP score | {b['clip_score']:.2f} | {a['clip_score']:.2f} |")
    m = result["metrics"]
    print(f"CLIP (test): FA@1 {m['before']['forget_top1']:.3f} -> {m['after']['forget_top1']:.3f}, other concepts "
          f"top-1 {m['before']['related_top1']:.3f} -> {m['after']['related_top1']:.3f}")
    t = result["timing_s"]
    print(f"time: SLUG {t['slug_total']:.1f} s, generation eval {t['generation_eval']:.1f} s; "
          f"patch {result['patch']['bytes']:,} bytes")
    print(f"outputs: {out}/result.json, report.md, generations.png, patch/")
    for line in verdict_lines(result.get("verdict")):
        print(line)
