"""The search sections of a run's ``report.md`` (:func:`slugkit.report.unlearn.render_report`): the first edited
layer's CLIP search trajectory, the heading of the layer table when a downstream search chose the edit, and the
``slug apply`` form for the model the run judged on. Split from :mod:`slugkit.report.unlearn` (its 400-line cap)."""

from __future__ import annotations

FINETUNED = "the fine-tuned values (not a SLUG step)"


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _partial_note(result: dict) -> str:
    """", except here: …" when the multi-layer fallback applied only part of the first layer's step (the heading
    gave the margin rule alone, twenty-third trial)."""
    first = (result.get("layers_edited") or [{}])[0]
    if not str(first.get("why", "")).startswith("partial step"):
        return ""
    return (f", except here: the fallback applied a partial step of it, η = {first['step_size']:.6g} (η/R "
            f"{first['relative_change']:.4f}; \"Layers edited\"), and searched the next round on the edited model")


def trajectory_lines(result: dict, chosen: str) -> list[str]:
    """The report's "Search trajectory of the first edited layer": its CLIP step search, or — when the layer was
    chosen off that search (by the search on a pipeline's generations or a VLM's answers) — a line saying where its
    trajectory is instead of an empty table."""
    c = result["config"]
    lines = ["## Search trajectory of the first edited layer", "",
             f"Criterion: validation `{c['metric']}` ≤ {c['threshold']}"
             + (f", utility drop ≤ {c['utility_floor']}" if c['utility_floor'] is not None else "")
             + f"; S = {c['steps']} evaluations; applied step = {c['margin']} × smallest accepted step"
             + _partial_note(result) + ".", ""]
    rows = [e for e in result["search"] if e["layer"] == chosen and e.get("round", 1) == 1]
    if not rows and result.get("method") == "layer-finetune":  # no step rule applies to it (verification 62)
        group = " + ".join(f"`{n}`" for n in result.get("group") or [chosen])
        return [*lines[:2], f"{group} {'were' if len(result.get('group') or []) > 1 else 'was'} not searched on the "
                f"CLIP's validation metrics: {'they hold' if len(result.get('group') or []) > 1 else 'it holds'} "
                f"{FINETUNED}, judged on the downstream model's outputs (the fine-tune's lines below)."]
    if rows and result.get("method") == "layer-finetune":  # the table below was never applied (verification 60)
        lines += [f"**None of these steps was applied**: SLUG's search refused, and `{chosen}` holds "
                  f"{FINETUNED}. Its CLIP step search, for reference:", ""]
    if not rows:
        return lines + [f"`{chosen}` was not searched on the CLIP's validation metrics: its step comes from the "
                        "search on the downstream model's outputs, whose trajectory is in that section below."]
    lines += ["| # | η | η/R | val FA@1 | val FA@5 | accepted |", "|---|---|---|---|---|---|"]
    for k, e in enumerate(rows, 1):
        lines.append(f"| {k} | {e['step_size']:.6g} | {e['relative_change']:.4f} | "
                     f"{_fmt(e['metrics'].get('forget_top1'))} | {_fmt(e['metrics'].get('forget_top5'))} | "
                     f"{'yes' if e['accepted'] else 'no'} |")
    return lines


def _why_heading(result: dict) -> list[str]:
    """"Why this layer" — or, when a search on a downstream model's outputs chose the edited layers (``--target sd``:
    generated images, ``--target vlm``: the VLM's answers), a heading saying that the table below is the CLIP side's
    search over the candidates, so layers it lists but nobody edited are not mistaken for the edit."""
    ch = result.get("chooser") or {}
    rounds = ch.get("rounds") or [ch]
    what = ("the generated images" if any(r.get("generator_search") for r in rounds)
            else "the VLM's answers" if any(r.get("vlm_search") for r in rounds) else None)
    if what is None:
        return ["## Why " + ("these layers" if len(result.get("layers_edited") or []) > 1 else "this layer"), ""]
    edited = (" + ".join(f"`{n}`" for n in result.get("group") or [result["layer"]])  # every tensor fine-tuned
              if result.get("method") == "layer-finetune" else
              ", ".join(f"`{e['layer']}`" for e in result.get("layers_edited") or []) or f"`{result['layer']}`")
    return ["## The CLIP search over the candidate layers", "",
            (f"The edited layer ({edited}) was fine-tuned after SLUG's search on {what} refused (its section below); "
             if result.get("method") == "layer-finetune" else
             f"The edited layers ({edited}) and their steps were chosen by the search on {what} (its section below); ")
            + "the CLIP search summarised here gave the candidates and their starting steps. "
            + ("A row marked **(edited)**, if any, is the fine-tuned layer (at the fine-tuned values, not that row's "
               "step); the others were candidates only." if result.get("method") == "layer-finetune" else
               "A row marked **(edited)** is a layer that was edited; the others were candidates only."), ""]


def apply_command(result: dict, patch: str = "patch/", beside: str | None = None) -> str:
    """The ``slug apply`` form for the model the run judged on, ``patch`` the patch folder as the reader should type
    it (a VLM run's patch goes into LLaVA, a text-to-image run's into the pipeline; it said ``--patch patch/ ...`` for
    every run): the model the run used (``embedded`` for the shipped one; ``result["vlm_model"]``,
    ``result["pipeline"]["model"]``) and, given the run folder as the reader types it (``beside``), a new folder
    beside it, ``<beside>-vlm`` / ``<beside>-pipeline``; else placeholders that are said (``SD_DIR``/``VLM_DIR``,
    ``DIR``: pasted as printed, the command failed on them: verification 64)."""
    import shlex

    rounds = (result.get("chooser") or {}).get("rounds") or [result.get("chooser") or {}]
    if result.get("target") == "vlm" or any(r.get("vlm_search") for r in rounds):
        flag, holder, model, what, kind = "--llava", "VLM_DIR", result.get("vlm_model"), "the VLM's folder", "vlm"
    elif result.get("target") == "sd" or any(r.get("generator_search") for r in rounds):
        flag, holder, model, what, kind = "--pipeline", "SD_DIR", (result.get("pipeline") or {}).get("model"), \
            "the pipeline's folder", "pipeline"
    else:
        return f"`slug apply --patch {patch} ...`"
    out = f"{beside}-{kind}" if beside is not None else None
    said = ([] if model else [f"{holder}: {what}, `embedded` for the shipped one"]) + (
        [] if out else ["DIR: a new folder for the patched copy"])
    return (f"`slug apply {flag} {shlex.quote(model) if model else holder} --patch {patch} --out "
            f"{shlex.quote(out) if out else 'DIR'}`" + (f" ({'; '.join(said)})" if said else ""))


def apply_hint(result: dict, out) -> str:
    """The console's ``apply the patch: slug apply …`` for the run folder ``out``, to paste as printed (quoted for a
    shell): the model the run used and a new folder beside the run's, ``<out>-pipeline`` / ``<out>-vlm`` (the
    text-to-image summary had none; then it named ``SD_DIR`` and ``DIR``, which failed when pasted)."""
    import shlex

    from ..common.text import printable

    run = printable(str(out)).rstrip("/") or "."
    return "apply the patch: " + apply_command(result, shlex.quote(f"{run}/patch"), run).replace("`", "")


def later_fronts(result: dict) -> list[tuple[int, int]]:
    """(round, layers searched) of each later round (the front size was round 1's alone: verification 70)."""
    rounds = [s.get("round", 1) for s in result["layers_searched"]]
    return [(r, rounds.count(r)) for r in sorted(set(rounds)) if r > 1]
