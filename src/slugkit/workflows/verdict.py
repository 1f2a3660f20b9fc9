"""The verdict of a run: ``pass``, ``warn`` or ``fail``, with the reasons, computed from the measured numbers only.

A run never says "unlearned" because its search stopped; it says so when the **held-out test** numbers show it.

``fail`` (exit status 4) — the removal did not happen, or there was nothing to remove:
  * ``nothing_to_unlearn``: the unedited model does not recognise the concept on the test images (the criterion
    metric is already at or under the threshold before the edit);
  * ``not_forgotten``: after the edit the test criterion metric (FA@5 by default) exceeds the threshold by more than
    ``forget_tolerance`` (default 0.05: the search decides on *validation* images, so one test image in 20 may still
    be recognised), or FA@1 exceeds ``forget_tolerance`` — for every concept of a joint run;
  * text-to-image runs: the same two checks on the generated images the judge recognises (:func:`generation_checks`);
  * ``model_broken``: utility (TA_IN@1) or the other identities' mean (TA_CA@1) dropped by more than
    :data:`BROKEN` × its budget (0.10 / 0.25 at the defaults; never less than at the defaults, never more than
    :data:`BROKEN_CAP` unless the budget is): the concept may be gone, but so is the model — a run that lost 0.48 of
    utility said "unlearned — with warnings" (tenth and twelfth trials). Runs judged on a downstream model (``--target
    sd``/``vlm``) keep the CLIP's own drop as a warning: their patch is for the pipeline, judged on its own outputs.

``warn`` (exit status 3) — the removal happened, but something a user must know did too:
  * ``utility_drop`` / ``related_drop``: utility (TA_IN@1) or other-identity (TA_CA@1) accuracy dropped by more than
    its budget (defaults 0.02 and 0.05, ``--utility-budget`` / ``--related-budget``);
  * ``worst_drop``: one other identity (or concept) lost more than ``worst_drop`` (default 0.20, ``--worst-budget``)
    of its accuracy — the mean can hide a look-alike the edit broke (:mod:`slugkit.eval.collateral`);
  * ``not_measured``: a metric could not be measured (no utility folders: the layer choice then ignored utility);
  * ``samples_skipped``: image–caption pairs were skipped while reading (undecodable, unpaired, duplicates);
  * ``captions_without_concept``: some forget captions do not name the concept (none at all is refused before the
    gradient pass: :func:`caption_check`);
  * ``name_truncated``: captions whose concept name falls beyond the text context (the tokenizer cuts it).

``pass`` (exit status 0) otherwise. Reasons are dicts ``{"code", "severity", "message"}`` (a downstream run's CLIP's
own add ``"on": "clip"``); ``result.json`` holds ``{"verdict": {"status", "reasons", "budgets"}}``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

EXIT_STATUS = {"pass": 0, "warn": 3, "fail": 4}
BROKEN = 5.0  # a mean drop beyond this many times its budget fails the run (model_broken) ...
BROKEN_CAP = 0.30  # ... or beyond 0.30, unless the budget is larger (--utility-budget 0.2 disarmed it: 14th trial)
# Metrics are float32 fractions: 30 of 1500 utility images is 0.02, yet 0.994 - 0.974 = 0.0200000405 in float32. A drop
# is over its budget only beyond this slack, far below one image of any evaluation set (as the search compares).
EPS = 1e-6
METRIC_NAMES = {"forget_top1": "FA@1", "forget_top5": "FA@5", "related_top1": "TA_CA@1", "utility_top1": "TA_IN@1"}


@dataclass
class Budgets:
    """How far the measured numbers may stray before the verdict changes (fractions, 0–1)."""

    forget_tolerance: float = 0.05  # test criterion metric may exceed the validation threshold by this much
    utility_drop: float = 0.02  # TA_IN@1 drop that turns the verdict into a warning
    related_drop: float = 0.05  # TA_CA@1 drop (mean over the other identities / concepts)
    worst_drop: float | None = 0.20  # the largest drop of any single other identity / concept (issue 12); None: off

    def __post_init__(self):
        from ..common.errors import check_number

        if self.worst_drop is None:  # off, as --worst-budget off (a drop never exceeds 1; trial 48 found no way)
            self.worst_drop = 1.0
        for k, v in asdict(self).items():  # a str failed later, in a comparison (trial 28)
            check_number("Budgets", k, v, hi=0.5 if k == "forget_tolerance" else 1.0, hi_open=k == "forget_tolerance",
                         flag={"forget_tolerance": "--forget-tolerance"}.get(k, f"--{k.split('_')[0]}-budget"))


@dataclass
class Verdict:
    """Collects reasons; the status is the most severe one (``fail`` > ``warn`` > ``pass``)."""

    reasons: list[dict] = field(default_factory=list)
    budgets: dict = field(default_factory=dict)

    def add(self, severity: str, code: str, message: str) -> None:
        if severity not in ("warn", "fail"):
            raise ValueError(f"severity must be warn or fail, not {severity!r}")
        self.reasons.append({"code": code, "severity": severity, "message": message})

    @property
    def status(self) -> str:
        sev = {r["severity"] for r in self.reasons}
        return "fail" if "fail" in sev else "warn" if "warn" in sev else "pass"

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.status]

    def to_json(self) -> dict:
        return {"status": self.status, "reasons": list(self.reasons), "budgets": dict(self.budgets)}


def _name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def forgetting_checks(v: Verdict, concepts: list[str], metric: str, threshold: float, before: dict, after: dict,
                      tol: float) -> None:
    """``nothing_to_unlearn`` and ``not_forgotten`` on the test metrics ``before``/``after`` (fractions), per concept
    when ``before`` holds ``forget_by_concept`` (joint runs)."""
    per_b = before.get("forget_by_concept") or {concepts[0]: before}
    per_a = after.get("forget_by_concept") or {concepts[0]: after}
    for c in per_b:
        b, a = per_b[c], per_a[c]
        if b[metric] <= threshold:
            v.add("fail", "nothing_to_unlearn",
                  f"the unedited model does not recognise {c!r} on the test images ({_name(metric)} before "
                  f"{b[metric]:.3f} <= threshold {threshold:g}): there is nothing to unlearn — check the concept "
                  "name, the identity templates and the test folder")
            continue
        if a[metric] > threshold + tol or a[metric] >= b[metric]:
            v.add("fail", "not_forgotten",
                  f"{c!r} is still recognised on the test images: {_name(metric)} {b[metric]:.3f} -> {a[metric]:.3f} "
                  f"(criterion <= {threshold:g}, tolerance {tol:g})")
        elif metric != "forget_top1" and a["forget_top1"] > tol:
            v.add("fail", "not_forgotten",
                  f"{c!r} is still named first on {a['forget_top1']:.1%} of the test images (FA@1 after "
                  f"{a['forget_top1']:.3f} > tolerance {tol:g})")


def collateral_checks(v: Verdict, before: dict, after: dict, budgets: Budgets, labels: dict | None = None) -> None:
    """``utility_drop``, ``related_drop`` and ``not_measured`` from the test metrics. ``labels`` renames the two parts
    in messages (e.g. the SD demo's "other concepts" and "identities")."""
    labels = labels or {"related_top1": "other identities (TA_CA@1)", "utility_top1": "utility (TA_IN@1)"}
    for key, budget, code in (("related_top1", budgets.related_drop, "related_drop"),
                              ("utility_top1", budgets.utility_drop, "utility_drop")):
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            v.add("warn", "not_measured", f"{labels[key]} accuracy was not measured (no images given), so the "
                                          "damage to it is unknown and the layer choice ignored it")
            continue
        drop_check(v, b - a, budget, code, f"{labels[key]} accuracy dropped {b:.3f} -> {a:.3f}")
    worst_check(v, before.get("related_by_concept"), after.get("related_by_concept"), budgets.worst_drop)


def drop_check(v: Verdict, drop: float, budget: float, code: str, what: str) -> None:
    """``code`` (warn) when ``drop`` exceeds ``budget``; ``model_broken`` (fail) beyond :data:`BROKEN` × it — never
    below :data:`BROKEN` × the default budget (``--related-budget 0`` asked for a warning on any drop, and got a
    0.002 drop called a broken model: thirteenth trial) and never above :data:`BROKEN_CAP` unless ``budget`` is."""
    line = max(budget, min(BROKEN * max(budget, getattr(Budgets(), code, 0.0)), BROKEN_CAP))
    if drop > line + EPS:
        rule = (f"{BROKEN:g} × the budget" if line == BROKEN * budget else f"{BROKEN:g} × the default budget"
                if line < BROKEN_CAP else "the most any budget below it allows")
        v.add("fail", "model_broken", f"{what} (drop {drop:.3f}, more than {line:g} = {rule}): the edit broke the "
                                      "model; do not ship this patch")
    elif drop > budget + EPS:
        v.add("warn", code, f"{what} (drop {drop:.3f} > budget {budget:g})")


def worst_check(v: Verdict, before: dict | None, after: dict | None, budget: float) -> None:
    """``worst_drop``: warn when the single most damaged other concept (``{concept: accuracy}`` before/after, as
    :mod:`slugkit.eval.collateral` reads them) lost more than ``budget``; nothing when per-concept values are absent."""
    from ..eval.collateral import worst_drop

    if not before or not after:
        return
    name, drop = worst_drop(before, after)
    if name is not None and drop > budget + EPS:
        over = sorted((c for c in before if c in after and before[c] - after[c] > budget + EPS),
                      key=lambda c: (after[c] - before[c], c))
        more = f"; also over budget: {', '.join(f'{c!r} -{before[c] - after[c]:.2f}' for c in over[1:])}" \
            if len(over) > 1 else ""
        mean = sum(before[c] - after[c] for c in before if c in after) / max(1, sum(c in after for c in before))
        v.add("warn", "worst_drop", f"{name!r} dropped {drop:.3f} ({before[name]:.3f} -> {after[name]:.3f}, more "
                                    f"than the worst budget {budget:g})"
                                    + (" although the mean over the others may look small" if mean <= 0.05 else
                                       f"; the mean over the others dropped {mean:.3f} too") + more)


def data_checks(v: Verdict, read_stats: dict[str, dict]) -> None:
    """``samples_skipped`` for every set whose read statistics count skipped pairs (``ReadStats.as_dict()``)."""
    for what, st in read_stats.items():
        skipped = {k.removeprefix("skipped_"): n for k, n in st.items() if k.startswith("skipped_") and n}
        if skipped:
            detail = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(skipped.items()))
            v.add("warn", "samples_skipped", f"the {what} set skipped {sum(skipped.values())} pair(s) while reading "
                                             f"({detail}); rerun with --strict to see which")
        for key, what_kind in (("truncated_shards", "truncated"), ("not_tar_shards", "not tar"),
                               ("empty_shards", "empty")):
            if st.get(key):
                v.add("warn", "samples_skipped", f"the {what} set had {what_kind} shard(s): {st[key][:3]}")


