"""The labelled fine-tune fallbacks (``--vlm-fallback finetune``, ``--sd-fallback finetune``; not SLUG) in words,
for the console summary and ``report.md`` (``result.json → chooser.fallback``: :mod:`slugkit.workflows.layer_ft`)."""

from __future__ import annotations


def fallback_lines(chooser: dict) -> list[str]:
    """Whether the edit is the fine-tune (**not SLUG**) and each group it fine-tuned, with its validation figures;
    [] when the run had no fallback. Records written before ``option`` / ``summary`` existed are the VLM's."""
    fb = chooser.get("fallback")
    if not fb:
        return []
    option = fb.get("option", "--vlm-fallback finetune")
    summary = fb.get("summary") or (
        f"on the VLM's answers ({fb['steps']} Adam steps at {fb['lr']:g}, the target's name pushed below "
        f"{fb['tau']:g} on its pool images, the other identities' and the utility answers kept)")
    head = (f"**Not SLUG: method layer-finetune.** SLUG's search refused, and the edit is a one-layer fine-tune "
            f"{summary} (`{option}`)" if fb.get("accepted") else
            f"SLUG's search refused, and the one-layer fine-tune (`{option}`) did not pass either")
    rows = []
    for t in fb["tried"]:
        said = "named or likely" if "utility_drop" in t else "recognised"
        top = max(t["relative_change"], key=t["relative_change"].get)  # which tensor (it read as the group's: 65)
        largest = (f"relative change {t['relative_change'][top]:.3g}" if len(t["relative_change"]) == 1 else
                   f"largest relative change {t['relative_change'][top]:.3g}, {top.rsplit('.', 2)[-2]}")
        rows.append(f"- fine-tuned `{' + '.join(t['group'])}` ({largest}"
                    f", {t['train_s']:.0f} s): {said} {t['target_recognised']:.2f} on validation, others "
                    f"{0.0 - t['other_drop']:+.3f}, worst neighbour {t.get('worst_neighbour')} "  # 0 - x: no "-0.00"
                    f"{0.0 - (t.get('neighbour_drop') or 0.0):+.2f}"
                    + (f", utility {0.0 - t['utility_drop']:+.3f}" if "utility_drop" in t else "")
                    + (" (accepted)" if t["accepted"] else ""))
    why = str(chooser.get("refusal") or "").replace(" (no patch)", "")  # SLUG's rounds made none; the fine-tune did
    return [head + ":", *rows] + ([f"SLUG's own refusal, before the fine-tune: {why}"] if why else [])


def edited_phrase(result: dict, where: str) -> str:
    """The console headline's "by editing …" object: every edited group with its step and round (a two-layer SLUG
    run named its first layer only), or the fine-tuned values of a ``layer-finetune`` edit (it said "step 1", the
    stored step of θ ← θ − 1·(−delta)); ``where``: e.g. "of its CLIP vision tower"."""
    edits = result.get("layers_edited") or [{"group": result["group"], "step_size": result["step_size"]}]
    if result.get("method") == "layer-finetune":
        return f"{', '.join(edits[0]['group'])} (the fine-tuned values, not a SLUG step) {where}"
    said = " + ".join(f"{', '.join(e['group'])} (step {e['step_size']:.4g})" for e in edits)
    return f"{said} {where}" + (f" ({len(edits)} layers: no single layer forgot within the budgets)"
                                if len(edits) > 1 else "")
