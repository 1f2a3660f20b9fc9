"""FT: fine-tune on the retain set (one pass over D_r per epoch minimising the CLIP contrastive loss L_r).

Official (SLUG repo ``unlearn/FT.py``, ViT-B/32): AdamW lr 1e-7, wd 0.1, batch 32, 10 epochs, cosine, warm-up 0.
Our default ``lr`` (1e-4, 10 epochs) is tuned for the **embedded** tiny CLIP, on which 1e-7 changes nothing
measurable. FT is not expected to forget (paper Table 1: FA@1 73 -> 66); it is the "do nothing targeted" control.
"""

from __future__ import annotations

from .base import GradientMethod


class FT(GradientMethod):
    name = "ft"
    passes = ("retain",)
    default_lr = 1e-4
    default_epochs = 10