def caption_check(v: Verdict, named: int, total: int, truncated: int, concepts: list[str],
                  retain_named: int = 0, retain_total: int = 0) -> None:
    """``captions_without_concept`` and ``name_truncated`` from the forget captions' counts (see
    :func:`slugkit.workflows.inputs.forget_caption_counts`); ``retain_names_concept`` when some retain captions name
    the concept (most of them is refused before the run: :func:`check_retain_captions`)."""
    who = " / ".join(repr(c) for c in concepts)
    if retain_named:
        v.add("warn", "retain_names_concept",
              f"{retain_named} of {retain_total} retain captions name {who}; their retain gradient pulls against the "
              "forgetting (slug curate builds a retain set without the concept)")
    if named < total:
        v.add("warn", "captions_without_concept",
              f"{total - named} of {total} forget captions do not name {who}; the forget gradient also moves "
              "whatever those captions describe")
    if truncated:
        v.add("warn", "name_truncated",
              f"{truncated} of {total} forget captions name {who} only beyond the text context (the tokenizer cuts "
              "the name off); those pairs teach nothing about the name")


def generation_checks(v: Verdict, concept: str, before: dict, after: dict, threshold: float, other_budget: float,
                      tol: float, worst_budget: float | None = None) -> None:
    """Text-to-image runs: the forgetting checks on generated images (share the judge recognises as the concept,
    ``generated_target_recognised``), the other concepts' mean drop (``generated_other_recognised``) and, with
    ``worst_budget``, the worst single other concept's drop (from ``per_concept``)."""
    b, a = before["generated_target_recognised"], after["generated_target_recognised"]
    if b <= threshold:
        v.add("fail", "nothing_to_unlearn",
              f"the unedited pipeline's images of {concept!r} are recognised only {b:.0%} of the time (<= "
              f"{threshold:.0%}): there is nothing to unlearn")
    elif a > threshold + tol:
        v.add("fail", "not_forgotten", f"generated images of {concept!r} are still recognised: {b:.3f} -> {a:.3f} "
                                       f"(criterion <= {threshold:g}, tolerance {tol:g})")
    ob, oa = before["generated_other_recognised"], after["generated_other_recognised"]
    drop_check(v, ob - oa, other_budget, "related_drop", f"the other concepts' generated images are recognised "
                                                         f"less: {ob:.3f} -> {oa:.3f}")
    if worst_budget is not None:
        others = [c for c in before.get("per_concept", {}) if c.lower() != concept.lower()]
        worst_check(v, {c: before["per_concept"][c] for c in others},
                    {c: after["per_concept"][c] for c in others if c in after.get("per_concept", {})}, worst_budget)


