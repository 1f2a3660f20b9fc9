"""Membership-inference attack (MIA) of the SLUG repo (spec ``slug-algorithm.md`` §8.3).

``src/clip/utils.py::membership_inference_attack`` / ``src/mia_util.py::evaluate_attack_model``: a logistic
regression tries to tell forget pairs (members: the model was trained on them, then unlearned them) from held-out
pairs (non-members) by one feature, the image–text cosine of each pair. For seeds s = 0..9:
``random.seed(s); np.random.seed(s)``; m = min(|a|, |b|); draw ``sb = random.sample(b, m)`` **first**, then
``sa = random.sample(a, m)``; X = [sa; sb] clipped to [−100, 100], shape (2m, 1); y = [0]*m + [1]*m;
``cross_val_score(LogisticRegression(), X, y, cv=StratifiedShuffleSplit(n_splits=10, random_state=s))``
(accuracy; default test_size 0.1); the score for s is the mean over the splits. Reported: 100·mean ± 100·std over
the 10 seeds. 50 means the forget pairs look like unseen data; the paper's pre-unlearning ViT-B/32 value is 72.8.

Needs scikit-learn (``pip install 'slugkit[compare]'``).
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch


def mia_score(a: Sequence[float], b: Sequence[float], seeds: int = 10, n_splits: int = 10) -> dict:
    """MIA accuracy (in %) separating feature list ``a`` (members) from ``b`` (non-members)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score
    except ImportError as e:  # pragma: no cover
        raise ImportError("the MIA needs scikit-learn: pip install 'slugkit[compare]'") from e
    a, b = [float(x) for x in a], [float(x) for x in b]
    m = min(len(a), len(b))
    if m < 2:
        raise ValueError(f"MIA needs at least 2 members and 2 non-members (got {len(a)} and {len(b)})")
    scores = []
    for s in range(seeds):
        random.seed(s)
        np.random.seed(s)
        sb = random.sample(b, m)
        sa = random.sample(a, m)
        x = np.clip(np.asarray(sa + sb, dtype=np.float64), -100, 100).reshape(-1, 1)
        y = np.asarray([0] * m + [1] * m)
        cv = StratifiedShuffleSplit(n_splits=n_splits, random_state=s)
        scores.append(float(np.mean(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy"))))
    arr = np.asarray(scores)
    return {"mean": float(100 * arr.mean()), "std": float(100 * arr.std()), "per_seed": [100 * v for v in scores],
            "n": m}


@torch.no_grad()
def pair_cosines(adapter, images: torch.Tensor, tokens: torch.Tensor, batch_size: int = 256) -> list[float]:
    """cos(f_I(x_i), f_T(t_i)) for each pair, on the model as it is now."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        dev = adapter.device  # the pairs stay in CPU memory; each batch goes to the model's device for its forward
        out.append(adapter.forget_loss_per_sample(images[i:i + batch_size].to(dev),
                                                  tokens[i:i + batch_size].to(dev)).cpu())
    return torch.cat(out).tolist() if out else []


def mia(adapter, member: tuple[torch.Tensor, torch.Tensor], nonmember: tuple[torch.Tensor, torch.Tensor],
        batch_size: int = 256) -> dict:
    """The SLUG-repo MIA on cosine features of (images, tokens) member vs non-member pairs."""
    return mia_score(pair_cosines(adapter, *member, batch_size), pair_cosines(adapter, *nonmember, batch_size))
