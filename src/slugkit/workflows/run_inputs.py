"""What a SLUG run reads before its gradient pass (:func:`slugkit.workflows.unlearn.run_unlearn`'s first stages):
the checks on its folders (:func:`check_inputs`, :func:`refuse_forget_in_eval`), the model restricted to what a
downstream consumer reads (:func:`load_model`), the forget/retain pairs with their caption checks and the validation
and test suites (:func:`load_run_data`), and the checks on a precomputed gradients file's batching
(:func:`gradients_file_record`). ``cfg`` is an :class:`~slugkit.workflows.unlearn.UnlearnConfig`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..data.folders import images_with_digests, shared_images
from ..data.shards import ReadStats
from .inputs import (build_suite, forget_caption_counts, load_pairs, retain_caption_count, unnamed_concepts)
from .verdict import ForgetCaptionsError, check_captions, check_retain_captions


def check_inputs(cfg) -> None:
    """Refuse validation/test (or utility) folders that are the same folder or share images (links or copies;
    ``--out`` is checked by :func:`~slugkit.common.runfolder.run_folder`), and a run without forget or retain pairs."""
    check_world_sets(cfg)
    refuse_out_in_inputs(cfg)
    check_paths_exist(cfg)
    if not (cfg.forget and cfg.retain):
        raise ValueError("pass forget and retain pairs (--forget, --retain), with --gradients too: the pairs they "
                         "were computed on (their captions are checked; the neighbour protection and a second layer "
                         "use them)")
    if cfg.val_identities and cfg.test_identities and \
            Path(cfg.val_identities).resolve() == Path(cfg.test_identities).resolve():
        raise ValueError("validation and test identity folders are the same; the search must not see the test "
                         "images (pass disjoint --val-identities and --test-identities)")
    if cfg.utility_val and cfg.utility_test and Path(cfg.utility_val).resolve() == Path(cfg.utility_test).resolve():
        raise ValueError("--utility-val and --utility-test are the same folder; they must be disjoint")
    for flags, val, test in (("--val-identities/--test-identities", cfg.val_identities, cfg.test_identities),
                             ("--utility-val/--utility-test", cfg.utility_val, cfg.utility_test)):
        if val and test and Path(val).is_dir() and Path(test).is_dir():
            shared = shared_images(val, test)
            if shared:  # links to, or copies of, the validation images: the reported metrics would be the searched
                raise ValueError(f"{flags}: {len(shared)} test image(s) are validation images too (the same file or "
                                 f"the same bytes; e.g. {shared[0][1]} = {shared[0][0]}); the search must not see "
                                 "the test images: remove them from one folder")


def check_paths_exist(cfg) -> None:
    """``FileNotFoundError`` naming the option for an input path that does not exist — before the model loads (the
    README's Python snippet fetched the hub weights, then said the forget shard was missing; trial 48). Shard specs
    are brace-expanded and split at ``::``; the shards' contents are read later."""
    from ..data.shards import braceexpand

    for flag, spec, folder in (("--forget", cfg.forget, False), ("--retain", cfg.retain, False),
                               ("--val-identities", cfg.val_identities, True),
                               ("--test-identities", cfg.test_identities, True),
                               ("--utility-val", cfg.utility_val, True), ("--utility-test", cfg.utility_test, True),
                               ("--names", cfg.names, False), ("--related-names", cfg.related_names, False),
                               ("--gradients", cfg.gradients, False)):
        for part in (x.strip() for x in str(spec or "").split("::")):
            for path in (braceexpand(part) if part else []):
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{flag} {path}: no such {'folder' if folder else 'file or folder'}"
                                            + (f" (from {spec!r})" if path != str(spec) else ""))
                if folder and not os.path.isdir(path):
                    raise NotADirectoryError(f"{flag} {path}: a file; it takes a folder of class folders "
                                             "(<Name>/*.jpg)")


def check_world_sets(cfg) -> None:
    """A config from :func:`slugkit.world_config` whose curated sets (in OUT's temporary folder) are gone — a run on
    it already took them, finished or failed (``FileNotFoundError``) — or were replaced by a later ``world_config``
    call for the same OUT, of other concepts (``ValueError``): say so, before any work (it said "shard(s) not found …
    check the path or brace pattern", or "none of the 100 forget captions names …": trial 35)."""
    from ..common.outguard import TAG

    forget = Path(str(cfg.forget or ""))
    stage = forget.parent.parent
    if not (stage.name.startswith(".") and TAG in stage.name and stage.name.endswith(".tmp")):
        return  # not world_config's temporary folder (OUT/.NAME.slug-XXXX.tmp/data/forget.tar)
    if not forget.is_file():
        raise FileNotFoundError(f"{forget}: this config's forget and retain sets are gone — world_config curated them "
                                f"into {cfg.out}'s temporary folder, which a run on this config took with it "
                                "(finished or failed): call world_config again for a new config")
    calls, latest, seed = _CURATED.get(os.path.abspath(forget), (0, None, None))
    mine = getattr(cfg, "_world_call", None)  # which call made cfg (a dataclasses.replace copy does not carry it)
    if calls > 1 and (mine != calls if mine is not None else  # (one call: edited on purpose)
                      (latest, seed) != (sorted(cfg.concept_list()), cfg.seed)):
        raise ValueError(f"world_config was called again for {cfg.out} (for {' + '.join(latest)!r}, seed {seed}) "
                         f"after this config (for {cfg.concept!r}, seed {cfg.seed}) was made, and its sets replaced "
                         "this config's: run unlearn on the newer config, or call world_config again")


