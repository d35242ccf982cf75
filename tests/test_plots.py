"""The figures show the run's numbers: legends, curves and cells are checked on the matplotlib objects."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from deeplense import plots
from deeplense.data import CLASSES


@pytest.fixture
def drawn(monkeypatch):
    """Keep the figures that would be saved, and save them too (the files must still appear)."""
    figs = []
    real = plots.save_figure

    def keep(fig, stem, formats=plots.FORMATS):
        figs.append(fig)
        return real(fig, stem, formats)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figs


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y] * np.array([2.0, 0.5, 1.0])  # unequal difficulty
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_roc_classwise_draws_each_class_curve_with_its_auc(drawn, tmp_path):
    y, p = _data()
    paths = plots.roc_classwise(y, p, tmp_path / "roc")
    assert [x.name for x in paths] == ["roc.png", "roc.pdf"] and all(x.stat().st_size > 0 for x in paths)
    ax = drawn[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    for c, name in enumerate(CLASSES):
        auc = roc_auc_score(y == c, p[:, c])
        label = next(lab for lab in labels if f"({name})" in lab)
        assert label.endswith(f"AUC = {auc:.3f}")
        fpr, tpr, _ = roc_curve(y == c, p[:, c])
        np.testing.assert_allclose(lines[label].get_xdata(), fpr)
        np.testing.assert_allclose(lines[label].get_ydata(), tpr)


def test_roc_average_labels_macro_and_micro_with_their_own_auc(drawn, tmp_path):
    y, p = _data(seed=1)
    plots.roc_average(y, p, tmp_path / "avg")
    labels = [t.get_text() for t in drawn[0].axes[0].get_legend().get_texts()]
    macro = roc_auc_score(y, p, multi_class="ovr", average="macro")
    micro = roc_auc_score(np.eye(3)[y].ravel(), p.ravel())
    assert abs(macro - micro) > 0.001  # the two numbers differ, so a swapped label would show
    assert any(lab.startswith("macro") and lab.endswith(f"AUC = {macro:.3f}") for lab in labels), labels
    assert any(lab.startswith("micro") and lab.endswith(f"AUC = {micro:.3f}") for lab in labels), labels


def test_confusion_cells_show_counts_and_row_fractions(drawn, tmp_path):
    cm = [[40, 5, 5], [10, 30, 10], [0, 2, 48]]
    plots.confusion(cm, tmp_path / "cm")
    texts = [t.get_text() for t in drawn[0].axes[0].texts]
    assert texts == [f"{cm[i][j]}\n{cm[i][j] / sum(cm[i]):.1%}" for i in range(3) for j in range(3)]


def test_training_curves_plot_the_history(drawn, tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_macro_auc": 0.5 + 0.1 * e,
                "val_accuracy": 0.3 + 0.1 * e} for e in (1, 2, 3)]
    plots.training_curves(history, tmp_path / "tc")
    loss_ax, metric_ax = drawn[0].axes
    series = {ln.get_label(): list(ln.get_ydata()) for ax in (loss_ax, metric_ax) for ln in ax.get_lines()}
    assert series["train"] == [h["train_loss"] for h in history]
    assert series["macro AUC"] == [h["val_macro_auc"] for h in history]
    assert series["accuracy"] == [h["val_accuracy"] for h in history]
