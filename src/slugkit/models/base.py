"""The adapter protocol: what the SLUG core needs to know about a model family.

An adapter wraps a loaded model and declares, as data:

* its **towers** (``vision`` / ``language``) and which parameter tensor belongs to which;
* its **candidate tensors** (the tensors SLUG may edit) and **groups** of tensors that move together;
* **encode** functions returning L2-normalised embeddings;
* the **forget loss** (per-sample cosine of each image with its own caption) and the **retain loss**
  (CLIP contrastive loss);
* a **staged forward** per tower (``stages(tower)``): the tower as a list of callables whose composition is the
  tower's encoder. The step-size search uses it to cache the activations entering the edited stage once and
  re-run only the stages the edit can change (spec §9.3).

The SLUG core (``slugkit.slug``) only talks to this protocol, never to a library directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..common.errors import ModelLoadError  # noqa: F401  (re-exported: slugkit.models.ModelLoadError)

TOWERS = ("vision", "language")


@dataclass
class Stage:
    """One step of a staged tower forward: ``fn(x, ctx) -> x``; ``params`` are the parameter names it reads."""

    name: str
    fn: Callable
    params: list[str] = field(default_factory=list)


class Adapter:
    """Base class; see :class:`slugkit.models.open_clip.OpenClipAdapter` for the reference implementation."""

    family: str = "base"
    model: torch.nn.Module
    model_id: dict

    # --- declarations -------------------------------------------------------------------------------------
    def tower_of(self, name: str) -> str:
        raise NotImplementedError

    def candidate_names(self) -> list[str]:
        raise NotImplementedError

    def group_of(self, name: str) -> list[str]:
        """Tensors that must move together with ``name`` (itself included). Default: the tensor alone."""
        return [name]

    # --- encoders and losses ------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def preprocess(self, image):
        raise NotImplementedError

    def forget_loss_per_sample(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """cos(f_I(x_i), f_T(t_i)) for each pair: L_forget is its mean (spec §2.3, clean sign convention)."""
        fi = self.encode_image(images)
        ft = self.encode_text(tokens)
        return (fi * ft).sum(dim=-1)

    def retain_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- staged forward for the cached search -----------------------------------------------------------
    def stages(self, tower: str) -> list[Stage]:
        raise NotImplementedError

    def stage_index(self, tower: str, name: str) -> int:
        for i, st in enumerate(self.stages(tower)):
            if name in st.params:
                return i
        raise KeyError(f"tensor {name} is not read by any stage of the {tower} tower")

    def parameter(self, name: str) -> torch.nn.Parameter:
        params = dict(self.model.named_parameters())
        if name not in params:
            raise KeyError(f"model has no parameter {name!r}")
        return params[name]

    def model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