_CURATED: dict[str, tuple] = {}  # world_config's forget sets: path → (calls, the latest's concepts, its seed)


def note_curated(cfg, concepts: list[str], seed: int) -> None:
    """Record that :func:`slugkit.world_config` curated ``concepts`` with ``seed`` into ``cfg.forget``, and mark
    ``cfg`` with the call's number (:func:`check_world_sets`: an earlier call's config that differs from the latest
    in its retain mix alone, ``retain_identity_fraction``, ran on the latest's sets)."""
    key = os.path.abspath(cfg.forget)
    _CURATED[key] = (_CURATED.get(key, (0,))[0] + 1, sorted(concepts), seed)
    cfg._world_call = _CURATED[key][0]


def refuse_out_in_inputs(cfg, out=None) -> None:
    """Raise ``ValueError`` for ``--out`` (``out``, default ``cfg.out``) at or inside a folder the run reads (a class
    folder, a captioned or shard folder): the run's temporary folder was read as one more class ("61 class
    directories but 60 class names") or its files as pairs."""
    given = cfg.out if out is None else out
    out = Path(given).resolve()
    for flag, spec in (("--val-identities", cfg.val_identities), ("--test-identities", cfg.test_identities),
                       ("--utility-val", cfg.utility_val), ("--utility-test", cfg.utility_test),
                       ("--forget", cfg.forget), ("--retain", cfg.retain)):
        for part in (x.strip() for x in str(spec or "").split("::")):
            if part and Path(part).is_dir() and (out == Path(part).resolve() or Path(part).resolve() in out.parents):
                raise ValueError(f"--out {given} is inside {flag} {part}, a folder this run reads: the run's own "
                                 "folder would be read as part of it; write the run elsewhere")


def refuse_forget_in_eval(cfg, manifest: list[dict]) -> None:
    """Raise ``ValueError`` when a validation or test image is one of the forget set's own images (the same bytes):
    the search or the report would score the images the gradient was taken on."""
    digests = {m["sha256"]: f"{m['source']}:{m['key']}" for m in manifest}
    for flag, folder in (("--val-identities", cfg.val_identities), ("--test-identities", cfg.test_identities)):
        hit = images_with_digests(folder, digests) if folder and Path(folder).is_dir() else []
        if hit:
            raise ValueError(f"{flag}: {len(hit)} image(s) are forget-set images (the same bytes; e.g. {hit[0][0]} = "
                             f"forget sample {hit[0][1]}); evaluation images must be held out of the forget set: "
                             "remove them")


def load_model(cfg, adapter):
    """The adapter of ``cfg.model`` (unless one is given), restricted to what ``cfg.consumer`` reads."""
    from ..models import load_adapter

    if adapter is None:
        adapter = load_adapter(cfg.model, cfg.pretrained, family=cfg.family, device=cfg.device,
                               precision=cfg.precision)
    if cfg.consumer:
        from ..integrations import restrict_to_consumer

        if not hasattr(adapter, "restrict_candidates"):
            raise ValueError(f"--consumer needs the hf_clip family (the {adapter.family} adapter cannot restrict "
                             "its candidates to a downstream model)")
        restrict_to_consumer(adapter, cfg.consumer, clip_skip=cfg.clip_skip)
    return adapter


def load_run_data(cfg, adapter) -> dict:
    """Forget and retain pairs, validation and test suites. With precomputed gradients the pairs are read too: their
    captions are checked, and the neighbour protection and a second layer need them (skipped before, the run
    silently took the paper's step, and a forget set of another person went through; twelfth trial)."""
    data = {"forget": None, "retain": None, "forget_stats": ReadStats(), "retain_stats": ReadStats()}
    data["captions"] = None
    if cfg.forget and cfg.retain:
        f_img, f_tok, data["forget_stats"] = load_pairs(adapter, cfg.forget, cfg.forget_samples, cfg.strict, "forget")
        captions = data["forget_stats"].captions
        named, truncated = forget_caption_counts(adapter, captions, cfg.concept_list() + list(cfg.aliases))
        if cfg.caption_check:
            check_captions(named, len(captions), cfg.concept_list(), cfg.forget, truncated, cfg.strict)
            missing = unnamed_concepts(captions, cfg.concept_list()) if len(cfg.concept_list()) > 1 else []
            if missing and named:
                raise ForgetCaptionsError(
                    f"none of the {len(captions)} forget captions in {cfg.forget} names "
                    f"{' / '.join(map(repr, missing))}: a joint run unlearns every concept from one forget set, so "
                    "each needs its own pairs; add them (slug curate --concept NAME) or leave the concept out")
        data["captions"] = {"named": named, "total": len(captions), "truncated": truncated}
        refuse_forget_in_eval(cfg, data["forget_stats"].manifest)
        r_img, r_tok, data["retain_stats"] = load_pairs(adapter, cfg.retain, cfg.retain_samples, cfg.strict, "retain")
        r_caps = data["retain_stats"].captions
        r_named = retain_caption_count(r_caps, cfg.concept_list() + list(cfg.aliases))
        if cfg.caption_check:
            check_retain_captions(r_named, len(r_caps), cfg.concept_list(), cfg.retain, cfg.forget)
        data["captions"].update(retain_named=r_named, retain_total=len(r_caps))
        data["forget"], data["retain"] = (f_img, f_tok), (r_img, r_tok)
    data["val_suite"] = build_suite(adapter, cfg, cfg.val_identities, cfg.utility_val)
    data["test_suite"] = build_suite(adapter, cfg, cfg.test_identities, cfg.utility_test)
    return data
