"""Redraw every figure of a run from its saved files, without the model.

The notebook draws its figures through the same two functions, so ``report`` reproduces them byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import plots
from .util import DeepLenseError, read_jsonl


def draw_training(run: str | Path, figures: str | Path) -> list[Path]:
    """``training_curves`` from ``RUN/history.jsonl`` (and the recipe name from ``RUN/config.json``)."""
    run = Path(run)
    history = read_jsonl(run / "history.jsonl")
    if not history:
        return []
    try:
        recipe = json.loads((run / "config.json").read_text())["config"]["recipe"]
    except (OSError, ValueError, KeyError):
        recipe = "?"
    Path(figures).mkdir(parents=True, exist_ok=True)
    return plots.training_curves(history, Path(figures) / "training_curves", title=f"Training ({recipe} recipe)")


def draw_evaluation(run: str | Path, figures: str | Path) -> list[Path]:
    """``roc_classwise``, ``roc_average`` and ``confusion_matrix`` from ``RUN/metrics.json`` and
    ``RUN/predictions.npz``."""
    run = Path(run)
    mpath, ppath = run / "metrics.json", run / "predictions.npz"
    for p in (mpath, ppath):
        if not p.is_file():
            raise DeepLenseError(f"{p}: not found (run `python -m deeplense evaluate --checkpoint {run}/best.pt` "
                                 f"first)")
    try:
        metrics = json.loads(mpath.read_text())
        with np.load(ppath, allow_pickle=False) as z:
            labels, probs = z["labels"], z["probabilities"]
    except (ValueError, KeyError, OSError) as exc:
        raise DeepLenseError(f"{run}: unreadable metrics.json or predictions.npz ({exc})") from None
    out = Path(figures)
    out.mkdir(parents=True, exist_ok=True)
    split = metrics.get("provenance", {}).get("split", "test")
    what = f"{'held-out test' if split == 'test' else 'selection part of val'}, n={metrics.get('n', len(labels))}"
    written = plots.roc_classwise(labels, probs, out / "roc_classwise", title=f"ROC per class ({what})")
    written += plots.roc_average(labels, probs, out / "roc_average", title=f"Averaged ROC ({what})")
    written += plots.confusion(metrics["confusion_matrix"], out / "confusion_matrix",
                               title=f"Confusion matrix ({what})")
    return written


def report(run: str | Path, figures: str | Path | None = None) -> list[Path]:
    """Draw every figure of ``RUN`` into ``figures`` (default ``RUN/figures``); return the files written."""
    run = Path(run)
    out = Path(figures) if figures else run / "figures"
    return draw_evaluation(run, out) + draw_training(run, out)
