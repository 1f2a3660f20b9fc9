"""What a text-to-image consumer reads, before and after the edit (``slug unlearn --consumer sd:DIR``; trial 43).

A run with ``--consumer sd:DIR`` is judged on the CLIP's own metrics (zero-shot recognition of the concept and the
other identities, utility); the pipeline never sees those. It reads the text encoder's token states, and a step that
passes every CLIP check can move the conditioning of unrelated prompts — and of the empty prompt, which classifier-free
guidance encodes with the same edited encoder — as much as the target's (measured: a q/k/v edit that passed moved "a
photo of a teapot" 0.84 and the empty prompt 0.99 against the target's 1.35). So such a run also measures, on the
CLIP's text tower (which the consumer check verified equals the pipeline's encoder), the relative shift
``‖H_after − H_before‖_F / ‖H_before‖_F`` of what the pipeline reads (:func:`reads`) for:

* the target's prompts (the run's identity templates with its name),
* each of the nearest other concepts and an even sample of the rest (same templates),
* the utility class names (the first utility template), and
* the empty prompt,

and warns (``consumer_shift``) when the others' mean moves at least :data:`SELECTIVITY_WARN` × the target's, or the
empty prompt at least :data:`EMPTY_WARN` × (as much as the target). Measured: the embedded SD demo's patch (generated
images: the concept 0.90 → 0.00, the others' mean −0.03) moves the other 29 concepts' prompts 0.30 × and the empty
prompt 0.49 × as much as the target's; the passing q/k/v edit of trial 43 moved other prompts 0.62–0.96 × and the
empty prompt 0.73 ×. The empty prompt moves with any edit of a layer it passes through, so it alone warns only at
1 ×. The shift is a proxy: what a generator draws from it is measured by ``slug eval-sd`` on generated images.
"""

from __future__ import annotations

import torch

SELECTIVITY_WARN = 0.5  # others' mean shift / the target's, at or above which it warns
EMPTY_WARN = 1.0  # the empty prompt's shift / the target's, at or above which it warns
MAX_OTHERS = 24  # other concepts sampled beyond the nearest (evenly over the name list, deterministic)
MAX_TEMPLATES = 4  # identity templates per concept
MAX_UTILITY = 24  # utility class names


def reads(adapter) -> tuple[int, bool]:
    """``(k, final_norm)``: the pipeline reads the text tower's hidden state after layer ``k − 1`` (``k`` = the
    consumed text layers: the deepest among the adapter's candidates, restricted to the consumer, plus one), through
    the final layer norm when that is the last layer or the pipeline is a single-encoder SD one run with
    ``clip_skip`` (diffusers' SD 1.x/2.x), not for SDXL's penultimate states."""
    import re

    n = adapter.model.config.text_config.num_hidden_layers
    found = [int(m.group(1)) for name in adapter.candidate_names()
             if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", name))]
    k = max(found) + 1 if found else n
    sdxl = str(getattr(adapter, "consumer", "") or "").startswith("SDXL")
    return k, (k == n) or not sdxl


@torch.no_grad()
def conditioning(adapter, prompts: list[str], k: int, final_norm: bool) -> torch.Tensor:
    """``[P, T, D]`` token states the pipeline reads for ``prompts`` (padded to the tokenizer's max length, as SD
    pipelines pad)."""
    tok = adapter.tokenizer
    length = min(int(getattr(tok, "model_max_length", 77) or 77),
                 adapter.model.config.text_config.max_position_embeddings)
    ids = tok(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]
    tm = adapter.model.text_model
    out = tm(input_ids=ids.to(next(tm.parameters()).device), output_hidden_states=True)
    h = out.hidden_states[k]
    return (tm.final_layer_norm(h) if final_norm else h).float().cpu()


def prompt_sets(suite, neighbours: list[tuple[str, float]]) -> dict[tuple, list[str]]:
    """``{("target",): [...], ("other", NAME): [...], ..., ("utility",): [...], ("empty",): [""]}`` from the run's
    test suite (its names, identity templates and utility class names) and its nearest neighbours (closest first);
    tuple keys, so that no concept's name can be taken for one of the groups."""
    templates = list(suite.identity_templates[:MAX_TEMPLATES])
    targets = {suite.names[i] for i in suite.target_list()}
    near = [n for n, _ in neighbours if n not in targets]
    rest = [n for n in suite.names if n not in targets and n not in near]
    step = max(1, len(rest) // MAX_OTHERS)
    others = near + rest[::step][:MAX_OTHERS]
    sets = {("target",): [t.format(n) for n in sorted(targets) for t in templates]}
    sets.update({("other", n): [t.format(n) for t in templates] for n in others})
    util_t = suite.utility_templates[0] if suite.utility_templates else "a photo of a {}."
    if suite.utility_classnames:
        sets[("utility",)] = [util_t.format(c) for c in suite.utility_classnames[:MAX_UTILITY]]
    sets[("empty",)] = [""]
    return sets


def consumer_shift(adapter, apply_edits, suite, neighbours: list[tuple[str, float]]) -> dict:
    """The record (``result.json → consumer_shift``): the mean relative shift of the target's prompts, each other
    concept's (and their mean, the worst), the utility prompts', the empty prompt's, and the ratios to the target's.
    ``apply_edits``: a context manager factory that applies the run's edits to ``adapter.model``."""
    k, final_norm = reads(adapter)
    sets = prompt_sets(suite, neighbours)
    flat = [p for ps in sets.values() for p in ps]
    before = conditioning(adapter, flat, k, final_norm)
    with apply_edits():
        after = conditioning(adapter, flat, k, final_norm)
    from .sd_conditioning import per_prompt_shift

    s, at, per = per_prompt_shift(before, after), 0, {}
    for key, ps in sets.items():
        per[key] = float(s[at:at + len(ps)].mean())
        at += len(ps)
    target = per.pop(("target",))
    empty, utility = per.pop(("empty",)), per.pop(("utility",), None)
    others = {key[1]: v for key, v in per.items()}
    worst = max(others, key=others.get) if others else None
    mean_o = sum(others.values()) / len(others) if others else None
    near = [n for n, _ in neighbours if n in others][:5]
    return {"reads": f"hidden state after text layer {k - 1}" + (" through the final layer norm" if final_norm
                                                                  else ""),
            "target": target, "others_mean": mean_o, "worst_other": [worst, others[worst]] if worst else None,
            "nearest": {n: others[n] for n in near}, "utility": utility, "empty": empty,
            "others_ratio": None if mean_o is None else mean_o / max(target, 1e-12),
            "empty_ratio": empty / max(target, 1e-12), "warn_at": SELECTIVITY_WARN, "empty_warn_at": EMPTY_WARN,
            "per_concept": others}


def consumer_check(verdict, rec: dict) -> None:
    """``consumer_shift`` (warn) on :func:`consumer_shift`'s record."""
    high = [(what, r, at) for what, r, at in (
        ("the other concepts' prompts (mean)", rec["others_ratio"], SELECTIVITY_WARN),
        ("the empty prompt (classifier-free guidance)", rec["empty_ratio"], EMPTY_WARN)) if r is not None and r >= at]
    if high:
        said = "; ".join(f"{w} {r:.2f} × (warn at {at:g} ×)" for w, r, at in high)
        verdict.add("warn", "consumer_shift",
                    f"the edit moves what the pipeline reads for {said} as much as for the target's prompts (shift "
                    f"{rec['target']:.3f}): the CLIP checks passed, but the pipeline may draw other prompts "
                    "differently — check it on generated images (`slug eval-sd`)")
