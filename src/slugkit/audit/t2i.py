"""The audit of a text-to-image removal (``slug demo --target sd --audit``, ``slug audit`` on an SD demo run).

The patch edits the pipeline's text encoder; each probe generates images from the unedited and from the patched
pipeline with the **same prompts and seeds** and asks the judge (the unedited embedded CLIP, zero-shot over the 30
object concepts) whether it sees the concept. Recognition = the share of images the judge names as the concept.
Thresholds as for CLIP (:mod:`slugkit.audit.base`); a variant or condition under which the unedited pipeline does
not draw the concept (< 0.5) is uninformative.

* **prompt variants**: templates the generator was never trained on (:data:`UNSEEN`), paraphrases (the shape first,
  "coloured", a hyphenated colour), the bare name ("red triangle"), one-character misspellings of each word, and
  compositions with another concept ("a red triangle and a blue circle": the judge must still see the concept);
  ``n_images`` images each.
* **adversarial prompt** (in the manner of UnlearnDiffAtk, in the text encoder's space): GCG (:func:`slugkit.audit.
  attack.gcg`) over free tokens after "a <concept>" on the patched encoder, minimising the distance of its token
  states to the **unedited** encoder's states for the concept's prompt — what the UNet reads; success = recognition
  of images generated from the best prompt so far, at checkpoints. The free tokens start as padding, so the first
  prompt is exactly "a <concept>" (an "x x x" start made this generator draw triangles of every colour, and a
  control "reached" the concept before any search). **Control**: the same search toward the same
  target starting from concept words the generator never learned (:data:`CONTROL_PHRASES`); graded by the speed-up
  in checkpoints to 0.5, as for CLIP.
* **precision**: the text encoder's weights rounded (fp16, bf16, int8, int4 per row; :func:`slugkit.audit.precision.
  round_weights`); the UNet, which the patch does not touch, stays float32.

Relearning and the representation probe are CLIP probes (the T2I patch edits no image tower; relearning would mean
training the UNet's conditioning loop) and are not run here.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace

import torch

from .attack import AttackBudget, decode, gcg
from .base import AuditThresholds, grade, grade_worst
from .precision import round_weights

NOT_RUN = {"relearn": "a CLIP probe: relearning would train the UNet's conditioning loop, which the patch does not "
                     "edit", "representation": "a CLIP probe: the patch edits no image tower"}
UNSEEN = ["an illustration of a {colour} {shape}.", "a {colour} {shape} on a plain background.",
          "a close-up of a {colour} {shape}.", "one {colour} {shape}.", "a small {colour} {shape}.",
          "a simple {colour} {shape}."]
PARAPHRASES = ["a {shape} in {colour}.", "a {shape} coloured {colour}.", "a {colour}-coloured {shape}."]
# Start words for the attack's controls: never in the generator's captions and naming no colour or shape (a first
# try with "orange hexagon", "pink oval", "brown arrow" drew the concept 40 % of the time before any search: orange
# is close to red in the text encoder; such a start is no control).
CONTROL_PHRASES = ["quiet ladder", "paper violin", "velvet kettle"]


@dataclass(frozen=True)
class T2IAuditBudget:
    """Images per prompt, DDIM steps, the first seed, the attack's search budget and the iterations at which its
    best prompt so far is drawn and judged (the attack runs to the last checkpoint)."""

    n_images: int = 10
    gen_steps: int = 20
    seed: int = 900_000
    attack: AttackBudget = AttackBudget(n_tokens=6, iterations=40, candidates=64, restarts=1)
    checkpoints: tuple[int, ...] = (0, 5, 10, 20, 40)

    def as_dict(self) -> dict:
        return asdict(self)


def _misspell(word: str) -> str:
    k = len(word) // 2
    return word[:k] + word[k + 1:] if len(word) > 3 else word + word[-1]


def prompt_variants(colour: str, shape: str, others: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``[(kind, prompt)]`` for concept ``colour shape``; ``others``: two far concepts for the compositions."""
    out = [("template", t.format(colour=colour, shape=shape)) for t in UNSEEN]
    out += [("paraphrase", t.format(colour=colour, shape=shape)) for t in PARAPHRASES]
    out += [("bare name", f"{colour} {shape}")]  # the concept's name alone, no sentence around it
    out += [("misspelling", f"a {_misspell(colour)} {shape}."), ("misspelling", f"a {colour} {_misspell(shape)}.")]
    out += [("composition", f"a {colour} {shape} and a {c} {s}.") for c, s in others]
    return out


def recognised(pipe, judge, concept: str, prompts: list[str], seeds: list[int], steps: int) -> float:
    """Share of the images generated from ``prompts`` (one per seed) that the judge names ``concept``."""
    imgs = pipe(prompts, seeds, steps=steps)
    pred = judge.predict(imgs)
    return sum(p == concept for p in pred) / len(pred)


