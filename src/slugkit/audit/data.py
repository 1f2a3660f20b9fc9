"""What an audit needs besides the two models: the concept's images and names, the other identities, a control.

:class:`AuditData` holds preprocessed images (``[N, C, H, W]`` float32, CPU) per identity name:

* ``test``: held-out images of the concept and of every other identity — what every probe scores on;
* ``train``: training-split images (the representation probe's training data; the relearning pairs);
* ``controls``: **control names** the model never learned (invented names never captioned): the attack and the
  relearning probes run the same search or fine-tuning on the concept's own images with a control name in place of
  the concept's name, so a budget strong enough to attach *any* name to those images can be told from one that
  recovers the forgotten name.

:func:`world_audit_data` builds it for the embedded world (test split, 50 images per identity; 20 training-split
images per identity; controls :func:`default_controls`).
:func:`folder_audit_data` builds it from a user's class folders (``<Name>/*.jpg``), the form ``slug audit`` takes for
a real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..common.errors import EmptyForgetSetError
from ..data.folders import name_key


@dataclass
class AuditData:
    """Images and names of one audit (module docstring). ``names``: the zero-shot class list (every identity, the
    concept included); ``templates``: the zero-shot prompt templates of the run (``{}`` = the name);
    ``seen_templates``: templates the search or the forget captions used (never counted as unseen prompt forms);
    ``aliases``: other names the concept goes by (tried as name variants)."""

    concept: str
    names: list[str]
    templates: list[str]
    test: dict[str, torch.Tensor]
    train: dict[str, torch.Tensor] = field(default_factory=dict)
    controls: list[str] = field(default_factory=list)
    seen_templates: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if self.concept not in self.names:
            raise ValueError(f"concept {self.concept!r} is not in the name list ({len(self.names)} names); "
                             "the audit scores it against the others")
        if self.concept not in self.test or not len(self.test[self.concept]):
            raise EmptyForgetSetError(f"no test images of {self.concept!r}; every probe scores on them")
        if not self.controls:
            self.controls = default_controls(self.names)
        own = {w: n for n in [self.concept, *self.aliases] for w in name_words(n)}
        for c in self.controls:
            if c.strip().lower() in {n.lower() for n in self.names}:
                raise ValueError(f"control name {c!r} is in the name list; a control must be a name the model never "
                                 "learned")
            shared = [w for w in name_words(c) if w in own]
            if shared:  # "Talsa" for Talsa Falham: the control reached the concept's name, a false pass (trial 38)
                whose = "concept's name" if own[shared[0]] == self.concept else "concept's alias"
                raise ValueError(f"control name {c!r} shares {shared[0]!r} with {own[shared[0]]!r}, the audited "
                                 f"{whose}; a control must be a name the model never learned, and a part of the "
                                 f"{whose} is a route back to it: choose a name with none of its words")

    @property
    def concept_index(self) -> int:
        return self.names.index(self.concept)


def default_controls(names: list[str], n: int = 3) -> list[str]:
    """``n`` invented names (:func:`slugkit.world.names.held_out_identities`) not in ``names``: never captioned in the
    embedded world, and invented (two-syllable first and last names from the world's syllable lists), so a real
    model is very unlikely to have learned them either; pass your own with ``--control-name``."""
    from ..world.names import held_out_identities

    taken = {w for x in names for w in name_words(x)}  # no word of a listed name (the concept's first name …)
    for k in (n + 5, n + 20, n + 80):  # held_out_identities(k)'s order depends on k: n + 5 first, the names it gave
        free = [i.name for i in held_out_identities(k) if not taken & set(name_words(i.name))]
        if len(free) >= n:
            break
    return free[:n]


def name_words(name: str) -> list[str]:
    """The words of ``name`` as concept matching reads them (:func:`slugkit.data.matching.normalize_text`;
    letters and digits, hyphens and apostrophes split): ``"Jean-Luc O'Neil"`` → ``["jean", "luc", "o", "neil"]``."""
    import re

    from ..data.matching import normalize_text

    return re.findall(r"\w+", normalize_text(name))


def _preprocess(adapter, images) -> torch.Tensor:
    return torch.stack([adapter.preprocess(im) for im in images])


def _world_split(split: str, per: int) -> dict[str, list]:
    from ..world import render as world

    by: dict[str, list] = {}
    for s in world.make_samples(split, "identity", per):
        by.setdefault(s.class_name, []).append(world.jpeg_roundtrip(s.image))
    return by


def world_audit_data(adapter, concept: str, per_test: int = 50, per_train: int = 20,
                     controls: list[str] | None = None, aliases: list[str] | None = None) -> AuditData:
    """The embedded world's audit data for identity ``concept`` (rendered directly: the same images as the world's
    folders, JPEG round trip included); ``controls`` default to :func:`default_controls`. Raises ``ValueError`` for a
    name the world does not have or a control that is one of its names."""
    from ..world import render as world

    try:
        ident = world.identity_by_name(concept)
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    names = world.identity_names()
    test, train = ({n: _preprocess(adapter, ims) for n, ims in _world_split(split, per).items()}
                   for split, per in (("test", per_test), ("train", per_train)))
    return AuditData(
        concept=ident.name, names=names, templates=list(world.IDENTITY_EVAL_TEMPLATES), test=test, train=train,
        seen_templates=list(world.IDENTITY_CAPTION_TEMPLATES) + list(world.IDENTITY_EVAL_TEMPLATES),
        controls=list(controls or []), aliases=list(aliases or []), source="embedded world (test split, train split)")


def name_list(names_file: str | None, test_identities: str) -> list[str]:
    """The zero-shot name list as a run builds it: the ``--names`` file, else the test folder's class names."""
    from ..data.folders import read_class_folder, read_names

    return read_names(names_file) if names_file else list(read_class_folder(test_identities).classnames)


