"""A run's results as text and figures, from its saved files only: tables for the README, the notebook's
reading of the curves, and every figure redrawn without the model.

The notebook draws its figures through the same two functions, so ``report`` reproduces them byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import plots
from .data import CLASS_LABELS
from .util import REPO, DeepLenseError, file_sha256, read_jsonl, replace_section

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def format_ci(value, interval, digits: int = 3, unavailable: str | None = None) -> str:
    """``0.957 [0.925, 0.983]``: a value with its interval (``n/a`` for a missing value; no brackets without an
    interval; ``0.957 [interval n/a: <why>]`` when the interval could not be estimated)."""
    if value is None:
        return "n/a"
    if interval:
        return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return f"{value:.{digits}f}" + (f" [interval n/a: {unavailable}]" if unavailable else "")


def results_table(metrics: dict) -> str:
    """A Markdown table of accuracy and AUCs with 95% intervals, from a ``metrics.json`` dict."""
    ci = metrics["ci"]
    prov = metrics.get("provenance", {})
    rows = [("accuracy", metrics["accuracy"], ci["accuracy"]),
            ("macro AUC (mean of per-class one-vs-rest)", metrics["auc"]["macro"], ci["macro_auc"]),
            ("micro AUC (pooled one-vs-rest)", metrics["auc"]["micro"], ci["micro_auc"])]
    rows += [(f"AUC {CLASS_LABELS[c]} (`{c}`)", v, ci["per_class_auc"][c])
             for c, v in metrics["auc"]["per_class"].items()]
    lines = ["| metric | value [95% bootstrap interval] |", "|---|---|"]
    why = ci.get("auc_unavailable")
    lines += [f"| {name} | {format_ci(v, c, unavailable=None if name == 'accuracy' else why)} |"
              for name, v, c in rows]
    cfg = prov.get("config", {})
    if str(prov.get("heldout_check", "")).startswith("NOT"):
        lines += ["", f"**Warning: {prov['heldout_check']}.**"]
    lines += ["", f"Held-out test set: n = {metrics['n']} ({prov.get('split_description', '')}); "
                  f"recipe `{prov.get('recipe')}`, {cfg.get('epochs')} epochs, input {cfg.get('image_size')} px"
                  + (f" (central {cfg.get('crop')} px crop)" if cfg.get("crop") else "")
                  + f", weights: {'ImageNet' if prov.get('pretrained') else 'random initialisation'}; "
                  f"device {prov.get('device')}; seed {prov.get('seed')}; TTA {'on' if prov.get('tta') else 'off'}."]
    return "\n".join(lines)


def findings(metrics: dict) -> str:
    """What the curves say, in Markdown: classes from easiest to hardest with their AUCs, the confusions, and how
    wide the macro-AUC interval is (differences smaller than that are not evidence)."""
    auc, ci = metrics["auc"]["per_class"], metrics["ci"]["per_class_auc"]
    order = sorted((c for c in auc if auc[c] is not None), key=lambda c: auc[c], reverse=True)
    why = metrics["ci"].get("auc_unavailable")
    lines = [f"- **{CLASS_LABELS[c]}** (`{c}`): AUC {format_ci(auc[c], ci[c], unavailable=why)}" for c in order]
    if order:
        lines.append(f"\nHardest class in this run: **{CLASS_LABELS[order[-1]]}**. Confusions (rows true, columns "
                     f"predicted): {metrics['confusion_matrix']}.")
    macro_ci = metrics["ci"]["macro_auc"]
    if macro_ci:
        lines.append(f"\nThe macro-AUC interval is {macro_ci[1] - macro_ci[0]:.3f} wide with n = {metrics['n']} test "
                     "images: differences smaller than that between runs are not evidence.")
    return "\n".join(lines)


def calibration_table(metrics: dict) -> str:
    """Markdown: can the probabilities be trusted? The top-label ECE with its 95% bootstrap interval, the mean
    class-wise ECE and the NLL, as predicted and after temperature scaling (with the temperature and what it was
    fitted on). Empty for a ``metrics.json`` older than calibration."""
    cal = metrics.get("calibration")
    if not isinstance(cal, dict) or not isinstance(cal.get("uncalibrated"), dict):
        return ""
    states = [("as predicted", cal["uncalibrated"])]
    if cal.get("calibrated"):
        states.append((f"temperature-scaled, T = {cal['temperature']:.3g}", cal["calibrated"]))
    lines = ["| probabilities | ECE (top label) [95% bootstrap interval] | mean class-wise ECE | NLL |",
             "|---|---|---|---|"]
    for name, s in states:
        cw = s["classwise_ece"]
        lines.append(f"| {name} | {format_ci(s['ece'], s.get('ece_ci'))} | {sum(cw.values()) / len(cw):.3f} | "
                     f"{s['nll']:.3f} |")
    n_bins = cal["uncalibrated"].get("n_bins")
    note = (f"ECE: {n_bins} equal-width confidence bins; 0 is perfectly calibrated. "
            + (f"Temperature fitted on {cal['fitted_on']}; " if cal.get("fitted_on") else
               "No fitted temperature in this checkpoint; ")
            + f"the saved probabilities are {'the scaled' if cal.get('applied') else 'the ones as predicted'}.")
    return "\n".join(lines + ["", note])


def update_readme(metrics_path: str | Path, readme: str | Path = REPO / "README.md", extra: str = "") -> None:
    """Replace the text between the results markers in README.md with the table from ``metrics_path``."""
    metrics = json.loads(Path(metrics_path).read_text())
    cal = calibration_table(metrics)
    body = f"{extra}{results_table(metrics)}" + (f"\n\nCalibration on the same images:\n\n{cal}" if cal else "")
    replace_section(readme, README_START, README_END, body)


def documents(repo: str | Path = REPO) -> list[Path]:
    """The Markdown files generated sections may live in: the README, ``docs/``, and the benchmarks' and
    experiments' own READMEs."""
    repo = Path(repo)
    found = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    found += [repo / d / "README.md" for d in ("benchmarks", "experiments")]
    return [p for p in found if p.is_file()]


