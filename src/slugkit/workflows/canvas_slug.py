"""SLUG on the embedded canvas (issue 15): one layer of the text encoder, the step searched on generated images.

The paper's UnlearnCanvas run (spec ``baselines.md`` §7.5, ``src/clip/eval_uncanvas.py``) edits the SD text encoder
at a Pareto-front layer and searches the step on generations judged by the benchmark's classifiers: a few images of
the target (UA-hit) and a few of other concepts of the same domain (IRA), stopping when the target is no longer
recognised and IRA moved by less than 0.1. Here, on the embedded canvas:

1. forget pairs: renders of every (style, object) pair that names the target, with its prompt; retain pairs:
   renders of every other pair; SLUG's forget (∇ mean cos) and retain (∇ CLIP loss) gradients on the embedded CLIP
   (:func:`slugkit.slug.gradients.compute_gradients`), whose text tower *is* the canvas generator's (hash-checked);
2. importance and alignment of every text layer the generator consumes; the Pareto front first (by importance),
   then the other layers (:func:`slugkit.workflows.vlm_demo.vlm_layer_order` — the same ordering);
3. per layer, the doubling/bisection rule of :func:`slugkit.workflows.sd_generator.generator_step_search` from
   0.1 × ‖θ‖/‖g_f‖: accepted when the target-domain judge recognises at most ``threshold`` of ``val_target``
   validation images of the target and the in-domain accuracy of the other concepts (``val_other`` images each)
   dropped by at most ``ira_budget`` (0.1, the official rule); the first layer with an accepted step wins.
   Validation seeds (9,000,000 + i) are disjoint from the answer set's.

Returns the edited text-encoder tensors as a :class:`~slugkit.methods.diffusion.DiffusionEdit` (its tensors are
named as in the pipeline's text encoder; apply with :func:`slugkit.methods.diffusion.applied` on
``pipe.text_encoder``). Raises :class:`~slugkit.slug.search.SearchFailed` when no searched layer has an accepted step.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..methods.diffusion import DiffusionEdit, storage
from ..slug.search import SearchFailed, edited_consumer, edited_values
from ..world import canvas
from ..world.canvas import domain_of, target_pairs
from .sd_generator import closest, generator_step_search

VAL_TARGET, VAL_OTHER = 8, 2
IRA_BUDGET = 0.10  # the official stopping rule: IRA changed by < 0.1


def _pairs_uint8(pairs, per_pair: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    x, prompts = canvas.render_pairs(pairs, per_pair, seed, 1616)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), prompts


def canvas_gradients(adapter, target: str, n_forget: int = 8, n_retain: int = 2, seed: int = 0,
                     progress: bool = False):
    """SLUG's gradients for ``target`` on the canvas (module docstring, point 1): ``n_forget`` renders per target
    pair, ``n_retain`` per other pair; batches of 64."""
    from ..slug.gradients import compute_gradients
    from ..world.train import normalise

    tp = target_pairs(target)
    rest = [(s, o) for s in canvas.STYLES for o in canvas.OBJECTS if (s, o) not in tp]
    fx, fp = _pairs_uint8(tp, n_forget, seed)
    rx, rp = _pairs_uint8(rest, n_retain, seed + 1)

    def batches(x, prompts):
        return [(normalise(x[i:i + 64]), adapter.tokenize(prompts[i:i + 64])) for i in range(0, len(x), 64)]

    return compute_gradients(adapter, batches(fx, fp), batches(rx, rp), adapter.candidate_names(), progress=progress)


def validation_plan(target: str, val_target: int = VAL_TARGET, val_other: int = VAL_OTHER):
    """``[(style, object, prompt, seed)]``: ``val_target`` images cycling over the target's pairs and ``val_other``
    of each other concept of its domain (cycling over the other domain), seeds 9,000,000 + i."""
    dom = domain_of(target)
    names, cross = (canvas.STYLES, canvas.OBJECTS) if dom == "style" else (canvas.OBJECTS, canvas.STYLES)
    rows, i = [], 0
    for name in names:
        n = val_target if name == target else val_other
        for j in range(n):
            other = cross[(j + names.index(name)) % len(cross)]
            style, obj = (name, other) if dom == "style" else (other, name)
            rows.append((style, obj, canvas.prompt(obj, style), 9_000_000 + i))
            i += 1
    return rows


def slug_canvas(target: str, pipe, judges, adapter, mapping: dict[str, str], *, threshold: float = 0.0,
                ira_budget: float = IRA_BUDGET, val_target: int = VAL_TARGET, val_other: int = VAL_OTHER,
                search_steps: int = 8, max_searched: int | None = 4, seed: int = 0, sampling_steps: int = 20,
                progress: bool = False) -> DiffusionEdit:
    """SLUG on the canvas for ``target`` (module docstring). ``adapter``: the embedded CLIP as an HF adapter,
    restricted to the text layers the generator consumes; ``mapping``: adapter tensor name → ``pipe.text_encoder``
    name; ``sampling_steps``: DDIM steps of the validation images."""
    from .vlm_demo import vlm_layer_order

    t0 = time.perf_counter()
    grads = canvas_gradients(adapter, target, seed=seed, progress=progress)
    order, table = vlm_layer_order(adapter, grads.forget, grads.retain)
    params = dict(adapter.model.named_parameters())
    plan = validation_plan(target, val_target, val_other)
    dom = domain_of(target)
    names = canvas.STYLES if dom == "style" else canvas.OBJECTS
    truth = np.array([names.index(s if dom == "style" else o) for s, o, _, _ in plan])

    def score(group, eta):
        with edited_consumer(pipe.text_encoder, mapping, adapter.model, grads.forget, group, eta):
            imgs = pipe([p for _, _, p, _ in plan], [s for *_, s in plan], steps=sampling_steps)
        ps, po = judges.predict(imgs)
        pred = ps if dom == "style" else po
        hit = pred == truth
        is_t = truth == names.index(target)
        return float(hit[is_t].mean()), float(hit[~is_t].mean())

    base_t, base_o = score(order[0].group, 0.0)

    def evaluate(group, eta):
        t_acc, o_acc = score(group, eta)
        return t_acc, base_o - o_acc

    searched, chosen = [], None
    for layer in order[:max_searched]:
        ratio = float(params[layer.name].detach().norm()) / max(float(grads.forget[layer.name].norm()), 1e-30)
        start = 0.1 * ratio
        traj, eta = generator_step_search(lambda e, g=layer.group: evaluate(g, e), start, search_steps, threshold,
                                          ira_budget)
        searched.append({"layer": layer.name, "group": layer.group, "start_step": start, "trajectory": traj,
                         "accepted_step": eta})
        if eta is not None:
            chosen = (layer, eta)
            break
    if chosen is None:
        raise SearchFailed(f"no searched text layer has a step at which the canvas stops drawing {target!r} "
                           f"(<= {threshold:.0%} of {val_target} validation images) while the other {dom}s' "
                           f"accuracy drops <= {ira_budget:.0%}{closest(searched, threshold, ira_budget, None)}")
    layer, eta = chosen
    values = edited_values(adapter.model, grads.forget, layer.group, eta)
    tensors = {mapping[n]: v.detach().float().cpu().contiguous() for n, v in values.items()}
    return DiffusionEdit(tensors, time.perf_counter() - t0, storage(tensors), None,
                         {"layer": layer.name, "group": layer.group, "step_size": eta, "module": "text_encoder",
                          "base_validation": {"target": base_t, "others": base_o}, "search": searched,
                          "front": table["fronts"]})


__all__ = ["IRA_BUDGET", "SearchFailed", "canvas_gradients", "slug_canvas", "validation_plan"]
