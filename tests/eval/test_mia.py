"""The SLUG-repo MIA (spec §8.3): separable vs identical feature distributions, and the exact sampling order."""

import random

import numpy as np
import pytest

pytest.importorskip("sklearn")

from slugkit.eval.mia import mia_score  # noqa: E402


def _gauss(mu, n, seed):
    return np.random.default_rng(seed).normal(mu, 1.0, n).tolist()


def test_well_separated_gaussians_score_about_100():
    r = mia_score(_gauss(-10, 60, 0), _gauss(10, 60, 1))
    assert r["mean"] > 99 and r["std"] < 1 and r["n"] == 60 and len(r["per_seed"]) == 10


def test_identical_distributions_score_about_50():
    r = mia_score(_gauss(0, 200, 0), _gauss(0, 200, 1))
    assert 40 < r["mean"] < 60


def test_sampling_order_seeds_and_features(monkeypatch):
    """b is sampled first, then a, after random.seed(s) and np.random.seed(s); X clipped, y = [0]*m + [1]*m."""
    import sklearn.model_selection as ms

    a = [float(i) for i in range(10)] + [500.0]  # 11 members, one beyond the clip
    b = [float(-i) for i in range(1, 8)]  # 7 non-members: m = 7
    seen = []

    def fake_cvs(est, x, y, cv, scoring):
        seen.append((x.copy(), y.copy(), cv.n_splits, cv.random_state, scoring, type(est).__name__))
        return np.array([0.5])

    monkeypatch.setattr(ms, "cross_val_score", fake_cvs)
    r = mia_score(a, b)
    assert len(seen) == 10 and r["mean"] == pytest.approx(50.0) and r["std"] == pytest.approx(0.0)
    for s, (x, y, n_splits, rs, scoring, est) in enumerate(seen):
        random.seed(s)
        np.random.seed(s)
        sb = random.sample(b, 7)
        sa = random.sample(a, 7)
        want = np.clip(np.array(sa + sb), -100, 100).reshape(-1, 1)
        assert x.shape == (14, 1) and np.array_equal(x, want)
        assert y.tolist() == [0] * 7 + [1] * 7
        assert (n_splits, rs, scoring, est) == (10, s, "accuracy", "LogisticRegression")
    # the order matters: sampling a first would give different draws for some seed
    random.seed(0)
    sa_first = random.sample(a, 7)
    assert not np.array_equal(seen[0][0][:7, 0], np.clip(sa_first, -100, 100))


def test_too_few_samples():
    with pytest.raises(ValueError):
        mia_score([1.0], [2.0, 3.0])
