"""The VLM's own answer-loss gradients and the layer order they give (``slug demo --target vlm --vlm-gradient vlm``,
:mod:`slugkit.workflows.vlm_demo`; the canvas SLUG's layer order too, :mod:`slugkit.workflows.canvas_slug`)."""

from __future__ import annotations

import torch

from ..world import render as world
from ..world import vlm


def vlm_gradients(llava, processor, mapping: dict[str, str], names: list[str], targets: list[str],
                  n_forget: int = 100, n_retain: int = 5, batch_size: int = 50, protect: list[str] = (),
                  n_protect: int = 20, per_image: bool = False) -> tuple[dict, dict, list[dict]]:
    """``(forget, retain)`` gradients of the **VLM's own answer loss** w.r.t. the vision-tower tensors ``names``
    (CLIP names; ``mapping``: CLIP name → LLaVA name), float32 on the CPU, same shapes as the tensors.

    forget: ∇θ of minus the mean answer NLL of "What's the name of the person in this image?" → the target's name on
    ``n_forget`` of each target's ``pool`` images (the images SLUG's forget pairs come from), so that θ − η·g raises
    it — the sign convention of SLUG's CLIP forget gradient; retain: ∇θ of the mean NLL of the other identities'
    names on ``n_retain`` pool images each and of the three utility answers on ``n_retain`` pool images per object
    class (used for the alignment of the layer ranking, as SLUG's retain gradient is); and the **protected**
    directions: for each identity in ``protect`` the gradient of its name's NLL on ``n_protect`` of its pool images,
    and one per utility question kind and object class (its answers' NLL on the ``n_retain`` images of the class) —
    the step is later projected off their span (:func:`slugkit.slug.neighbours.project_off`), so that, to first
    order, the edit changes neither the nearest identities' answers nor the utility answers. ``per_image``: one
    protected direction per image of each protected identity (its name's NLL on that image) instead of one per
    identity — to first order, no protected image's answer changes, not only their mean."""
    from ..world.vlm_train import _batch, qa_ids

    tok = processor.tokenizer
    forget = [(im, vlm.NAME_QUESTION, t) for t, ims in vlm.identity_images("pool", n_forget, targets).items()
              for im in ims]
    retain = [(im, vlm.NAME_QUESTION, n) for n, ims in vlm.identity_images("pool", n_retain).items()
              if n not in targets for im in ims]
    classes = {c.name: c for c in world.UTILITY_CLASSES}
    util_images = vlm.utility_images("pool", n_retain)
    classes_of = {id(im): c for c, ims in util_images.items() for im in ims}
    util = {k: [(im, q, vlm.utility_answers(classes[c])[k]) for c, ims in util_images.items() for im in ims]
            for k, q in vlm.UTILITY_QUESTIONS.items()}
    retain += [r for rows in util.values() for r in rows]
    guard = [[(im, vlm.NAME_QUESTION, n) for im in ims]
             for n, ims in vlm.identity_images("pool", n_protect, list(protect)).items()]
    if per_image:
        guard = [[row] for rows in guard for row in rows]
    guard += [[r for r in rows if classes_of[id(r[0])] == c] for rows in util.values() for c in classes]
    params = dict(llava.named_parameters())
    live = [params[mapping[n]] for n in names]

    def grad(rows, sign: float) -> dict:
        total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in zip(names, live)}
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            ids, mask, labels, _ = _batch([(k, *qa_ids(tok, q, a)) for k, (_, q, a) in enumerate(chunk)],
                                          tok.pad_token_id)
            px = processor.image_processor(images=[r[0] for r in chunk], return_tensors="pt")["pixel_values"]
            loss = llava(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
            gs = torch.autograd.grad(sign * loss * len(chunk) / len(rows), live)
            for n, g in zip(names, gs):
                total[n] += g.detach().float()
        return total

    before = [p.requires_grad for p in live]
    try:
        for p in live:
            p.requires_grad_(True)
        with torch.enable_grad():
            return grad(forget, -1.0), grad(retain, 1.0), [grad(rows, 1.0) for rows in guard]
    finally:
        for p, r in zip(live, before):
            p.requires_grad_(r)


def vlm_layer_order(adapter, forget: dict, retain: dict) -> tuple[list, dict]:
    """Every candidate group of the consumed vision tower as a :class:`~slugkit.slug.search.LayerSearch` (no CLIP
    step; ``ratio`` = ‖θ‖/‖g_f‖ of the VLM gradient), Pareto-front groups first (SLUG's importance and alignment of
    the VLM gradients, :func:`slugkit.slug.layers.rank_layers`), each part by descending importance; and the layer
    table's JSON."""
    from types import SimpleNamespace

    from ..slug.layers import rank_layers
    from ..slug.search import LayerSearch

    table = rank_layers(adapter, SimpleNamespace(forget=forget, retain=retain), list(forget))
    rows = {r.name: r for r in table.rows}
    front = set(table.front_names())
    seen, out = set(), []
    for r in sorted(table.rows, key=lambda r: (r.name not in front, -r.importance)):
        group = [n for n in adapter.group_of(r.name) if n in rows]
        if frozenset(group) in seen:
            continue
        seen.add(frozenset(group))
        out.append(LayerSearch(r.name, group, r.tower, r.ratio, depth=adapter.stage_index(r.tower, r.name),
                               val_metrics={}))
    return out, table.to_json()
