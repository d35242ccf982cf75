"""Evaluate a checkpoint on the held-out test part of ``val`` (or the selection part), and predict files.

``evaluate`` writes ``metrics.json`` and ``predictions.npz`` (``labels`` int64 ``(N,)``,
``probabilities`` float32 ``(N, 3)``, ``val_indices`` int64 ``(N,)``); the metrics are computed from exactly
those arrays, so every figure can be redrawn without the model.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .calibration import apply_temperature, calibration_summary
from .checkpoint import config_of, load_checkpoint, model_from_checkpoint
from .config import EVAL_SPLITS
from .data import CLASSES, SPLITS, _numeric_key, load_splits, read_image
from .device import pick_device, plan_for
from .engine import predict_proba
from .metrics import compute_metrics
from .splits import ProtocolSplit, check_disjoint, limit_per_class, pixel_digest, split_holdout
from .transforms import native_crop
from .util import DeepLenseError, atomic_path, file_sha256, folder_lock, versions, write_json_atomic, write_text_atomic


def evaluate(checkpoint: str | os.PathLike, data: str | os.PathLike | None, out: str | os.PathLike, *,
             split: str = "test", tta: bool = False, device: str | None = None, n_bootstrap: int = 1000,
             allow_pickle: bool = False, progress: bool = True, allow_changed_data: bool = False,
             precision: str | None = None, eval_batch_size: int | None = None, calibrated: bool = False) -> dict:
    """Evaluate ``checkpoint`` and write ``out/metrics.json`` and ``out/predictions.npz``.

    ``split="test"``: the images the run's protocol held out for the test, as the checkpoint recorded them:
    the held-out part of ``val`` (reference protocol; refused if ``val`` no longer lists the same files) or all
    of ``val`` (clean protocol, which never trains or selects on it). ``split="selection"`` (or ``"val"``): the
    images that chose the checkpoint.

    ``metrics.json`` also holds ``calibration`` (:mod:`deeplense.calibration`): the ECE with its interval, the
    class-wise ECE and the reliability curves of the probabilities as predicted, and, where the checkpoint holds a
    temperature fitted on its selection images, the same after temperature scaling. ``calibrated``: save and score
    the temperature-scaled probabilities (the accuracy is unchanged; the AUCs may move a little).
    """
    if split not in EVAL_SPLITS:
        raise DeepLenseError(f"--split {split}: expected test or selection")
    split = "selection" if split == "val" else split
    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    config = _for_this_run(config_of(ckpt, checkpoint), precision, eval_batch_size)
    plan = plan_for(dev, config.precision)
    recorded = ckpt.get("data") or {}
    data = data or recorded.get("root")
    if data is None:
        raise DeepLenseError("evaluate: --data is required (the checkpoint does not name its dataset)")
    source = "val" if split == "test" else recorded.get("selection_split", "val")
    info: dict = {}
    # the test needs train/ too: to check that val/ shares no file or pixels with it (and, clean: that it is the
    # train/ the run trained on)
    loaded = load_splits(data, SPLITS if split == "test" else (source,), allow_pickle=allow_pickle,
                         progress=progress, info=info)
    images, labels = loaded[source]
    idx, checked, description = _indices(split, source, config, recorded, labels, info[source].listing, data,
                                         checkpoint, allow_changed_data)
    if split == "test":
        verdict = _check_test(checked, config, recorded, loaded, info, images, idx, data, checkpoint,
                              allow_changed_data)
        if verdict.startswith("NOT") and not checked.startswith("NOT"):
            description += ", NOT a checked held-out set"
        checked = verdict
    if len(idx) == 0:
        raise DeepLenseError(f"{data}: the {description} is empty (holdout_fraction {config.holdout_fraction} of "
                             f"{len(labels)} images); nothing to evaluate")
    temperature = fitted_temperature(ckpt, checkpoint, tta, required=calibrated)
    model = model_from_checkpoint(ckpt, dev, checkpoint)
    raw, logp = predict_proba(model, native_crop(images, idx, config.crop), config, plan, tta=tta,
                              progress=progress, desc=f"evaluating {split}", with_log=True)
    probs = apply_temperature(logp, temperature) if calibrated else raw
    out = Path(out)
    # two evaluations into one folder would mix their two files; metrics.json names the hash of the predictions
    # it was computed from, so that report can tell a true pair from a pair left by two evaluations (or a kill)
    with folder_lock(out, "an evaluation"):
        with atomic_path(out / "predictions.npz", suffix=".npz") as tmp:
            np.savez(tmp, labels=labels[idx].astype(np.int64), probabilities=probs, **{f"{source}_indices": idx})
        digest = file_sha256(out / "predictions.npz")
        with np.load(out / "predictions.npz") as saved:  # compute metrics from exactly the saved arrays
            metrics = compute_metrics(saved["labels"], saved["probabilities"], n_bootstrap=n_bootstrap,
                                      seed=config.seed)
        metrics["predictions_sha256"] = digest
        metrics["calibration"] = _calibration(labels[idx], raw, logp, temperature, ckpt, calibrated, n_bootstrap,
                                              config.seed)
        metrics["provenance"] = {
            "split": split, "split_description": description, "protocol": config.protocol, "heldout_check": checked,
            "holdout_fraction": config.holdout_fraction, "seed": config.seed, "tta": bool(tta),
            "calibrated": bool(calibrated),
            "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_epoch": int(ckpt["epoch"]),
            "checkpoint_sha256": file_sha256(checkpoint),
            "recipe": config.recipe, "config": config.to_dict(),
            "data": {"root": str(Path(data).resolve()), "split": source, "fingerprint": info[source].fingerprint,
                     "listing": info[source].listing},
            "weights": ckpt.get("weights"), "pretrained": bool((ckpt.get("weights") or {}).get("pretrained")),
            "device": str(dev), "precision": plan.precision, "versions": versions(),
            "trained_with": ckpt.get("versions"),
        }
        write_json_atomic(out / "metrics.json", metrics)
    return metrics


def fitted_temperature(ckpt: dict, path, tta: bool, *, required: bool) -> float | None:
    """The temperature ``ckpt`` holds for predictions with (``tta``) or without test-time averaging, fitted on its
    selection images when training ended; None when it holds none, or a one-line error when ``required``."""
    t = (ckpt.get("temperature") or {}).get("tta" if tta else "plain")
    if t is None and required:
        raise DeepLenseError(f"{path}: holds no fitted temperature for --calibrated (only a run's best.pt does, from "
                             f"the end of training; a run trained before this version gets one with "
                             f"`python -m deeplense train --resume RUN`)")
    return None if t is None else float(t)


def _calibration(labels, raw, logp, temperature: float | None, ckpt: dict, applied: bool, n_bootstrap: int,
                 seed: int) -> dict:
    """``metrics.json``'s calibration record: the probabilities as predicted (``raw``) and, with a temperature,
    scaled (from their log-probabilities ``logp``)."""
    record = {"temperature": temperature, "applied": applied, "uncalibrated":
              calibration_summary(labels, raw, n_bootstrap=n_bootstrap, seed=seed), "calibrated": None}
    if temperature is not None:
        fit = ckpt["temperature"]
        record["fitted_on"] = f"the {fit['n']} selection images of epoch {fit['epoch']} (never the test)"
        record["calibrated"] = calibration_summary(labels, apply_temperature(logp, temperature),
                                                   n_bootstrap=n_bootstrap, seed=seed)
    return record


def _indices(split: str, source: str, config, recorded: dict, labels: np.ndarray, listing: str, data, checkpoint,
             allow_changed_data: bool = False):
    """``(indices, how they were checked, description)`` of the images of ``source`` (the split whose
    ``labels`` and ``listing`` are given) to evaluate."""
    if split == "test" and config.protocol == "clean":
        return (np.arange(len(labels), dtype=np.int64), "all of val: the clean protocol never trains or selects on it",
                "all of val (clean protocol)")
    description = ("held-out test part of val" if split == "test" else
                   "model-selection part of val" if source == "val" else "model-selection part of train (clean)")
    if "selection_indices" not in recorded:  # checkpoints written before the split was recorded
        sel, test = split_holdout(labels, config.holdout_fraction, seed=config.seed)
        return ((test if split == "test" else sel), "recomputed from the seed (the checkpoint does not record its "
                "split)", description)
    if recorded.get("listings", {}).get(source) != listing:
        if not allow_changed_data:
            raise DeepLenseError(f"{data}: its {source}/ is not the one {checkpoint} was trained with (files added, "
                                 f"removed or renamed), so the images it held out cannot be identified (evaluate "
                                 f"anyway with --allow-changed-data: the result is then not a held-out test)")
        sel, test = split_holdout(labels, config.holdout_fraction, seed=config.seed)
        return ((test if split == "test" else sel), f"NOT CHECKED: {source}/ differs from the one the checkpoint "
                f"was trained with (--allow-changed-data); these images may have been used for selection",
                description + ", NOT a checked held-out set")
    n = len(labels)  # only the split being evaluated is loaded: the other's size does not matter here
    rec = ProtocolSplit.from_record(recorded, n if source == "train" else 0, n if source == "val" else None)
    checked = f"the checkpoint's recorded images; {source} lists the same files as in training"
    if split == "test":
        return rec.test_idx, checked, description
    # the images that chose the checkpoint: with --limit-per-class, only the first N per class did
    return limit_per_class(labels, rec.selection_idx, config.limit_per_class), checked, description


def _check_test(checked: str, config, recorded: dict, loaded: dict, info: dict, images, idx, data, checkpoint,
                allow_changed_data: bool) -> str:
    """What backs the claim that the test images were held out, beyond the recorded listing of ``val``: ``val/``
    shares no file or pixels with ``train/``; under the clean protocol ``train/`` still lists the files the run
    trained on; under the reference protocol the held-out images' pixels match the digest recorded at training
    (or, for checkpoints without one, their files' sizes and times). Refused unless ``allow_changed_data``; then
    the returned description starts with ``NOT CHECKED``."""
    if checked.startswith("NOT"):
        return checked
    problems = []
    try:
        check_disjoint(info["train"], info["val"], loaded["train"][0], loaded["val"][0])
    except DeepLenseError as exc:
        problems.append(str(exc))
    if config.protocol == "clean":
        if recorded.get("listings", {}).get("train") not in (None, info["train"].listing):
            problems.append(f"{data}: its train/ is not the one {checkpoint} was trained with (files added, removed "
                            f"or renamed), so val/ may hold images it trained on")
        checked = (f"{checked}; train/ lists the files it trained on and val/ shares no file or pixels with it"
                   if "listings" in recorded else f"{checked}; val/ shares no file or pixels with train/")
    else:
        digest = recorded.get("heldout_digest")
        modified = recorded.get("split_fingerprints", {}).get("val") not in (None, info["val"].fingerprint)
        if digest is not None and pixel_digest(images, idx) != digest:
            problems.append(f"{data}: files modified since training: the held-out images' pixels differ from those "
                            f"{checkpoint} recorded (files renamed within a class, or rewritten)")
        elif digest is not None:
            checked += ("; their pixels match the recorded digest" +
                        (" (file times differ since training: a copy)" if modified else ""))
        elif modified:
            return ("NOT CHECKED: files modified since training (val/'s file sizes or times differ from those the "
                    "checkpoint recorded, and it records no pixel digest to verify the held-out images)")
        checked += "; val/ shares no file or pixels with train/"
    if problems and not allow_changed_data:
        raise DeepLenseError(f"{problems[0]} (evaluate anyway with --allow-changed-data: the result is then not a "
                             f"held-out test)")
    return f"NOT CHECKED: {problems[0]} (--allow-changed-data)" if problems else checked


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
                  batch_size: int = 64, precision: str | None = None,
                  eval_batch_size: int | None = None, calibrated: bool = False) -> list[dict]:
    """Predict each ``.npy`` file (or every ``.npy`` under each folder); write a CSV
    ``path,predicted,p_no,p_sphere,p_vort`` to ``output`` (or stdout). Returns the rows. ``calibrated``: the
    probabilities scaled by the checkpoint's fitted temperature (:func:`fitted_temperature`)."""
    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    config = _for_this_run(config_of(ckpt, checkpoint), precision, eval_batch_size)
    plan = plan_for(dev, config.precision)
    temperature = fitted_temperature(ckpt, checkpoint, tta, required=calibrated)
    model = model_from_checkpoint(ckpt, dev, checkpoint)
    files = _expand(paths)
    rows, shape = [], None
    for s in range(0, len(files), batch_size):
        chunk = files[s : s + batch_size]
        images = [read_image(f, allow_pickle=allow_pickle) for f in chunk]
        if shape is None:
            shape = images[0].shape
            trained = (ckpt.get("data") or {}).get("image_shape")
            if trained and tuple(trained) != tuple(shape):
                raise DeepLenseError(f"{chunk[0]}: a {shape[0]}x{shape[1]} image, but {checkpoint} was trained on "
                                     f"{trained[0]}x{trained[1]} images")
        odd = next((i for i, im in enumerate(images) if im.shape != shape), None)
        if odd is not None:
            raise DeepLenseError(f"{chunk[odd]}: shape {images[odd].shape} differs from {files[0]}'s {shape}; "
                                 f"predict one image size at a time")
        arr = np.stack(images)[:, None]
        probs, logp = predict_proba(model, native_crop(arr, np.arange(len(arr)), config.crop), config, plan,
                                    tta=tta, with_log=True)
        if calibrated:
            probs = apply_temperature(logp, temperature)
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


def _for_this_run(config, precision: str | None, eval_batch_size: int | None):
    """The checkpoint's config with this command's ``--precision`` and ``--eval-batch-size``, where given."""
    changes = {k: v for k, v in (("precision", precision), ("eval_batch_size", eval_batch_size)) if v is not None}
    return config.replace(**changes) if changes else config


@dataclass(frozen=True)
class EvaluatedSplit:
    """What :func:`evaluated_split` reads of an evaluation folder: its metrics.json, predictions (labels,
    probabilities, the evaluated images' indices into the split) and the split itself, read back from the data."""

    metrics: dict
    labels: np.ndarray
    probabilities: np.ndarray
    indices: np.ndarray
    images: np.ndarray  # the whole split, (N, 1, H, W), as load_splits gives it
    files: list  # the split's files, in the order of ``images``
    root: Path
    split: str


def evaluated_split(run: str | Path, need: str = "its images") -> EvaluatedSplit:
    """The evaluation folder ``run`` (``metrics.json`` and ``predictions.npz`` of ``python -m deeplense evaluate``)
    and the images it scored, read back from the dataset its metrics.json names and checked to be the ones evaluated
    (the predictions' hash as recorded, the same listing, the same labels). ``need`` says in the error what wanted the
    data when it is gone."""
    run = Path(run)
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        data = metrics["provenance"]["data"]
        split = data["split"]
        with np.load(run / "predictions.npz", allow_pickle=False) as z:
            labels, probs, idx = z["labels"], z["probabilities"], z[f"{split}_indices"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeepLenseError(f"{run}: not an evaluation folder (metrics.json and predictions.npz from `python -m "
                             f"deeplense evaluate`): {exc}") from None
    if metrics.get("predictions_sha256") not in (None, file_sha256(run / "predictions.npz")):
        raise DeepLenseError(f"{run / 'predictions.npz'}: not the predictions metrics.json was computed from; "
                             f"evaluate again")
    root = Path(data["root"])
    if not root.is_dir():
        raise DeepLenseError(f"{root}: the data {run} was evaluated on is not here ({need} need it)")
    info: dict = {}
    images, all_labels = load_splits(root, (split,), info=info, progress=False)[split]
    if info[split].listing != data.get("listing") or not np.array_equal(all_labels[idx], labels):
        raise DeepLenseError(f"{root}: its {split}/ no longer lists the images {run} evaluated; evaluate again")
    return EvaluatedSplit(metrics, labels, probs, idx, images, list(info[split].files), root, split)
