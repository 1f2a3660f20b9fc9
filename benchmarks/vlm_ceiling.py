"""How far can *any* edit of the embedded VLM's vision tower go? An optimised edit as a ceiling for SLUG's.

    python benchmarks/vlm_ceiling.py --first 10 [--scopes layers.2.mlp.fc1.weight,layers.2,tower]
                                     [--steps 300] [--lr 1e-3] [--json results.json]

`slug demo --target vlm` (issue 14) refuses most identities: at every step of every layer it tried, the VLM stops
naming the target only when the other identities or the utility answers lose more than the budgets. This script asks
whether that is SLUG's limit (one gradient step) or the model's: for each identity and each **scope** (a set of the
vision tower's weights), it *optimises* the scope with Adam on the VLM's own answers, as a fine-tuning unlearning
method would —

* forget: the target's images (20, the world's ``pool`` split): a hinge on the teacher-forced log-probability of its
  full name and of its last name, ``relu(log p − log tau)`` (``--tau``, default 0.01: pushed below 1 %),
* retain: the answers of every other identity's images (5 each, ``pool``) and of the utility questions (5 images per
  object class x 3 questions), next-token cross-entropy, a random batch of 64 per step; ``--neighbour-images N``
  adds N images of each of the target's 8 look-alikes (nearest mean features at the layer the VLM reads),

and scores the result exactly as ``benchmarks/vlm_embedded.py`` does (test split: 50 images of the target, 20 of each
other identity, 10 of each object class; pass = target named <= 5 %, the others' mean drop <= 0.05, utility drop
<= 0.03; the worst single identity reported, and ``verdict_worst`` = its drop <= 0.20 as ``slug demo``'s verdict).
A scope is a prefix of the tower's parameter names below ``vision_model.encoder.`` (``layers.2.mlp.fc1.weight``: one
Linear weight, as SLUG edits; ``layers.2.mlp``: fc1+fc2 with biases; ``layers.2``: a block), or ``tower``: every
parameter that the features the VLM reads depend on. Each row also gives the cosine between the optimised edit and
the first forget gradient's descent direction (what one gradient step of the forget loss alone would change). This
is a measurement of how far an edit can go, not SLUG: it trains on the VLM's answers for hundreds of steps where SLUG
takes one step. The optimiser is :func:`slugkit.workflows.vlm_layer_ft.finetune_answers`, the same code
``slug demo --target vlm --vlm-fallback finetune`` runs (labelled, not SLUG) when SLUG's search refuses. Weights are
restored after each run.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import (ceiling_args, failed_checks, floats, ints, name_list, per_scope, run, scope_list,  # noqa: E402
                   write_complete)

TARGET_BEFORE, TARGET_AFTER, OTHER_DROP, UTILITY_DROP, WORST_DROP = 0.90, 0.05, 0.05, 0.03, 0.20
K_ALIKE = 8  # look-alikes given extra retain images (--neighbour-images)
N_RETAIN_ID = 5  # retain images per identity (the README's table; the demo's fallback takes 15)
SCOPES = "layers.2.mlp.fc1.weight,layers.2.self_attn.out_proj.weight,layers.2,tower"  # the README's table


def scope_params(tower, scope: str, read_layer: int) -> dict:
    """``{name: parameter}`` of ``tower`` (a transformers ``CLIPVisionModel``) in ``scope``; ``ValueError`` when the
    scope names nothing or reaches past the layer the VLM reads."""
    n_layers = tower.config.num_hidden_layers
    last = n_layers + read_layer if read_layer < 0 else read_layer - 1  # hidden_states[k] = output of layer k-1
    short = {n.removeprefix("vision_model."): n for n, _ in tower.named_parameters()}  # the prefix varies by version
    feeds = [n for n in short if not n.startswith("encoder.layers.") or int(n.split(".")[2]) <= last]
    feeds = [n for n in feeds if not n.startswith("post_layernorm")]
    bare = scope.removeprefix("vision_model.").removeprefix("encoder.")  # SLUG's full names are accepted too
    names = feeds if scope == "tower" else [n for n in feeds if (n + ".").startswith(f"encoder.{bare}.")]
    if not names:
        raise ValueError(f"scope {scope!r} names no parameter the VLM's features depend on (layers 0..{last}); give "
                         "e.g. layers.2.mlp.fc1.weight (one Linear), layers.2 (a block) or tower")
    names = [short[n] for n in names]
    params = dict(tower.named_parameters())
    return {n: params[n] for n in names}


def look_alikes(features: dict, target: str, k: int) -> list[str]:
    """The ``k`` identities whose mean features (``features`` ``{identity: [D]}``, what the VLM reads, flattened)
    are nearest ``target``'s by cosine: the look-alikes an edit of the tower moves with it."""
    import torch

    names = [n for n in features if n != target]
    m = torch.nn.functional.normalize(torch.stack([features[n] for n in names]), dim=1)
    cos = m @ torch.nn.functional.normalize(features[target], dim=0)
    return [names[i] for i in cos.argsort(descending=True)[:k].tolist()]


