"""Checkpoints as plain data: write them atomically, read them with ``weights_only=True``, rebuild the model.

A checkpoint is a dict of tensors and plain values (``FORMAT``): ``model`` (state dict), ``config`` (the
:class:`~deeplense.config.TrainConfig` as a dict), ``classes``, ``epoch``, ``metrics`` (that epoch's history
record), ``best_metric``, ``best_epoch``, ``weights`` (where the initial weights came from), ``data`` (dataset
root, fingerprints, split sizes), ``versions``, ``device``; ``last.pt`` adds ``optimizer``, ``scheduler`` and
``scaler`` states so a run can resume. With ``ema`` on, ``model`` holds the averaged weights (what selection,
evaluation and prediction use) and ``last.pt`` adds ``raw_model`` (the weights training continues from) and
``ema`` (the average's state, with its step count). Nothing in it is a pickled object, so loading cannot run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .config import TrainConfig
from .data import CLASSES
from .util import DeepLenseError, atomic_path

FORMAT = "deeplense-checkpoint-1"


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so a reader never sees half a checkpoint."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a deeplense checkpoint with ``weights_only=True``; a one-line error naming the file for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DeepLenseError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's own message goes on to advise weights_only=False: we do not
        raise DeepLenseError(f"{path}: not a deeplense checkpoint (it holds objects other than tensors and plain "
                             f"data; loading those could run code, so it is refused)") from None
    except Exception as exc:  # noqa: BLE001 - truncated files, other formats
        raise DeepLenseError(f"{path}: not a deeplense checkpoint ({_first_words(exc)})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "classes", "epoch"} <= set(ckpt):
        raise DeepLenseError(f"{path}: not a deeplense checkpoint (expected model, config, classes, epoch)")
    if list(ckpt["classes"]) != list(CLASSES):
        raise DeepLenseError(f"{path}: trained for classes {list(ckpt['classes'])}, this version uses "
                             f"{list(CLASSES)}")
    return ckpt


def _first_words(exc: Exception, limit: int = 160) -> str:
    """The first line of an exception's message, shortened at a word boundary."""
    text = (str(exc).splitlines() or [""])[0]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def config_of(ckpt: dict, path: str | os.PathLike) -> TrainConfig:
    """The training config stored in a checkpoint; an error that names the file if it does not fit."""
    try:
        return TrainConfig.from_dict(dict(ckpt["config"]))
    except (DeepLenseError, TypeError, ValueError) as exc:
        raise DeepLenseError(f"{path}: unusable training config in the checkpoint ({exc})") from None


def model_from_checkpoint(ckpt: dict, device: torch.device, path: str | os.PathLike = "checkpoint"):
    """The checkpoint's network on ``device``, in eval mode (``channels_last`` on CUDA); an error naming ``path``
    when its weights do not fit the network (another head size, missing or extra keys)."""
    from .model import build_model

    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    arch = cfg.get("arch", "resnet34")
    model, _ = build_model("none", arch=arch, image_size=cfg.get("image_size", 224), attention=cfg.get("attention"))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DeepLenseError(f"{path}: its weights do not fit a 3-class {arch} ({_first_words(exc)})") from None
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def checkpoint_payload(model, config: TrainConfig, epoch: int, metrics: dict, best_metric: float, best_epoch: int,
                       stamp: dict) -> dict:
    """What ``best.pt`` holds after ``epoch`` (the schema at the top of this module): the weights, the config, the
    epoch's record, the best selection score so far and its epoch, and ``stamp`` (``classes``, ``weights``, ``data``,
    ``versions``, ``device``)."""
    return {"model": model.state_dict(), "config": config.to_dict(), "epoch": epoch, "metrics": metrics,
            "best_metric": best_metric, "best_epoch": best_epoch, "format": FORMAT, **stamp}


def resumable(payload: dict, optimizer, scheduler, scaler, raw_model=None, ema=None) -> dict:
    """``payload`` plus what a resume needs (``last.pt``): the optimiser, scheduler and gradient-scaler states, and
    with an ``ema`` (torch's ``AveragedModel``) its state and the training weights ``raw_model``."""
    out = {**payload, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
           "scaler": scaler.state_dict()}
    if ema is not None:
        out.update(raw_model=raw_model.state_dict(), ema=ema.state_dict())
    return out


def restore_training_state(ckpt: dict, optimizer, scheduler, scaler) -> tuple[int, float, int]:
    """Load ``last.pt``'s optimiser, scheduler and scaler states into the new objects; return the epoch to start
    from, the best selection score so far and its epoch."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["best_epoch"]
