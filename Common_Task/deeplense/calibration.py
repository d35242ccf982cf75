"""Can the probabilities be trusted? Expected calibration error, reliability curves and temperature scaling.

Definitions (as written in ``docs`` and the notebook):

- **ECE** (top-label expected calibration error, Guo et al. 2017): each image goes into one of ``n_bins``
  equal-width bins of [0, 1] by its highest probability (its confidence); ECE = sum over bins of
  (images in the bin / all images) x |accuracy in the bin - mean confidence in the bin|. 0 is perfect.
- **class-wise ECE**: the same for one class, with that class's probability against "is this class" (one-vs-rest);
  the mean over classes is reported beside the per-class values.
- **reliability curve** of a class: scikit-learn's ``calibration_curve`` (equal-width bins), the observed frequency
  of the class against the mean predicted probability in each non-empty bin.
- **temperature scaling**: ``p_T = softmax(log p / T)`` with one ``T > 0`` fitted by minimising the negative
  log-likelihood on the **selection** images (the ones that chose the checkpoint; never the test). For plain
  predictions ``log p`` is the logits minus a per-image constant, so this is temperature scaling of the logits
  exactly; with test-time averaging it scales the log of the averaged probabilities. Fit and apply both work on
  the log-probabilities as the network computes them (a float32 probability of 0 would otherwise be read as
  ``1e-12`` by one and as ``0`` by the other), and a temperature that does not lower the selection NLL is not
  stored (``T = 1``). ``T > 1`` softens
  over-confident probabilities. The arg max (the predicted class, so the accuracy) never changes; the one-vs-rest
  AUCs can move a little with three classes, because scaling keeps the order of the classes within an image, not the
  order of one class's probability across images.
"""

from __future__ import annotations

import numpy as np

from .data import CLASSES

N_BINS = 15
"""Equal-width bins of the ECE and of the reliability curves."""
T_BOUNDS = (0.05, 20.0)
"""The temperatures searched (a fit at either end says the probabilities are degenerate, e.g. all one class)."""