def verdict_fields(verdict: dict) -> dict:
    """What a patch records of its run's verdict (``patch.json → extra``): the status, its fail reasons' codes and
    its warnings' codes (a downstream run's CLIP's own apart, ``clip_warning_codes``: a bare utility_drop read as the
    pipeline's, verification 66), so that `slug inspect`, `apply`, `export` and `audit` say why
    (:func:`slugkit.patch.summary.failed_because`, :func:`~slugkit.patch.summary.verdict_line`; a warn patch said
    only "see result.json", which a patch handed on does not come with)."""
    def codes(severity, on=None):
        return sorted({r["code"] for r in verdict.get("reasons", []) if (r["severity"], r.get("on")) == (severity, on)})

    return {"verdict": verdict["status"], "verdict_codes": codes("fail"), "warning_codes": codes("warn"),
            **({"clip_warning_codes": clip} if (clip := codes("warn", "clip")) else {})}


def exit_status_of(result: dict) -> int:
    """The documented exit status of a finished run's result dict (0 pass, 3 warn, 4 fail)."""
    return EXIT_STATUS[result.get("verdict", {}).get("status", "pass")]


class NothingToUnlearnError(ValueError):
    """The unedited model does not recognise the concept on the validation images: the search would accept any
    step, so no run is made (exit status 4, like a ``fail`` verdict)."""

    exit_status = 4