def main():
    import torch

    from slugkit.common.files import write_json
    from slugkit.world import render as world
    from slugkit.world import vlm
    from slugkit.slug.search import written
    from slugkit.workflows.vlm_layer_ft import finetune_answers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--first", type=ints(1), default=None, help="the world's first N identities (default 10)")
    ap.add_argument("--concepts", default=None, help="comma list instead of --first")
    ap.add_argument("--scopes", default=SCOPES, help="comma list of parameter-name prefixes below "
                    f"vision_model.encoder. (e.g. layers.2.mlp.fc1.weight), or tower (default {SCOPES})")
    ap.add_argument("--steps", type=ints(1), default=300, help="Adam steps per run (default 300)")
    ap.add_argument("--lr", type=floats(1e-6, 1.0), default=1e-3, help="Adam learning rate (default 1e-3)")
    ap.add_argument("--tau", type=floats(1e-6, 0.5), default=0.01,
                    help="forget hinge: push the name's probability below this (default 0.01)")
    ap.add_argument("--retain-weight", type=floats(0.0, 1e3), default=1.0, help="weight of the retain loss (default 1)")
    ap.add_argument("--neighbour-images", type=ints(0), default=0,
                    help="retain images of each of the target's 8 look-alikes (nearest mean features at the layer "
                         "the VLM reads) besides the 5 every identity has (default 0: no extra weight on them; at "
                         "most 100)")
    a = ceiling_args(ap, summary, "identities")
    if a is None:
        return 0
    names = world.identity_names()
    if a.concepts is not None and a.first is not None:
        ap.error("--first and --concepts exclude each other")
    if (a.first or 0) > len(names):
        ap.error(f"--first {a.first}: the world has {len(names)} identities; give at most {len(names)}")
    if a.neighbour_images > 100:
        ap.error(f"--neighbour-images {a.neighbour_images}: give at most 100 (each is rendered and kept in memory)")
    targets = name_list(ap, "--concepts", a.concepts, names) if a.concepts is not None else names[:a.first or 10]
    scopes = scope_list(ap, a.scopes, "layers.2.mlp.fc1.weight")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    llava, processor = vlm.load_vlm()
    tower = llava.model.vision_tower
    read = llava.config.vision_feature_layer
    for s in scopes:
        try:
            scope_params(tower, s, read)  # a bad scope fails before any work
        except ValueError as e:
            ap.error(f"--scopes: {e}")
    llava.requires_grad_(False)

    def pixels(images):
        return processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def features(px):
        return tower(px, output_hidden_states=True).hidden_states[read][:, 1:]

    id_pool = world.make_samples("pool", "identity", N_RETAIN_ID)
    with torch.no_grad():
        pooled = features(pixels(s.image for s in id_pool)).flatten(1)
    mean_features = {n: pooled[[i for i, s in enumerate(id_pool) if s.class_name == n]].mean(0)
                     for n in dict.fromkeys(s.class_name for s in id_pool)}
    test_named = vlm.identity_images("test", 20)
    test_util = vlm.utility_images("test", 10)
    t0 = time.perf_counter()
    base_scores = {}
    for t in targets:  # the target's 50 test images replace its 20
        base_scores[t] = vlm.vlm_scores(llava, processor, {**test_named, **vlm.identity_images("test", 50, [t])},
                                        test_util)
    print(f"scored the unedited VLM ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows = []
    for t in targets:
        alike = look_alikes(mean_features, t, K_ALIKE) if a.neighbour_images else []
        for scope in scopes:
            params = scope_params(tower, scope, read)
            t1 = time.perf_counter()
            ft = finetune_answers(llava, processor, params, [t], alike, steps=a.steps, lr=a.lr, tau=a.tau,
                                  retain_weight=a.retain_weight, look_alike_images=a.neighbour_images,
                                  n_forget=20, forget_batch=None, n_retain=N_RETAIN_ID, n_retain_cls=5, batch=64,
                                  first_grad=True, progress=False)
            with torch.no_grad():
                delta = torch.cat([d.flatten() for d in ft["delta"].values()])
                cos_first = float(torch.nn.functional.cosine_similarity(-ft["first_grad"], delta, dim=0))
                with written(tower, {n: n for n in params}, {n: params[n] + d for n, d in ft["delta"].items()}):
                    after = vlm.vlm_scores(llava, processor, {**test_named, **vlm.identity_images("test", 50, [t])},
                                           test_util)
            b = base_scores[t]
            drops = {n: b["named"][n] - after["named"][n] for n in b["named"] if n != t}
            worst = max(drops, key=drops.get)
            row = {"concept": t, "scope": scope, "look_alikes": alike, "params": sorted(params),
                   "numel": sum(p.numel() for p in params.values()), "relative_change": ft["relative_change"],
                   "cos_with_first_forget_step": cos_first, "target": [b["named"][t], after["named"][t]],
                   "mean_drop": statistics.mean(drops.values()),
                   "worst": {"concept": worst, "before": b["named"][worst], "after": after["named"][worst],
                             "drop": drops[worst]},
                   "utility": [b["utility_accuracy"], after["utility_accuracy"]],
                   "utility_drop": b["utility_accuracy"] - after["utility_accuracy"],
                   "final_loss": ft["final_loss"],
                   "timing_s": {"train": ft["train_s"], "wall": time.perf_counter() - t1}}
            row["checks"] = {"target_before>=0.9": row["target"][0] >= TARGET_BEFORE - 1e-9,
                             "target_after<=0.05": row["target"][1] <= TARGET_AFTER + 1e-9,
                             "other_drop<=0.05": row["mean_drop"] <= OTHER_DROP + 1e-9,
                             "utility_drop<=0.03": row["utility_drop"] <= UTILITY_DROP + 1e-9}
            row["passed"] = all(row["checks"].values())
            row["verdict_worst"] = drops[worst] <= WORST_DROP + 1e-9
            rows.append(row)
            lost = (f"worst {worst} lost {drops[worst]:.2f}{' (<= 0.20)' if row['verdict_worst'] else ''}"
                    if drops[worst] > 0 else "no other identity lost")
            print(f"{t:16s} {scope:24s} named {row['target'][0]:.2f}->{row['target'][1]:.2f}  others' mean drop "
                  f"{row['mean_drop']:+.3f}  {lost}  utility drop "
                  f"{row['utility_drop']:+.3f}  {failed_checks(row['checks'])}  cos(edit, -forget grad) "
                  f"{cos_first:+.2f}  {row['timing_s']['wall']:.0f} s", flush=True)
            if a.json:
                write_json(a.json, {"rows": rows, "options": vars(a), "complete": False})
    summary(rows, a.json, vars(a))
    return 0


def summary(rows: list[dict], json_path: str | None, options: dict, **extra) -> dict:
    """Per scope over ``rows``: passes (issue 14's checks: the target named <= 5 % after, from >= 90 %; the others'
    mean drop <= 0.05; utility drop <= 0.03), passes that also keep every other identity within 0.20, and the median
    and worst of the worst single identity's drop, the others' mean drop and the utility drop; printed, and written
    with the rows to ``json_path`` (``"complete": true``)."""
    out = per_scope(rows, {"worst_identity_drop": lambda r: r["worst"]["drop"], "mean_drop": lambda r: r["mean_drop"],
                           "utility_drop": lambda r: r["utility_drop"]})
    for scope, s in out.items():
        s["passed_and_worst_ok"] = sum(r["passed"] and r["verdict_worst"] for r in rows if r["scope"] == scope)
        print(f"{scope:24s} {s['passed']}/{s['total']} pass (target named <= 0.05, others' mean drop <= 0.05, "
              f"utility drop <= 0.03), {s['passed_and_worst_ok']} of them with every other identity's drop <= 0.20; "
              f"worst single identity: median {s['worst_identity_drop_median']:.2f}, worst "
              f"{s['worst_identity_drop_worst']:.2f}; others' mean drop: median {s['mean_drop_median']:.3f}, worst "
              f"{s['mean_drop_worst']:.3f}; utility drop: median {s['utility_drop_median']:.3f}, worst "
              f"{s['utility_drop_worst']:.3f}")
    return write_complete(json_path, rows, out, options, **extra)


if __name__ == "__main__":
    run(main)
