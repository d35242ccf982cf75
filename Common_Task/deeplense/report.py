"""A run's results as text and figures, from its saved files only: tables for the README, the notebook's
reading of the curves, and every figure redrawn without the model.

The notebook draws its figures through the same two functions, so ``report`` reproduces them byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import plots
from .config import INVARIANT_ARCHS
from .data import CLASS_LABELS, CLASSES
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


def tta_words(tta: bool | None, arch: str | None) -> str:
    """What test-time averaging did: on, off, or not needed for an exactly invariant network (one pass: the 8
    views would give the same numbers; :func:`deeplense.transforms.tta_views`)."""
    if tta and arch in INVARIANT_ARCHS:
        return "TTA not needed (the network is exactly invariant to the 8 flips and quarter turns: one pass)"
    return f"TTA {'on' if tta else 'off'}"


def averaged_words(tta: bool | None, arch: str | None) -> str:
    """The saliency caption's tail: averaged over the TTA views only where more than one view ran."""
    return ", averaged over the TTA views" if tta and arch not in INVARIANT_ARCHS else ""


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
    lines += ["", f"Held-out test set: n = {metrics['n']} ({prov.get('split_description', '')}). "
                  f"Network `{cfg.get('arch', 'resnet34')}`, recipe `{prov.get('recipe')}`, {cfg.get('epochs')} "
                  f"epochs. "
                  f"Input {cfg.get('image_size')} px"
                  + (f" (central {cfg.get('crop')} px crop)" if cfg.get("crop") else "")
                  + f"; weights: {'ImageNet' if prov.get('pretrained') else 'random initialisation'}. "
                  f"Device {prov.get('device')}, seed {prov.get('seed')}, "
                  f"{tta_words(prov.get('tta'), cfg.get('arch'))}."]
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


def enrichment_table(result: dict) -> str:
    """Markdown: ``explain --evaluation``'s enrichment per class and method, with its interval and its scale."""
    from .plots import METHOD_NAMES

    lines = ["| class | method | enrichment near the true substructure [95% bootstrap interval] | ideal | images |",
             "|---|---|---|---|---|"]
    for cls, by_method in result["per_class"].items():
        for m, e in by_method.items():
            if isinstance(e, dict):
                lines.append(f"| {CLASS_LABELS[cls]} (`{cls}`) | {METHOD_NAMES.get(m, m)} | "
                             f"{format_ci(e['ratio'], e['ci'], 2, None if e['ci'] else 'one image')} | "
                             f"{e['ideal_ratio']:.2f} | {e['n']} |")
    return "\n".join(lines + ["", f"Enrichment: the saliency within {result['radius_px']:g} px of the true "
                                   f"structure, over that near the same structure turned about the lens centre. 1 "
                                   f"means no preference; ideal is a map spread evenly over the true region. Maps are "
                                   f"for the true class"
                                   f"{averaged_words(result.get('tta'), result.get('arch'))}."])


def update_readme(metrics_path: str | Path, readme: str | Path = REPO / "README.md", extra: str = "") -> None:
    """Replace the text between the results markers in README.md with the tables from ``metrics_path``: the
    results, the calibration and, when ``explain --evaluation`` wrote ``explain/enrichment.json`` beside it, the
    saliency enrichment."""
    metrics = json.loads(Path(metrics_path).read_text())
    cal = calibration_table(metrics)
    body = f"{extra}{results_table(metrics)}" + (f"\n\nCalibration on the same images:\n\n{cal}" if cal else "")
    saliency = Path(metrics_path).parent / "explain" / "enrichment.json"  # where the notebook's explain writes
    if saliency.is_file():
        body += f"\n\nWhere the network looks (`explain`, from `{saliency.parent.name}/{saliency.name}`):\n\n" \
                f"{enrichment_table(json.loads(saliency.read_text()))}"
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
    from sklearn.metrics import confusion_matrix

    counted = confusion_matrix(labels, probs.argmax(1), labels=range(k)).tolist()
    if cm != counted:  # a hand-edited or foreign metrics.json: the matrix drawn must be the predictions'
        raise DeepLenseError(f"{mpath}: its confusion_matrix {cm} is not the one of {ppath.name} ({counted}); "
                             f"evaluate again")
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


def error_examples(labels, probabilities, per_class: int = 4) -> tuple[dict, np.ndarray]:
    """``({class index: the indices of its images with the highest loss, highest first}, the indices of the
    wrong predictions made with the highest confidence, most confident first, at most 2 x per_class)``; the loss of
    an image is ``-log p(true class)``; ties keep the evaluation's order."""
    labels = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    loss = -np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None))
    hardest = {k: np.flatnonzero(labels == k)[np.argsort(-loss[labels == k], kind="stable")][:per_class]
               for k in range(p.shape[1])}
    wrong = np.flatnonzero(p.argmax(1) != labels)
    confident = wrong[np.argsort(-p[wrong].max(1), kind="stable")][: 2 * per_class]
    return hardest, confident


def draw_errors(run: str | Path, figures: str | Path, per_class: int = 4) -> list[Path]:
    """``hardest``: per true class, the evaluated images with the highest loss; ``confident_errors``: the wrong
    predictions made with the highest confidence; each image with its probabilities."""
    from .evaluate import evaluated_split

    run = Path(run)
    ev = evaluated_split(run, "the error figures")
    metrics, labels, probs, images = ev.metrics, ev.labels, ev.probabilities, np.asarray(ev.images[ev.indices, 0])
    hardest, confident = error_examples(labels, probs, per_class)

    def caption(i):
        k, j = int(labels[i]), int(probs[i].argmax())
        said = f"p({CLASSES[k]}) = {probs[i, k]:.2f}"
        return said if j == k else f"{said}\npredicted {CLASSES[j]} ({probs[i, j]:.2f})"

    what = f"{metrics.get('provenance', {}).get('split_description', 'held-out test')}, n={len(labels)}"
    out = Path(figures)
    out.mkdir(parents=True, exist_ok=True)
    rows = [(f"{CLASS_LABELS[c]}\n({c})", [(images[i], caption(i)) for i in hardest[k]])
            for k, c in enumerate(CLASSES)]
    written = plots.image_rows(rows, out / "hardest", title=f"Highest loss per true class ({what})")
    half = (len(confident) + 1) // 2
    rows = [(f"{r * half + 1}-{r * half + len(part)}", [(images[i], f"true {CLASSES[labels[i]]}, " + caption(i))
                                                         for i in part])
            for r, part in enumerate((confident[:half], confident[half:])) if len(part)]
    written += plots.image_rows(rows or [("none", [])], out / "confident_errors",
                                title=f"Most confident errors ({what})" if rows else f"No errors ({what})")
    return written


def report(run: str | Path, figures: str | Path | None = None, log=None) -> list[Path]:
    """Draw every figure of ``RUN`` into ``figures`` (default ``RUN/figures``); return the files written. The error
    figures need the evaluated images: without the data they are skipped, with a line to ``log`` (stderr). The
    saliency examples are redrawn when ``explain --evaluation RUN --out RUN/explain`` kept them."""
    import sys

    run = Path(run)
    out = Path(figures) if figures else run / "figures"
    written = draw_evaluation(run, out)
    try:
        written += draw_errors(run, out)
    except DeepLenseError as exc:
        (log or (lambda m: print(m, file=sys.stderr)))(f"report: error figures skipped: {exc}")
    examples = run / "explain" / plots.SALIENCY_EXAMPLES
    if examples.is_file():  # what `explain --evaluation RUN --out RUN/explain` kept
        written += plots.draw_saliency_examples(examples, out)
    return written + draw_training(run, out)
