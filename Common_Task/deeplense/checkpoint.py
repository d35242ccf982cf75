"""Checkpoints as plain data: write them atomically, read them with ``weights_only=True``, rebuild the model.

A checkpoint is a dict of tensors and plain values (``FORMAT``): ``model`` (state dict), ``config`` (the
:class:`~deeplense.config.TrainConfig` as a dict), ``classes``, ``epoch``, ``metrics`` (that epoch's history
record), ``best_metric``, ``best_epoch``, ``weights`` (where the initial weights came from), ``data`` (dataset
root, fingerprints, split sizes), ``versions``, ``device``; ``last.pt`` adds ``optimizer``, ``scheduler`` and
``scaler`` states so a run can resume. Nothing in it is a pickled object, so loading cannot run code.
"""

from __future__ import annotations

import os
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
    except Exception as exc:  # noqa: BLE001
        raise DeepLenseError(f"{path}: not a deeplense checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "classes", "epoch"} <= set(ckpt):
        raise DeepLenseError(f"{path}: not a deeplense checkpoint (expected model, config, classes, epoch)")
    if list(ckpt["classes"]) != list(CLASSES):
        raise DeepLenseError(f"{path}: trained for classes {list(ckpt['classes'])}, this version uses "
                             f"{list(CLASSES)}")
    return ckpt


def config_of(ckpt: dict, path: str | os.PathLike) -> TrainConfig:
    """The training config stored in a checkpoint; an error that names the file if it does not fit."""
    try:
        return TrainConfig.from_dict(dict(ckpt["config"]))
    except (DeepLenseError, TypeError, ValueError) as exc:
        raise DeepLenseError(f"{path}: unusable training config in the checkpoint ({exc})") from None


def model_from_checkpoint(ckpt: dict, device: torch.device):
    """The checkpoint's network on ``device``, in eval mode (``channels_last`` on CUDA)."""
    from .model import build_model

    model, _ = build_model("none")
    model.load_state_dict(ckpt["model"])
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.eval()
