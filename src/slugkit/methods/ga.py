"""GA: gradient ascent on the forget pairs (one pass over D_f per epoch).

Each step minimises L_forget = mean cos(f_I(x), f_T(t)) over the batch, i.e. ascent on L_cos = 1 − cos, the same
direction SLUG's single edit follows (SLUG repo ``unlearn/GA.py``; the ``_o`` InfoNCE variant is not implemented).

Official (ViT-B/32): AdamW lr 1e-7, wd 0.1, batch 32, 10 epochs, cosine. Our default ``lr = 1e-4`` (10 epochs) is
tuned for the **embedded** tiny CLIP: the smallest of {1e-5, 1e-4, 3e-4, 1e-3} whose validation FA@5 reaches 0
within 10 epochs on the default identity (epoch 4; 1e-5 barely moves the loss, 3e-4 gets there at epoch 2 with
related accuracy down to 0.88, 1e-3 at epoch 1 with 0.74). On the next two identities 1e-4 gets there at epochs 5
and 4. Validation has 20 images of the concept, so validation FA@5 = 0 can leave one or two of the 50 test images
in the top 5 (default identity: test FA@5 0.04 at epoch 4, 0 from epoch 5, by which utility is down to 0.96).
"""

from __future__ import annotations

from .base import GradientMethod


class GA(GradientMethod):
    name = "ga"
    passes = ("forget",)
    default_lr = 1e-4
    default_epochs = 10