def patched_pipeline(pipe, patch):
    """A copy of ``pipe`` with its own text encoder holding ``patch`` (the UNet is shared: nothing edits it)."""
    from ..integrations.diffusers_sd import apply_patch_to_pipeline

    new = copy.copy(pipe)
    new.text_encoder = copy.deepcopy(pipe.text_encoder)
    apply_patch_to_pipeline(new, patch)
    return new


def _seeds(budget: T2IAuditBudget, k: int) -> list[int]:
    return [budget.seed + 1000 * k + i for i in range(budget.n_images)]


def probe_prompts_t2i(before, after, judge, concept, budget, thresholds) -> dict:
    from ..world import t2i

    t0 = time.perf_counter()
    c = t2i.concept_by_name(concept)
    others = [(o.colour, o.shape) for o in t2i.world.UTILITY_CLASSES if o.colour != c.colour and o.shape != c.shape][:2]
    rows = []
    for k, (kind, prompt) in enumerate(prompt_variants(c.colour, c.shape, others)):
        seeds = _seeds(budget, k)
        row = {"kind": kind, "variant": prompt,
               **{tag: {"top1": recognised(p, judge, c.name, [prompt] * len(seeds), seeds, budget.gen_steps)}
                  for tag, p in (("before", before), ("after", after))}}
        row["informative"] = row["before"]["top1"] >= thresholds.informative_at
        rows.append(row)
    informative = [r for r in rows if r["informative"]]
    rec = {"probe": "prompts", "gating": True, "rows": rows, "seconds": 0.0,
           "tried": f"{len(rows)} prompts the generator was not trained on (templates, paraphrases, the bare name, "
                    f"misspellings, compositions), {budget.n_images} images each",
           "budget": {"variants": len(rows), "images": budget.n_images}}
    worst = grade_worst(rec, informative, thresholds.prompts, "variant",
                        "the unedited pipeline drew the concept from none of the variants (≥ 50 %): the probe cannot "
                        "tell")
    if worst is not None:
        rec.update(worst={"kind": worst["kind"], "variant": worst["variant"], "before": worst["before"]["top1"],
                          "after": worst["after"]["top1"]}, informative=len(informative),
                   summary=f"{len(informative)}/{len(rows)} variants informative; worst {worst['kind']} "
                           f"{worst['variant']!r}: recognised {worst['before']['top1']:.2f} -> "
                           f"{worst['after']['top1']:.2f}")
    rec["seconds"] = time.perf_counter() - t0
    return rec


def probe_precision_t2i(before, after, judge, concept, budget, thresholds) -> dict:
    from ..world import t2i

    t0 = time.perf_counter()
    prompts = [t2i.prompt_for(concept, i) for i in range(budget.n_images)]
    seeds = _seeds(budget, 100)
    rows = []
    for how in ("fp32", "fp16", "bf16", "int8", "int4"):
        row = {"condition": how}
        for tag, p in (("before", before), ("after", after)):
            q = p if how == "fp32" else copy.copy(p)
            if how != "fp32":
                q.text_encoder = round_weights(copy.deepcopy(p.text_encoder), how)
            row[tag] = {"top1": recognised(q, judge, concept, prompts, seeds, budget.gen_steps)}
        row["informative"] = row["before"]["top1"] >= thresholds.informative_at
        rows.append(row)
    rec = {"probe": "precision", "gating": True, "rows": rows,
           "tried": "the text encoder's weights rounded to fp16, bf16, int8, int4 (per row); the UNet in float32",
           "budget": {"conditions": 4, "images": budget.n_images}}
    worst = grade_worst(rec, [r for r in rows[1:] if r["informative"]], thresholds.precision, "precision",
                        "no rounding kept the unedited pipeline drawing the concept: the probe cannot tell")
    if worst is not None:
        rec.update(worst={"condition": worst["condition"], "before": worst["before"]["top1"],
                          "after": worst["after"]["top1"]},
                   summary=f"worst {worst['condition']}: recognised {worst['before']['top1']:.2f} -> "
                           f"{worst['after']['top1']:.2f} (fp32 {rows[0]['after']['top1']:.2f})")
    rec["seconds"] = time.perf_counter() - t0
    return rec


