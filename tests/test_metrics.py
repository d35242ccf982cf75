from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score
from sklearn.preprocessing import label_binarize

from deeplense.metrics import compute_metrics, quick_metrics, roc_curves


def _random(n=300, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += signal
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    y, p = _random(seed=seed)
    m = compute_metrics(y, p, n_bootstrap=50, seed=seed)
    p64 = p.astype(np.float64)
    assert m["n"] == len(y)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-9)
    assert m["auc"]["macro"] == pytest.approx(roc_auc_score(y, p64, multi_class="ovr", average="macro"), abs=1e-9)
    onehot = label_binarize(y, classes=[0, 1, 2])
    assert m["auc"]["micro"] == pytest.approx(roc_auc_score(onehot, p64, average="micro"), abs=1e-9)
    assert m["auc"]["micro"] == pytest.approx(roc_auc_score(onehot.ravel(), p64.ravel()), abs=1e-9)
    for c, name in enumerate(("no", "sphere", "vort")):
        assert m["auc"]["per_class"][name] == pytest.approx(roc_auc_score(y == c, p64[:, c]), abs=1e-9)
    assert m["confusion_matrix"] == confusion_matrix(y, p.argmax(1)).tolist()
    q = quick_metrics(y, p)
    assert q["macro_auc"] == m["auc"]["macro"] and q["accuracy"] == m["accuracy"]


def test_bootstrap_intervals_contain_point_estimates_and_are_seeded():
    y, p = _random(n=400, seed=5)
    m = compute_metrics(y, p, n_bootstrap=100, seed=1)
    ci = m["ci"]
    assert ci["accuracy"][0] <= m["accuracy"] <= ci["accuracy"][1]
    assert ci["macro_auc"][0] <= m["auc"]["macro"] <= ci["macro_auc"][1]
    assert ci["micro_auc"][0] <= m["auc"]["micro"] <= ci["micro_auc"][1]
    for c, v in m["auc"]["per_class"].items():
        assert ci["per_class_auc"][c][0] <= v <= ci["per_class_auc"][c][1]
    assert ci["macro_auc"][1] - ci["macro_auc"][0] > 0.005  # a real interval, not a point
    assert compute_metrics(y, p, n_bootstrap=100, seed=1)["ci"] == ci

    def bounds(c):  # the intervals only (the dict also records its seed, which differs trivially)
        return [c["accuracy"], c["macro_auc"], c["micro_auc"], *c["per_class_auc"].values()]

    other = compute_metrics(y, p, n_bootstrap=100, seed=2)["ci"]
    assert other["seed"] == 2 and all(a != b for a, b in zip(bounds(other), bounds(ci), strict=True))


def test_absent_class_gives_null_auc_and_skipped_resamples():
    y, p = _random(n=60, seed=3)
    y[y == 2] = 0
    m = compute_metrics(y, p, n_bootstrap=20, seed=0)
    assert m["auc"]["per_class"]["vort"] is None and m["auc"]["macro"] is None and m["auc"]["micro"] is None
    assert m["auc"]["per_class"]["no"] is not None
    assert m["ci"]["skipped"] == 20 and m["ci"]["macro_auc"] is None
    # a rare class: some resamples miss it and are counted
    y, p = _random(n=40, seed=4)
    y[:] = 0
    y[:2] = 1
    y[2:4] = 2
    m = compute_metrics(y, p, n_bootstrap=100, seed=0)
    assert 0 < m["ci"]["skipped"] < 100


