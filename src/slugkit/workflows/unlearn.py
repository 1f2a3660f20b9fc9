"""The SLUG run: data → gradients → layers → search → patch → result.json / report.md / pareto.png / run.json.

``run_unlearn(UnlearnConfig(...))`` is what ``slug unlearn`` and ``slug demo`` call; it reads every input through
the same loaders whether the model is ViT-B-32 on LAION + CelebA + ImageNet or the embedded world. Each stage is one
function below, called in order by :func:`_run_unlearn`; the stages' wall-clock seconds go to ``timing_s``.

The whole run is written into a private temporary folder next to ``cfg.out`` and renamed into place at the end,
under a lock on ``cfg.out`` (:func:`slugkit.common.runfolder.run_folder`): a second run into the same folder stops at
once, and an interrupted or failed run leaves ``cfg.out`` as it was.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..common.progress import status
from ..common.runfolder import claim_out, pause_point, run_folder
from ..eval.collateral import NEIGHBOURS_K, nearest_concepts
from ..eval.zeroshot import PARTS, SuiteEvaluator
from ..slug.gradfile import batching_record, run_provenance, save_full
from ..slug.gradients import compute_gradients
from ..slug.layers import rank_layers
from ..slug.neighbours import DEFAULT_PROTECT, NeighbourProtection, protect_neighbours
from ..slug.search import SearchConfig, SearchFailed, choose_layer, edited, search_layers
from .inputs import batches, forget_images_named, load_gradients_file
from .records import brief, result_record, write_run_files
from .rounds import applied, composed_values, generator_rounds, more_rounds
from .run_inputs import check_inputs, load_model, load_run_data
from .verdict import Budgets, check_recognised, clip_verdict, verdict_fields

RESULT_FILES = ("result.json", "run.json", "report.md", "pareto.png", "layers.json", "patch")
RUN_MARKER = RESULT_FILES[0]  # a folder holding it is a complete run (the run appears whole, by one rename)


@dataclass
class UnlearnConfig:
    """Everything one SLUG run reads; ``slug unlearn``'s options, field for field (``--batch-size`` is
    ``batch_size``; errors raised during the run name the options as the CLI spells them).

    Required: ``concept`` (the name to unlearn, as the captions and the identity folders spell it; or ``concepts``,
    a list, for a joint run), ``out`` (the run folder), ``forget`` / ``retain`` (image–caption pairs: a
    webdataset shard spec such as ``'data/{00000..00009}.tar'``, a captioned folder ``x.jpg`` + ``x.txt``, or a
    list of them), ``val_identities`` / ``test_identities`` (disjoint class folders ``<Name>/*.jpg``: the search's
    and the reported metrics). Paths are ``str`` or ``os.PathLike``. Optional: ``names`` (file, the full identity
    name list), ``identity_templates`` (list, or a file one per line), ``related_names``, ``utility_val`` /
    ``utility_test`` (class folders; utility is not measured without them: verdict warn), ``utility_classnames``,
    ``utility_templates`` (``'imagenet-simple'``, ``'imagenet'``, a file or a list), ``aliases`` (list),
    ``model`` / ``pretrained`` / ``family`` (``'open_clip'`` or ``'hf_clip'``), ``consumer``, ``clip_skip``,
    ``gradients`` (a ``slug grads`` file). Numbers: ``batch_size`` ≥ 2, ``forget_samples`` ≥ 1,
    ``retain_samples`` ≥ 2, ``threads`` ≥ 1 (default 1 for the embedded model on the CPU, else torch's),
    ``protect_neighbours`` in [0, 50] (0: the paper's step), ``max_layers`` in [1, 3] (1: the paper's single layer);
    ``search`` a :class:`~slugkit.slug.search.SearchConfig`, ``budgets`` a :class:`~slugkit.workflows.verdict.Budgets`.

    Checked when built (:func:`slugkit.workflows.config_check.check_config`): ``TypeError`` / ``ValueError`` naming
    the field. The embedded world's data for a run on the embedded model: :func:`slugkit.world_config`.
    """

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
    budgets: Budgets = field(default_factory=Budgets)  # what the verdict tolerates (slugkit.workflows.verdict)
    caption_check: bool = True  # refuse a forget set none of whose captions names the concept
    aliases: list[str] = field(default_factory=list)  # other phrasings that name the concept in forget captions
    clip_skip: int | None = None  # with consumer sd:DIR: diffusers' clip_skip (the pipeline's last N layers unread)
    protect_neighbours: int = DEFAULT_PROTECT  # k nearest neighbours the step is projected off (0: the paper's step)
    max_layers: int = 2  # layers the fallback may edit (1: the paper's single layer; slugkit.workflows.rounds)

    def __post_init__(self):
        from .config_check import check_config

        check_config(self)

    def concept_list(self) -> list[str]:
        return list(self.concepts) if self.concepts else [self.concept]


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Claim ``out`` for the run this process is about to make (:func:`slugkit.common.runfolder.claim_out`): take the
    lock on it (:class:`~slugkit.common.runfolder.RunLockedError` when another run holds it), refuse
    (:class:`~slugkit.common.errors.OutputExistsError`) a folder that holds a run unless ``overwrite``, and move
    what it holds aside. Callers that write a run's inputs into ``out`` before :func:`run_unlearn` (``slug demo``:
    ``out/data``) call this first; those writes then become part of the run, and are removed if it fails."""
    claim_out(out, overwrite, RUN_MARKER)


def run_unlearn(cfg: UnlearnConfig, adapter=None, extra_run_info: dict | None = None, choose=None) -> dict:
    """Run SLUG end to end and write every output into ``cfg.out`` (assembled in a temporary folder, renamed into
    place at the end); returns the result dict.

    ``cfg.threads`` sets torch's CPU threads for the run only (restored afterwards; default 1 for the embedded model
    on the CPU); torch's random state is restored too. ``choose``: an optional
    ``choose(searches, adapter, grads, val_before, policy) -> (LayerSearch, info)`` replacing the CLIP layer
    choice among the searched Pareto layers (e.g. :func:`slugkit.workflows.sd_generator.generator_chooser` for a
    diffusion pipeline); ``info`` is recorded as ``result["chooser"]``."""
    if not isinstance(cfg, UnlearnConfig):  # a dict said "'dict' object has no attribute 'threads'" (trial 28)
        raise TypeError(f"slugkit.unlearn takes a slugkit.UnlearnConfig, not a {type(cfg).__name__}: "
                        + ("world_config returns (config, curate_summary, data_dir); pass its first item"
                           if isinstance(cfg, tuple) else "UnlearnConfig(**fields)"))
    from .config_check import check_config

    check_config(cfg)  # again: a field set after the config was built (cfg.batch_size = 1) ran 11 s (trial 29)
    from ..common.outputs import out_inside_model

    folder = cfg.model.removeprefix("local-dir:")
    why = out_inside_model(cfg.out, {"--model": folder if Path(folder).is_dir() else None},
                           "UnlearnConfig.out (--out)")
    if why:  # a run into the package's assets or the model folder it reads, from Python (trial 30; the CLI refused)
        raise ValueError(why)
    threads = torch.get_num_threads()
    n = cfg.threads or (1 if cfg.model == "embedded" and cfg.device == "cpu" else None)  # as the CLI: 130 s vs 13.6
    cuda = torch.device(cfg.device).type == "cuda"
    try:
        if n:
            torch.set_num_threads(n)
        with torch.random.fork_rng(devices=[torch.device(cfg.device).index or 0] if cuda else []):
            return _run_unlearn(cfg, adapter, extra_run_info, choose)  # the caller's RNG streams are left as they were
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _timed(timing: dict, name: str, cpu: dict | None = None):
    """Add the block's wall-clock seconds to ``timing[name]`` and its CPU seconds to ``cpu[name]`` (``slug compare``'s
    ``cpu_s``; each stage is also a test pause point)."""
    t, c = time.perf_counter(), time.process_time()
    yield
    timing[name] = timing.get(name, 0.0) + time.perf_counter() - t
    if cpu is not None:
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - c
    pause_point(name)


def _run_unlearn(cfg: UnlearnConfig, adapter=None, extra_run_info: dict | None = None, choose=None) -> dict:
    t_start = time.perf_counter()
    check_inputs(cfg)
    with run_folder(cfg.out, cfg.overwrite, RUN_MARKER) as out:  # a private temporary folder, renamed to cfg.out
        torch.manual_seed(cfg.seed)
        timing, cpu = {}, {}  # seconds per stage: wall clock; CPU of the method's own stages
        with _timed(timing, "load_model"):
            status(f"loading model {cfg.model}" + (f" ({cfg.pretrained})" if cfg.pretrained else ""), cfg.progress)
            adapter = load_model(cfg, adapter)
        with _timed(timing, "load_data"):
            status("reading the forget and retain pairs and the validation and test folders", cfg.progress)
            data = load_run_data(cfg, adapter)
        with _timed(timing, "evaluation"):
            status("evaluating the unedited model (validation, test)", cfg.progress)
            val_eval = SuiteEvaluator(adapter, data["val_suite"], cfg.eval_batch_size)
            test_eval = SuiteEvaluator(adapter, data["test_suite"], cfg.eval_batch_size)
            before, val_before = test_eval.base_metrics(), val_eval.base_metrics()
        check_recognised(cfg.concept_list(), cfg.search.metric, cfg.search.threshold, val_before)
        if data["captions"] is not None:
            data["captions"]["forget_images"] = forget_images_named(
                adapter, data["forget"][0], val_eval.class_embeddings(), data["val_suite"].names,
                data["val_suite"].target_list(), val_before["forget_top1"])
        names = adapter.candidate_names()
        with _timed(timing, "gradients", cpu):
            grads, stats = _gradients(cfg, adapter, data, names)
        if cfg.save_gradients and not cfg.gradients:
            batching = {"batch_size": cfg.batch_size, "retain_batches": -(-len(data["retain"][0]) // cfg.batch_size)}
            prov = run_provenance(adapter, names, {"forget": cfg.forget, "retain": cfg.retain}, batching)
            save_full(out / "gradients.safetensors", grads, prov)
        with _timed(timing, "layers", cpu):
            table = _layers(cfg, adapter, grads, stats, names)
        with _timed(timing, "neighbours", cpu):
            neighbours = nearest_concepts(val_eval.class_embeddings(), data["val_suite"].names,
                                          data["val_suite"].target_list(), max(NEIGHBOURS_K, cfg.protect_neighbours))
            grads, protection, ratios = _protect(cfg, adapter, grads, table, data, neighbours)
        with _timed(timing, "search", cpu):
            searches, chosen, chooser_info = _search(cfg, adapter, grads, table, ratios, val_eval, val_before,
                                                     choose)
            edits, chooser_info = _rounds(cfg, adapter, data, (searches, chosen, grads), val_before, neighbours,
                                          choose, timing, cpu, protection)
            chosen = edits[-1].search
        timing["search"] -= timing.pop("later_gradients", 0.0)  # a later round's gradient pass is "gradients" time
        cpu["search"] -= cpu.pop("later_gradients", 0.0)  # and its CPU seconds too (they stayed in "search": trial 44)
        with _timed(timing, "evaluation"):
            status(f"evaluating the edit of {' + '.join(', '.join(e.search.group) for e in edits)} on the test images",
                   cfg.progress)
            after = _evaluate_edits(adapter, edits, test_eval)
        timing["evaluation"] = timing.pop("evaluation")  # keep the stages in run order in result.json
        verdict = clip_verdict(cfg.concept_list(), cfg.search.metric, cfg.search.threshold, before, after, cfg.budgets,
                               {k: data[f"{k}_stats"].as_dict() for k in ("forget", "retain")}, data["captions"])
        shift = None
        if (cfg.consumer or "").startswith("sd:"):  # what the pipeline reads, which the CLIP checks never see
            from .consumer_shift import consumer_check, consumer_shift

            shift = consumer_shift(adapter, lambda: applied(adapter.model, edits), data["test_suite"], neighbours)
            consumer_check(verdict, shift)
        with _timed(timing, "patch"):
            patch, patch_bytes = _write_patch(cfg, adapter, edits, before, after, out, verdict.to_json(), protection)
        timing["total"] = time.perf_counter() - t_start
        run = {"before": before, "after": after, "val_before": val_before, "searches": searches, "chosen": chosen,
               "edits": edits,
               "chooser_info": chooser_info, "table": table, "grads": grads, "timing": timing, "patch": patch,
               "patch_bytes": patch_bytes, "verdict": verdict.to_json(), "neighbours": neighbours,
               "protection": protection, "cpu": cpu, "consumer_shift": shift}
        result = result_record(cfg, adapter, data, run)
        write_run_files(cfg, out, data, run, result, extra_run_info)
    return result


# ---------------------------------------------------------------------------------------------------- the stages


def _gradients(cfg: UnlearnConfig, adapter, data: dict, names: list[str]):
    """Mean forget and retain gradients of every candidate tensor (spec §1), or the precomputed file's; plus the
    stats-first scalars when the file holds them."""
    counts = {k: len(data[k][0]) for k in ("forget", "retain")}
    if cfg.gradients:
        loaded = load_gradients_file(cfg.gradients, names, counts, adapter,
                                     {"forget": cfg.forget, "retain": cfg.retain})
        # a file batched otherwise holds another gradient (contrastive loss): said, kept in result.json
        data["gradients_file"] = batching_record(cfg.gradients, cfg.batch_size, counts["retain"], cfg.precision)
        for w in data["gradients_file"]["warnings"]:
            print(f"warning: {w}", file=sys.stderr, flush=True)
        return loaded
    bs = cfg.batch_size
    (f_img, f_tok), (r_img, r_tok) = data["forget"], data["retain"]
    grads = compute_gradients(adapter, batches(f_img, f_tok, bs), batches(r_img, r_tok, bs), names,
                              progress=cfg.progress, n_forget_batches=-(-len(f_img) // bs),
                              n_retain_batches=-(-len(r_img) // bs))
    return grads, None


def _layers(cfg: UnlearnConfig, adapter, grads, stats, names: list[str]):
    """Importance, alignment and the Pareto front of every candidate (spec §2–3)."""
    if stats is None:
        return rank_layers(adapter, grads, names)
    from ..slug.gradpass import rank_from_stats

    table = rank_from_stats(adapter, stats, names)
    missing = [m for n in table.front_names() for m in adapter.group_of(n) if m not in grads.forget]
    if missing:
        raise ValueError(f"{cfg.gradients}: stats-first file lacks the full gradient of front tensor(s) "
                         f"{missing[:3]}; it was computed for other weights or candidates")
    return table


def _protect(cfg: UnlearnConfig, adapter, grads, table, data: dict, neighbours: list[tuple[str, float]]):
    """The forget gradients of the Pareto layers projected off the nearest neighbours' alignment gradients
    (:mod:`slugkit.slug.neighbours`; ``cfg.protect_neighbours = 0``: unchanged, the paper's step), and each front
    tensor's R = ‖θ‖/‖g‖ for the gradient the search applies."""
    ratios = {r.name: r.ratio for r in table.rows}
    k = cfg.protect_neighbours
    if k <= 0:
        return grads, NeighbourProtection(0), ratios
    groups = list({tuple(adapter.group_of(n)): adapter.group_of(n) for n in table.front_names()}.values())
    r_img, r_tok = data["retain"]
    status(f"projecting the step off the {k} nearest neighbours' gradients", cfg.progress)
    forget, rec = protect_neighbours(adapter, grads.forget, r_img, r_tok, data["retain_stats"].captions, neighbours,
                                     groups, k, cfg.batch_size)
    params = dict(adapter.model.named_parameters())
    for n in table.front_names():
        gn = float(torch.linalg.vector_norm(forget[n].float()))
        ratios[n] = float(torch.linalg.vector_norm(params[n].detach().float())) / gn if gn > 0 else ratios[n]
    return replace(grads, forget=forget), rec, ratios


def _search(cfg: UnlearnConfig, adapter, grads, table, ratios, val_eval, val_before, choose):
    """The step-size search on every Pareto layer (spec §4) and the choice among them (a ``choose`` callback is
    called by :func:`_rounds`)."""
    searches = _search_front(cfg, adapter, grads, table, ratios, val_eval)
    if choose is None:
        try:
            # worst_budget None: the policy alone, as before the budgets existed (``benchmarks/all_identities.py
            # --variant paper``); otherwise the worst and utility budgets first
            util = cfg.budgets.utility_drop if cfg.search.worst_budget is not None else None
            return searches, choose_layer(searches, cfg.search.selection, val_before, cfg.search.worst_budget,
                                          util), None
        except SearchFailed:
            if cfg.max_layers <= 1:
                raise
            return searches, None, None  # the multi-layer fallback takes over (_rounds)
    return searches, None, None


def _search_front(cfg: UnlearnConfig, adapter, grads, table, ratios, val_eval):
    return search_layers(adapter, grads, table.front_names(), ratios, val_eval, cfg.search, cached=cfg.cached_search,
                         progress=cfg.progress)


def _rounds(cfg: UnlearnConfig, adapter, data, first, val_before, neighbours, choose, timing: dict,
            cpu: dict | None = None, protection: NeighbourProtection | None = None):
    """(edits, chooser record): round 1's layer, or the multi-layer fallback's (:mod:`slugkit.workflows.rounds`);
    with a ``choose`` callback (the SD demo's generator-aware choice) its rounds (:func:`generator_rounds`). A later
    round's gradient pass is added to ``timing["gradients"]`` and ``timing["later_gradients"]`` (the report's
    "gradients" counted the first pass only: eighth trial)."""
    def gradients(c, *args):  # on the edited model: in-process, a --gradients file holds the unedited model's
        t, p = time.perf_counter(), time.process_time()
        try:
            return _gradients(replace(c, gradients=None), *args)
        finally:
            for key in ("gradients", "later_gradients"):
                timing[key] = timing.get(key, 0.0) + time.perf_counter() - t
                if cpu is not None:
                    cpu[key] = cpu.get(key, 0.0) + time.process_time() - p

    def protect(c, *args):  # a later round's projection goes into ``protection`` (it was dropped: verification 69)
        g, rec, ratios = _protect(c, *args, neighbours)
        if protection is not None and rec.groups:
            protection.later_rounds.append({"round": len(protection.later_rounds) + 2, "groups": rec.groups})
        return g, rec, ratios

    stages = {"gradients": gradients, "layers": _layers, "search": _search_front, "protect": protect}
    if choose is not None:
        return generator_rounds(cfg, adapter, data, first, val_before, choose, stages)
    return more_rounds(cfg, adapter, data, first, val_before, stages), None


def _evaluate_edits(adapter, edits, test_eval) -> dict:
    """Test metrics of the edited model. One edit: the activations entering the edited stage are computed unedited
    once (cached path); several: every edit applied and both towers recomputed."""
    if len(edits) > 1:
        with applied(adapter.model, edits):
            return test_eval.evaluate_naive()
    chosen, grads = edits[0].search, edits[0].grads
    test_cache = test_eval.prepare(chosen.name, PARTS)
    with edited(adapter.model, grads.forget, chosen.group, chosen.step_size):
        return test_eval.evaluate_cached(test_cache)


def _write_patch(cfg: UnlearnConfig, adapter, edits, before: dict, after: dict, out: Path, verdict: dict,
                 protection=None):
    """``out/patch``: every edited group's new values with the base hashes (spec §5); returns (patch, file bytes).
    Each edit's θ − η·g is computed on the values before it, in round order. ``extra.edit`` says which g:
    the paper's, or projected off the nearest neighbours' gradients (``protection``)."""
    edit = "theta <- theta - step_size * grad(mean cos(image, caption)) on forget pairs"
    if protection is not None and protection.neighbours:  # the default step; extra.edit said the paper's (8th trial)
        edit += (f", projected off the alignment gradients of the {len(protection.neighbours)} nearest other concepts "
                 "(slugkit.slug.neighbours; --protect-neighbours 0: the paper's step)")
    from ..patch import architecture_facts, make_patch, save_patch

    chosen = edits[0].search
    new_values = composed_values(adapter.model, edits)  # a layer a later round stepped again holds both steps
    patch = make_patch(adapter.model, new_values, base_model=adapter.model_id, adapter=adapter.family,
                       architecture=architecture_facts(adapter.model),
                       concept=cfg.concept if not cfg.concepts else cfg.concept_list(), method="slug",
                       step_size=chosen.step_size, metrics={"before": brief(before), "after": brief(after)},
                       extra={"layer": chosen.name, "tower": chosen.tower, **verdict_fields(verdict),
                              **({"layers_edited": [e.to_json() for e in edits]} if len(edits) > 1 else {}),
                              "relative_change": chosen.step_size / chosen.ratio, "edit": edit})
    save_patch(patch, out / "patch", overwrite=cfg.overwrite)
    return patch, (out / "patch" / "patch.safetensors").stat().st_size

