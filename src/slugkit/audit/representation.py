"""Probe 5, representation: is the concept still visually separable in the image features?

A multinomial logistic regression (scikit-learn, L2, C = 1, lbfgs) is trained on the image features (the model's
normalised image embeddings, ``[N, D]``) of the **training-split** images of every identity, the concept's
included, and scored on the **test** images: the accuracy on the concept's test images, before and after the patch
(each model gets its own probe, trained on its own features), with the mean over the other identities beside it.

What a high value means, in plain words: **the identity can still be recognised from the image features by anyone
with a few labelled images of the person** — the patch removed the association between the name and the images
(what zero-shot naming, the paper's FA, measures), not the visual identity. SLUG, and every method compared with it
here, edits the name–image association; a high value after the patch is the expected result for all of them, not
a bug. The probe is reported for that reason and is **not gating** (it does not change the audit's exit status)
unless ``--gate-representation`` is given. Graded number: the concept's test accuracy after the patch.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .base import AuditThresholds, grade
from .data import AuditData
from .score import image_features

EXPLANATION = ("a linear probe on the image features still recognises the identity: it remains visually separable "
               "(anyone with a few labelled images of the person could re-identify them from the features); the "
               "patch removed the name–image association, which is what zero-shot naming measures")


def _probe_accuracy(adapter, data: AuditData, classes: list[str], seed: int) -> dict:
    train = {n: image_features(adapter, data.train[n]).numpy() for n in classes}
    test = {n: image_features(adapter, data.test[n]).numpy() for n in classes if n in data.test}
    return probe_accuracy(train, test, data.concept, seed)


def probe_accuracy(train: dict, test: dict, concept: str, seed: int = 0) -> dict:
    """The linear probe (module docstring) on given features: ``train`` / ``test`` ``{class: [N, D] array}``;
    returns the accuracy on ``concept``'s test features and the mean and worst over the other classes'."""
    from sklearn.linear_model import LogisticRegression

    classes = list(train)
    xs = [np.asarray(train[n], dtype=np.float64) for n in classes]
    ys = [k for k, x in enumerate(xs) for _ in range(x.shape[0])]
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    clf.fit(np.concatenate(xs), np.asarray(ys))
    acc = {n: float((clf.predict(np.asarray(test[n], dtype=np.float64)) == k).mean())
           for k, n in enumerate(classes) if n in test}
    others = [v for n, v in acc.items() if n != concept]
    return {"concept": acc[concept], "others_mean": float(np.mean(others)) if others else None,
            "others_worst": min(others) if others else None}


def probe_representation(before, after, data: AuditData, thresholds: AuditThresholds = AuditThresholds(),
                         seed: int = 0, gating: bool = False) -> dict:
    """Run probe 5; returns the probe record (``before``/``after``: probe accuracy on the concept's test images,
    the mean and worst over the other identities). Skipped (with the reason) without training-split images of the
    concept and at least one other identity. Needs scikit-learn."""
    t0 = time.perf_counter()
    rec = {"probe": "representation", "gating": gating}
    classes = [n for n in data.names if n in data.train]
    if data.concept not in data.train or len(classes) < 2:
        rec.update(status="skipped", summary="needs training-split images of the concept and of other identities "
                                             "(--train-identities DIR)")
        return rec
    try:
        import sklearn  # noqa: F401
    except ImportError:
        rec.update(status="skipped", summary="needs scikit-learn: pip install 'slugkit[compare]'")
        return rec
    torch.manual_seed(seed)
    res = {tag: _probe_accuracy(m, data, classes, seed) for tag, m in (("before", before), ("after", after))}
    value = res["after"]["concept"]
    status = grade(value, thresholds.representation)
    rec.update(status=status, **res, seconds=time.perf_counter() - t0,
               tried=f"logistic regression on image features, {len(classes)} classes, "
                     f"{sum(int(data.train[n].shape[0]) for n in classes)} training-split images",
               budget={"classes": len(classes), "train_images": sum(int(data.train[n].shape[0]) for n in classes)},
               graded={"name": "probe accuracy on the concept's test images after", "value": value,
                       "pass_at": thresholds.representation[0], "fail_at": thresholds.representation[1]},
               summary=f"probe accuracy {res['before']['concept']:.2f} -> {value:.2f} (other identities "
                       f"{res['after']['others_mean']:.2f})" + ("; the identity is still visually separable, the "
                                                                "name association is what was removed"
                                                                if status != "pass" else ""))
    return rec
