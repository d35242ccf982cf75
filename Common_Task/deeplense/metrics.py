"""Classification metrics from scikit-learn, on softmax probabilities, with bootstrap intervals.

Definitions (peers use "average AUC" inconsistently, so we say which):

- per-class AUC: one-vs-rest ROC AUC of class c's probability for "is class c";
- macro AUC: the unweighted mean of the per-class AUCs (``roc_auc_score(multi_class="ovr",
  average="macro")``);
- micro AUC: the AUC of all one-vs-rest decisions pooled (``average="micro"`` on the one-hot labels).

An AUC that is undefined because a class is absent is ``None`` (``null`` in JSON).
"""

from __future__ import annotations

import numpy as np

from .data import CLASSES


def _check(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    k = len(CLASSES)
    if p.ndim != 2 or p.shape[1] != k or y.shape != (p.shape[0],):
        raise ValueError(f"expected labels (N,) and probabilities (N, {k}), got {y.shape} and {p.shape}")
    return y, p


def _aucs(y: np.ndarray, p: np.ndarray) -> dict:
    """Per-class, macro and micro AUC with the fewest scikit-learn calls.

    The macro AUC is the mean of the per-class AUCs, which is what ``roc_auc_score(multi_class="ovr",
    average="macro")`` computes; the micro AUC is ``roc_auc_score`` on the flattened one-hot labels and scores,
    which is what ``average="micro"`` computes. Tests check both equalities against those calls.
    """
    from sklearn.metrics import roc_auc_score

    k = len(CLASSES)
    counts = np.bincount(y, minlength=k)
    onehot = np.eye(k, dtype=np.int64)[y]
    per_class = {}
    for c, name in enumerate(CLASSES):
        ok = 0 < counts[c] < len(y)
        per_class[name] = float(roc_auc_score(onehot[:, c], p[:, c])) if ok else None
    if (counts > 0).all():
        macro = float(np.mean([per_class[name] for name in CLASSES]))
        micro = float(roc_auc_score(onehot.ravel(), p.ravel()))
    else:
        macro = micro = None
    return {"macro": macro, "micro": micro, "per_class": per_class}


def _resample_aucs(y: np.ndarray, p: np.ndarray) -> tuple[list[float], float]:
    """Per-class and micro AUC of one bootstrap resample (every class present) as Mann-Whitney U / (n1 n0), with U
    from the positives' rank sum (``U = R1 - n1 (n1 + 1) / 2``, ties at their mean rank: what SciPy's
    ``mannwhitneyu`` computes, without its test statistics).

    That is the same number as ``roc_auc_score`` (ties count one half in both), at a small fraction of either
    call's input checking, which dominates 1,000 resamples of a few hundred images; ``tests/test_metrics.py``
    checks the two agree.
    """
    from scipy.stats import rankdata

    def auc(scores, positive):
        n1 = int(positive.sum())
        n0 = len(scores) - n1
        return float((rankdata(scores)[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))

    per_class = [auc(p[:, c], y == c) for c in range(len(CLASSES))]
    hit = np.eye(len(CLASSES), dtype=bool)[y]
    return per_class, auc(p.ravel(), hit.ravel())


MIN_PER_CLASS_FOR_AUC_CI = 5
"""Fewer test images of a class than this and the AUC intervals are reported as not available: resamples of one or
two images per class give intervals of zero width or nothing at all, not 95% intervals."""


def compute_metrics(labels, probabilities, *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Accuracy, AUCs (macro, micro, per class), confusion matrix, and bootstrap 95% intervals.

    Parameters
    ----------
    labels : int array ``(N,)`` indexing :data:`CLASSES`.
    probabilities : float array ``(N, 3)``, softmax rows in :data:`CLASSES` order.
    n_bootstrap : resamples (with replacement, size N) for the percentile intervals. The accuracy interval uses
        every resample; the AUC intervals skip resamples that miss a class (counted in ``ci.skipped``) and are
        None, with the reason in ``ci.auc_unavailable``, when a class has fewer than
        :data:`MIN_PER_CLASS_FOR_AUC_CI` test images (with at least 5 per class, under 1% of the resamples miss a
        class).
    seed : seed of the resampling.

    Returns
    -------
    dict with ``n``, ``accuracy``, ``auc`` (``macro``, ``micro``, ``per_class``), ``confusion_matrix``
    (rows true, columns predicted) and ``ci`` (``accuracy``, ``macro_auc``, ``micro_auc``,
    ``per_class_auc``: ``[low, high]``; plus ``n_bootstrap``, ``skipped``, ``level``).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix

    y, p = _check(labels, probabilities)
    pred = p.argmax(axis=1)
    k = len(CLASSES)
    out = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else None,
        "auc": _aucs(y, p),
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(k))).tolist(),
    }
    rng = np.random.default_rng(seed)
    samples = {"accuracy": [], "macro_auc": [], "micro_auc": [], **{f"auc_{c}": [] for c in CLASSES}}
    skipped = 0
    for _ in range(n_bootstrap if len(y) else 0):
        idx = rng.integers(0, len(y), len(y))
        yb = y[idx]
        samples["accuracy"].append(float((pred[idx] == yb).mean()))  # defined for every resample
        if np.bincount(yb, minlength=k).min() == 0:
            skipped += 1
            continue
        per_class, micro = _resample_aucs(yb, p[idx])
        samples["macro_auc"].append(float(np.mean(per_class)))
        samples["micro_auc"].append(micro)
        for c, v in zip(CLASSES, per_class, strict=True):
            samples[f"auc_{c}"].append(v)

    def interval(v):
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None

    counts = np.bincount(y, minlength=k)
    unavailable = None
    if len(y) and n_bootstrap:
        if counts.min() < MIN_PER_CLASS_FOR_AUC_CI:
            c = int(counts.argmin())
            unavailable = (f"{int(counts[c])} test image(s) of class {CLASSES[c]}, fewer than the "
                           f"{MIN_PER_CLASS_FOR_AUC_CI} an AUC interval needs")
    if unavailable:
        samples.update({key: [] for key in samples if key != "accuracy"})

    out["ci"] = {
        "level": 0.95, "method": "percentile bootstrap", "n_bootstrap": int(n_bootstrap), "skipped": int(skipped),
        "seed": int(seed),
        "accuracy": interval(samples["accuracy"]),
        "macro_auc": interval(samples["macro_auc"]),
        "micro_auc": interval(samples["micro_auc"]),
        "per_class_auc": {c: interval(samples[f"auc_{c}"]) for c in CLASSES},
        "auc_unavailable": unavailable,
    }
    return out


