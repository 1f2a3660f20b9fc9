"""The SLUG run: data → gradients → layers → search → patch → result.json / report.md / pareto.png / run.json.

``run_unlearn(UnlearnConfig(...))`` is what ``slug unlearn`` and ``slug demo`` call; it reads every input through
the same loaders whether the model is ViT-B-32 on LAION + CelebA + ImageNet or the embedded world.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..common.errors import EmptyForgetSetError
from ..data.folders import iter_pairs, read_class_folder, read_lines
from ..common.errors import OutputExistsError, ShardError
from ..common.files import atomic_write_bytes, write_json
from ..data.shards import ReadStats
from ..eval.zeroshot import PARTS, EvalSuite, ImageSet, SuiteEvaluator
from ..slug.gradients import compute_gradients
from ..slug.layers import rank_layers
from ..slug.search import SearchConfig, choose_layer, edited, edited_values, search_layers

RESULT_FILES = ("result.json", "run.json", "report.md", "pareto.png", "layers.json", "patch")


@dataclass
class UnlearnConfig:
    concept: str
    out: str
    forget: str  # shards spec or captioned folder with the concept's image–caption pairs
    retain: str  # shards spec or captioned folder of retain pairs
    val_identities: str  # class folder (<Name>/*.jpg) for validation: target + other identities
    test_identities: str  # disjoint class folder for the reported metrics
    model: str = "embedded"
    pretrained: str | None = None
    family: str = "open_clip"  # adapter family: open_clip or hf_clip (transformers CLIPModel)
    consumer: str | None = None  # sd:DIR or llava:DIR: only candidates that downstream model reads (hf_clip)
    names: str | None = None  # file with the full identity name list (default: the folder's identities)
    identity_templates: list[str] = field(default_factory=lambda: ["{}."])  # official CelebA template
    related_names: str | None = None  # file restricting which other identities count as "related"
    utility_val: str | None = None  # class folder (e.g. ImageNet val subset)
    utility_test: str | None = None
    utility_classnames: str | None = None  # file, "imagenet", or None (classnames.txt / folder names)
    utility_templates: list[str] | str = "imagenet-simple"
    forget_samples: int | None = None  # cap on forget pairs
    retain_samples: int | None = None  # cap on retain pairs (first N)
    batch_size: int = 64
    eval_batch_size: int = 256
    search: SearchConfig = field(default_factory=SearchConfig)
    cached_search: bool = True
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    strict: bool = False
    overwrite: bool = False
    progress: bool = True
    save_gradients: bool = False
    gradients: str | None = None  # precomputed `slug grads` / --save-gradients file: skips the gradient pass
    concepts: list[str] = field(default_factory=list)  # several concepts unlearned jointly (one forget set)

    def concept_list(self) -> list[str]:
        return list(self.concepts) if self.concepts else [self.concept]


def _templates(spec: list[str] | str) -> list[str]:
    if isinstance(spec, list):
        return spec
    if spec == "imagenet-simple":
        from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

        return [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    return read_lines(spec)


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def _stack(adapter, images) -> torch.Tensor:
    return torch.stack([adapter.preprocess(im) for im in images]) if images else torch.empty(0)


def load_pairs(adapter, spec: str, limit: int | None, strict: bool, what: str):
    """Preprocessed images, tokenized captions and read statistics of an image–caption set.

    ``stats.manifest`` lists (key, source, sha256 of the image bytes) of every sample used, for ``run.json``.
    The tensors stay in CPU memory whatever ``--device`` is (the set may be large): the gradient pass moves each
    batch to the model's device right before its forward.
    """
    stats = ReadStats()
    images, captions, manifest = [], [], []
    for s in iter_pairs(spec, strict=strict, stats=stats):
        images.append(adapter.preprocess(s.image))
        captions.append(s.caption)
        manifest.append({"key": s.key, "source": s.source, "sha256": hashlib.sha256(s.data).hexdigest()})
        if limit is not None and len(images) >= limit:
            break
    stats.manifest = manifest
    if not images:
        msg = (f"the {what} set {spec} yielded no usable image–caption pairs ({stats.as_dict()}); "
               "an empty set would silently produce a zero gradient")
        raise EmptyForgetSetError(msg) if what == "forget" else ShardError(msg)
    return torch.stack(images), adapter.tokenize(captions), stats


def _batches(images: torch.Tensor, tokens: torch.Tensor, bs: int):
    """Consecutive batches, on the data's device (CPU); ``accumulate_batch`` moves each to the model's device."""
    for i in range(0, images.shape[0], bs):
        yield images[i:i + bs], tokens[i:i + bs]


def build_suite(adapter, cfg: UnlearnConfig, identities_dir: str, utility_dir: str | None) -> EvalSuite:
    folder = read_class_folder(identities_dir)
    names = read_lines(cfg.names) if cfg.names else list(folder.classnames)
    index = {_norm(n): i for i, n in enumerate(names)}
    targets = []
    for concept in cfg.concept_list():
        t = index.get(_norm(concept))
        if t is None:
            raise ValueError(f"concept {concept!r} is not in the identity name list ({len(names)} names from "
                             f"{cfg.names or identities_dir}); the zero-shot forget metric needs it there")
        targets.append(t)
    unknown = [c for c in folder.classnames if _norm(c) not in index]
    if unknown:
        raise ValueError(f"{identities_dir}: identity folders not in the name list: {unknown[:5]} ...")
    allowed = None
    if cfg.related_names:
        allowed = {_norm(n) for n in read_lines(cfg.related_names)}
    f_imgs, f_labels, r_imgs, r_labels = [], [], [], []
    for (img, y) in folder.load():
        name = folder.classnames[y]
        lab = index[_norm(name)]
        if lab in targets:
            f_imgs.append(img)
            f_labels.append(lab)
        elif allowed is None or _norm(name) in allowed:
            r_imgs.append(img)
            r_labels.append(lab)
    for concept, t in zip(cfg.concept_list(), targets):
        if t not in f_labels:
            raise EmptyForgetSetError(f"{identities_dir} has no images of {concept!r} (expected a folder "
                                      f"{concept.replace(' ', '_')}/); FA cannot be measured")
    suite = EvalSuite(
        names=names, identity_templates=list(cfg.identity_templates), target=targets[0],
        targets=targets if len(targets) > 1 else None,
        forget=ImageSet(_stack(adapter, f_imgs), torch.tensor(f_labels, dtype=torch.long)),
        related=ImageSet(_stack(adapter, r_imgs), torch.tensor(r_labels, dtype=torch.long)) if r_imgs else None)
    if utility_dir:
        uf = read_class_folder(utility_dir, cfg.utility_classnames)
        imgs, labels = zip(*uf.load())
        suite.utility_classnames = list(uf.classnames)
        suite.utility_templates = _templates(cfg.utility_templates)
        suite.utility = ImageSet(_stack(adapter, list(imgs)), torch.tensor(labels, dtype=torch.long))
    return suite


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("slugkit", "open_clip_torch", "numpy", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def load_gradients_file(path: str, names: list[str]):
    """Gradients written by ``slug grads`` (full or ``--stats-first``) or ``--save-gradients``; checked against the
    model's candidate tensors. Returns ``(Gradients, stats or None)``."""
    from ..slug.gradients import Gradients

    if not Path(path).is_file():
        raise FileNotFoundError(f"gradients file not found: {path}")
    grads = Gradients.load(path)
    if grads.n_forget <= 0:
        raise EmptyForgetSetError(f"{path} records no forget samples; recompute it with `slug grads`")
    from ..slug.gradpass import load_stats

    stats = load_stats(path) or None
    have = set(stats) if stats else set(grads.forget)
    unknown = sorted(set(grads.forget) - set(names))
    if unknown or not have:
        raise ValueError(f"{path} does not match this model: tensors {unknown[:3]} are not among its candidates"
                         if unknown else f"{path} holds no gradients")
    return grads, stats


