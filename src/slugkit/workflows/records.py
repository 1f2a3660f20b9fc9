"""What a SLUG run writes next to its patch: the ``result.json`` record, ``run.json`` (configuration, versions, data
manifests, every search), ``layers.json``, ``pareto.png`` and ``report.md`` (rendered by :mod:`slugkit.report.unlearn`).

Every file is written atomically, into the run's temporary folder (:func:`slugkit.common.runfolder.run_folder`); the
paths the JSON files record are the final ones (``--out``, not the temporary folder: ``write_json`` maps them). The
same inputs and seed give the same records apart from timings.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from ..common.files import atomic_write_bytes, write_json
from ..report.unlearn import pareto_plot, render_report
from .inputs import manifest_digest


def versions() -> dict:
    """Python, torch and the libraries whose versions change a run's numbers (``run.json``)."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("slugkit", "open_clip_torch", "numpy", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def model_label(model_id: dict) -> str:
    """``model/pretrained`` (or the model id alone) for headlines and plot titles."""
    m = model_id.get("model")
    return f"{m}/{model_id['pretrained']}" if model_id.get("pretrained") else str(m)


def result_record(cfg, adapter, data: dict, run: dict) -> dict:
    """The ``result.json`` document of a run: concept, model, the verdict (:mod:`slugkit.workflows.verdict`),
    chosen layer and step size, test and validation metrics before/after, the Pareto front, every search evaluation,
    timings, patch and model bytes."""
    timing = run["timing"]
    edits = run.get("edits") or []
    chosen = edits[0].search if edits else run["chosen"]  # the first edited layer names the run
    searched = all_searches(run)
    search_entries = [{"layer": s.name, "round": rnd, "step_size": st.step_size, "relative_change": st.relative_change,
                       "metrics": brief(st.metrics), "accepted": st.accepted}
                      for rnd, s in searched for st in s.trajectory]
    before, after = run["before"], run["after"]
    changes = tensor_changes(run["patch"])
    return {
        "concept": cfg.concept,
        "concepts": cfg.concept_list(),
        "model": adapter.model_id,
        "model_label": model_label(adapter.model_id),
        "method": (run["chooser_info"] or {}).get("edit_method", "slug"),  # a chooser's fallback may not be SLUG
        "verdict": run["verdict"],
        "layer": chosen.name,
        "group": chosen.group,
        "tower": chosen.tower,
        "step_size": chosen.step_size,
        "accepted_step_size": chosen.accepted_step,
        "relative_change": chosen.step_size / chosen.ratio,
        "metrics": {"before": before, "after": after, "validation_before": run["val_before"],
                    "validation_after": brief(run["chosen"].val_metrics)},
        "collateral": collateral_of(before, after, run.get("neighbours", [])),
        "neighbour_protection": run["protection"].to_json() if run.get("protection") else None,
        "layers_edited": [_with_tensor_changes(e.to_json(), changes) for e in edits],
        "relative_change_by_tensor": changes,
        **({"consumer_shift": run["consumer_shift"]} if run.get("consumer_shift") else {}),
        "pareto_front": run["table"].front_names(),
        # --gradients: the file's batching beside this run's, and what differs (gradfile.batching_record)
        **({"gradients_file": {"path": os.path.abspath(cfg.gradients), **data["gradients_file"]}}
           if data.get("gradients_file") else {}),
        **({"chooser": run["chooser_info"]} if run["chooser_info"] is not None else {}),
        "layers_searched": [{"round": rnd, **{k: (brief(v) if k == "val_metrics" and v else v)
                                              for k, v in s.to_json().items() if k != "trajectory"},
                             "val_worst": _val_worst(s, run["val_before"])} for rnd, s in searched],
        "search": search_entries,
        "config": {"metric": cfg.search.metric, "threshold": cfg.search.threshold, "steps": cfg.search.steps,
                   "initial_divisor": cfg.search.initial_divisor, "margin": cfg.search.margin,
                   "utility_floor": cfg.search.utility_floor, "selection": cfg.search.selection,
                   "protect_neighbours": cfg.protect_neighbours},
        "timing_s": timing,
        "cpu_s": run.get("cpu") or {},
        "patch": {"path": "patch", "bytes": run["patch_bytes"], "tensors": run["patch"].names},
        "model_bytes": adapter.model_bytes(),
        "data": {"n_forget": run["grads"].n_forget, "n_retain": run["grads"].n_retain,
                 "val_sizes": data["val_suite"].sizes(), "test_sizes": data["test_suite"].sizes()},
    }


