"""GA+FT ("GAFT" in the SLUG repo, alternating GradDiff): each epoch a GA pass over D_f (minimise mean cos), then an
FT pass over D_r (minimise the CLIP loss), every batch its own step, one optimizer and one cosine schedule.

Official (ViT-B/32, ``unlearn/GAFT.py``): AdamW lr 1e-7, wd 0.1, batch 32, 10 epochs. Our default ``lr = 1e-4``
(10 epochs) is tuned for the **embedded** tiny CLIP: the smallest of {1e-5, 1e-4, 2e-4} whose validation FA@5
reaches 0 within 10 epochs on the default identity (FA@1 = 0 at epoch 2, FA@5 = 0 at epoch 3; 2e-4: epochs 1 / 2);
on the next two identities FA@5 = 0 at epochs 4 and 3. ``slug compare`` selects by FA@5 by default, so it reports
epoch 3 here; the paper's FA@1 rule (``--select-metric forget_top1``) stops at epoch 2 with test FA@5 0.24.
A larger rate needs fewer epochs and costs utility: on the default identity 5e-4 reaches FA@5 = 0 after one epoch
with test utility 0.957 (1e-4: 0.990 at epoch 3).
"""

from __future__ import annotations

from .base import GradientMethod


class GAFT(GradientMethod):
    name = "gaft"
    passes = ("forget", "retain")
    default_lr = 1e-4
    default_epochs = 10
