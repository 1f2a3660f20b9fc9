"""How a patch reads to a person: ``slug inspect`` and the lines ``slug apply`` prints.

``patch.json`` is untrusted input: every field is passed through :func:`slugkit.common.text.printable` (a concept
such as ``"\\x1b[2J\\r\\nbase model: evil"`` would clear the terminal and fake a line).
"""

from __future__ import annotations

from ..common.text import printable
from .format import Patch, _base_label

__all__ = ["describe", "failed_because", "family_mismatch", "printable", "warned_of"]

_WHY = {"not_forgotten": "the concept was not forgotten on its test images",
        "nothing_to_unlearn": "the unedited model did not recognise the concept: there was nothing to unlearn",
        "model_broken": "the edit broke the model: utility or the other concepts lost more than 5 × their budget",
        "audit_fail": "the audit run with the run found that the removal does not hold (its audit.md)"}


def failed_because(extra) -> str:
    """Why the run that made a patch failed, from ``patch.json → extra.verdict_codes`` (its fail reasons' codes):
    "the concept was not forgotten" was said of a run whose concept was gone but whose model broke (thirteenth
    trial). A patch without the codes (an older slugkit's) gets both possibilities."""
    codes = extra.get("verdict_codes") if isinstance(extra, dict) else None
    said = [_WHY[c] for c in codes or [] if c in _WHY]
    return "; ".join(said) or "the concept was not forgotten on its test images, or the edit broke the model"


def family_mismatch(family: str | None, metas: list[dict]) -> str | None:
    """The refusal for a ``--family`` that is not the patches' adapter (``slug apply``/``revert``/``audit``): it failed
    on tensor names and named the model, not the option (twenty-third trial). None when it fits or none was given."""
    named = {m.get("adapter") for m in metas} & {"open_clip", "hf_clip"}
    if family is None or not named or family in named:
        return None
    have = " and ".join(sorted(named))
    return (f"--family {family}: the patch's adapter is {have} (its tensors carry that family's names); leave "
            f"--family out (it defaults to the patch's) or give --family {have}")


def warned_of(extra) -> str:
    """``"worst_drop, samples_skipped"``: the warning codes a warn run recorded in its patch
    (``extra.warning_codes``), then a downstream run's CLIP's own (``extra.clip_warning_codes``: ``"worst_drop; the
    CLIP's own, used on its own: utility_drop"``), escaped; ``""`` when it recorded none (an older slugkit's
    patch)."""
    def listed(key):
        codes = extra.get(key) if isinstance(extra, dict) else None
        return ", ".join(printable(c) for c in codes) if isinstance(codes, list) else ""

    own, clip = listed("warning_codes"), listed("clip_warning_codes")
    return "; ".join(x for x in (own, clip and f"the CLIP's own, used on its own: {clip}") if x)


def verdict_line(path, meta: dict) -> str | None:
    """What ``slug apply`` and ``slug export`` print of the verdict of the run that made the patch at ``path``: a
    ``warning:`` for fail (with :func:`failed_because` and any warning codes), a ``note:`` for warn (export said
    nothing of a warn patch; eighteenth trial), None for pass or an unknown verdict."""
    extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
    if extra.get("verdict") == "fail":  # its warnings too (a fail's worst_drop went unsaid: verification 69)
        codes = warned_of(extra)
        return (f"warning: {path} comes from a run whose verdict was fail ({failed_because(extra)})"
                + (f"; also warned: {codes}" if codes else "") + "; see its result.json")
    if extra.get("verdict") == "warn":
        codes = warned_of(extra)
        return (f"note: {path} comes from a run whose verdict was warn" + (f" ({codes})" if codes else "")
                + "; its warnings are in that run's result.json")
    return None


def _is_sequential_run(folder) -> bool:
    """``folder/result.json`` says ``mode: sequential`` (a run of `slug demo/unlearn --sequential`)."""
    import json

    try:
        return json.loads((folder / "result.json").read_text(encoding="utf-8")).get("mode") == "sequential"
    except (OSError, ValueError, AttributeError):
        return False