def quick_metrics(labels, probabilities) -> dict:
    """Accuracy, macro and per-class AUC without intervals (for per-epoch validation)."""
    y, p = _check(labels, probabilities)
    a = _aucs(y, p)
    return {"accuracy": float((p.argmax(1) == y).mean()), "macro_auc": a["macro"], "micro_auc": a["micro"],
            "per_class_auc": a["per_class"]}


def roc_curves(labels, probabilities, grid_points: int | None = None) -> dict:
    """ROC curves: ``per_class`` (one-vs-rest), ``micro`` (pooled) and ``macro`` (per-class TPRs averaged
    on the common FPR grid formed by all per-class FPR values), each ``{"fpr", "tpr", "auc"}`` or None."""
    from sklearn.metrics import roc_curve
    from sklearn.preprocessing import label_binarize

    y, p = _check(labels, probabilities)
    k = len(CLASSES)
    aucs = _aucs(y, p)
    onehot = label_binarize(y, classes=list(range(k)))
    per_class = {}
    for c, name in enumerate(CLASSES):
        if aucs["per_class"][name] is None:
            per_class[name] = None
            continue
        fpr, tpr, _ = roc_curve(onehot[:, c], p[:, c])
        per_class[name] = {"fpr": fpr, "tpr": tpr, "auc": aucs["per_class"][name]}
    out = {"per_class": per_class, "micro": None, "macro": None}
    if aucs["micro"] is not None:
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
        out["micro"] = {"fpr": fpr, "tpr": tpr, "auc": aucs["micro"]}
        grid = np.unique(np.concatenate([v["fpr"] for v in per_class.values()]))
        mean_tpr = np.mean([np.interp(grid, v["fpr"], v["tpr"]) for v in per_class.values()], axis=0)
        out["macro"] = {"fpr": grid, "tpr": mean_tpr, "auc": aucs["macro"]}
    return out


def _macro_auc_ranked(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Macro AUC of several runs at once: ``p`` ``(R, N, K)`` probabilities on the same labels ``y`` ``(N,)``.

    Per class, AUC = (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0), ties ranked on average, which is
    the Mann-Whitney form of ``roc_auc_score``. Returns ``(R,)``.
    """
    from scipy.stats import rankdata

    ranks = rankdata(p, axis=1)  # (R, N, K)
    aucs = []
    for c in range(p.shape[2]):
        pos = y == c
        n1, n0 = int(pos.sum()), int((~pos).sum())
        aucs.append((ranks[:, pos, c].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0))
    return np.mean(aucs, axis=0)


def paired_difference(labels, probs_a: list, probs_b: list, *, n_bootstrap: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Macro AUC of arm A minus arm B, paired by training seed and by test image.

    ``probs_a[s]`` and ``probs_b[s]``: ``(N, 3)`` probabilities of training seed ``s`` of each arm on the same
    ``N`` test images (``labels``). Returns ``per_seed`` differences, their ``mean``, ``t_ci`` (a t interval over
    the seeds: how much the difference moves with the training seed) and ``bootstrap_ci`` (a paired percentile
    bootstrap over test images, the same resample for every run: how much it moves with the test sample).
    """
    from scipy.stats import t as student_t

    y = np.asarray(labels).astype(np.int64)
    a = np.stack([np.asarray(p, dtype=np.float64) for p in probs_a])  # (S, N, K)
    b = np.stack([np.asarray(p, dtype=np.float64) for p in probs_b])
    if a.shape != b.shape or a.shape[1] != len(y):
        raise ValueError(f"expected the same (seeds, N, K) for both arms and N labels, got {a.shape}, {b.shape}")
    both = np.concatenate([a, b])
    per_seed = _macro_auc_ranked(y, a) - _macro_auc_ranked(y, b)
    s = len(per_seed)
    half = (float(student_t.ppf(0.5 + level / 2, s - 1) * per_seed.std(ddof=1) / np.sqrt(s)) if s > 1 else float("nan"))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(y), len(y))
        if np.bincount(y[idx], minlength=a.shape[2]).min() == 0:
            continue
        auc = _macro_auc_ranked(y[idx], both[:, idx])
        diffs.append(auc[:s].mean() - auc[s:].mean())
    tail = (1 - level) / 2 * 100
    mean = float(per_seed.mean())
    return {"per_seed": per_seed.tolist(), "mean": mean, "t_ci": [mean - half, mean + half],
            "bootstrap_ci": ([float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))]
                             if diffs else None), "level": level, "n_bootstrap": int(n_bootstrap), "seed": int(seed)}
