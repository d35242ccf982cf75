"""Calibration: ECE as documented, reliability curves from scikit-learn, temperature scaling fitted where it should
be and leaving the predicted class alone."""

from __future__ import annotations

import numpy as np
import pytest

from deeplense.calibration import apply_temperature as _apply_log
from deeplense.calibration import (
    calibration_summary,
    classwise_ece,
    expected_calibration_error,
    nll,
    reliability,
    temperature_nll,
    top_label_reliability,
)
from deeplense.calibration import fit_temperature as _fit_log
from deeplense.data import CLASSES


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fit_temperature(y, p) -> float:
    """The fitted temperature of probabilities ``p`` (the module works on log-probabilities)."""
    return _fit_log(y, np.log(p))["temperature"]


def apply_temperature(p, t) -> np.ndarray:
    return _apply_log(np.log(np.asarray(p, dtype=np.float64)), t)


def _drawn(n=20_000, seed=0, scale=1.0):
    """Logits, labels drawn from softmax(logits) (so softmax(logits) is calibrated), and softmax(scale * logits)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 3))
    true = _softmax(z)
    y = (rng.random(n)[:, None] > np.cumsum(true, 1)).sum(1)
    return y, true, _softmax(scale * z)


def test_ece_of_a_known_overconfident_model_and_of_a_calibrated_one():
    y = np.array([0] * 60 + [1] * 40)
    p = np.tile([0.99, 0.005, 0.005], (100, 1))  # always 99% sure of class 0, right 60% of the time
    assert expected_calibration_error(y, p) == pytest.approx(0.39)
    assert classwise_ece(y, p)["no"] == pytest.approx(0.39) and classwise_ece(y, p)["sphere"] == pytest.approx(0.395)
    y, calibrated, _ = _drawn()
    assert expected_calibration_error(y, calibrated) < 0.02


def test_classwise_ece_matches_scikit_learns_calibration_curve():
    """Class-wise ECE = sum over non-empty bins of (share of images) x |observed - predicted| of calibration_curve."""
    from sklearn.calibration import calibration_curve

    y, _, p = _drawn(n=3000, seed=1, scale=2.0)
    got = classwise_ece(y, p, n_bins=10)
    for k, c in enumerate(CLASSES):
        observed, predicted = calibration_curve(y == k, p[:, k], n_bins=10, strategy="uniform")
        share = np.bincount(np.minimum((p[:, k] * 10).astype(int), 9), minlength=10)
        share = share[share > 0] / len(y)
        assert got[c] == pytest.approx(float((share * np.abs(observed - predicted)).sum()), abs=1e-9)
    curves = reliability(y, p, n_bins=10)
    assert set(curves) == set(CLASSES) and len(curves["no"]["predicted"]) == len(curves["no"]["observed"]) <= 10


def test_temperature_recovers_the_overconfidence_and_keeps_the_predicted_class():
    y, calibrated, over = _drawn(scale=3.0)  # logits 3x too large: the right temperature is 3
    t = fit_temperature(y, over)
    assert t == pytest.approx(3.0, rel=0.08)
    fixed = apply_temperature(over, t)
    assert np.array_equal(fixed.argmax(1), over.argmax(1))
    assert expected_calibration_error(y, fixed) < expected_calibration_error(y, over) / 3
    assert nll(y, fixed) < nll(y, over)
    np.testing.assert_allclose(apply_temperature(calibrated, 1.0), calibrated, atol=1e-6)
    _, _, under = _drawn(scale=0.5)
    assert fit_temperature(y, under) == pytest.approx(0.5, rel=0.08)  # under-confident: T < 1 sharpens


def test_summary_interval_brackets_the_ece():
    y, _, over = _drawn(n=2000, scale=3.0)
    s = calibration_summary(y, over, n_bootstrap=200)
    assert s["ece_ci"][0] <= s["ece"] <= s["ece_ci"][1] and s["ece"] > 0.05
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error(y, over[:, :2])


def test_the_top_label_bins_drawn_are_the_ones_the_ece_is_computed_from():
    y, _, over = _drawn(n=3000, seed=2, scale=2.5)
    bins = top_label_reliability(y, over)
    n, acc, conf = (np.asarray(bins[k]) for k in ("count", "accuracy", "confidence"))
    assert n.sum() == len(y) and (n > 0).all() and np.all(np.diff(conf) > 0)
    assert float((n * np.abs(acc - conf)).sum() / len(y)) == pytest.approx(expected_calibration_error(y, over))
    assert calibration_summary(y, over, n_bootstrap=0)["top_label"] == bins


def test_temperature_keeps_each_images_class_order_and_moves_the_aucs_only_a_little():
    """What temperature scaling leaves alone with three classes: the order of the classes within each image (so
    the predicted class and the accuracy). What it does not: the order of one class's probability across images,
    so a one-vs-rest AUC can move (a constructed pair shows it); on realistic probabilities it moves little."""
    from sklearn.metrics import roc_auc_score

    y, _, over = _drawn(n=5000, seed=3, scale=3.0)
    scaled = apply_temperature(over, fit_temperature(y, over))
    assert np.array_equal(np.argsort(scaled, 1), np.argsort(over, 1))
    for k in range(3):
        assert abs(roc_auc_score(y == k, scaled[:, k]) - roc_auc_score(y == k, over[:, k])) < 0.01
    pair = np.array([[0.6, 0.2, 0.2], [0.5, 0.49, 0.01]])  # class 0 ranks image 0 first, and after T = 4 last
    assert pair[0, 0] > pair[1, 0] and apply_temperature(pair, 4.0)[0, 0] < apply_temperature(pair, 4.0)[1, 0]


def test_the_reliability_diagram_draws_each_state_with_its_own_ece(monkeypatch):
    import deeplense.plots as plots

    y, _, over = _drawn(n=2000, seed=4, scale=3.0)
    t = fit_temperature(y, over)
    record = {"temperature": t, "uncalibrated": calibration_summary(y, over, n_bootstrap=20),
              "calibrated": calibration_summary(y, apply_temperature(over, t), n_bootstrap=20)}
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, stem: drawn.append(fig) or [stem])
    plots.reliability_diagram(record, "x")
    plots.reliability_diagram({**record, "calibrated": None}, "y")
    both, alone = ([a for a in f.axes] for f in drawn)
    assert len(both) == 2 and len(alone) == 1
    for ax, state in zip(both, ("uncalibrated", "calibrated"), strict=True):
        assert f"ECE {record[state]['ece']:.3f} [" in ax.get_title()
        top = record[state]["top_label"]
        assert any(np.allclose(line.get_xydata(), np.c_[top["confidence"], top["accuracy"]]) for line in ax.lines
                   if len(line.get_xydata()) == len(top["count"]))
    assert f"T = {t:.3g}" in both[1].get_title()


def test_the_fit_scores_what_is_applied_and_never_raises_the_nll(monkeypatch):
    """Issue 37, item 5: the fit once clipped probabilities at 1e-12 while the applied scaling kept float32 zeros,
    so a 'calibrated' selection NLL went from 9.210 to 9.379. Now both read the same log-probabilities: the NLL the
    fit reports is the NLL of what apply_temperature gives, and no stored temperature raises it."""
    import deeplense.calibration as C

    logits = np.array([[60.0, 0.0, -50.0], [0.0, 40.0, -70.0], [-80.0, 0.0, 30.0], [3.0, 0.0, 0.0],
                       [0.0, 5.0, 0.0], [0.0, 0.0, 8.0]])
    y = np.array([2, 1, 2, 0, 1, 2])
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - \
        logits.max(1, keepdims=True)  # exact log-softmax: -110 where float32 softmax gives 0
    fit = _fit_log(y, logp)
    t = fit["temperature"]
    assert fit["nll_after"] == pytest.approx(temperature_nll(y, logp, t), rel=1e-12)
    assert fit["nll_before"] == pytest.approx(temperature_nll(y, logp, 1.0), rel=1e-12)
    assert fit["nll_after"] < fit["nll_before"]
    applied = _apply_log(logp, t).astype(np.float64)
    finite = applied[np.arange(len(y)), y] > 1e-30
    assert np.allclose(-np.log(applied[np.arange(len(y)), y])[finite],
                       -C.scaled_log_probabilities(logp, t)[np.arange(len(y)), y][finite], rtol=1e-5)
    # float32 probabilities with exact zeros: fit and apply read the same floor, never -inf
    p32 = _softmax(logits).astype(np.float32)
    assert (p32 == 0).any()
    with np.errstate(divide="ignore"):
        fit32 = _fit_log(y, np.log(p32))
        assert np.isfinite(fit32["nll_after"]) and fit32["nll_after"] <= fit32["nll_before"]
        assert fit32["nll_after"] == pytest.approx(temperature_nll(y, np.log(p32), fit32["temperature"]))
    # a fit that would raise the NLL is not stored (T = 1, said); one that stops at a bound says so
    import scipy.optimize

    class Bad:
        x = float(np.log(0.05))

    monkeypatch.setattr(scipy.optimize, "minimize_scalar", lambda *a, **k: Bad())
    bad = _fit_log(np.array([1, 1, 2]), logp[3:])  # one confident error: sharpening to 0.05 raises the NLL
    assert bad["temperature"] == 1.0 and not bad["kept"] and bad["nll_after"] == bad["nll_before"]
    assert bad["at_bound"] == 0.05 and bad["fitted"] == pytest.approx(0.05)


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    """A 2-epoch run on the small set (reference protocol: selection on part of val)."""
    from deeplense.config import recipe
    from deeplense.testing import FAST, quiet
    from deeplense.train import train

    run = tmp_path_factory.mktemp("cal") / "run"
    train(recipe("default", epochs=2, **FAST), small, run, **quiet())
    return run


@pytest.mark.slow
def test_training_fits_temperatures_on_the_selection_images_into_best_pt(small, trained):
    import torch

    from deeplense.checkpoint import config_of, load_checkpoint, model_from_checkpoint
    from deeplense.data import load_splits
    from deeplense.engine import predict_proba
    from deeplense.testing import quiet
    from deeplense.train import resume
    from deeplense.transforms import native_crop

    ck = load_checkpoint(trained / "best.pt")
    fit = ck["temperature"]
    assert fit["epoch"] == ck["epoch"] and fit["fitted_on"] == "selection" and "temperature" not in load_checkpoint(
        trained / "last.pt")
    x, y = load_splits(small, ("val",), progress=False)["val"]
    sel = np.asarray(ck["data"]["selection_indices"])
    assert fit["n"] == len(sel)
    cfg = config_of(ck, "best.pt")
    net = model_from_checkpoint(ck, torch.device("cpu"))
    for name, tta in (("plain", False), ("tta", True)):
        probs, logp = predict_proba(net, native_crop(x, sel, cfg.crop), cfg, torch.device("cpu"), tta=tta,
                                    with_log=True)
        np.testing.assert_allclose(np.exp(logp), probs, atol=1e-6)  # the same probabilities, kept in log space
        assert fit[name] == pytest.approx(_fit_log(y[sel], logp)["temperature"], rel=1e-6)
        before, after = fit[f"{name}_selection_nll"]
        assert after <= before and before == pytest.approx(nll(y[sel], probs), rel=1e-5)
        assert after == pytest.approx(temperature_nll(y[sel], logp, fit[name]), rel=1e-9)
    stamp = (trained / "best.pt").stat().st_mtime_ns
    resume(trained, **quiet())  # finished, and fitted for this best.pt already: nothing rewritten
    assert (trained / "best.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_evaluate_and_predict_apply_the_temperature_only_when_asked(small, trained, tmp_path, capsys):
    from deeplense.checkpoint import load_checkpoint, save_checkpoint
    from deeplense.cli import main
    from deeplense.evaluate import evaluate, predict_files

    ck = load_checkpoint(trained / "best.pt")
    # this tiny selection set is separable, so both fits end at the lower bound; two distinct temperatures instead
    # show which one is applied
    fit = {**ck["temperature"], "plain": 2.0, "tta": 0.5}
    best = tmp_path / "best.pt"
    save_checkpoint(best, {**ck, "temperature": fit})
    plain = evaluate(best, small, tmp_path / "plain", tta=True, progress=False, n_bootstrap=50)
    cal = evaluate(best, small, tmp_path / "cal", tta=True, progress=False, n_bootstrap=50, calibrated=True)
    raw = np.load(tmp_path / "plain" / "predictions.npz")["probabilities"]
    scaled = np.load(tmp_path / "cal" / "predictions.npz")["probabilities"]
    np.testing.assert_allclose(scaled, apply_temperature(raw, fit["tta"]), atol=1e-6)  # TTA's own temperature
    assert cal["accuracy"] == plain["accuracy"] and cal["provenance"]["calibrated"]
    for m in (plain, cal):  # both report the ECE before and after, whichever probabilities they saved
        assert m["calibration"]["temperature"] == pytest.approx(fit["tta"])
        labels = np.load(tmp_path / "plain" / "predictions.npz")["labels"]
        assert m["calibration"]["uncalibrated"]["ece"] == pytest.approx(expected_calibration_error(labels, raw))
        assert m["calibration"]["calibrated"]["ece"] == pytest.approx(expected_calibration_error(labels, scaled),
                                                                      abs=1e-6)
    from deeplense.report import calibration_table, format_ci, report

    table = calibration_table(cal)  # the notebook's and the README's calibration table, from metrics.json
    for state in ("uncalibrated", "calibrated"):
        s = cal["calibration"][state]
        assert f"| {format_ci(s['ece'], s['ece_ci'])} |" in table
    assert "T = 0.5 |" in table and "the scaled" in table and "selection images" in table
    assert "the ones as predicted" in calibration_table(plain)
    # the reliability diagram is redrawn from metrics.json, byte for byte
    first = [p.read_bytes() for p in report(tmp_path / "cal", tmp_path / "f1") if p.stem == "reliability"]
    again = [p.read_bytes() for p in report(tmp_path / "cal", tmp_path / "f2") if p.stem == "reliability"]
    assert len(first) == 2 and first == again
    files = sorted((small / "val" / "no").glob("*.npy"))[:3]
    rows = predict_files(best, [str(f) for f in files], tmp_path / "p.csv", calibrated=True)
    got = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    want = predict_files(best, [str(f) for f in files], tmp_path / "q.csv")
    np.testing.assert_allclose(got, apply_temperature([[float(r[f"p_{c}"]) for c in CLASSES] for r in want],
                                                      fit["plain"]), atol=1e-5)  # the CSV keeps 6 decimals
    # a checkpoint without a temperature (last.pt): one line, exit status 2
    assert main(["evaluate", "--checkpoint", str(trained / "last.pt"), "--data", str(small), "--out",
                 str(tmp_path / "x"), "--calibrated"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no fitted temperature" in err and len(err.splitlines()) == 1