def _check(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(CLASSES) or y.shape != (len(p),) or len(p) == 0:
        raise ValueError(f"expected labels (N,) and probabilities (N, {len(CLASSES)}) with N > 0, got {y.shape} and "
                         f"{p.shape}")
    return y, p


def _binned_gap(hit: np.ndarray, score: np.ndarray, n_bins: int) -> float:
    """sum_b (n_b / N) |mean(hit) - mean(score)| over equal-width bins of ``score`` (the last bin includes 1)."""
    b = np.minimum((score * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, weights=hit, minlength=n_bins) - np.bincount(b, weights=score, minlength=n_bins))
    return float(gap.sum() / len(score)) if n.sum() else 0.0


def expected_calibration_error(labels, probabilities, n_bins: int = N_BINS) -> float:
    """Top-label ECE (module docstring)."""
    y, p = _check(labels, probabilities)
    return _binned_gap((p.argmax(1) == y).astype(np.float64), p.max(1), n_bins)


def classwise_ece(labels, probabilities, n_bins: int = N_BINS) -> dict:
    """One-vs-rest ECE of each class (``{class: ece}``)."""
    y, p = _check(labels, probabilities)
    return {c: _binned_gap((y == k).astype(np.float64), p[:, k], n_bins) for k, c in enumerate(CLASSES)}


def reliability(labels, probabilities, n_bins: int = 10) -> dict:
    """``{class: {"predicted": [...], "observed": [...]}}``: scikit-learn's ``calibration_curve`` per class."""
    from sklearn.calibration import calibration_curve

    y, p = _check(labels, probabilities)
    out = {}
    for k, c in enumerate(CLASSES):
        observed, predicted = calibration_curve(y == k, p[:, k], n_bins=n_bins, strategy="uniform")
        out[c] = {"predicted": predicted.tolist(), "observed": observed.tolist()}
    return out


def top_label_reliability(labels, probabilities, n_bins: int = N_BINS) -> dict:
    """The bins the ECE is computed from: for each non-empty equal-width bin of the confidence (the highest
    probability), ``confidence`` (its mean), ``accuracy`` and ``count``. ECE = sum(count x |accuracy - confidence|)
    / N over these bins."""
    y, p = _check(labels, probabilities)
    score, hit = p.max(1), (p.argmax(1) == y).astype(np.float64)
    b = np.minimum((score * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(b, minlength=n_bins)
    keep = n > 0
    return {"confidence": (np.bincount(b, weights=score, minlength=n_bins)[keep] / n[keep]).tolist(),
            "accuracy": (np.bincount(b, weights=hit, minlength=n_bins)[keep] / n[keep]).tolist(),
            "count": n[keep].tolist()}


LOG_FLOOR = -104.0
"""The log-probability a float32 probability of exactly 0 stands for (below the smallest float32, about e^-103):
where a caller passes ``log p`` of underflowed probabilities, fit and apply both read it so, never ``-inf``."""


def _log_probabilities(log_probabilities) -> np.ndarray:
    z = np.asarray(log_probabilities, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(CLASSES):
        raise ValueError(f"expected log-probabilities (N, {len(CLASSES)}), got {z.shape}")
    return np.maximum(z, LOG_FLOOR)


def scaled_log_probabilities(log_probabilities, temperature: float) -> np.ndarray:
    """``log softmax(log p / T)`` in float64: the one computation temperature scaling is fitted on
    (:func:`fit_temperature`) and applied with (:func:`apply_temperature`)."""
    z = _log_probabilities(log_probabilities) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def apply_temperature(log_probabilities, temperature: float) -> np.ndarray:
    """The probabilities ``softmax(log p / T)`` as float32, from the log-probabilities ``log p`` (the engine's
    ``predict_proba(..., with_log=True)``: finite where a float32 probability is 0)."""
    return np.exp(scaled_log_probabilities(log_probabilities, temperature)).astype(np.float32)


def nll(labels, probabilities) -> float:
    """Mean negative log-likelihood of the true classes (probabilities clipped at 1e-12)."""
    y, p = _check(labels, probabilities)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def temperature_nll(labels, log_probabilities, temperature: float) -> float:
    """The mean NLL of the true classes after scaling by ``temperature``, in log space (no clipping): what
    :func:`fit_temperature` minimises; ``temperature=1`` gives the NLL as predicted."""
    y = np.asarray(labels).astype(np.int64)
    z = scaled_log_probabilities(log_probabilities, temperature)
    return float(-z[np.arange(len(y)), y].mean())


def fit_temperature(labels, log_probabilities) -> dict:
    """The ``T`` in :data:`T_BOUNDS` minimising :func:`temperature_nll` on these images (SciPy's bounded scalar
    minimiser over log T; the NLL is convex in 1/T, so the minimum it finds is the one). Fit it on the selection
    images only. Returns ``{"temperature", "nll_before", "nll_after", "at_bound", "kept"}``: a fit that would not
    lower the NLL keeps ``T = 1`` (``kept`` False) so a stored temperature never makes these images' probabilities
    worse; ``at_bound`` names the bound a fit stopped at (degenerate probabilities, e.g. all one class), else None."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels).astype(np.int64)
    z = _log_probabilities(log_probabilities)
    if y.shape != (len(z),) or len(z) == 0:
        raise ValueError(f"expected labels (N,) with N > 0 for log-probabilities {z.shape}, got {y.shape}")
    r = minimize_scalar(lambda log_t: temperature_nll(y, z, np.exp(log_t)), bounds=tuple(np.log(T_BOUNDS)),
                        method="bounded", options={"xatol": 1e-6})
    t = float(np.exp(r.x))
    before, after = temperature_nll(y, z, 1.0), temperature_nll(y, z, t)
    near = [b for b in T_BOUNDS if abs(np.log(t) - np.log(b)) < 1e-3]
    kept = after < before
    return {"temperature": t if kept else 1.0, "nll_before": before, "nll_after": after if kept else before,
            "at_bound": near[0] if near else None, "kept": bool(kept), "fitted": t}


def calibration_summary(labels, probabilities, *, n_bootstrap: int = 1000, seed: int = 0,
                        n_bins: int = N_BINS) -> dict:
    """ECE with a 95% bootstrap interval over images, class-wise ECE, NLL and the reliability curves."""
    y, p = _check(labels, probabilities)
    rng = np.random.default_rng(seed)
    boot = [expected_calibration_error(y[i], p[i], n_bins) for i in
            (rng.integers(0, len(y), len(y)) for _ in range(n_bootstrap))]
    return {"ece": expected_calibration_error(y, p, n_bins),
            "ece_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else None,
            "classwise_ece": classwise_ece(y, p, n_bins), "nll": nll(y, p), "n_bins": n_bins,
            "reliability": reliability(y, p), "top_label": top_label_reliability(y, p, n_bins)}