class ForgetCaptionsError(ValueError):
    """None of the forget captions names the concept (e.g. another person's forget set): refused before the
    gradient pass."""


def check_recognised(concepts: list[str], metric: str, threshold: float, val_before: dict) -> None:
    """Raise :class:`NothingToUnlearnError` when every concept's validation criterion metric is already at or under
    the threshold before any edit (trust case A2: a template without ``{}`` makes every prompt identical)."""
    per = val_before.get("forget_by_concept") or {concepts[0]: val_before}
    if all(m[metric] <= threshold for m in per.values()):
        shown = ", ".join(f"{c!r} {_name(metric)} {m[metric]:.3f}" for c, m in per.items())
        raise NothingToUnlearnError(
            f"nothing to unlearn: the unedited model does not recognise the concept on the validation images "
            f"({shown} <= threshold {threshold:g}); check the concept name, the identity templates (each needs {{}} "
            "where the name goes) and the validation folder")


def check_downstream_recognised(per_target: dict[str, float], threshold: float, what: str, hint: str) -> None:
    """Raise :class:`NothingToUnlearnError` when the unedited pipeline / VLM recognises a target on at most
    ``threshold`` of its validation images (``per_target``: ``{target: share}``; ``what``: e.g. "the unedited VLM
    names"). Checked before the CLIP run: a ``--target sd``/``vlm`` run found it only at the end, after the whole
    run, and wrote a folder and a patch (fifteenth trial); the verdict would fail it anyway."""
    low = {t: v for t, v in per_target.items() if v <= threshold + 1e-9}
    if low:
        shown = ", ".join(f"{t!r} on {v:.0%}" for t, v in low.items())
        raise NothingToUnlearnError(f"nothing to unlearn: {what} {shown} of its validation images (<= "
                                    f"{threshold:.0%}); {hint}")


