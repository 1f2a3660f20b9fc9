"""The embedded world's runs: the ``UnlearnConfig`` that ``slug demo`` and ``slug compare`` build for a world concept.

The world's data (pool shards, validation and test folders) is written by :mod:`slugkit.world.demo_data`; this module
only curates the concept's forget/retain sets from it and points a configuration at the folders — the same
configuration a user writes by hand for LAION + CelebA + ImageNet.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..common.outlock import claim_out, inputs_folder, is_private
from ..data.curate import curate
from ..world import render as world
from ..world.demo_data import RETAIN_PAIRS, ensure_world_data, retain_without, write_mixed_retain
from .run_inputs import note_curated
from .unlearn import RUN_MARKER, UnlearnConfig


def world_config(concept: str | list[str], out: str | Path, data_dir: str | Path | None = None, *,
                 progress: bool = True, seed: int = 0, retain_identity_fraction: float | None = None, **overrides):
    """The ``UnlearnConfig`` of ``slug demo``: curate the concept from the world's pool shards (100 forget pairs,
    900 retain pairs that never name it) and point validation/test at the world's disjoint class folders.
    A list of concepts is unlearned jointly: 100 forget pairs of each, a retain set naming none of them.
    ``retain_identity_fraction``: instead of the curated retain set, 900 pool pairs with that share of other
    identities' pairs, the rest utility pairs (:func:`write_mixed_retain`).

    ``out`` is claimed for the run as ``slug demo`` claims it (:func:`slugkit.common.outlock.claim_out`; a run there
    is refused without ``overwrite=True``, another process writing it raises ``RunLockedError``): the curated sets
    are written into the run's hidden temporary folder next to ``out`` (``config.forget``/``retain`` point there),
    which :func:`slugkit.unlearn` fills and renames to ``out`` — they become the run's ``out/data``, and ``out``
    keeps its old content until then. When the run fails, or this process ends without running it, the temporary
    folder goes with it: call ``world_config`` again for another try. A folder inside a run being written (``slug
    compare``'s per-method folders) is written directly.

    Returns ``(config, curate_summary, data_dir)``.
    """
    _check_request(concept, out, overrides)
    try:
        concepts = [world.identity_by_name(c).name for c in ([concept] if isinstance(concept, str) else concept)]
    except KeyError as e:  # a KeyError printed its message in quotes (trial 37)
        raise ValueError(f"world_config: {e.args[0]}") from None
    data = ensure_world_data(data_dir, progress=progress)
    inputs = Path(out) / "data"  # the run's OUT/data; written below into OUT's temporary folder (inputs_folder)
    cfg = UnlearnConfig(  # built (and so checked: an unknown or bad override, an empty out) before anything is written
        concept=" + ".join(concepts), concepts=concepts if len(concepts) > 1 else [], out=out,
        model="embedded", forget=str(inputs / "forget.tar"),
        retain=str(inputs / "retain.tar"), val_identities=str(data / "val" / "identities"),
        test_identities=str(data / "test" / "identities"), names=str(data / "names.txt"),
        identity_templates=list(world.IDENTITY_EVAL_TEMPLATES), utility_val=str(data / "val" / "utility"),
        utility_test=str(data / "test" / "utility"), utility_templates=str(data / "utility_templates.txt"),
        seed=seed, progress=progress, **overrides)
    if not is_private(out):  # OUT claimed as `slug demo` claims it (a run there is refused without overwrite), so
        claim_out(out, cfg.overwrite, RUN_MARKER, for_python=True)  # the data goes into its temporary folder
    inputs = inputs_folder(out) / "data"
    if inputs.parent != Path(out):  # the claim's temporary folder (not under a run being written: OUT itself)
        cfg = replace(cfg, forget=str(inputs / "forget.tar"), retain=str(inputs / "retain.tar"))
    mixed = retain_identity_fraction is not None
    cur = curate(str(data / "pool"), concepts[0], inputs, aliases=concepts[1:],
                 max_forget=100 * len(concepts), retain=0 if mixed else RETAIN_PAIRS, seed=seed)
    if mixed:
        cur["retain"] = RETAIN_PAIRS
        cur["retain_mix"] = write_mixed_retain(concepts, inputs / "retain.tar", retain_identity_fraction,
                                               seed=seed)
    note_curated(cfg, concepts, seed)  # a config of an earlier call for this OUT is then known to be stale
    return cfg, cur, data


# the fields world_config sets, and those a run on the world's data does not read (`slug unlearn`: world_ignored)
_FIXED = ("concept", "concepts", "out", "model", "forget", "retain", "val_identities", "test_identities", "names",
          "identity_templates", "utility_val", "utility_test", "utility_templates")
_UNREAD = ("family", "consumer", "clip_skip", "related_names", "utility_classnames", "aliases")


def _check_request(concept, out, overrides: dict) -> None:
    """Refuse, before anything is written (the world, OUT/data), what world_config cannot use (trial 31): a concept
    that is no name or list of names, an out that is no path, inside the slugkit package, or a file, an override
    of a field it sets or of one the world's run does not read, a ``pretrained`` checkpoint that is missing or not
    safetensors (:class:`~slugkit.models.ModelLoadError`)."""
    from ..common.outputs import out_inside_model

    names = [concept] if isinstance(concept, str) else concept
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(c, str) for c in names):
        raise TypeError(f"world_config: concept must be an identity's name or a list of names, got {concept!r}")
    if not all(c.strip() for c in names):
        raise ValueError(f"world_config: concept {concept!r} holds an empty name; `slug world names` lists them")
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).strip():
        raise ValueError(f"world_config: out must be a folder path, got {out!r}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"world_config: out {out} is a file; give a folder")
    if out_inside_model(out, {}, "out"):
        raise ValueError(f"world_config: {out_inside_model(out, {}, 'out')}")
    pretrained = overrides.get("pretrained")
    if isinstance(pretrained, (str, os.PathLike)) and os.fspath(pretrained):  # missing: refused by unlearn, after
        from ..models.open_clip import weights_override  # OUT/data was curated (other types: UnlearnConfig's check)

        weights_override("embedded", os.fspath(pretrained))
    fixed, unread = [k for k in overrides if k in _FIXED], [k for k in overrides if k in _UNREAD]
    if fixed or unread:
        raise TypeError(f"world_config: {', '.join(fixed + unread)}: "
                        + ("set by world_config from the embedded world" if fixed else "not read by a run on the "
                           "embedded world's data (as `slug unlearn --model embedded` refuses them)")
                        + "; build UnlearnConfig yourself to choose them")


def sequential_world_configs(concepts: list[str], where, data_dir: str | Path | None = None, **kwargs) -> list[tuple]:
    """One :func:`world_config` per step of a sequential run, in folder ``where(k, concept)``: step k's forget set is
    concept k's, its retain set that step's curated retain set minus the pairs naming a concept unlearned at an
    earlier step (``data/retain-excluding-earlier.tar``). With them the retain gradient (and a baseline's retain
    pass) would pull an already forgotten concept back. Returns ``[(config, curate_summary, data_dir), ...]``."""
    steps = []
    for k, c in enumerate(concepts):
        folder = Path(where(k, c))
        cfg, cur, data = world_config(c, folder, data_dir, **kwargs)
        if k:
            path = folder / "data" / "retain-excluding-earlier.tar"
            cur = {**cur, "retain_excluding_earlier": retain_without(cfg.retain, concepts[:k], path)}
            cfg = replace(cfg, retain=str(path))
        steps.append((cfg, cur, data))
    return steps
