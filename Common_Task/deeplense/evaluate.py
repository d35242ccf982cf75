"""Evaluate a checkpoint on the held-out test part of ``val`` (or the selection part), and predict files.

``evaluate`` writes ``metrics.json`` and ``predictions.npz`` (``labels`` int64 ``(N,)``,
``probabilities`` float32 ``(N, 3)``); the metrics are computed from exactly those arrays, so every
figure can be redrawn without the model.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .data import CLASSES, _numeric_key, dataset_fingerprint, load_split, read_image, split_holdout
from .metrics import compute_metrics
from .train import TrainConfig, native_crop, predict_proba
from .util import DeepLenseError, atomic_path, pick_device, versions, write_json_atomic


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a deeplense checkpoint with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DeepLenseError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise DeepLenseError(f"{path}: not a deeplense checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "classes", "epoch"} <= set(ckpt):
        raise DeepLenseError(f"{path}: not a deeplense checkpoint (expected model, config, classes, epoch)")
    if list(ckpt["classes"]) != list(CLASSES):
        raise DeepLenseError(f"{path}: trained for classes {list(ckpt['classes'])}, this version uses "
                             f"{list(CLASSES)}")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: torch.device):
    from .model import build_model

    model, _ = build_model("none")
    model.load_state_dict(ckpt["model"])
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def evaluate(checkpoint: str | os.PathLike, data: str | os.PathLike | None, out: str | os.PathLike, *,
             split: str = "test", tta: bool = False, device: str | None = None, n_bootstrap: int = 1000,
             allow_pickle: bool = False, progress: bool = True) -> dict:
    """Evaluate ``checkpoint`` and write ``out/metrics.json`` and ``out/predictions.npz``.

    ``split="test"``: the held-out part of ``val`` (``split_holdout`` with the seed stored in the
    checkpoint); ``split="val"``: the model-selection part.
    """
    if split not in ("test", "val"):
        raise DeepLenseError(f"--split {split}: expected test or val")
    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    config = TrainConfig.from_dict(ckpt["config"])
    data = data or ckpt.get("data", {}).get("root")
    if data is None:
        raise DeepLenseError("evaluate: --data is required (the checkpoint does not name its dataset)")
    images, labels = load_split(data, "val", allow_pickle=allow_pickle, progress=progress)
    sel_idx, test_idx = split_holdout(labels, config.holdout_fraction, seed=config.seed)
    idx = test_idx if split == "test" else sel_idx
    model = model_from_checkpoint(ckpt, dev)
    probs = predict_proba(model, native_crop(images, idx, config.crop), config, dev, tta=tta, progress=progress,
                          desc=f"evaluating {split}")
    y = labels[idx].astype(np.int64)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "predictions.npz", suffix=".npz") as tmp:
        np.savez(tmp, labels=y, probabilities=probs, val_indices=idx.astype(np.int64))
    saved = np.load(out / "predictions.npz")  # compute metrics from exactly the saved arrays
    metrics = compute_metrics(saved["labels"], saved["probabilities"], n_bootstrap=n_bootstrap, seed=config.seed)
    metrics["provenance"] = {
        "split": split, "split_description": ("held-out test part of val" if split == "test"
                                              else "model-selection part of val"),
        "holdout_fraction": config.holdout_fraction, "seed": config.seed, "tta": bool(tta),
        "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_epoch": int(ckpt["epoch"]),
        "recipe": config.recipe, "config": ckpt["config"],
        "data": {"root": str(Path(data).resolve()), "fingerprint": dataset_fingerprint(data)},
        "weights": ckpt.get("weights"), "pretrained": bool((ckpt.get("weights") or {}).get("pretrained")),
        "device": str(dev), "versions": versions(), "trained_with": ckpt.get("versions"),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


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
    config = TrainConfig.from_dict(ckpt["config"])
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
        from .util import write_text_atomic

        write_text_atomic(output, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
    return rows
