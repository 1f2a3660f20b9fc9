"""The console summary of a sequential multi-concept run (``slug demo --sequential``,
:mod:`slugkit.workflows.sequential`)."""

from __future__ import annotations

from ..common.text import printable
from .unlearn import broke_the_model, verdict_lines


def print_sequential_summary(result: dict, out: str) -> None:
    """Print the outcome of a sequential multi-concept run: per-concept and shared metrics, the chained patch."""
    print()
    verb = "removed" if broke_the_model(result["verdict"]) else "did NOT unlearn" \
        if result["verdict"]["status"] == "fail" else "unlearned"  # verdict_lines say why
    print(f"SLUG {verb} {', '.join(result['concepts'])} one after another ("
          + " then ".join(" + ".join(e["layer"] for e in s.get("layers_edited") or [s]) for s in result["steps"])
          + ")" + (", but the edits BROKE the model (see the verdict); do not ship the patch"
                   if broke_the_model(result["verdict"]) else ""))  # every layer of a step named (eighth trial)
    print("| concept | FA@1 before | FA@1 after | FA@5 before | FA@5 after |")
    print("|---|---|---|---|---|")
    for c, m in result["per_concept"].items():
        b, a = m["before"], m["after"]
        print(f"| {c} | {b['forget_top1']:.3f} | {a['forget_top1']:.3f} | {b['forget_top5']:.3f} | "
              f"{a['forget_top5']:.3f} |")
    b, a = result["metrics"]["before"], result["metrics"]["after"]
    print(f"shared: related top-1 (identities not unlearned) {b['related_top1']:.3f} -> {a['related_top1']:.3f}, "
          f"utility top-1 {b['utility_top1']:.3f} -> {a['utility_top1']:.3f}")
    print(f"one chained patch: {printable(out)}/patch ({result['patch']['bytes']:,} bytes); "
          f"per-step runs in {printable(out)}/<k>-<Name>/")
    for line in verdict_lines(result.get("verdict")):
        print(line)