def sequential_run_line(given: list) -> str | None:
    """For ``--patch`` paths that are steps of one sequential run (``SEQ/<k>-<Name>/patch``, ``SEQ/result.json`` with
    ``mode: sequential``): the verdict of that run's final model (``SEQ/patch``'s ``extra.verdict``), which the
    steps' own verdicts do not carry — applied in order they are that model, and printed "pass" where the chained
    patch said fail (trial 46). A ``warning:``/``note:`` line (:func:`verdict_line`), or None: not such steps, a
    pass, or an unreadable record."""
    import json
    import re

    seq, steps = _sequential_run_of(given)
    if seq is None:
        return None
    try:
        meta = json.loads((seq / "patch" / "patch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError):
        return None
    n = len([x for x in seq.iterdir() if re.fullmatch(r"\d+-.+", x.name)])
    line = verdict_line(seq / "patch", meta)
    if line is None:
        return None
    scope = ("the model all its steps make, which these patches applied in order are" if len(steps) >= n else
             f"the model all its {n} steps make (these are {len(steps)} of them)")
    return (f"{line.split(':', 1)[0]}: the sequential run {printable(str(seq))} has verdict "
            f"{printable(str((meta.get('extra') or {}).get('verdict')))} on {scope}; see its result.json")


def _sequential_run_of(given: list):
    """``(SEQ, {step folders})`` when the ``--patch`` paths are two or more steps of one sequential run, else
    ``(None, set())``."""
    import re

    from .format import resolve_patch_dir

    seqs, steps = set(), set()
    for g in given:
        try:
            d = resolve_patch_dir(g).resolve()
        except (OSError, ValueError):
            return None, set()
        if not re.fullmatch(r"\d+-.+", d.parent.name):
            return None, set()
        seqs.add(d.parent.parent)
        steps.add(d)
    if len(seqs) != 1 or len(given) < 2 or not _is_sequential_run(seq := seqs.pop()):
        return None, set()
    return seq, steps


def composed_line(given: list) -> str | None:
    """`slug apply` of several patches that are not the steps of one sequential run: a ``note:`` that their
    combination was never measured (two runs' patches of one concept were applied without a word; verification
    66). None for one patch or a sequential run's steps (:func:`sequential_run_line` says that run's verdict)."""
    if len(given) < 2 or _sequential_run_of(given)[0] is not None:
        return None
    return (f"note: {len(given)} patches composed; each was measured on its own, their combination was not: measure "
            "the result (`slug eval-sd`, `slug audit`) before you ship it")


def _steps(m: dict) -> str:
    """The step size line; a patch of several layers (``extra.layers_edited``, the multi-layer fallback) gives each
    layer's step and round — the top-level ``step_size`` is the first layer's only."""
    edits = (m.get("extra") or {}).get("layers_edited") if isinstance(m.get("extra"), dict) else None
    if m.get("step_size") is None and m.get("components"):  # a chained or composed patch ("step size: None")
        return "  step sizes: per component, below (η of each component's first layer)"
    if m.get("method") == "layer-finetune":  # the stored 1.0 is not a SLUG step (it read "step size: 1.0")
        return "  step size:  none (a fine-tune: the patch holds the fine-tuned values, not a step along a gradient)"
    if not isinstance(edits, list) or len(edits) < 2:
        return f"  step size:  {printable(_rounded(m.get('step_size'), 6))}"
    return "  step sizes: " + "; ".join(
        f"{printable(e.get('layer'))} {printable(_rounded(e.get('step_size'), 6))} (round {printable(e.get('round'))})"
        if isinstance(e, dict) else printable(e) for e in edits)


def method_line(method) -> str:
    """``inspect``'s method line; a fine-tune's (``layer-finetune``, ``--sd/--vlm-fallback finetune``) says it is not
    SLUG, for a patch as for its LoRA (the patch's line said the bare name)."""
    return f"  method:     {printable(method)}" + (" (NOT SLUG: a fine-tune after SLUG's search refused)"
                                                   if method == "layer-finetune" else "")


def describe(patch: Patch) -> str:
    """A short human summary: concept, method, base model, tensors (shape, dtype, relative change), η, metrics.
    Every value read from ``patch.json`` is escaped (:func:`printable`), so the text holds no control character
    but its line breaks."""
    m, p = patch.meta, printable
    lines = [
        f"slugkit patch (format {p(m.get('format_version'))}, slugkit {p(m.get('toolkit_version'))})",
        *(["  sealed:     no (a format 1 patch: its concept and metrics are not covered by a fingerprint)"]
          if m.get("format_version") == 1 else []),
        ("  concepts:   " if isinstance(m.get("concept"), list) else "  concept:    ") + _names(m.get("concept")),
        method_line(m.get("method")),
        f"  base model: {p(_base_label(m))}  [adapter: {p(m.get('adapter'))}]",
        *([f"  verdict:    {p((m.get('extra') or {}).get('verdict'))} (of the run that made it; see its result.json)"
           + (f": {p(failed_because(m['extra']))}" + (f"; also warned: {warned_of(m['extra'])}"
                                                         if warned_of(m["extra"]) else "")
              if m["extra"].get("verdict") == "fail" else
              f": warnings {warned_of(m['extra'])}" if warned_of(m["extra"]) else "")]
          if isinstance(m.get("extra"), dict) and m["extra"].get("verdict") else []),
        *_downstream(m),
        _steps(m),
        f"  tensors ({len(patch.names)}, {patch.nbytes / 2**20:.2f} MiB incl. originals):",
    ]
    for name in patch.names:
        info = m["tensors"][name]
        rel = ""
        if name in patch.patched and name in patch.original and patch.original[name].is_floating_point():
            o = patch.original[name].double()
            d = (patch.patched[name].double() - o).norm()
            rel = f"  ‖Δ‖/‖θ‖={float(d / o.norm().clamp_min(1e-30)):.3g}"
        lines.append(f"    {p(name)}  {p(info['dtype'])}{tuple(info['shape'])}{rel}")
    arch = m.get("architecture")
    if isinstance(arch, dict) and arch:
        lines.append("  architecture: " + ", ".join(f"{p(k)}={p(arch[k])}" for k in sorted(arch)))
    for comp in m.get("components") or []:
        tensors = comp.get("tensors", [])
        lines.append(f"  component: {_names(comp.get('concept'))} ({p(comp.get('method'))}, "
                     f"η={p(comp.get('step_size'))}) "
                     f"→ {', '.join(p(t) for t in (tensors if isinstance(tensors, list) else [tensors]))}")
    metrics = m.get("metrics") or {}
    if isinstance(metrics, dict) and isinstance(metrics.get("before"), dict) and isinstance(metrics.get("after"), dict):
        lines += ["  metrics (before → after):", *_before_after(metrics["before"], metrics["after"])]
    elif metrics:
        lines.append("  metrics:")
        for k in sorted(metrics, key=str):
            v = metrics[k]
            lines.append(f"    {p(k)}: {p(_rounded(v))}")
    return "\n".join(lines)


METRIC_NAMES = {"forget_top1": "FA@1", "forget_top5": "FA@5", "related_top1": "TA_CA@1 (other identities)",
                "utility_top1": "TA_IN@1 (utility)", "utility_top5": "TA_IN@5"}  # report.md's names


def _before_after(before: dict, after: dict) -> list[str]:
    """One line a metric, in report.md's names and order (``inspect`` printed Python dicts of the internal keys,
    twenty-third trial); a key neither names is shown as stored."""
    keys = [k for k in METRIC_NAMES if k in before or k in after]
    keys += sorted((set(before) | set(after)) - set(keys), key=str)

    def v(d, k):
        return printable(_rounded(d[k])) if k in d else "–"

    lines = []
    for k in keys:
        b, a = before.get(k), after.get(k)
        if isinstance(b, dict) or isinstance(a, dict):  # per concept (a joint run's forget_by_concept): one line each
            b, a = b if isinstance(b, dict) else {}, a if isinstance(a, dict) else {}
            for c in list(dict.fromkeys([*b, *a])):
                bc, ac = b.get(c), a.get(c)
                if isinstance(bc, dict) or isinstance(ac, dict):
                    bc, ac = bc if isinstance(bc, dict) else {}, ac if isinstance(ac, dict) else {}
                    lines += [f"    {printable(METRIC_NAMES.get(m, m))} of {printable(c)}: {v(bc, m)} → {v(ac, m)}"
                              for m in list(dict.fromkeys([*bc, *ac]))]
                else:
                    lines.append(f"    {printable(k)} of {printable(c)}: {v(b, c)} → {v(a, c)}")
            continue
        lines.append(f"    {printable(METRIC_NAMES.get(k, k))}: {v(before, k)} → {v(after, k)}")
    return lines


def _names(v) -> str:
    """A concept, or a joint run's concepts (a list: ``A, B``, not Python's ``['A', 'B']``), escaped."""
    return ", ".join(printable(x) for x in v) if isinstance(v, list) else printable(v)


def _downstream(m: dict) -> list[str]:
    """The ``downstream`` line of a patch judged on a downstream model (``--target sd``/``vlm``)."""
    d = (m.get("extra") or {}).get("downstream") if isinstance(m.get("extra"), dict) else None
    if not isinstance(d, dict):
        return []
    c, w = d.get("concept") or [None, None], list(d.get("worst_other") or [None, None]) + [None, None]
    values = f" ({w[2]:.2f} → {w[3]:.2f})" if all(isinstance(x, (int, float)) for x in w[2:4]) else ""
    return [f"  judged on:  {printable(d.get('judged_on'))}: concept {_fixed(c[0], 2)} → {_fixed(c[-1], 2)}, others' "
            f"mean drop {_fixed(d.get('others_mean_drop'), 3)}, worst {printable(w[0])} drop {_fixed(w[1], 2)}{values} "
            "(the metrics below are the CLIP's)"]


def _fixed(v, decimals: int) -> str:
    """A fraction as the reports print it (``decimals`` places: a mean drop of 0.0034482758620689 read "0.003448"
    here and "0.003" in report.md; verification 65); anything else as :func:`printable` gives it."""
    return f"{v:.{decimals}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else printable(v)


def _rounded(v, digits: int = 4):
    """Floats to ``digits`` significant digits, inside lists and dicts too (0.03999999910593033 → 0.04); patch.json
    keeps the exact values."""
    if isinstance(v, float):
        return float(f"{v:.{digits}g}")
    if isinstance(v, dict):
        return {k: _rounded(x, digits) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x, digits) for x in v]
    return v


def sequential_step_hint(given: list, audit: bool = False) -> str:
    """What to do when a patch that is step k > 1 of a sequential run (``SEQ/<k>-<Name>/patch``, ``SEQ/result.json``
    with ``mode: sequential``) did not fit the model: it was made on the model the earlier steps produced, so its
    originals are no base model's (``slug apply`` said "load the base model the patch was made for: embedded" of
    the model given, which was that base; trial 38). ``given``: the ``--patch`` paths; "" when none is such a step or
    its earlier steps are given too."""
    import json
    import re
    from pathlib import Path

    from .format import resolve_patch_dir

    dirs = []
    for g in given:
        try:
            dirs.append(resolve_patch_dir(g).resolve())
        except (OSError, ValueError):
            return ""
    for d in dirs:
        m = re.fullmatch(r"(\d+)-.+", d.parent.name)
        seq = d.parent.parent
        if not m or int(m.group(1)) < 2 or not _is_sequential_run(seq):
            continue
        steps = sorted((int(x.name.split("-", 1)[0]), x / "patch") for x in seq.iterdir()
                       if re.fullmatch(r"\d+-.+", x.name) and (x / "patch" / "patch.json").is_file())
        earlier = [p for k, p in steps if k < int(m.group(1))]
        if all(p in dirs for p in earlier):
            continue
        order = " ".join(f"--patch {printable(str(p))}" for p in earlier + [d])
        head = (f" {printable(str(d))} is step {m.group(1)} of the sequential run {printable(str(seq))}: it was made "
                "on the model the earlier steps produced")
        if audit:  # `slug audit` takes one --patch: the earlier steps' checkpoint is its base (verify 41, 42)
            first = " ".join(f"--patch {printable(str(p))}" for p in earlier)
            try:
                base = json.loads((d / "patch.json").read_text(encoding="utf-8"))["base_model"]["model"]
            except (OSError, ValueError, KeyError, TypeError):
                base = "MODEL"
            return (f"{head}, so audit it on that model: `slug apply {first} --model {printable(str(base))} --out "
                    f"steps.safetensors`, then `slug audit --patch {printable(str(d))} --pretrained "
                    "steps.safetensors`")
        return (f"{head}, so apply it after them, in the order they were made ({order}), or apply the run's "
                f"chained patch {printable(str(Path(seq) / 'patch'))}")
    return ""


def describe_lora(path, meta: dict) -> str:
    """``slug inspect FILE.safetensors`` of a LoRA ``slug export --lora`` wrote (``meta``: what
    :func:`slugkit.patch.lora.read_lora` returns): what it removes, for which encoder, its rank and reconstruction
    error per module, the patch it came from and that patch's run verdict (inspect said "is a file, not a patch";
    trial 39). Every field passes through :func:`printable`."""
    concept = meta.get("concept")
    names = ", ".join(map(printable, concept)) if isinstance(concept, list) else printable(concept)
    lines = [f"slugkit LoRA ({printable(meta.get('created_by'))}, format {printable(meta.get('format_version'))}): "
             f"{printable(str(path))}",
             f"  concept{'s' if isinstance(concept, list) else ''}:{'  ' if isinstance(concept, list) else '   '} "
             f"{names}",
             *([method_line(meta["method"])] if meta.get("method") else []),
             f"  base model: {printable(_base_label({'base_model': meta.get('base_model')}))}",
             f"  encoder:    {printable(meta.get('encoder'))} (diffusers' load_lora_weights key prefix)",
             *([] if meta.get("seal") else ["  sealed:     no (a format 1 LoRA, written before the seal: its metadata "
                                            "cannot be checked)"])]
    verdict = meta.get("verdict")
    if verdict:
        lines.append(f"  verdict:    {printable(verdict)} (of the run that made the patch)"
                     + (f": {failed_because(meta)}" if verdict == "fail" else
                        f"; warned of {warned_of(meta)}" if verdict == "warn" and warned_of(meta) else ""))
    bound = meta.get("max_error")
    lines.append("  rank:       " + (f"forced {printable(meta.get('rank'))}" if meta.get("rank") is not None else
                                     f"the smallest within relative error {printable(bound)} per module"))
    ranks, errors, tensors = (meta.get(k) or {} for k in ("ranks", "relative_errors", "tensors"))
    lines.append(f"  modules ({len(ranks)}):")
    for key in sorted(ranks):
        err = errors.get(key)
        line = f"    {printable(key)}  rank {printable(ranks[key])}"
        line += f"  relative error {err:.3e}" if isinstance(err, (int, float)) else ""  # as export prints it (v. 66)
        line += f"  (patch tensor {printable(tensors[key])})" if key in tensors else ""
        lines.append(line)
    lines.append(f"  patch fingerprint: {printable(str(meta.get('patch_fingerprint', ''))[:16])}…")
    return "\n".join(lines)