def _digest(manifest: list[dict]) -> str:
    """One sha256 over the ordered (key, image sha256) list of a set: identifies the retain set compactly."""
    h = hashlib.sha256()
    for m in manifest:
        h.update(f"{m['key']}\t{m['sha256']}\n".encode())
    return h.hexdigest()


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any((out / f).exists() for f in RESULT_FILES):
        if not overwrite:
            raise OutputExistsError(f"{out} already holds a run (result files present); pass --overwrite to "
                                    "replace it or choose another --out")


def model_label(model_id: dict) -> str:
    m = model_id.get("model")
    return f"{m}/{model_id['pretrained']}" if model_id.get("pretrained") else str(m)


def run_unlearn(cfg: UnlearnConfig, adapter=None, extra_run_info: dict | None = None, choose=None) -> dict:
    """Run SLUG end to end and write every output into ``cfg.out``; returns the result dict.

    ``cfg.threads`` sets torch's CPU threads for the run only (restored afterwards). ``choose``: an optional
    ``choose(searches, adapter, grads, val_before, policy) -> (LayerSearch, info)`` replacing the CLIP layer
    choice among the searched Pareto layers (e.g. :func:`slugkit.sd.generator_chooser` for a diffusion pipeline);
    ``info`` is recorded as ``result["chooser"]``."""
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _run_unlearn(cfg, adapter, extra_run_info, choose)
    finally:
        torch.set_num_threads(threads)