def test_roc_curves():
    y, p = _random(n=500, seed=7)
    c = roc_curves(y, p)
    for name, curve in c["per_class"].items():
        assert curve["fpr"][0] == 0 and curve["fpr"][-1] == 1 and curve["tpr"][-1] == 1
        assert curve["auc"] == pytest.approx(np.trapezoid(curve["tpr"], curve["fpr"]), abs=1e-9), name
    assert c["micro"]["auc"] == pytest.approx(np.trapezoid(c["micro"]["tpr"], c["micro"]["fpr"]), abs=1e-9)
    # the macro curve is the mean of the per-class curves on the union grid: its area is the mean AUC
    assert c["macro"]["auc"] == pytest.approx(np.trapezoid(c["macro"]["tpr"], c["macro"]["fpr"]), abs=2e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_bootstrap_resample_aucs_equal_sklearn_with_ties(seed):
    from deeplense.metrics import _aucs, _resample_aucs

    y, p = _random(seed=seed)
    p = np.round(p.astype(np.float64), 2)  # many ties, which both must count one half
    per_class, micro = _resample_aucs(y, p)
    ref = _aucs(y, p)
    assert per_class == pytest.approx([ref["per_class"][c] for c in ("no", "sphere", "vort")], abs=1e-12)
    assert micro == pytest.approx(ref["micro"], abs=1e-12)


@pytest.mark.slow
def test_bootstrap_interval_narrows_as_n_grows():
    widths = {}
    for n in (150, 2400):
        y, p = _random(n=n, seed=11, signal=1.0)
        ci = compute_metrics(y, p, n_bootstrap=200, seed=0)["ci"]
        widths[n] = {k: ci[k][1] - ci[k][0] for k in ("accuracy", "macro_auc", "micro_auc")}
    for k in ("accuracy", "macro_auc", "micro_auc"):
        # the standard error falls as 1/sqrt(n): 16x the images, about a quarter of the width
        assert 0.1 < widths[2400][k] / widths[150][k] < 0.45, (k, widths)


def test_macro_interval_is_built_from_per_class_aucs():
    """Scores ranked well within each class but on different scales per class: macro AUC high, micro AUC low."""
    rng = np.random.default_rng(3)
    n = 900
    y = np.repeat(np.arange(3), n // 3)
    p = rng.random((n, 3)) * 0.5
    p[np.arange(n), y] += 0.25  # each column separates its class moderately well...
    p *= np.array([1.0, 0.2, 0.05])  # ...but the columns live on different scales, which pooling punishes
    m = compute_metrics(y, p, n_bootstrap=200, seed=0)
    macro, micro = m["auc"]["macro"], m["auc"]["micro"]
    assert macro - micro > 0.1, (macro, micro)
    lo, hi = m["ci"]["macro_auc"]
    assert lo <= macro <= hi and not lo <= micro <= hi
    lo, hi = m["ci"]["micro_auc"]
    assert lo <= micro <= hi and not lo <= macro <= hi


def test_paired_difference_per_seed_equals_sklearn_and_intervals_behave():
    from deeplense.metrics import paired_difference

    y, _ = _random(n=600, seed=20)

    def arm(signal, seed):
        logits = np.random.default_rng(seed).normal(size=(600, 3))
        logits[np.arange(600), y] += signal
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    better = [arm(1.6, 10 + s) for s in range(4)]
    worse = [arm(1.0, 20 + s) for s in range(4)]
    d = paired_difference(y, better, worse, n_bootstrap=200, seed=0)
    expected = [roc_auc_score(y, a, multi_class="ovr") - roc_auc_score(y, b, multi_class="ovr")
                for a, b in zip(better, worse, strict=True)]
    assert d["per_seed"] == pytest.approx(expected, abs=1e-12)
    assert d["mean"] == pytest.approx(np.mean(expected))
    for key in ("t_ci", "bootstrap_ci"):
        lo, hi = d[key]
        assert 0 < lo < d["mean"] < hi, key  # a real gain: both intervals exclude 0
    # an arm against a copy of itself with fresh noise: both intervals contain 0
    same = paired_difference(y, [arm(1.3, 30 + s) for s in range(4)], [arm(1.3, 40 + s) for s in range(4)],
                             n_bootstrap=200, seed=0)
    assert same["t_ci"][0] < 0 < same["t_ci"][1] and same["bootstrap_ci"][0] < 0 < same["bootstrap_ci"][1]
    # identical predictions: exactly zero
    zero = paired_difference(y, better, better, n_bootstrap=50, seed=0)
    assert zero["per_seed"] == [0.0] * 4 and zero["bootstrap_ci"] == [0.0, 0.0]


@pytest.mark.slow
def test_no_zero_width_intervals_from_tiny_test_sets():
    """One held-out image per class: the accuracy interval uses every resample (so it is not the zero-width
    [x, x] of the 22% of resamples that hold all three classes), and the AUC intervals are not available, with
    the reason, in metrics.json, the CLI's format and the README table (issue 22, item 2)."""
    from deeplense.report import format_ci, results_table

    y = np.array([0, 1, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])  # 2 of 3 right
    m = compute_metrics(y, p, n_bootstrap=400, seed=0)
    lo, hi = m["ci"]["accuracy"]
    assert lo < m["accuracy"] < hi and hi - lo > 0.3, m["ci"]["accuracy"]
    assert m["ci"]["macro_auc"] is None and all(v is None for v in m["ci"]["per_class_auc"].values())
    why = m["ci"]["auc_unavailable"]
    assert "1 test image(s) of class no" in why
    assert format_ci(m["auc"]["macro"], m["ci"]["macro_auc"], 4, why).endswith(f"[interval n/a: {why}]")
    assert f"interval n/a: {why}" in results_table({**m, "provenance": {}})
    # 4 per class: still too few, though few resamples miss a class
    y4 = np.repeat([0, 1, 2], 4)
    rng = np.random.default_rng(0)
    p4 = rng.dirichlet([1, 1, 1], len(y4))
    m4 = compute_metrics(y4, p4, n_bootstrap=200, seed=0)
    assert m4["ci"]["macro_auc"] is None and m4["ci"]["skipped"] < 20 and "4 test image(s)" in \
        m4["ci"]["auc_unavailable"]
    y5 = np.repeat([0, 1, 2], 5)
    m5 = compute_metrics(y5, rng.dirichlet([1, 1, 1], len(y5)), n_bootstrap=200, seed=0)
    assert m5["ci"]["macro_auc"] is not None and m5["ci"]["auc_unavailable"] is None


@pytest.mark.slow
def test_the_95_percent_intervals_cover_the_true_value_95_percent_of_the_time():
    """Issue 37, item 10: every table reports 'value [95% interval]', yet a 90% interval labelled 95% passed the
    whole suite. Here the answer is known: test sets drawn from one model (300 sets of 30 images per class), whose
    true accuracy and AUCs come from 300,000 images of it; the intervals must contain the truth about 95% of the
    time (measured: 0.95 / 0.95 / 0.93 for accuracy, macro AUC, AUC `no`; a 90% interval gives 0.91 / 0.91 / 0.89,
    a 99% one about 0.99)."""
    from deeplense.metrics import _aucs

    def draw(n_per, rng):
        y = np.repeat(np.arange(3), n_per)
        z = rng.normal(0, 1, (len(y), 3))
        z[np.arange(len(y)), y] += 1.0
        p = np.exp(z)
        return y, p / p.sum(1, keepdims=True)

    big_y, big_p = draw(100_000, np.random.default_rng(123))
    truth, accuracy = _aucs(big_y, big_p), float((big_p.argmax(1) == big_y).mean())
    rng = np.random.default_rng(1)
    covered = {"accuracy": 0, "macro": 0, "no": 0}
    sets = 300
    for r in range(sets):
        ci = compute_metrics(*draw(30, rng), n_bootstrap=200, seed=r)["ci"]
        assert ci["level"] == 0.95
        covered["accuracy"] += ci["accuracy"][0] <= accuracy <= ci["accuracy"][1]
        covered["macro"] += ci["macro_auc"][0] <= truth["macro"] <= ci["macro_auc"][1]
        covered["no"] += ci["per_class_auc"]["no"][0] <= truth["per_class"]["no"] <= ci["per_class_auc"]["no"][1]
    rates = {k: v / sets for k, v in covered.items()}
    assert all(0.9 <= v <= 0.99 for v in rates.values()), rates
    assert 0.925 <= np.mean(list(rates.values())) <= 0.97, rates
