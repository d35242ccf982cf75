"""ResNet34 with a 3-class head, and the ways to get its pretrained ImageNet weights.

``weights``:

- ``"imagenet"``: torchvision's ``ResNet34_Weights.IMAGENET1K_V1`` through the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/resnet34-b627a593.pth``), downloaded there when online. The cached file
  is read with ``weights_only=True``; torchvision checks its hash only when downloading.
- a path to a ``.pth`` state dict with the ImageNet ResNet34 keys (``weights_only=True``, strict keys;
  a file named ``resnet34-b627a593.pth`` must have a sha256 starting with ``b627a593``).
- ``"none"``: random initialisation.
- ``"auto"``: ImageNet if it can be had, otherwise random initialisation with a loud warning, which the
  run also records in its results.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from .data import CLASSES
from .util import DeepLenseError

RESNET34_FILE = "resnet34-b627a593.pth"


def hub_checkpoint_path() -> Path:
    """Where torchvision looks for the ImageNet ResNet34 weights: ``$TORCH_HOME/hub/checkpoints/...``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET34_FILE


def _load_state_dict_file(path: Path, *, check_name_hash: bool = True) -> dict:
    if not path.is_file():
        raise DeepLenseError(f"{path}: weights file not found")
    if check_name_hash and path.name == RESNET34_FILE:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith("b627a593"):
            raise DeepLenseError(f"{path}: sha256 {digest[:8]}... does not match the name's b627a593 "
                                 f"(a corrupted or different file)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code, truncated files, non-torch files
        raise DeepLenseError(f"{path}: not a loadable state dict ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DeepLenseError(f"{path}: not a state dict of tensors")
    return sd


def _imagenet_resnet34(sd: dict, source: str) -> nn.Module:
    from torchvision.models import resnet34

    model = resnet34(weights=None, num_classes=1000)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise DeepLenseError(f"{source}: not ImageNet ResNet34 weights ({first[:200]})") from None
    return model


def _download_imagenet() -> dict:
    from torchvision.models import ResNet34_Weights

    return ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=True, check_hash=True, weights_only=True)


def build_model(weights: str = "auto", num_classes: int = len(CLASSES)) -> tuple[nn.Module, dict]:
    """Build ResNet34 with ``fc`` replaced by a ``num_classes`` linear head.

    Returns
    -------
    model : ``torch.nn.Module`` taking ``(B, 3, H, W)`` in [-1, 1], returning logits ``(B, num_classes)``.
    info : plain dict: ``requested``, ``source`` (``imagenet``, a file path or ``random``), ``pretrained``
        (bool) and ``warning`` (str or None).
    """
    from torchvision.models import resnet34

    info = {"requested": str(weights), "source": "random", "pretrained": False, "warning": None}
    if weights in ("imagenet", "auto"):
        cached = hub_checkpoint_path()
        try:
            if cached.is_file():
                # like torchvision, trust the hub cache (it checks the hash only when downloading)
                model = _imagenet_resnet34(_load_state_dict_file(cached, check_name_hash=False), str(cached))
            else:
                model = _imagenet_resnet34(_download_imagenet(), "ImageNet download")
            info.update(source="imagenet", pretrained=True)
        except Exception as exc:  # noqa: BLE001 - offline, corrupt cache, ...
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            if weights == "imagenet":
                raise DeepLenseError(
                    f"ImageNet ResNet34 weights unavailable ({reason}).\n"
                    f"Place the file at: {cached}") from None
            info["warning"] = (f"ImageNet weights unavailable ({reason}); training from RANDOM initial weights. "
                               f"Place the file at {cached} to fine-tune from ImageNet.")
            warnings.warn(info["warning"], stacklevel=2)
            model = resnet34(weights=None)
    elif weights in ("none", "random", None):
        model = resnet34(weights=None)
    else:
        path = Path(weights).expanduser()
        model = _imagenet_resnet34(_load_state_dict_file(path), str(path))
        info.update(source=str(path), pretrained=True)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model, info


def describe_weights(weights: str = "auto") -> str:
    """Where :func:`build_model` will take its initial weights from, said without loading or downloading them."""
    if weights in ("none", "random", None):
        return "ResNet34 with a 3-class head; initial weights: random (weights='none')"
    if weights in ("imagenet", "auto"):
        cached = hub_checkpoint_path()
        if cached.is_file():
            return f"ResNet34 with a 3-class head; initial weights: ImageNet, from the torch hub cache ({cached})"
        offline = "training stops with an error" if weights == "imagenet" else "it trains from RANDOM initial weights"
        return (f"ResNet34 with a 3-class head; initial weights: ImageNet, downloaded to {cached} when this machine "
                f"is online; otherwise {offline} (place the file there to fine-tune from ImageNet offline)")
    return f"ResNet34 with a 3-class head; initial weights: the ImageNet state dict at {Path(weights).expanduser()}"
