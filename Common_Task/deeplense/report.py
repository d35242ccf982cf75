"""Redraw every figure of a run from its saved files, without the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import plots
from .util import DeepLenseError


def report(run: str | Path, figures: str | Path | None = None) -> list[Path]:
    """Draw ``roc_classwise``, ``roc_average``, ``confusion_matrix`` and (if ``history.jsonl`` exists)
    ``training_curves`` from ``RUN/metrics.json``, ``RUN/predictions.npz`` and ``RUN/history.jsonl``."""
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
    out = Path(figures) if figures else run / "figures"
    out.mkdir(parents=True, exist_ok=True)
    split = metrics.get("provenance", {}).get("split_description", "")
    n = metrics.get("n", len(labels))
    written = []
    written += plots.roc_classwise(labels, probs, out / "roc_classwise", title=f"ROC per class ({split}, n={n})")
    written += plots.roc_average(labels, probs, out / "roc_average", title=f"Averaged ROC ({split}, n={n})")
    written += plots.confusion(metrics["confusion_matrix"], out / "confusion_matrix",
                               title=f"Confusion matrix ({split})")
    from .cli_train import read_history

    history = read_history(run)
    if history:
        written += plots.training_curves(history, out / "training_curves")
    return written
