"""The checks of an :class:`~slugkit.workflows.unlearn.UnlearnConfig` built in Python, with the rules of
``slug unlearn``'s parser: the CLI refused ``--batch-size 0``, ``--forget-samples 0`` or ``--max-layers 9`` before any
work, while ``slugkit.unlearn(UnlearnConfig(...))`` ran on them: one forget pair with ``forget_samples=0`` (verdict
pass), a ``ZeroDivisionError`` after the gradient pass with ``batch_size=0``, and with a ``pathlib.Path`` for ``out``
a whole run thrown away when ``run.json`` was written (trial 28). Paths may be ``str`` or ``os.PathLike`` (kept as
``str``); ``forget``/``retain`` may be a list of sources (joined with ``::``, as the CLI takes them); a field that
takes a list refuses a ``str`` (``aliases="Jowen"`` became five one-letter aliases). ``identity_templates`` may be a
template file, as ``utility_templates`` (read here, one template per line).

Every error names the field and the CLI option it mirrors: ``TypeError`` for a value of the wrong type,
``ValueError`` for one out of range.
"""

from __future__ import annotations

import numbers
import os

_REQUIRED_PATHS = ("out", "forget", "retain", "val_identities", "test_identities")
_OPTIONAL_PATHS = ("pretrained", "names", "related_names", "utility_val", "utility_test", "utility_classnames",
                   "gradients")
_FLAGS = ("cached_search", "strict", "overwrite", "progress", "save_gradients", "caption_check")
# (field, smallest, largest or None, why) of the integer fields; None values are allowed where the default is None
_INTS = (("batch_size", 2, None, "the retain loss is contrastive: a batch of one pair has no negatives"),
         ("eval_batch_size", 1, None, ""), ("forget_samples", 1, None, "a cap of 0 pairs kept one"),
         ("retain_samples", 2, None, "the retain loss needs two pairs"), ("threads", 1, None, ""),
         ("clip_skip", 0, None, ""), ("protect_neighbours", 0, 50, "0 is the paper's step"),
         ("max_layers", 1, 3, "1 is the paper's single layer"))


# the CLI spelling where it is not the field's (None: no option)
_CLI = {"aliases": "--alias", "identity_templates": "--identity-template", "caption_check": "--no-caption-check",
        "cached_search": "--naive-search", "progress": "--no-progress", "eval_batch_size": None}


def _where(name: str) -> str:
    flag = _CLI.get(name, "--" + name.replace("_", "-"))
    return f"UnlearnConfig.{name}" + (f" ({flag})" if flag else "")