def check_captions(named: int, total: int, concepts: list[str], spec: str, truncated: int = 0,
                   strict: bool = False) -> None:
    """Raise :class:`ForgetCaptionsError` when no forget caption names any of ``concepts``, or when the text context
    cuts the name off in most of the captions that name it (in any of them under ``strict``; trust case D7)."""
    who = " / ".join(repr(c) for c in concepts)
    if total and named == 0:
        raise ForgetCaptionsError(
            f"none of the {total} forget captions in {spec} names {who} (whole word, Unicode-normalised): is this "
            "the right --forget set? Pass --no-caption-check if your captions never name the concept")
    if truncated and (strict or 2 * truncated > named):
        raise ForgetCaptionsError(
            f"{truncated} of the {named} forget captions in {spec} that name {who} name it only beyond the text "
            "context (the tokenizer cuts the name off), so they teach nothing about the name; shorten the captions "
            "or put the name first" + (" (--strict refuses any)" if strict and 2 * truncated <= named else ""))


def check_retain_captions(named: int, total: int, concepts: list[str], spec: str, forget_spec: str) -> None:
    """Raise :class:`ForgetCaptionsError` when the retain set is the forget set (same ``spec``) or most of its
    ``total`` captions name one of ``concepts`` (``named``): the retain set is everything *but* the concept, and a
    retain gradient of the concept's own pairs cancels the forget gradient (spec §1: importance and the update take
    the difference). A minority is a ``retain_names_concept`` warning in the verdict (:func:`caption_check`)."""
    who = " / ".join(repr(c) for c in concepts)
    fix = ("curate one that excludes the concept (slug curate --shards ... --concept NAME writes retain.tar), or pass "
           "--no-caption-check if this is deliberate")
    if os.path.abspath(spec) == os.path.abspath(forget_spec):
        raise ForgetCaptionsError(f"--retain and --forget are the same set ({spec}); the retain set is what the "
                                  f"model should keep, not the concept: {fix}")
    if total and 2 * named > total:
        raise ForgetCaptionsError(f"{named} of the {total} retain captions in {spec} name {who}: the retain set is "
                                  f"meant to be everything but the concept (its gradient would undo the forgetting); "
                                  f"{fix}")


def clip_verdict(concepts: list[str], metric: str, threshold: float, before: dict, after: dict, budgets: Budgets,
                 read_stats: dict[str, dict], captions: dict | None) -> Verdict:
    """The verdict of a CLIP run from its test metrics, read statistics and forget-caption counts
    (``captions = {"named", "total", "truncated"}`` or None when the pairs were not read)."""
    v = Verdict(budgets=asdict(budgets))
    forgetting_checks(v, concepts, metric, threshold, before, after, budgets.forget_tolerance)
    collateral_checks(v, before, after, budgets)
    data_checks(v, read_stats)
    if captions is not None:
        caption_check(v, captions["named"], captions["total"], captions["truncated"], concepts,
                      captions.get("retain_named", 0), captions.get("retain_total", 0))
        if (captions.get("forget_images") or {}).get("warning"):  # inputs.forget_images_named
            v.add("warn", "forget_images_not_concept", captions["forget_images"]["warning"])
    return v


_FORGETTING = ("not_forgotten", "nothing_to_unlearn")


def sd_verdict(concept: str, clip_verdict_json: dict, gen_before: dict, gen_after: dict, threshold: float,
               other_budget: float, tol: float) -> Verdict:
    """A text-to-image run: forgetting is judged on the **generated** images (:func:`generation_checks`), not on
    CLIP's zero-shot ranking (the generator forgets at a smaller step than CLIP's argmax needs); the CLIP run's
    other reasons (collateral, skipped samples, captions) are kept."""
    budgets = clip_verdict_json.get("budgets", {})
    v = Verdict(budgets={**budgets, "generated_threshold": threshold, "generated_other_drop": other_budget})
    generation_checks(v, concept, gen_before, gen_after, threshold, other_budget, tol, budgets.get("worst_drop"))
    # the CLIP run's collateral on identity names is kept; its worst-drop reason too (the generated one is added above)
    v.reasons += [_as_warning(r) for r in clip_verdict_json.get("reasons", []) if r["code"] not in _FORGETTING]
    return v