def tensor_changes(patch) -> dict[str, float]:
    """‖patched − original‖ / ‖original‖ of every tensor of ``patch`` (Frobenius norms, float64). A group edit's
    ``relative_change`` is η/R of the tensor named for the search; its other tensors' changes can be several times
    larger (a q/k/v edit said 0.032 where v_proj changed by 0.172: trial 43)."""
    out = {}
    for n in patch.names:
        o, p = patch.original[n].double(), patch.patched[n].double()
        out[n] = float((p - o).norm() / o.norm().clamp_min(1e-300))
    return out


def _with_tensor_changes(edit: dict, changes: dict[str, float]) -> dict:
    """A ``layers_edited`` entry with ``relative_change_max`` / ``relative_change_max_tensor`` over its group."""
    group = [n for n in (edit.get("group") or [edit["layer"]]) if n in changes]
    if not group:
        return edit
    top = max(group, key=lambda n: changes[n])
    return {**edit, "relative_change_max": changes[top], "relative_change_max_tensor": top}


def all_searches(run: dict) -> list[tuple[int, object]]:
    """``(round, LayerSearch)`` of every layer searched: round 1's front, then each later round's
    (:mod:`slugkit.workflows.rounds`)."""
    return [(1, s) for s in run["searches"]] + [(e.round, s) for e in run.get("edits") or [] for s in e.searches]


def _val_worst(search, val_before: dict) -> dict | None:
    """The validation worst single-identity drop of a searched layer at its applied step (what the choice saw)."""
    from ..slug.search import worst_val_drop

    name, drop = worst_val_drop(search.val_metrics, val_before)
    return None if name is None else {"concept": name, "drop": drop}


def brief(metrics: dict) -> dict:
    """``metrics`` without the per-identity dict (kept once, in ``collateral``), with its worst drop instead when the
    search recorded it."""
    return {k: v for k, v in metrics.items() if k != "related_by_concept"}


def collateral_of(before: dict, after: dict, neighbours: list[tuple[str, float]]) -> dict | None:
    """The worst-case collateral record (:func:`slugkit.eval.collateral.collateral_record`) of the test metrics:
    every other identity's top-1 before/after, the worst, the :data:`~slugkit.eval.collateral.NEIGHBOURS_K` nearest
    neighbours by the model's text embedding. None when no other identity was measured."""
    from ..eval.collateral import NEIGHBOURS_K, collateral_record

    if not before.get("related_by_concept") or not after.get("related_by_concept"):
        return None
    return collateral_record(before["related_by_concept"], after["related_by_concept"], neighbours[:NEIGHBOURS_K],
                             "identity top-1 over the full name list (TA_CA@1 per identity)", NEIGHBOURS_K,
                             "cosine of the unedited model's zero-shot class embeddings (validation templates)")


def write_run_files(cfg, out: Path, data: dict, run: dict, result: dict, extra_run_info: dict | None) -> None:
    """``layers.json``, ``pareto.png``, ``result.json``, ``run.json`` and ``report.md`` into ``out``."""
    table, chosen = run["table"], (run["edits"][0].search if run.get("edits") else run["chosen"])
    f_stats, r_stats = data["forget_stats"], data["retain_stats"]
    later = [e.search.name for e in run.get("edits") or [] if e.round > 1]
    # round 1's front (the unedited model's gradients); a later round's layer is named, not plotted (trial 44)
    note = {"round": 1, "later_rounds_edited": later} if later else {}
    write_json(out / "layers.json", {**table.to_json(), **note})
    pareto_plot(table.to_json(), out / "pareto.png",
                title=f"SLUG Pareto fronts: {cfg.concept} ({result['model_label']})"
                + (f"\nround 1 (unedited model); round 2+ edited {', '.join(later)}: see report.md" if later else ""),
                chosen=chosen.name)
    write_json(out / "result.json", result)
    record = {"config": asdict(cfg), "seed": cfg.seed, "versions": versions(), "threads": torch.get_num_threads(),
              "data": {"forget": {"spec": cfg.forget, "read_stats": f_stats.as_dict(), "samples": f_stats.manifest},
                       "retain": {"spec": cfg.retain, "read_stats": r_stats.as_dict(),
                                  "samples_sha256": manifest_digest(r_stats.manifest)},
                       "val_sizes": data["val_suite"].sizes(), "test_sizes": data["test_suite"].sizes()},
              "gradient_seconds": run["grads"].seconds, "timing_s": run["timing"], "chosen_layer": chosen.name,
              "search": [{"round": rnd, **s.to_json()} for rnd, s in all_searches(run)]}
    for s in record["search"]:
        s["trajectory"] = [{**t, "metrics": brief(t["metrics"])} for t in s["trajectory"]]
        s["val_metrics"] = brief(s["val_metrics"]) if s.get("val_metrics") else s.get("val_metrics")
    if extra_run_info:
        record.update(extra_run_info)
    write_json(out / "run.json", record)
    atomic_write_bytes(out / "report.md", render_report(result).encode())
