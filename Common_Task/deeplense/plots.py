"""Publication figures, saved as PNG (300 dpi) and PDF with pinned metadata so re-drawing gives the same bytes.

Colours are the Okabe-Ito palette (safe for the common colour-vision deficiencies). Legends use the
physics names of the classes: no substructure, subhalos, vortex.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import CLASS_LABELS, CLASSES

CLASS_COLORS = {"no": "#0072B2", "sphere": "#D55E00", "vort": "#009E73"}
AVERAGE_COLORS = {"macro": "#E69F00", "micro": "#CC79A7"}
FORMATS = ("png", "pdf")


STYLE = {"svg.hashsalt": "deeplense", "pdf.fonttype": 42, "font.size": 10}
"""The rcParams every figure is drawn and saved under (only inside :func:`style`: the caller's are untouched)."""


def style():
    """A context in which figures get this module's look; the caller's backend and rcParams stay as they were."""
    import matplotlib

    return matplotlib.rc_context(STYLE)


def figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(fig, axes)`` like ``plt.subplots``, but outside pyplot: no backend switch, no window, no inline
    display in a notebook, nothing to close. Draw and save inside :func:`style`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None), layout=kwargs.pop("layout", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def styled(fn):
    """Run a drawing function inside :func:`style`."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)

    return wrapper


def save_figure(fig, stem: str | Path, formats=FORMATS) -> list[Path]:
    """Save ``fig`` as ``stem.png`` (300 dpi) and ``stem.pdf``, atomically, with no dates in the metadata."""
    from .util import atomic_path

    stem = Path(stem)
    out = []
    with style():
        for fmt in formats:
            path = stem.with_suffix(f".{fmt}")
            meta = {"Software": None} if fmt == "png" else {"CreationDate": None, "ModDate": None, "Producer": None,
                                                            "Creator": None}
            with atomic_path(path, suffix=f".{fmt}") as tmp:
                fig.savefig(tmp, format=fmt, dpi=300, metadata=meta, bbox_inches="tight")
            out.append(path)
    return out


def square_roc_axes(ax, title: str) -> None:
    """Chance diagonal, unit square with equal aspect, labels, title and legend of a ROC plot."""
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="chance (AUC = 0.500)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", frameon=False)
    ax.grid(alpha=0.3)


@styled
def roc_classwise(labels, probabilities, stem, *, title="One-vs-rest ROC per class") -> list[Path]:
    """One ROC curve per class (one-vs-rest) with its AUC to 3 decimals."""
    from .metrics import roc_curves

    curves = roc_curves(labels, probabilities)
    fig, ax = figure(figsize=(4.6, 4.6))
    for cls in CLASSES:
        c = curves["per_class"][cls]
        if c is None:
            continue
        ax.plot(c["fpr"], c["tpr"], color=CLASS_COLORS[cls], lw=1.8,
                label=f"{CLASS_LABELS[cls]} ({cls}), AUC = {c['auc']:.3f}")
    square_roc_axes(ax, title)
    return save_figure(fig, stem)


@styled
def roc_average(labels, probabilities, stem, *, title="Averaged ROC") -> list[Path]:
    """Macro average (mean of the per-class curves on a common FPR grid; AUC = mean of per-class AUCs)
    and micro average (all one-vs-rest decisions pooled)."""
    from .metrics import roc_curves

    curves = roc_curves(labels, probabilities)
    fig, ax = figure(figsize=(4.6, 4.6))
    for kind, name in (("macro", "macro average (mean over classes)"), ("micro", "micro average (pooled)")):
        c = curves[kind]
        if c is not None:
            ax.plot(c["fpr"], c["tpr"], color=AVERAGE_COLORS[kind], lw=1.8, ls="-" if kind == "macro" else ":",
                    label=f"{name}, AUC = {c['auc']:.3f}")
    square_roc_axes(ax, title)
    return save_figure(fig, stem)


@styled
def confusion(confusion_matrix, stem, *, title="Confusion matrix (held-out test)") -> list[Path]:
    """Confusion matrix with counts and row-normalised fractions."""
    cm = np.asarray(confusion_matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = figure(figsize=(4.4, 4.0))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    names = [CLASS_LABELS[c] for c in CLASSES]
    ax.set_xticks(range(len(CLASSES)), names, rotation=20)
    ax.set_yticks(range(len(CLASSES)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{frac[i, j]:.1%}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title(title)
    return save_figure(fig, stem)


@styled
def training_curves(history: list[dict], stem, *, title="Training") -> list[Path]:
    """Training and validation loss, and validation macro AUC and accuracy, per epoch."""
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = figure(1, 2, figsize=(8.4, 3.4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", color="#0072B2", label="train")
    a1.plot(ep, [h["val_loss"] for h in history], "s-", color="#D55E00", label="validation (selection part)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy loss")
    a1.legend(frameon=False)
    a1.grid(alpha=0.3)
    a2.plot(ep, [h["val_macro_auc"] for h in history], "o-", color="#E69F00", label="macro AUC")
    a2.plot(ep, [h["val_accuracy"] for h in history], "s-", color="#009E73", label="accuracy")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation metric")
    a2.set_ylim(0, 1.01)
    a2.legend(frameon=False, loc="lower right")
    a2.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, stem)


@styled
def examples_grid(images, labels, stem, *, per_class: int = 4, title="Example images per class") -> list[Path]:
    """A grid of the first ``per_class`` images of each class; ``images`` is ``(N, 1, H, W)`` in [0, 1]."""
    labels = np.asarray(labels)
    fig, axes = figure(len(CLASSES), per_class, figsize=(1.9 * per_class, 2.0 * len(CLASSES)),
                             squeeze=False)
    for r, cls in enumerate(CLASSES):
        idx = np.flatnonzero(labels == r)[:per_class]
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(idx):
                ax.imshow(np.asarray(images[idx[c]])[0], cmap="inferno", vmin=0, vmax=1, origin="lower")
            if c == 0:
                ax.set_ylabel(f"{CLASS_LABELS[cls]}\n({cls})")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, stem)


def _reliability_panel(ax, summary: dict, title: str) -> None:
    """One reliability diagram: the top-label bins the ECE is computed from (accuracy against mean confidence,
    marker area by image count) and each class's one-vs-rest curve, over the diagonal of perfect calibration."""
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfectly calibrated")
    for cls in CLASSES:
        c = summary["reliability"][cls]
        ax.plot(c["predicted"], c["observed"], "-", color=CLASS_COLORS[cls], lw=1.2, alpha=0.8,
                label=f"{CLASS_LABELS[cls]} ({cls}), ECE {summary['classwise_ece'][cls]:.3f}")
    top = summary.get("top_label")
    if top and top["count"]:
        n = np.asarray(top["count"], dtype=float)
        ax.scatter(top["confidence"], top["accuracy"], s=12 + 120 * n / n.max(), color="black", zorder=3,
                   label="top label (bins of the ECE)")
        ax.plot(top["confidence"], top["accuracy"], "-", color="black", lw=1.4, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted probability (mean in bin)")
    ax.set_ylabel("observed frequency")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", frameon=False, fontsize=7)
    ax.grid(alpha=0.3)


@styled
def reliability_diagram(calibration: dict, stem, *, title="Reliability (held-out test)") -> list[Path]:
    """``metrics.json``'s ``calibration`` record drawn: the probabilities as predicted and, when the checkpoint
    holds a fitted temperature, after temperature scaling; the top-label ECE with its 95% interval in each title."""
    panels = [("as predicted", calibration["uncalibrated"])]
    if calibration.get("calibrated") is not None:
        panels.append((f"temperature-scaled (T = {calibration['temperature']:.3g}, fitted on the selection images)",
                       calibration["calibrated"]))
    fig, axes = figure(1, len(panels), figsize=(4.6 * len(panels), 4.8), squeeze=False)
    for ax, (name, summary) in zip(axes[0], panels, strict=True):
        ci = summary.get("ece_ci")
        ece = f"ECE {summary['ece']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        _reliability_panel(ax, summary, f"{name}\n{ece}")
    fig.suptitle(title)
    return save_figure(fig, stem)


METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "integrated_gradients": "integrated gradients"}


def _image_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


@styled
def saliency_panels(image, maps: dict, probabilities, stem, *, title="Saliency") -> list[Path]:
    """One image: the image, then each method's map (its share of the total, in the image's pixels) over it, and
    the predicted probabilities as bars."""
    fig, axes = figure(1, len(maps) + 2, figsize=(2.6 * (len(maps) + 2), 2.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1, origin="lower")
    axes[0].set_title("image", fontsize=9)
    for ax, (method, m) in zip(axes[1:], maps.items(), strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, origin="lower")
        ax.imshow(np.ma.masked_less_equal(m, 0), cmap="inferno", alpha=0.6, origin="lower", vmin=0,
                  vmax=float(m.max()) or 1.0)
        inside = m[m > 0]
        flat = inside.size > 0 and float(inside.std()) <= 1e-9 * float(inside.mean())
        ax.set_title(METHOD_NAMES.get(method, method) + (" (flat)" if flat else ""), fontsize=9)
    for ax in axes[:-1]:
        _image_axes(ax)
    bar = axes[-1]
    bar.barh(range(len(CLASSES)), probabilities, color=[CLASS_COLORS[c] for c in CLASSES])
    bar.set_yticks(range(len(CLASSES)), [CLASS_LABELS[c] for c in CLASSES], fontsize=8)
    bar.set_xlim(0, 1)
    bar.invert_yaxis()
    for i, p in enumerate(probabilities):
        bar.text(min(float(p) + 0.02, 0.75), i, f"{float(p):.2f}", va="center", fontsize=8)
    bar.set_title("probability", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)


@styled
def saliency_examples(shown: dict, stem, *, method: str, radius: float, title="Saliency") -> list[Path]:
    """Rows of classes, columns of images: the map over the image with the true substructure marked (subhalos as
    circles of ``radius`` pixels, a vortex as its line). ``shown``: ``{class: (images, maps, structures)}``."""
    n = max(len(v[0]) for v in shown.values())
    fig, axes = figure(len(shown), n, figsize=(2.2 * n, 2.4 * len(shown)), squeeze=False)
    for r, (cls, (images, maps, structures)) in enumerate(shown.items()):
        for c in range(n):
            ax = axes[r, c]
            _image_axes(ax)
            if c >= len(images):
                ax.set_axis_off()
                continue
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=1, origin="lower")
            ax.imshow(np.ma.masked_less_equal(maps[c], 0), cmap="inferno", alpha=0.6, origin="lower", vmin=0,
                      vmax=float(maps[c].max()) or 1.0)
            kind, points = structures[c]
            if kind == "vortex_end":
                ax.plot(points[:, 0], points[:, 1], "-", color="#56B4E9", lw=1.5)
            else:
                for x, y in points:
                    ax.add_patch(_circle((x, y), radius))
            if c == 0:
                ax.set_ylabel(f"{CLASS_LABELS[cls]}\n({cls})")
    fig.suptitle(f"{title}\n({METHOD_NAMES.get(method, method)})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)


def _circle(xy, radius):
    from matplotlib.patches import Circle

    return Circle(xy, radius, fill=False, color="#56B4E9", lw=0.8)


@styled
def image_rows(rows: list, stem, *, title: str) -> list[Path]:
    """A grid of images with captions: ``rows`` is ``[(row label, [(image (H, W) in [0, 1], caption), ...]), ...]``
    (rows may be shorter than the longest; the rest of the row stays empty)."""
    n = max(1, max((len(items) for _, items in rows), default=1))
    fig, axes = figure(max(1, len(rows)), n, figsize=(2.1 * n, 2.45 * max(1, len(rows))), squeeze=False)
    for r, (label, items) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            _image_axes(ax)
            if c < len(items):
                image, caption = items[c]
                ax.imshow(image, cmap="inferno", vmin=0, vmax=1, origin="lower")
                ax.set_title(caption, fontsize=7)
            else:
                ax.set_axis_off()
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
                ax.set_axis_on()
                _image_axes(ax)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)


# ----------------------------------------------------------------------------------------------- saliency examples
SALIENCY_EXAMPLES = "saliency_examples.npz"
"""What ``explain --evaluation`` keeps of the maps it drew, so that ``report`` redraws the figure without the model."""


def save_saliency_examples(path: Path, shown: dict, *, method: str, radius: float, title: str) -> None:
    """``shown`` (``{class: (images, maps, structures)}``) as arrays: per class its images and maps, and the
    structures' kinds, point counts and concatenated points."""
    from .util import atomic_path

    arrays = {"classes": np.array(list(shown)), "method": np.array(method), "radius": np.array(radius),
              "title": np.array(title)}
    for cls, (images, maps, structures) in shown.items():
        arrays[f"{cls}_images"] = np.asarray(images, dtype=np.float32)
        arrays[f"{cls}_maps"] = np.asarray(maps, dtype=np.float32)
        arrays[f"{cls}_kinds"] = np.array([k for k, _ in structures])
        arrays[f"{cls}_counts"] = np.array([len(p) for _, p in structures], dtype=np.int64)
        arrays[f"{cls}_points"] = np.concatenate([p for _, p in structures]) if structures else np.zeros((0, 2))
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def draw_saliency_examples(path: str | os.PathLike, figures: str | os.PathLike) -> list[Path]:
    """The saliency examples figure (``FIGURES/saliency_examples.png|pdf``) from what :func:`save_saliency_examples`
    kept (``explain --evaluation`` saves it; ``report`` redraws it without the model)."""
    from .util import DeepLenseError

    try:
        with np.load(path, allow_pickle=False) as z:
            shown = {}
            for cls in z["classes"].tolist():
                points = np.split(z[f"{cls}_points"], np.cumsum(z[f"{cls}_counts"])[:-1])
                shown[cls] = (z[f"{cls}_images"], z[f"{cls}_maps"],
                              list(zip(z[f"{cls}_kinds"].tolist(), points, strict=True)))
            method, radius, title = str(z["method"]), float(z["radius"]), str(z["title"])
    except (OSError, ValueError, KeyError) as exc:
        raise DeepLenseError(f"{path}: unreadable or not written by `explain --evaluation` ({exc})") from None
    Path(figures).mkdir(parents=True, exist_ok=True)
    return saliency_examples(shown, Path(figures) / "saliency_examples", method=method, radius=radius,
                                   title=title)