def write_section(name: str, body: str, repo: str | Path = REPO) -> Path:
    """Replace the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` with ``body``, in whichever
    document (:func:`documents`) holds those markers, so a table can move between the README and the longer
    documents without its writer changing. Returns that document."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    holders = [p for p in documents(repo) if start in p.read_text(encoding="utf-8")]
    if len(holders) != 1:
        where = ", ".join(str(p) for p in holders) or "none of " + ", ".join(str(p) for p in documents(repo))
        raise DeepLenseError(f"section {name!r}: its markers must be in exactly one document ({where})")
    replace_section(holders[0], start, end, body)
    return holders[0]


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
    """``roc_classwise``, ``roc_average``, ``confusion_matrix`` and (when ``metrics.json`` holds a calibration
    record) ``reliability`` from ``RUN/metrics.json`` and ``RUN/predictions.npz``."""
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
    cm = metrics.get("confusion_matrix") if isinstance(metrics, dict) else None
    k = len(CLASS_LABELS)
    if not (isinstance(cm, list) and len(cm) == k and all(isinstance(r, list) and len(r) == k for r in cm)) or \
            not isinstance(metrics.get("provenance", {}), dict) or probs.ndim != 2 or probs.shape[1:] != (k,) or \
            labels.shape != probs.shape[:1]:
        raise DeepLenseError(f"{run}: metrics.json or predictions.npz is not what `evaluate` writes (a "
                             f"{k}x{k} confusion_matrix, labels (N,) and probabilities (N, {k})); evaluate again")
    recorded = metrics.get("predictions_sha256")
    if recorded is not None and recorded != file_sha256(ppath):
        raise DeepLenseError(f"{ppath}: not the predictions {mpath.name} was computed from (written by another "
                             f"evaluation, or one that was killed between the two files); evaluate again")
    out = Path(figures)
    out.mkdir(parents=True, exist_ok=True)
    what = f"{metrics.get('provenance', {}).get('split_description', 'held-out test')}, " \
           f"n={metrics.get('n', len(labels))}"
    written = plots.roc_classwise(labels, probs, out / "roc_classwise", title=f"ROC per class ({what})")
    written += plots.roc_average(labels, probs, out / "roc_average", title=f"Averaged ROC ({what})")
    written += plots.confusion(metrics["confusion_matrix"], out / "confusion_matrix",
                               title=f"Confusion matrix ({what})")
    cal = metrics.get("calibration")
    if isinstance(cal, dict) and isinstance(cal.get("uncalibrated"), dict):  # older evaluations have none
        try:
            written += plots.reliability_diagram(cal, out / "reliability", title=f"Reliability ({what})")
        except (KeyError, TypeError, ValueError) as exc:
            raise DeepLenseError(f"{mpath}: its calibration record is not what `evaluate` writes ({exc!r}); "
                                 f"evaluate again") from None
    return written


def report(run: str | Path, figures: str | Path | None = None) -> list[Path]:
    """Draw every figure of ``RUN`` into ``figures`` (default ``RUN/figures``); return the files written."""
    run = Path(run)
    out = Path(figures) if figures else run / "figures"
    return draw_evaluation(run, out) + draw_training(run, out)
