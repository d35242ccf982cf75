"""The networks, with a 3-class head, and the ways to get the torchvision ones' pretrained ImageNet weights.

``arch`` (:data:`ARCHS`): torchvision's ``resnet34`` (the task's network, the default), ``resnet18``,
``resnet50``, ``efficientnet_b0`` and ``efficientnet_b3``, which take 3 channels at any size (224 px for their
ImageNet weights), and :class:`LensNet`, a small ResNet-style network trained from scratch on the native
single-channel image (150 px, no upsampling). Every network takes its input in [-1, 1]; the channels it takes
are :func:`~deeplense.config.input_channels` (recorded in every checkpoint's config).

``weights`` (torchvision networks):

- ``"imagenet"``: torchvision's default ImageNet weights through the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/<file>``, e.g. ``resnet34-b627a593.pth``), downloaded there when online. The
  cached file is read with ``weights_only=True``; torchvision checks its hash only when downloading.
- a path to a ``.pth`` state dict with the ImageNet keys of the network (``weights_only=True``, strict keys;
  a file named like torchvision's must have the sha256 prefix its name carries).
- ``"none"``: random initialisation.
- ``"auto"``: ImageNet if it can be had, otherwise random initialisation with a loud warning, which the
  run also records in its results. For ``lensnet`` (no ImageNet weights exist) ``auto`` means random, quietly.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import ARCHS
from .data import CLASSES
from .util import DeepLenseError

TORCHVISION_ARCHS = tuple(a for a in ARCHS if a != "lensnet")
RESNET34_FILE = "resnet34-b627a593.pth"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise DeepLenseError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")


def hub_file(arch: str = "resnet34") -> str:
    """The file name of a torchvision network's default ImageNet weights, as the torch hub cache stores it."""
    from torchvision.models import get_model_weights

    return get_model_weights(arch).DEFAULT.url.rsplit("/", 1)[-1]


