"""Evaluate a checkpoint on the held-out test part of ``val`` (or the selection part), and predict files.

``evaluate`` writes ``metrics.json`` and ``predictions.npz`` (``labels`` int64 ``(N,)``,
``probabilities`` float32 ``(N, 3)``, ``val_indices`` int64 ``(N,)``); the metrics are computed from exactly
those arrays, so every figure can be redrawn without the model.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

import numpy as np

from .checkpoint import config_of, load_checkpoint, model_from_checkpoint
from .data import CLASSES, _numeric_key, holdout_from_test, load_splits, native_crop, read_image, split_holdout
from .engine import predict_proba
from .metrics import compute_metrics
from .util import DeepLenseError, atomic_path, pick_device, versions, write_json_atomic, write_text_atomic

SPLIT_NAMES = {"test": "held-out test part of val", "selection": "model-selection part of val"}


def evaluate(checkpoint: str | os.PathLike, data: str | os.PathLike | None, out: str | os.PathLike, *,
             split: str = "test", tta: bool = False, device: str | None = None, n_bootstrap: int = 1000,
             allow_pickle: bool = False, progress: bool = True) -> dict:
    """Evaluate ``checkpoint`` and write ``out/metrics.json`` and ``out/predictions.npz``.

    ``split="test"``: the held-out part of ``val``, the indices the checkpoint recorded (after checking that
    ``val`` still lists the same files; checkpoints without them: ``split_holdout`` with the stored seed);
    ``split="selection"`` (or ``"val"``): the rest of ``val``, the part that chose the checkpoint.
    """
    split = "selection" if split == "val" else split
    if split not in SPLIT_NAMES:
        raise DeepLenseError(f"--split {split}: expected test or selection")
    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    config = config_of(ckpt, checkpoint)
    data = data or ckpt.get("data", {}).get("root")
    if data is None:
        raise DeepLenseError("evaluate: --data is required (the checkpoint does not name its dataset)")
    info: dict = {}
    images, labels = load_splits(data, ("val",), allow_pickle=allow_pickle, progress=progress, info=info)["val"]
    sel_idx, test_idx, checked = _holdout(ckpt, checkpoint, data, labels, info["val"].listing, config)
    idx = test_idx if split == "test" else sel_idx
    model = model_from_checkpoint(ckpt, dev)
    probs = predict_proba(model, native_crop(images, idx, config.crop), config, dev, tta=tta, progress=progress,
                          desc=f"evaluating {split}")
    out = Path(out)
    with atomic_path(out / "predictions.npz", suffix=".npz") as tmp:
        np.savez(tmp, labels=labels[idx].astype(np.int64), probabilities=probs, val_indices=idx.astype(np.int64))
    with np.load(out / "predictions.npz") as saved:  # compute metrics from exactly the saved arrays
        metrics = compute_metrics(saved["labels"], saved["probabilities"], n_bootstrap=n_bootstrap, seed=config.seed)
    metrics["provenance"] = {
        "split": split, "split_description": SPLIT_NAMES[split],
        "holdout_fraction": config.holdout_fraction, "seed": config.seed, "tta": bool(tta),
        "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_epoch": int(ckpt["epoch"]),
        "recipe": config.recipe, "config": config.to_dict(),
        "heldout_check": checked,
        "data": {"root": str(Path(data).resolve()), "val_fingerprint": info["val"].fingerprint,
                 "val_listing": info["val"].listing},
        "weights": ckpt.get("weights"), "pretrained": bool((ckpt.get("weights") or {}).get("pretrained")),
        "device": str(dev), "versions": versions(), "trained_with": ckpt.get("versions"),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def _holdout(ckpt: dict, checkpoint, data, labels: np.ndarray, listing: str, config):
    """``(selection_idx, test_idx, how_checked)`` for the ``val`` split at ``data``."""
    stored = (ckpt.get("data") or {}).get("heldout_test_indices")
    if stored is None:  # checkpoints written before the indices were recorded
        sel, test = split_holdout(labels, config.holdout_fraction, seed=config.seed)
        return sel, test, "recomputed from the seed (the checkpoint does not record its held-out images)"
    if ckpt["data"].get("val_listing") != listing:
        raise DeepLenseError(f"{data}: its val/ is not the one {checkpoint} was trained with (files added, removed "
                             f"or renamed), so its held-out test images cannot be identified")
    sel, test = holdout_from_test(stored, len(labels))
    return sel, test, "the checkpoint's recorded held-out images; val lists the same files as in training"


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in p.rglob("*.npy") if not f.name.startswith("._") and "__MACOSX" not in f.parts]
            files.extend(sorted(found, key=lambda f: (str(f.parent), _numeric_key(f))))
        elif p.is_file():
            files.append(p)
        else:
            raise DeepLenseError(f"{p}: no such file or folder")
    if not files:
        raise DeepLenseError(f"{', '.join(paths)}: no .npy files found")
    return files


def predict_files(checkpoint: str | os.PathLike, paths: list[str], output: str | os.PathLike | None = None, *,
                  tta: bool = False, device: str | None = None, allow_pickle: bool = False,
                  batch_size: int = 64) -> list[dict]:
    """Predict each ``.npy`` file (or every ``.npy`` under each folder); write a CSV
    ``path,predicted,p_no,p_sphere,p_vort`` to ``output`` (or stdout). Returns the rows."""
    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    config = config_of(ckpt, checkpoint)
    model = model_from_checkpoint(ckpt, dev)
    files = _expand(paths)
    rows = []
    for s in range(0, len(files), batch_size):
        chunk = files[s : s + batch_size]
        arr = np.stack([read_image(f, allow_pickle=allow_pickle)[None] for f in chunk])
        probs = predict_proba(model, native_crop(arr, np.arange(len(arr)), config.crop), config, dev, tta=tta)
        for f, p in zip(chunk, probs, strict=True):
            rows.append({"path": str(f), "predicted": CLASSES[int(p.argmax())],
                         **{f"p_{c}": f"{float(v):.6f}" for c, v in zip(CLASSES, p, strict=True)}})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "predicted", *[f"p_{c}" for c in CLASSES]], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    if output:
        write_text_atomic(output, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
    return rows