def _run_unlearn(cfg: UnlearnConfig, adapter=None, extra_run_info: dict | None = None, choose=None) -> dict:
    from ..models import load_adapter
    from ..patch import make_patch, save_patch
    from ..report.unlearn import pareto_plot, render_report

    t_start = time.perf_counter()
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    if cfg.val_identities and cfg.test_identities and \
            Path(cfg.val_identities).resolve() == Path(cfg.test_identities).resolve():
        raise ValueError("validation and test identity folders are the same; the search must not see the test "
                         "images (pass disjoint --val-identities and --test-identities)")
    if cfg.utility_val and cfg.utility_test and Path(cfg.utility_val).resolve() == Path(cfg.utility_test).resolve():
        raise ValueError("--utility-val and --utility-test are the same folder; they must be disjoint")
    torch.manual_seed(cfg.seed)
    timing = {}

    t = time.perf_counter()
    if adapter is None:
        adapter = load_adapter(cfg.model, cfg.pretrained, family=cfg.family, device=cfg.device,
                               precision=cfg.precision)
    if cfg.consumer:
        from ..integrations import restrict_to_consumer

        if not hasattr(adapter, "restrict_candidates"):
            raise ValueError(f"--consumer needs the hf_clip family (the {adapter.family} adapter cannot restrict "
                             "its candidates to a downstream model)")
        restrict_to_consumer(adapter, cfg.consumer)
    timing["load_model"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.gradients:
        # The pairs were read by `slug grads`; here they are only recorded, not loaded (they may be huge).
        f_img = r_img = None
        f_stats, r_stats = ReadStats(), ReadStats()
    else:
        f_img, f_tok, f_stats = load_pairs(adapter, cfg.forget, cfg.forget_samples, cfg.strict, "forget")
        r_img, r_tok, r_stats = load_pairs(adapter, cfg.retain, cfg.retain_samples, cfg.strict, "retain")
    val_suite = build_suite(adapter, cfg, cfg.val_identities, cfg.utility_val)
    test_suite = build_suite(adapter, cfg, cfg.test_identities, cfg.utility_test)
    timing["load_data"] = time.perf_counter() - t

    t = time.perf_counter()
    val_eval = SuiteEvaluator(adapter, val_suite, cfg.eval_batch_size)
    test_eval = SuiteEvaluator(adapter, test_suite, cfg.eval_batch_size)
    before = test_eval.base_metrics()
    val_before = val_eval.base_metrics()
    t_eval = time.perf_counter() - t

    t = time.perf_counter()
    names = adapter.candidate_names()
    bs = cfg.batch_size
    stats = None
    if cfg.gradients:
        grads, stats = load_gradients_file(cfg.gradients, names)
    else:
        grads = compute_gradients(adapter, _batches(f_img, f_tok, bs), _batches(r_img, r_tok, bs), names,
                                  progress=cfg.progress, n_forget_batches=-(-len(f_img) // bs),
                                  n_retain_batches=-(-len(r_img) // bs))
    timing["gradients"] = time.perf_counter() - t
    if cfg.save_gradients and not cfg.gradients:
        out.mkdir(parents=True, exist_ok=True)
        grads.save(out / "gradients.safetensors")

    t = time.perf_counter()
    if stats is not None:
        from ..slug.gradpass import rank_from_stats

        table = rank_from_stats(adapter, stats, names)
        missing = [m for n in table.front_names() for m in adapter.group_of(n) if m not in grads.forget]
        if missing:
            raise ValueError(f"{cfg.gradients}: stats-first file lacks the full gradient of front tensor(s) "
                             f"{missing[:3]}; it was computed for other weights or candidates")
    else:
        table = rank_layers(adapter, grads, names)
    front = table.front_names()
    timing["layers"] = time.perf_counter() - t

    t = time.perf_counter()
    ratios = {r.name: r.ratio for r in table.rows}
    searches = search_layers(adapter, grads, front, ratios, val_eval, cfg.search, cached=cfg.cached_search,
                             progress=cfg.progress)
    chooser_info = None
    if choose is None:
        chosen = choose_layer(searches, cfg.search.selection, val_before)
    else:
        chosen, chooser_info = choose(searches, adapter, grads, val_before, cfg.search.selection)
    timing["search"] = time.perf_counter() - t

    t = time.perf_counter()
    test_cache = test_eval.prepare(chosen.name, PARTS)  # activations entering the edited stage, unedited model
    with edited(adapter.model, grads.forget, chosen.group, chosen.step_size):
        after = test_eval.evaluate_cached(test_cache)
    t_eval += time.perf_counter() - t
    timing["evaluation"] = t_eval

    t = time.perf_counter()
    new_values = edited_values(adapter.model, grads.forget, chosen.group, chosen.step_size)
    label = model_label(adapter.model_id)
    patch = make_patch(adapter.model, new_values, base_model=adapter.model_id, adapter=adapter.family,
                       concept=cfg.concept if not cfg.concepts else cfg.concept_list(), method="slug",
                       step_size=chosen.step_size,
                       metrics={"before": before, "after": after},
                       extra={"layer": chosen.name, "tower": chosen.tower,
                              "relative_change": chosen.step_size / chosen.ratio,
                              "edit": "theta <- theta - step_size * grad(mean cos(image, caption)) on forget pairs"})
    out.mkdir(parents=True, exist_ok=True)
    save_patch(patch, out / "patch", overwrite=cfg.overwrite)
    patch_bytes = (out / "patch" / "patch.safetensors").stat().st_size
    timing["patch"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t_start

    search_entries = [{"layer": s.name, "step_size": st.step_size, "relative_change": st.relative_change,
                       "metrics": st.metrics, "accepted": st.accepted}
                      for s in searches for st in s.trajectory]
    result = {
        "concept": cfg.concept,
        "concepts": cfg.concept_list(),
        "model": adapter.model_id,
        "model_label": label,
        "method": "slug",
        "layer": chosen.name,
        "group": chosen.group,
        "tower": chosen.tower,
        "step_size": chosen.step_size,
        "accepted_step_size": chosen.accepted_step,
        "relative_change": chosen.step_size / chosen.ratio,
        "metrics": {"before": before, "after": after, "validation_before": val_before,
                    "validation_after": chosen.val_metrics},
        "pareto_front": front,
        **({"chooser": chooser_info} if chooser_info is not None else {}),
        "layers_searched": [{k: v for k, v in s.to_json().items() if k != "trajectory"} for s in searches],
        "search": search_entries,
        "config": {"metric": cfg.search.metric, "threshold": cfg.search.threshold, "steps": cfg.search.steps,
                   "initial_divisor": cfg.search.initial_divisor, "margin": cfg.search.margin,
                   "utility_floor": cfg.search.utility_floor, "selection": cfg.search.selection},
        "timing_s": timing,
        "patch": {"path": "patch", "bytes": patch_bytes, "tensors": patch.names},
        "model_bytes": adapter.model_bytes(),
        "data": {"n_forget": grads.n_forget, "n_retain": grads.n_retain, "val_sizes": val_suite.sizes(),
                 "test_sizes": test_suite.sizes()},
    }
    write_json(out / "layers.json", table.to_json())
    pareto_plot(table.to_json(), out / "pareto.png", title=f"SLUG Pareto fronts: {cfg.concept} ({label})",
                chosen=chosen.name)
    write_json(out / "result.json", result)
    cfg_json = asdict(cfg)
    run = {"config": cfg_json, "seed": cfg.seed, "versions": _versions(), "threads": torch.get_num_threads(),
           "data": {"forget": {"spec": cfg.forget, "read_stats": f_stats.as_dict(), "samples": f_stats.manifest},
                    "retain": {"spec": cfg.retain, "read_stats": r_stats.as_dict(),
                               "samples_sha256": _digest(r_stats.manifest)},
                    "val_sizes": val_suite.sizes(), "test_sizes": test_suite.sizes()},
           "gradient_seconds": grads.seconds, "timing_s": timing, "chosen_layer": chosen.name,
           "search": [s.to_json() for s in searches]}
    if extra_run_info:
        run.update(extra_run_info)
    write_json(out / "run.json", run)
    atomic_write_bytes(out / "report.md", render_report(result).encode())
    return result


def run_sequential(configs: list[UnlearnConfig], out: str | Path, adapter=None, overwrite: bool = False) -> dict:
    """Unlearn several concepts one after another: concept k is unlearned from the model with the patches of
    concepts 1..k-1 applied, each run writing its own folder ``out/<k>-<Name>/``; the patches are then folded into
    one (:func:`slugkit.patch.chain_patches`) in ``out/patch`` and every concept is re-scored on the final model.

    Writes ``out/result.json`` (``mode: "sequential"``, per-concept forget metrics before (base model) / after
    (final model), shared related/utility metrics, each step's layer and step size, patch bytes). The model is
    returned to its base weights (bit-exact) before returning.
    """
    from ..models import load_adapter
    from ..patch import apply_patch, chain_patches, load_patch, revert_patch, save_patch

    out = Path(out)
    if (out / "result.json").exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds a run; pass --overwrite")
    if adapter is None:
        c0 = configs[0]
        adapter = load_adapter(c0.model, c0.pretrained, family=c0.family, device=c0.device, precision=c0.precision)
    t0 = time.perf_counter()
    applied, steps = [], []
    try:
        for cfg in configs:
            r = run_unlearn(cfg, adapter=adapter)
            p = load_patch(Path(cfg.out) / "patch")
            apply_patch(adapter.model, p)
            applied.append(p)
            steps.append({"concept": cfg.concept, "out": str(cfg.out), "layer": r["layer"], "step_size": r["step_size"],
                          "metrics_at_step": r["metrics"]})
        chained = chain_patches(applied)
        # one suite over all concepts: per-concept FA, and related accuracy over the identities none of them is
        joint = replace(configs[0], concepts=[c.concept for c in configs])
        suite = build_suite(adapter, joint, joint.test_identities, joint.utility_test)
        final = SuiteEvaluator(adapter, suite).base_metrics()
    finally:
        for p in reversed(applied):
            revert_patch(adapter.model, p)
    base = SuiteEvaluator(adapter, suite).base_metrics()
    chained.meta["metrics"] = {"before": base, "after": final}
    save_patch(chained, out / "patch", overwrite=overwrite)
    result = {
        "mode": "sequential", "method": "slug", "concepts": [c.concept for c in configs],
        "model": adapter.model_id, "steps": steps,
        "per_concept": {c: {"before": base["forget_by_concept"][c], "after": final["forget_by_concept"][c]}
                        for c in joint.concepts},
        "metrics": {"before": base, "after": final},
        "patch": {"path": "patch", "bytes": (out / "patch" / "patch.safetensors").stat().st_size,
                  "tensors": chained.names},
        "model_bytes": adapter.model_bytes(), "timing_s": {"total": time.perf_counter() - t0},
    }
    write_json(out / "result.json", result)
    return result
