"""Zero-shot evaluation: FA@1/FA@5 (forget), related-identity top-1 (TA_CA analogue), utility top-1 (TA_IN analogue).

Classifiers follow ``open_clip.build_zero_shot_classifier`` (spec §1.4): for each class, embed every template,
L2-normalise each embedding, average over templates, renormalise; logits = 100 · f_img · W (the model's own logit
scale is not used; it does not change rankings). Metrics are fractions:

* ``forget_top1`` / ``forget_top5``: share of the forget concept's images whose top-1 / top-5 over the **full name
  list** contains the concept (FA@1, FA@5); with several concepts (joint unlearning) each image is scored against
  its own concept, and ``forget_by_concept`` gives the per-concept figures;
* ``related_top1``: unweighted mean over the *other* identities of each identity's top-1 accuracy over the full
  name list (TA_CA@1; the target is excluded, unlike the official list which includes it — spec §9.5(e));
  ``related_by_concept`` gives each identity's own top-1 (``{name: fraction}``; the worst-case collateral of
  :mod:`slugkit.eval.collateral`);
* ``utility_top1`` / ``utility_top5``: top-1 / top-5 over the utility images with the utility class names and
  templates (TA_IN@1, e.g. ImageNet).

:class:`SuiteEvaluator` computes the features of an :class:`EvalSuite` once for the base model and can re-evaluate
after an edit of one tensor by re-running only the stages of the edited tower that the edit can change, from cached
activations (spec §9.3); :meth:`SuiteEvaluator.evaluate_naive` recomputes everything and is what the tests compare
against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PARTS = ("forget", "related", "utility")
_CPU = torch.device("cpu")  # where features and metrics live, whatever the model's device


@dataclass
class ImageSet:
    images: torch.Tensor  # preprocessed, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self):
        return int(self.labels.numel())


@dataclass
class EvalSuite:
    """Everything needed to score one model on one split (validation or test)."""

    names: list[str]  # identity class names for the zero-shot identity classifier (the full list)
    identity_templates: list[str]
    target: int  # index of the forget concept in ``names`` (the first one when unlearning several jointly)
    forget: ImageSet  # images of the forget concept(s); labels = each image's own concept

    related: ImageSet | None = None  # images of other identities, labels index ``names``
    utility_classnames: list[str] = field(default_factory=list)
    utility_templates: list[str] = field(default_factory=list)
    utility: ImageSet | None = None
    targets: list[int] | None = None  # every forget concept (joint unlearning); default [target]
    empty_folders: list[str] = field(default_factory=list)  # class folders holding no image (not evaluated)

    def target_list(self) -> list[int]:
        return list(self.targets) if self.targets else [self.target]

    def prompts(self) -> tuple[list[str], list[str]]:
        ident = [t.format(n) for n in self.names for t in self.identity_templates]
        util = [t.format(c) for c in self.utility_classnames for t in self.utility_templates]
        return ident, util

    def sizes(self) -> dict:
        return {"names": len(self.names), "concepts": [self.names[c] for c in self.target_list()],
                "forget": len(self.forget),
                "related": len(self.related) if self.related is not None else 0,
                "related_identities": int(self.related.labels.unique().numel()) if self.related is not None else 0,
                "utility": len(self.utility) if self.utility is not None else 0,
                "utility_classes": len(self.utility_classnames),
                **({"empty_folders": list(self.empty_folders)} if self.empty_folders else {})}


def classifier_from_features(feats: torch.Tensor, n_classes: int, n_templates: int) -> torch.Tensor:
    """(C·T) x D normalised prompt features (class-major) -> D x C classifier."""
    w = feats.reshape(n_classes, n_templates, -1).mean(dim=1)
    return F.normalize(w, dim=-1).T


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)


def metrics_from_features(suite: EvalSuite, img: dict[str, torch.Tensor], w_id: torch.Tensor | None,
                          w_util: torch.Tensor | None, parts=PARTS) -> dict:
    out = {}
    if "forget" in parts:
        logits = 100.0 * img["forget"] @ w_id
        labels = suite.forget.labels
        h1, h5 = topk_hits(logits, labels, 1).float(), topk_hits(logits, labels, 5).float()
        out["forget_top1"] = h1.mean().item()
        out["forget_top5"] = h5.mean().item()
        if len(suite.target_list()) > 1:  # joint unlearning: the criterion above covers all; report each too
            out["forget_by_concept"] = {
                suite.names[c]: {"forget_top1": h1[labels == c].mean().item(),
                                 "forget_top5": h5[labels == c].mean().item()} for c in suite.target_list()}
    if "related" in parts and suite.related is not None and len(suite.related):
        logits = 100.0 * img["related"] @ w_id
        hits = topk_hits(logits, suite.related.labels, 1).float()
        per_id = {suite.names[c]: hits[suite.related.labels == c].mean().item()
                  for c in suite.related.labels.unique().tolist()}
        out["related_top1"] = float(sum(per_id.values()) / len(per_id))
        out["related_by_concept"] = per_id
    if "utility" in parts and suite.utility is not None and len(suite.utility):
        logits = 100.0 * img["utility"] @ w_util
        out["utility_top1"] = topk_hits(logits, suite.utility.labels, 1).float().mean().item()
        out["utility_top5"] = topk_hits(logits, suite.utility.labels, 5).float().mean().item()
    return out


def _batched(fn, x: torch.Tensor, bs: int, ctx: torch.Tensor | None = None, device=None,
             out_device=None) -> torch.Tensor:
    """``fn`` over batches of ``x`` (and ``ctx``), concatenated. Each input batch is moved to ``device`` right before
    ``fn`` (``x`` may stay in CPU memory) and each output to ``out_device`` (None: left where ``fn`` put it)."""
    outs = []
    for i in range(0, x.shape[0], bs):
        xb = x[i:i + bs]
        cb = None if ctx is None else ctx[i:i + bs]
        if device is not None:
            xb = xb.to(device)
            cb = None if cb is None else cb.to(device)
        out = fn(xb, cb)
        outs.append(out if out_device is None else out.to(out_device))
    return torch.cat(outs) if outs else x[:0]


class SuiteEvaluator:
    """Evaluate a suite on the model held by ``adapter``, with caching for single-tensor edits.

    ``inputs`` of a tower: all images of the suite (forget, related, utility concatenated) or all prompt tokens
    (identity prompts, then utility prompts). The base features of both towers are computed at construction.

    Devices: the inputs stay where the suite holds them (the CPU); each batch is moved to ``adapter.device`` right
    before its forward, and features come back to the CPU, where the metrics are computed (so a CUDA model gives
    the same metric code path as a CPU one). The activations cached by :meth:`prepare` stay on the model's device.
    """

    def __init__(self, adapter, suite: EvalSuite, batch_size: int = 256):
        self.adapter, self.suite, self.bs = adapter, suite, batch_size
        sets = [("forget", suite.forget), ("related", suite.related), ("utility", suite.utility)]
        self.img_slices, chunks, start = {}, [], 0
        for key, s in sets:
            n = len(s) if s is not None else 0
            self.img_slices[key] = slice(start, start + n)
            if n:
                chunks.append(s.images)
            start += n
        self.images = torch.cat(chunks)
        ident, util = suite.prompts()
        self.n_ident_prompts = len(ident)
        self.tokens = adapter.tokenize(ident + util)
        with torch.no_grad():
            self.base_img = self._encode_images_full(self.images)
            self.base_txt = self._encode_text_full(self.tokens)

    # -- full encoders --------------------------------------------------------------------------------------
    def _encode_images_full(self, images):
        return _batched(lambda x, c: self.adapter.encode_image(x), images, self.bs, device=self.adapter.device,
                        out_device=_CPU)

    def _encode_text_full(self, tokens):
        return _batched(lambda x, c: self.adapter.encode_text(x), tokens, self.bs, device=self.adapter.device,
                        out_device=_CPU)

    def _classifiers(self, txt: torch.Tensor):
        s = self.suite
        n_id = self.n_ident_prompts
        w_id = classifier_from_features(txt[:n_id], len(s.names), len(s.identity_templates))
        w_util = None
        if s.utility_classnames:
            w_util = classifier_from_features(txt[n_id:], len(s.utility_classnames), len(s.utility_templates))
        return w_id, w_util

    def _metrics(self, img: torch.Tensor, txt: torch.Tensor, parts) -> dict:
        w_id, w_util = self._classifiers(txt)
        feats = {k: img[sl] for k, sl in self.img_slices.items()}
        return metrics_from_features(self.suite, feats, w_id, w_util, parts)

    def class_embeddings(self) -> torch.Tensor:
        """C x D: the unedited model's zero-shot class embedding of every name (templates averaged, normalised) —
        the text-embedding similarity that ranks the target's nearest neighbours."""
        return self._classifiers(self.base_txt)[0].T

    def base_metrics(self, parts=PARTS) -> dict:
        return self._metrics(self.base_img, self.base_txt, parts)

    @torch.no_grad()
    def evaluate_naive(self, parts=PARTS) -> dict:
        """Recompute both towers from scratch on the model as it is now (the reference for the cached path)."""
        return self._metrics(self._encode_images_full(self.images), self._encode_text_full(self.tokens), parts)

    # -- cached path ------------------------------------------------------------------------------------------
    def _needed_rows(self, tower: str, parts) -> torch.Tensor | slice:
        """Rows of the tower's inputs whose features the requested parts need (others keep base features)."""
        if tower == "vision":
            idx = [torch.arange(self.img_slices[p].start, self.img_slices[p].stop) for p in parts
                   if p in self.img_slices]
            return torch.cat(idx) if idx else torch.arange(0)
        n = self.n_ident_prompts
        rows = []
        if "forget" in parts or "related" in parts:
            rows.append(torch.arange(0, n))
        if "utility" in parts:
            rows.append(torch.arange(n, self.tokens.shape[0]))
        return torch.cat(rows) if rows else torch.arange(0)

    @torch.no_grad()
    def prepare(self, name: str, parts=PARTS) -> dict:
        """Cache the activations entering the stage that reads ``name`` (base model), for the rows ``parts`` need."""
        tower = self.adapter.tower_of(name)
        stages = self.adapter.stages(tower)
        k = self.adapter.stage_index(tower, name)
        rows = self._needed_rows(tower, parts)
        inputs = self.images if tower == "vision" else self.tokens
        x = inputs[rows]
        ctx = self.tokens[rows] if tower == "language" else None

        def prefix(xb, cb):
            for st in stages[:k]:
                xb = st.fn(xb, cb)
            return xb

        # the cached activations stay on the model's device (no round trip per search step); ``ctx`` (token ids,
        # small) stays on the CPU and is moved batch by batch with them
        return {"name": name, "tower": tower, "k": k, "rows": rows, "parts": tuple(parts),
                "x": _batched(prefix, x, self.bs, ctx, device=self.adapter.device), "ctx": ctx}

    @torch.no_grad()
    def evaluate_cached(self, cache: dict) -> dict:
        """Metrics of the model as it is now, assuming only tensors of stage ``cache['k']`` of one tower changed."""
        stages = self.adapter.stages(cache["tower"])[cache["k"]:]

        def suffix(xb, cb):
            for st in stages:
                xb = st.fn(xb, cb)
            return F.normalize(xb, dim=-1)

        new = _batched(suffix, cache["x"], self.bs, cache["ctx"], device=self.adapter.device, out_device=_CPU)
        if cache["tower"] == "vision":
            img, txt = self.base_img.clone(), self.base_txt
            img[cache["rows"]] = new
        else:
            img, txt = self.base_img, self.base_txt.clone()
            txt[cache["rows"]] = new
        return self._metrics(img, txt, cache["parts"])


@torch.no_grad()
def evaluate_suite(adapter, suite: EvalSuite, batch_size: int = 256) -> dict:
    """One-off full evaluation of ``suite`` on the model as it is."""
    return SuiteEvaluator(adapter, suite, batch_size).base_metrics()