def _class_images(adapter, root: str, what: str) -> dict[str, torch.Tensor]:
    from ..data.folders import read_class_folder

    folder = read_class_folder(root)
    by: dict[str, list] = {}
    for img, y in folder.load():
        by.setdefault(folder.classnames[y], []).append(adapter.preprocess(img))
    if not by:
        raise EmptyForgetSetError(f"{root}: no images in the {what} class folder")
    return {n: torch.stack(v) for n, v in by.items()}


def folder_audit_data(adapter, concept: str, names: list[str], templates: list[str], test_identities: str, *,
                      train_identities: str | None = None, controls: list[str] | None = None,
                      seen_templates: list[str] | None = None, aliases: list[str] | None = None) -> AuditData:
    """Audit data from class folders (``<Name>/*.jpg``, names as ``names`` spells them, spaces or underscores):
    ``test_identities`` (required; the concept must have a folder) and ``train_identities`` (the representation
    probe and the relearning pairs; without it those probes are skipped). ``controls``: names the model never
    learned (default :func:`default_controls`). Raises ``EmptyForgetSetError`` when the concept has no test images,
    ``ValueError`` for a folder whose class is not in ``names`` or a control that is."""
    norm = {name_key(n): n for n in names}

    def rename(d: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in d.items():
            key = norm.get(name_key(k))
            if key is None:
                raise ValueError(f"{where}: class folder {k!r} is not in the name list")
            out[key] = v
        return out

    concept = norm.get(name_key(concept), concept)
    test = rename(_class_images(adapter, test_identities, "test"), test_identities)
    train = rename(_class_images(adapter, train_identities, "train"), train_identities) if train_identities else {}
    return AuditData(concept=concept, names=list(names), templates=list(templates), test=test, train=train,
                     controls=list(controls or []), seen_templates=list(seen_templates or []) + list(templates),
                     aliases=list(aliases or []),
                     source=f"class folders: test {test_identities}, train {train_identities or '-'}")