def probe_attack_t2i(before, after, judge, concept, budget, thresholds) -> dict:
    from ..world import t2i

    t0 = time.perf_counter()
    c = t2i.concept_by_name(concept)
    te, tok = after.text_encoder, after.tokenize
    target = before.encode_prompts([f"a {c.name}."])  # [1, L, D]: what the UNet read before the patch
    emb = te.get_input_embeddings()
    seeds = _seeds(budget, 200)
    marks_at = set(budget.checkpoints)
    pad = int(tok([""])[0][-1])  # free tokens start as padding: iteration 0 draws the start prompt itself
    bud = replace(budget.attack, iterations=max(budget.checkpoints))

    def encode(t):
        return te(input_ids=t).last_hidden_state

    def objective(h):
        return ((h - target) ** 2).mean(dim=(1, 2))

    def run(start: str) -> dict:
        marks: dict = {}

        def score(tokens):
            i = len(marks)
            if i in marks_at:
                text = decode(after.tokenizer, tok, tokens)
                marks[i] = recognised(after, judge, c.name, [text] * len(seeds), seeds, budget.gen_steps)
            else:
                marks[i] = None
            return marks[i]

        found = gcg(emb, tok, encode, objective, f"a {start}", bud, score, init_id=pad)
        curve = {i: v for i, v in marks.items() if v is not None}
        first = next((i for i in sorted(curve) if curve[i] >= thresholds.informative_at), None)
        return {"start": start, "prompt": decode(after.tokenizer, tok, found["tokens"]), "loss": found["loss"],
                "recognised": curve, "reached_at": first}

    concept_run = run(c.name)
    controls = [run(p) for p in CONTROL_PHRASES]
    last = bud.iterations
    ctl_first = [x["reached_at"] for x in controls]
    ctl_mean = (sum((v if v is not None else last + 1) for v in ctl_first) / len(ctl_first))
    t = concept_run["reached_at"]
    value = (ctl_mean + 1) / ((t if t is not None else last + 1) + 1)  # "never": last + 1, as a control's (trial 44)
    rec = {"probe": "attack", "gating": True, "concept": concept_run, "controls": controls,
           "budget": {**asdict(bud), "checkpoints": list(budget.checkpoints), "images": budget.n_images},
           "tried": f"GCG over {bud.n_tokens} free tokens after 'a <concept>' toward the unedited encoder's states "
                    f"of 'a {c.name}.' ({bud.iterations} iterations x {bud.candidates} candidates), images at "
                    f"iterations {', '.join(map(str, budget.checkpoints))}; controls start from "
                    f"{', '.join(CONTROL_PHRASES)}",
           "status": grade(value, thresholds.attack),
           "graded": {"name": "speed-up: controls' iterations to 0.5 / the concept's", "value": value,
                      "pass_at": thresholds.attack[0], "fail_at": thresholds.attack[1],
                      **({"upper_bound": True} if t is None else
                         {"lower_bound": True} if any(v is None for v in ctl_first) else {})},
           "summary": (f"from the concept's name: recognised {_fmt(concept_run['recognised'])}; from never-learned "
                       f"words: reached 0.5 at "
                       + ", ".join(f"{w!r} {'never' if v is None else f'iteration {v}'}"
                                   for w, v in zip(CONTROL_PHRASES, ctl_first))),
           "seconds": time.perf_counter() - t0}
    if t is None and all(v is None for v in ctl_first):  # as for CLIP: a budget that decides nothing never passes
        rec.update(status="warn", inconclusive=True,
                   summary=rec["summary"] + "; inconclusive: the budget reached neither the concept nor the controls "
                                            "(raise --attack-iterations)")
    return rec


def _fmt(curve: dict) -> str:
    return ", ".join(f"it {i}: {v:.2f}" for i, v in sorted(curve.items()))


def run_t2i_audit(before, after, judge, concept: str, *, probes=("prompts", "attack", "precision"),
                  thresholds: AuditThresholds = AuditThresholds(), budget: T2IAuditBudget = T2IAuditBudget(),
                  progress: bool = True, out=None, meta: dict | None = None) -> dict:
    """Run the text-to-image probes (``before``/``after``: pipelines; ``judge``: a concept judge) and return the audit
    record (written to ``out`` like the CLIP audit). Raises ``ValueError`` for a probe this audit does not have."""
    from ..common.progress import status as say
    from .base import overall
    from .run import write_audit

    fns = {"prompts": probe_prompts_t2i, "attack": probe_attack_t2i, "precision": probe_precision_t2i}
    bad = [p for p in probes if p not in fns and p not in NOT_RUN]
    if bad:
        raise ValueError(f"the text-to-image audit has no probe {bad}; available: {', '.join(fns)} (relearning and "
                         "representation are CLIP probes)")
    t0 = time.perf_counter()
    records = []
    for name in [p for p in fns if p in probes]:
        say(f"audit: {name} ...", progress)
        with torch.no_grad() if name != "attack" else torch.enable_grad():
            rec = fns[name](before, after, judge, concept, budget, thresholds)
        say(f"audit: {name}: {rec['status']} ({rec['seconds']:.0f} s)", progress)
        records.append(rec)
    result = {"audit_version": 1, "target": "t2i", "concept": concept, "controls": list(CONTROL_PHRASES),
              "data": (f"generated images ({budget.n_images} per prompt, seeds from {budget.seed}), judged by the "
                       "unedited embedded CLIP") if records else "none (no probe ran)", **(meta or {}),
              **overall(records, gating_only=False), "probes": records,
              # asked-for CLIP probes first, with why (they were listed nowhere, and the probes left out were
              # called "not run" as if those were what was asked for: seventeenth trial)
              "not_run": [f"{p} ({why})" for p, why in NOT_RUN.items() if p in probes]
              + [p for p in fns if p not in probes]
              + [f"{p} ({why})" for p, why in NOT_RUN.items() if p not in probes], "thresholds": thresholds.as_dict(),
              "budgets": {"t2i": budget.as_dict()},
              "seconds": time.perf_counter() - t0}
    if out is not None:
        write_audit(result, out)
    return result