def _is_int(v) -> bool:
    """An integer, numpy's too (a sweep over ``np.arange``), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _path(cfg, name: str, required: bool) -> None:
    v = getattr(cfg, name)
    if v is None and not required:
        return
    if name in ("forget", "retain") and isinstance(v, (list, tuple)):  # several sources: the CLI's A::B
        if not v:
            raise ValueError(f"{_where(name)}: the list is empty; give a shard spec, a captioned folder, or a list "
                             "of them")
        for x in v:
            if not isinstance(x, (str, os.PathLike)) or not os.fspath(x).strip():  # "" became "a::" (trial 31)
                raise TypeError(f"{_where(name)}: list items must be non-empty paths, got {type(x).__name__} {x!r}")
        v = "::".join(os.fspath(x) for x in v)
    if not isinstance(v, (str, os.PathLike)):
        raise TypeError(f"{_where(name)}: expected a path (str or os.PathLike), got {type(v).__name__} {v!r}")
    v = os.fspath(v)
    if not v.strip():  # "" read the working directory as a class folder
        raise ValueError(f"{_where(name)}: is empty; give a path" + ("" if required else " or None"))
    setattr(cfg, name, v)


def _names(cfg, name: str) -> list[str]:
    v = getattr(cfg, name)
    if isinstance(v, str):
        items = [x.strip() for x in v.split(",")] if "," in v else [v]
        raise TypeError(f"{_where(name)}: expected a list of names, e.g. {items!r}, not the str {v!r} (a str was read "
                        "one character at a time)")
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{_where(name)}: expected a list of str, got {type(v).__name__} {v!r}")
    bad = [x for x in v if not isinstance(x, str) or not x.strip()]
    if bad:
        raise ValueError(f"{_where(name)}: every item must be a non-empty str, got {bad[0]!r}")
    return [x.strip() for x in v]


def _templates(cfg, field: str = "identity_templates") -> None:
    from ..data.folders import read_templates

    v = getattr(cfg, field)
    if field == "utility_templates" and v in ("imagenet", "imagenet-simple"):
        return
    if isinstance(v, os.PathLike) or (isinstance(v, str) and "{}" not in v):  # a template file, as utility_templates
        path = os.fspath(v)
        if not os.path.isfile(path):
            raise ValueError(f"{_where(field)}: {path!r} is no file and holds no {{}}; give a list of "
                             "templates such as ['a photo of {}.'] or a file of them, one per line")
        if field == "identity_templates":
            cfg.identity_templates = read_templates(path)
        else:  # kept as the file's path (run.json records it), read here for its checks
            read_templates(path)
            setattr(cfg, field, path)
        return
    if isinstance(v, str):
        raise TypeError(f"{_where(field)}: expected a list of templates, e.g. [{v!r}], not a str")
    if not isinstance(v, (list, tuple)) or not v:
        raise ValueError(f"{_where(field)}: give at least one template, e.g. ['{{}}.'], got {v!r}")
    for t in v:
        ok = isinstance(t, str) and "{}" in t
        try:
            ok = ok and bool(t.format("x"))
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{_where(field)}: {t!r} must hold exactly one {{}} where the name goes "
                             "(other braces doubled: {{ }})")
    setattr(cfg, field, list(v))


def _numbers(cfg) -> None:
    for name, lo, hi, why in _INTS:
        v = getattr(cfg, name)
        if v is None and name in ("forget_samples", "retain_samples", "threads", "clip_skip"):
            continue
        if not _is_int(v):
            raise TypeError(f"{_where(name)}: expected an int, got {type(v).__name__} {v!r}")
        v = int(v)  # a numpy integer is no JSON value (run.json)
        setattr(cfg, name, v)
        if v < lo or (hi is not None and v > hi):
            rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"{_where(name)}: must be {rng}" + (f" ({why})" if why else "") + f", got {v}")
    if not _is_int(cfg.seed):
        raise TypeError(f"{_where('seed')}: expected an int, got {type(cfg.seed).__name__} {cfg.seed!r}")
    cfg.seed = int(cfg.seed)


def check_config(cfg) -> None:
    """Check (and normalise in place: paths to ``str``, templates read from a file) every field of ``cfg``, an
    ``UnlearnConfig``. Raises ``TypeError`` / ``ValueError`` naming the field and its CLI option."""
    from ..common.errors import check_device, check_flag
    from ..slug.search import SearchConfig
    from .verdict import Budgets

    if not isinstance(cfg.concept, str):
        raise TypeError(f"{_where('concept')}: expected a str, got {type(cfg.concept).__name__} {cfg.concept!r}")
    cfg.concepts = _names(cfg, "concepts")
    cfg.aliases = _names(cfg, "aliases")
    if len({c.casefold() for c in cfg.concepts}) < len(cfg.concepts):
        raise ValueError(f"{_where('concepts')}: a concept is given twice in {cfg.concepts}")
    cfg.concept = cfg.concept.strip() or " + ".join(cfg.concepts)
    if not cfg.concept:
        raise ValueError(f"{_where('concept')}: is empty; give the name to unlearn (or concepts=[...])")
    for name in _REQUIRED_PATHS:
        _path(cfg, name, True)
    for name in _OPTIONAL_PATHS:
        _path(cfg, name, False)
    if isinstance(cfg.model, os.PathLike):  # a local checkpoint or folder
        cfg.model = os.fspath(cfg.model)
    if not isinstance(cfg.utility_templates, (str, list, tuple, os.PathLike)):
        raise TypeError(f"{_where('utility_templates')}: expected 'imagenet-simple', 'imagenet', a file or a list "
                        f"of templates, got {type(cfg.utility_templates).__name__}")
    _templates(cfg)
    _templates(cfg, "utility_templates")  # [], [1], "no braces" were taken (trial 31)
    _numbers(cfg)
    for name in _FLAGS:  # numpy's bool is taken as a bool, as by every writer's overwrite (common.errors.check_flag)
        check_flag(_where(name), getattr(cfg, name))
        setattr(cfg, name, bool(getattr(cfg, name)))
    for name, kinds in (("model", ("a model id, a checkpoint or 'embedded'",)), ("family", ("open_clip", "hf_clip")),
                        ("precision", ("fp32", "bf16", "fp16"))):
        v = getattr(cfg, name)
        if not isinstance(v, str) or not v.strip() or (len(kinds) > 1 and v not in kinds):
            raise ValueError(f"{_where(name)}: expected {' or '.join(kinds)}, got {v!r}")
    if cfg.consumer is not None and not (isinstance(cfg.consumer, str) and cfg.consumer.split(":", 1)[0] in
                                         ("sd", "llava") and cfg.consumer.split(":", 1)[-1].strip()):
        raise ValueError(f"{_where('consumer')}: expected 'sd:DIR' or 'llava:DIR' (or 'sd:embedded', "
                         f"'llava:embedded'), or left out, got {cfg.consumer!r}")
    if cfg.save_gradients and cfg.gradients:  # nothing is computed to save: it was dropped without a word (trial 39)
        raise ValueError(f"{_where('save_gradients')}: the gradients are read from {cfg.gradients} (gradients, "
                         "--gradients), not computed, so there is nothing to save; drop one of the two")
    if cfg.clip_skip is not None and not (cfg.consumer or "").startswith("sd:"):  # was dropped without a word
        raise ValueError(f"{_where('clip_skip')}: applies with consumer 'sd:DIR' only (how that pipeline reads its "
                         "text encoder); drop it, or give --consumer sd:DIR")
    if not isinstance(cfg.device, str):
        raise TypeError(f"{_where('device')}: expected a str such as 'cpu' or 'cuda:0', got {cfg.device!r}")
    why = check_device(cfg.device)
    if why:
        raise ValueError(f"UnlearnConfig.device: {why}")
    if not isinstance(cfg.search, SearchConfig):
        raise TypeError(f"UnlearnConfig.search: expected a slugkit.SearchConfig, got {type(cfg.search).__name__}")
    if not isinstance(cfg.budgets, Budgets):
        raise TypeError(f"UnlearnConfig.budgets: expected a slugkit.Budgets, got {type(cfg.budgets).__name__}")
    _refused_at_build(cfg)
    if cfg.search.worst_budget is None and cfg.budgets.worst_drop < 1.0:  # half of --worst-budget off (trial 48)
        import warnings

        warnings.warn(f"UnlearnConfig.search.worst_budget is None (the search's bound off) while budgets.worst_drop "
                      f"is {cfg.budgets.worst_drop:g}, so the verdict still warns on a larger drop; --worst-budget off "
                      "is both: search=SearchConfig(worst_budget=None), budgets=Budgets(worst_drop=None)",
                      UserWarning, stacklevel=4)


def _refused_at_build(cfg) -> None:
    """What the CLI refuses before any work and a config took until the run (trial 48: a precision the device cannot
    run, a quoted ``~``, the same forget and retain set, the same validation and test folder were refused only
    after the model had loaded): ``ValueError`` naming the field. Pure checks of the values; whether the paths exist
    is checked when the run starts, before the model loads (:func:`slugkit.workflows.run_inputs.check_inputs`)."""
    from ..models.base import check_precision

    try:
        check_precision(cfg.precision, cfg.device)
    except ValueError as e:
        raise ValueError(f"{_where('precision')}: {e}") from None
    if str(cfg.out).startswith("~") and not os.path.lexists(cfg.out):
        raise ValueError(f"{_where('out')}: starts with '~', which Python does not expand; write the path out, e.g. "
                         f"{os.path.expanduser(cfg.out)}")
    for a, b, what in (("forget", "retain", "set; the retain set is what the model should keep, not the concept"),
                       ("val_identities", "test_identities", "folder; the search must not see the test images"),
                       ("utility_val", "utility_test", "folder; they must be disjoint")):
        x, y = getattr(cfg, a), getattr(cfg, b)
        if x and y and os.path.abspath(os.path.expanduser(x)) == os.path.abspath(os.path.expanduser(y)):
            fa, fb = (_CLI.get(n, "--" + n.replace("_", "-")) for n in (a, b))
            raise ValueError(f"UnlearnConfig.{b}: {fb} and {fa} are the same {what.replace('; ', f' ({x}); ', 1)}")