CLIP_SIDE = "CLIP zero-shot, the text encoder on its own: "  # beside the generated images' own reasons


def _as_warning(r: dict) -> dict:
    """A downstream run keeps the CLIP's own ``model_broken`` as a warning (module docstring); the CLIP's collateral
    reasons say they are the CLIP's (a worst-drop warning from the CLIP's ranking sat unlabelled beside the generated
    images' neighbours, with other numbers: fifteenth trial), also as ``"on": "clip"`` (verification 65)."""
    if r["code"] in ("utility_drop", "related_drop", "worst_drop"):
        return {**r, "message": CLIP_SIDE + r["message"], "on": "clip"}
    if r["code"] != "model_broken":
        return r
    return {**r, "severity": "warn", "code": "clip_broken", "on": "clip",
            "message": CLIP_SIDE + r["message"].replace("; do not ship this patch", "") + " — the pipeline is "
                                                                                          "judged on its outputs"}


def sequential_verdict(concepts: list[str], metric: str, threshold: float, before: dict, after: dict,
                       budgets: Budgets, step_verdicts: list[dict]) -> Verdict:
    """Several concepts one after another: every concept judged on the final model against the base model, the
    collateral over the identities none of them is, and each step's non-forgetting reasons (data, captions)."""
    v = Verdict(budgets=asdict(budgets))
    forgetting_checks(v, concepts, metric, threshold, before, after, budgets.forget_tolerance)
    collateral_checks(v, before, after, budgets)
    for c, sv in zip(concepts, step_verdicts):
        v.reasons += [{**r, "message": f"step {c!r}: {r['message']}"} for r in sv.get("reasons", [])
                      if r["code"] not in _FORGETTING and r["code"] not in ("utility_drop", "related_drop",
                                                                            "worst_drop", "model_broken")]
    return v


def vlm_verdict(targets: list[str], clip_verdict_json: dict, vlm_rec: dict, threshold: float, other_budget: float,
                utility_budget: float, budgets: Budgets) -> Verdict:
    """A VLM run (``slug demo --target vlm``): forgetting judged on the **VLM's answers** on the test images (each
    target named on at most ``threshold`` + ``budgets.forget_tolerance`` of its images), the other identities' mean
    naming drop (``other_budget``), the worst single other identity (``budgets.worst_drop``) and the utility
    questions' accuracy (``utility_budget``); the CLIP run's non-forgetting reasons are kept (its collateral on
    CLIP's zero-shot ranking, data, captions)."""
    b, a = vlm_rec["before"], vlm_rec["after"]
    v = Verdict(budgets={**clip_verdict_json.get("budgets", {}), "vlm_threshold": threshold,
                         "vlm_other_drop": other_budget, "vlm_utility_drop": utility_budget})
    for t in targets:
        tb, ta = b["target_named_by_concept"][t], a["target_named_by_concept"][t]
        if tb <= threshold:
            v.add("fail", "nothing_to_unlearn", f"the unedited VLM names {t!r} on only {tb:.0%} of the test images "
                                                f"(<= {threshold:.0%}): there is nothing to unlearn")
        elif ta > threshold + budgets.forget_tolerance:
            v.add("fail", "not_forgotten", f"the VLM still names {t!r}: {tb:.3f} -> {ta:.3f} of the test images "
                                           f"(criterion <= {threshold:g}, tolerance {budgets.forget_tolerance:g})")
    drop_check(v, b["other_named"] - a["other_named"], other_budget, "related_drop",
               f"the VLM names the other identities less often: {b['other_named']:.3f} -> {a['other_named']:.3f}")
    drop_check(v, b["utility_accuracy"] - a["utility_accuracy"], utility_budget, "utility_drop",
               f"the VLM's utility answers got worse: {b['utility_accuracy']:.3f} -> {a['utility_accuracy']:.3f}")
    others = [n for n in b["per_identity"] if n not in targets]
    worst_check(v, {n: b["per_identity"][n] for n in others}, {n: a["per_identity"][n] for n in others},
                budgets.worst_drop)
    v.reasons += [r for r in clip_verdict_json.get("reasons", []) if r["code"] not in _FORGETTING
                  and r["code"] not in ("related_drop", "utility_drop", "worst_drop", "model_broken")]
    return v