def hub_checkpoint_path(arch: str = "resnet34") -> Path:
    """Where torchvision looks for a network's ImageNet weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / hub_file(arch)


def _load_state_dict_file(path: Path, *, check_name_hash: bool = True) -> dict:
    if not path.is_file():
        raise DeepLenseError(f"{path}: weights file not found")
    named = re.search(r"-([0-9a-f]{8,})\.pth$", path.name)
    if check_name_hash and named and any(path.name == hub_file(a) for a in TORCHVISION_ARCHS):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(named.group(1)):
            raise DeepLenseError(f"{path}: sha256 {digest[:8]}... does not match the name's {named.group(1)} "
                                 f"(a corrupted or different file)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code, truncated files, non-torch files
        raise DeepLenseError(f"{path}: not a loadable state dict ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DeepLenseError(f"{path}: not a state dict of tensors")
    return sd


def _torchvision(arch: str, num_classes: int = 1000) -> nn.Module:
    from torchvision.models import get_model

    return get_model(arch, weights=None, num_classes=num_classes)


def _imagenet(arch: str, sd: dict, source: str) -> nn.Module:
    model = _torchvision(arch)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise DeepLenseError(f"{source}: not ImageNet {arch} weights ({first[:200]})") from None
    return model


def _download_imagenet(arch: str = "resnet34") -> dict:
    from torchvision.models import get_model_weights

    return get_model_weights(arch).DEFAULT.get_state_dict(progress=True, check_hash=True, weights_only=True)


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> nn.Module:
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:  # efficientnet: classifier = (Dropout, Linear)
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def build_model(weights: str = "auto", num_classes: int = len(CLASSES), arch: str = "resnet34"
                ) -> tuple[nn.Module, dict]:
    """Build ``arch`` with a ``num_classes`` linear head.

    Returns
    -------
    model : ``torch.nn.Module`` taking ``(B, input_channels(arch), H, W)`` in [-1, 1], returning logits
        ``(B, num_classes)``.
    info : plain dict: ``requested``, ``source`` (``imagenet``, a file path or ``random``), ``pretrained``
        (bool) and ``warning`` (str or None).
    """
    _check_arch(arch)
    info = {"requested": str(weights), "source": "random", "pretrained": False, "warning": None, "arch": arch}
    if arch == "lensnet":
        if weights not in ("auto", "none", "random", None):
            raise DeepLenseError(f"--weights {weights}: lensnet trains from scratch (there are no ImageNet weights "
                                 f"for it); use --weights none")
        return LensNet(num_classes), info
    if weights in ("imagenet", "auto"):
        cached = hub_checkpoint_path(arch)
        try:
            if cached.is_file():
                # like torchvision, trust the hub cache (it checks the hash only when downloading)
                model = _imagenet(arch, _load_state_dict_file(cached, check_name_hash=False), str(cached))
            else:
                model = _imagenet(arch, _download_imagenet(arch), "ImageNet download")
            info.update(source="imagenet", pretrained=True)
        except Exception as exc:  # noqa: BLE001 - offline, corrupt cache, ...
            reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            if weights == "imagenet":
                raise DeepLenseError(
                    f"ImageNet {arch} weights unavailable ({reason}).\n"
                    f"Place the file at: {cached}") from None
            info["warning"] = (f"ImageNet weights unavailable ({reason}); training from RANDOM initial weights. "
                               f"Place the file at {cached} to fine-tune from ImageNet.")
            warnings.warn(info["warning"], stacklevel=2)
            model = _torchvision(arch)
    elif weights in ("none", "random", None):
        model = _torchvision(arch)
    else:
        path = Path(weights).expanduser()
        model = _imagenet(arch, _load_state_dict_file(path), str(path))
        info.update(source=str(path), pretrained=True)
    return _replace_head(model, arch, num_classes), info


def describe_weights(weights: str = "auto", arch: str = "resnet34") -> str:
    """Where :func:`build_model` will take its initial weights from, said without loading or downloading them."""
    _check_arch(arch)
    name = f"{arch} with a 3-class head"
    if arch == "lensnet":
        return f"{name} ({LensNet.__doc__.splitlines()[0].rstrip('.')}); initial weights: random (trained from scratch)"
    if weights in ("none", "random", None):
        return f"{name}; initial weights: random (weights='none')"
    if weights in ("imagenet", "auto"):
        cached = hub_checkpoint_path(arch)
        if cached.is_file():
            return f"{name}; initial weights: ImageNet, from the torch hub cache ({cached})"
        offline = "training stops with an error" if weights == "imagenet" else "it trains from RANDOM initial weights"
        return (f"{name}; initial weights: ImageNet, downloaded to {cached} when this machine is online; otherwise "
                f"{offline} (place the file there to fine-tune from ImageNet offline)")
    return f"{name}; initial weights: the ImageNet state dict at {Path(weights).expanduser()}"


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- LensNet
class _Block(nn.Module):
    """Two 3x3 convolutions with batch norm and SiLU, and a shortcut (a strided 1x1 convolution when the shape
    changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class LensNet(nn.Module):
    """A small ResNet-style network for native single-channel lensing images (2.7 M parameters).

    ``(B, 1, H, W)`` in [-1, 1], any H, W (150 px native) -> logits ``(B, num_classes)``. A strided 3x3 stem
    (32 channels, H/2), three stages of two residual blocks (64, 128, 256 channels, each halving the size), global
    average pooling, dropout 0.2, a linear head. SiLU activations, as in the best clean from-scratch peer
    solution; no upsampling: the network sees the pixels as they are.
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 32):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.SiLU(inplace=True))
        self.stages = nn.Sequential(_Block(w, 2 * w, 2), _Block(2 * w, 2 * w, 1),
                                    _Block(2 * w, 4 * w, 2), _Block(4 * w, 4 * w, 1),
                                    _Block(4 * w, 8 * w, 2), _Block(8 * w, 8 * w, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * w, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))
