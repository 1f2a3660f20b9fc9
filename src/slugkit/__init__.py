"""slugkit: targeted unlearning with SLUG (Single Layer Unlearning Gradient, ICML 2025).

Public API::

    from slugkit import load_model, unlearn, UnlearnConfig, SearchConfig, Budgets, world_config
    from slugkit import load_patch, apply_patch, revert_patch, apply_patches, compose_patches, save_patch

``unlearn(UnlearnConfig(...))`` is ``slug unlearn``; ``world_config(NAME, OUT)`` gives the configuration of a run on
the embedded world's data (``slug demo``). The README's "Python" section shows both.
"""

from __future__ import annotations

__version__ = "0.1.0"

_PATCH_API = ("Patch", "apply_patch", "apply_patches", "combine_patches", "compose_patches", "load_patch",
              "revert_patch", "save_patch")


def load_model(model: str = "embedded", pretrained: str | None = None, **kw):
    """Load a model adapter: open_clip ids (``"ViT-B-32"``, ``pretrained="laion400m_e32"`` or a local
    ``.safetensors``), ``hf-hub:``/``local-dir:`` ids, a model folder, or ``"embedded"`` (the shipped tiny CLIP).
    ``kw``: ``family`` (``"open_clip"``, default, or ``"hf_clip"``: a transformers ``CLIPModel``), ``precision``
    (``"fp32"``, ``"bf16"``, ``"fp16"``), ``device``, ``cache_dir`` (:func:`slugkit.models.load_adapter`). The
    adapter's ``.model`` is the ``nn.Module``; :func:`apply_patch` takes either. Paths may be ``os.PathLike``;
    torch's random state is left as it was (building the model before loading its weights draws from it)."""
    import os

    from .models import load_adapter

    model, pretrained = (os.fspath(x) if isinstance(x, os.PathLike) else x for x in (model, pretrained))
    if not isinstance(model, str) or not model.strip():  # None said "'NoneType' object has no attribute 'startswith'"
        raise TypeError(f"load_model: model must be a model id, a folder or 'embedded', got {model!r}")
    if pretrained is not None and (not isinstance(pretrained, str) or not pretrained.strip()):
        raise ValueError(f"load_model: pretrained must be a tag, a .safetensors file or None, got {pretrained!r}")
    return load_adapter(model, pretrained, **kw)  # which keeps torch's random state (slugkit.common.rng)


def unlearn(config) -> dict:
    """Run SLUG end to end (``slug unlearn``) with ``config``, an :class:`UnlearnConfig`; writes the run folder
    ``config.out`` (``result.json``, ``report.md``, ``patch/``, …) and returns ``result.json``'s content as a dict.

    Check ``result["verdict"]["status"]``: ``pass``, ``warn`` or ``fail`` (the CLI's exit status 0, 3, 4); the patch
    is at ``Path(config.out) / result["patch"]["path"]`` when one was written. Raises ``TypeError`` for a config of
    another type, :class:`slugkit.slug.search.SearchFailed` when no layer and step met the criteria (no patch, no
    folder), and the input errors of :mod:`slugkit.common.errors` (``ValueError``, ``OSError`` subclasses) naming
    the file or option."""
    from .workflows.unlearn import run_unlearn

    return run_unlearn(config)


def world_config(concept, out, data_dir=None, *, progress: bool = True, seed: int = 0,
                 retain_identity_fraction: float | None = None, **overrides):
    """The :class:`UnlearnConfig` of a run on the embedded world's data (``slug demo``): the world is written to
    ``data_dir`` (default: the shared cache) if missing; ``out`` is claimed as ``slug demo`` claims it (a run there
    is refused without ``overwrite=True``) and the concept's forget/retain pairs are curated into its temporary
    folder, which :func:`unlearn` renames to ``out`` (they become ``out/data``; ``out`` is untouched until then; a
    run that fails takes them along: call ``world_config`` again; :func:`release_claims` gives ``out`` back unused).
    ``concept``: a name or a list (unlearned jointly); ``retain_identity_fraction``: a mixed retain set
    (:func:`slugkit.world.demo_data.write_mixed_retain`);
    ``overrides``: other ``UnlearnConfig`` fields (``search``, ``budgets``, ``overwrite``, …). Returns ``(config,
    curate_summary, data_dir)``; pass ``config`` to :func:`unlearn`."""
    from .workflows.world_runs import world_config as wc

    return wc(concept, out, data_dir, progress=progress, seed=seed, retain_identity_fraction=retain_identity_fraction,
              **overrides)


def release_claims() -> None:
    """Give up every output folder this process claimed for a run it has not started (:func:`world_config` claims
    ``out`` until :func:`unlearn` runs on it): their temporary folders — the curated sets — are removed and the
    folders left as they were, so another process (or ``slug demo --out``) can write them. Also done at exit."""
    from .common.outlock import abandon_claims

    abandon_claims(waiting_only=True)


def __getattr__(name):
    """Lazy public names: ``import slugkit`` (and ``slug --help``, ``slug --version``, a usage error) does not import
    torch (1.7 s); the first use of a name below does."""
    if name in _PATCH_API:
        from . import patch

        return getattr(patch, name)
    if name == "UnlearnConfig":
        from .workflows.unlearn import UnlearnConfig

        return UnlearnConfig
    if name == "SearchConfig":
        from .slug.search import SearchConfig

        return SearchConfig
    if name == "Budgets":
        from .workflows.verdict import Budgets

        return Budgets
    raise AttributeError(f"module 'slugkit' has no attribute {name!r}")


def __dir__():
    """The lazy names too: tab completion and ``help(slugkit)`` listed only ``load_model`` and ``unlearn``."""
    return sorted(set(globals()) | set(__all__))


__all__ = ["Patch", "apply_patch", "apply_patches", "combine_patches", "compose_patches", "load_patch", "revert_patch",
           "save_patch", "load_model", "unlearn", "world_config", "release_claims", "UnlearnConfig", "SearchConfig",
           "Budgets"]
