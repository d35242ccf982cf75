"""The networks, with a 3-class head, and the ways to get the torchvision ones' pretrained ImageNet weights.

``arch`` (:data:`ARCHS`): torchvision's ``resnet34`` (the task's network, the default), ``resnet18``,
``resnet50``, ``efficientnet_b0``, ``efficientnet_b3`` and ``convnext_tiny``, which take 3 channels at any size
(224 px for their ImageNet weights); torchvision's transformers ``swin_t`` (any size), ``vit_b_16`` (a multiple of
16 px: the network is built for the run's input side and ImageNet's position embeddings are interpolated to it
with torchvision's ``interpolate_embeddings``) and ``maxvit_t`` (a multiple of 224 px); ``resnet34_attn``, ResNet34
with attention added (:func:`add_attention`: ``se``, ``cbam`` or ``mhsa``) on ImageNet ResNet34 weights, the new
modules initialised so that the network starts as plain ResNet34; and :class:`LensNet`, a small ResNet-style
network trained from scratch on the native single-channel image (150 px, no upsampling). Every network takes its
input in [-1, 1]; the channels it takes are :func:`~deeplense.config.input_channels` (recorded in every checkpoint's
config).

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

from .config import ARCHS, ATTENTIONS, INPUT_MULTIPLE, NATIVE_ARCHS
from .data import CLASSES
from .util import DeepLenseError

TORCHVISION_ARCHS = tuple(a for a in ARCHS if a not in (*NATIVE_ARCHS, "resnet34_attn"))
RESNET34_FILE = "resnet34-b627a593.pth"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise DeepLenseError(f"unknown arch {arch!r} (choose from {', '.join(ARCHS)})")


def _backbone(arch: str) -> str:
    """The torchvision network whose ImageNet weights ``arch`` starts from."""
    return "resnet34" if arch == "resnet34_attn" else arch


def hub_file(arch: str = "resnet34") -> str:
    """The file name of a torchvision network's default ImageNet weights, as the torch hub cache stores it."""
    from torchvision.models import get_model_weights

    return get_model_weights(_backbone(arch)).DEFAULT.url.rsplit("/", 1)[-1]


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


def _torchvision(arch: str, num_classes: int = 1000, image_size: int = 224) -> nn.Module:
    from torchvision.models import get_model

    size = {"vit_b_16": {"image_size": image_size}, "maxvit_t": {"input_size": (image_size, image_size)}}
    return get_model(_backbone(arch), weights=None, num_classes=num_classes, **size.get(arch, {}))


def _imagenet(arch: str, sd: dict, source: str, image_size: int = 224) -> nn.Module:
    model = _torchvision(arch, image_size=image_size)
    if arch == "vit_b_16" and image_size != 224 and "encoder.pos_embedding" in sd:
        from torchvision.models.vision_transformer import interpolate_embeddings

        sd = interpolate_embeddings(image_size, INPUT_MULTIPLE[arch], sd)  # ImageNet's 14 x 14 patches to this input's
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
    """The ImageNet network's last linear layer replaced by a ``num_classes`` one (where each family keeps it)."""
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    elif arch == "swin_t":
        model.head = nn.Linear(model.head.in_features, num_classes)
    elif arch == "vit_b_16":
        model.heads.head = nn.Linear(model.heads.head.in_features, num_classes)
    else:  # efficientnet (Dropout, Linear), convnext (LayerNorm2d, Flatten, Linear), maxvit (..., Tanh, Linear)
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    return model


def build_model(weights: str = "auto", num_classes: int = len(CLASSES), arch: str = "resnet34", *,
                image_size: int = 224, attention: str | None = None) -> tuple[nn.Module, dict]:
    """Build ``arch`` with a ``num_classes`` linear head; ``image_size``: the input side (``vit_b_16`` and
    ``maxvit_t`` are built for it); ``attention``: ``resnet34_attn``'s (default ``se``).

    Returns
    -------
    model : ``torch.nn.Module`` taking ``(B, input_channels(arch), H, W)`` in [-1, 1], returning logits
        ``(B, num_classes)``.
    info : plain dict: ``requested``, ``source`` (``imagenet``, a file path or ``random``), ``pretrained``
        (bool) and ``warning`` (str or None).
    """
    _check_arch(arch)
    info = {"requested": str(weights), "source": "random", "pretrained": False, "warning": None, "arch": arch}
    if arch in NATIVE_ARCHS:  # trained from scratch at the native pixels
        if weights not in ("auto", "none", "random", None):
            raise DeepLenseError(f"--weights {weights}: {arch} trains from scratch (there are no ImageNet weights "
                                 f"for it); use --weights none")
        if arch == "d4net":
            from .equivariant import D4Net

            return D4Net(num_classes), info
        return LensNet(num_classes), info
    if weights in ("imagenet", "auto"):
        cached = hub_checkpoint_path(arch)
        try:
            if cached.is_file():
                # like torchvision, trust the hub cache (it checks the hash only when downloading)
                model = _imagenet(arch, _load_state_dict_file(cached, check_name_hash=False), str(cached),
                                  image_size)
            else:
                model = _imagenet(arch, _download_imagenet(_backbone(arch)), "ImageNet download", image_size)
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
            model = _torchvision(arch, image_size=image_size)
    elif weights in ("none", "random", None):
        model = _torchvision(arch, image_size=image_size)
    else:
        path = Path(weights).expanduser()
        model = _imagenet(arch, _load_state_dict_file(path), str(path), image_size)
        info.update(source=str(path), pretrained=True)
    model = _replace_head(model, arch, num_classes)
    if arch == "resnet34_attn":
        info["attention"] = attention or ATTENTIONS[0]
        model = add_attention(model, info["attention"])
    return model, info


def model_for(config, weights: str | None = None) -> tuple[nn.Module, dict]:
    """:func:`build_model` for a :class:`~deeplense.config.TrainConfig`: its arch, input side and attention
    (``weights``: default the config's)."""
    return build_model(config.weights if weights is None else weights, arch=config.arch,
                       image_size=config.image_size, attention=config.attention)


def describe_weights(weights: str = "auto", arch: str = "resnet34") -> str:
    """Where :func:`build_model` will take its initial weights from, said without loading or downloading them."""
    _check_arch(arch)
    name = f"{arch} with a 3-class head"
    if arch in NATIVE_ARCHS:  # trained from scratch at the native pixels
        from .equivariant import D4Net

        doc = (D4Net if arch == "d4net" else LensNet).__doc__.splitlines()[0].rstrip(".")
        return f"{name} ({doc}); initial weights: random (trained from scratch)"
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


# ------------------------------------------------------------------------------------ attention on ResNet
class _Gate(nn.Module):
    """The gate ``2 sigmoid(z)`` the attention modules below multiply by: exactly 1 while ``z`` is 0, which their
    zero-initialised last layer gives at the start, so the network starts as the ResNet it was added to."""

    def forward(self, z):
        return 2 * torch.sigmoid(z)


class SqueezeExcite(nn.Module):
    """Channel attention (squeeze-and-excitation, reduction 16): the block's output scaled per channel by a gate
    computed from its global average."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels // reduction, 1),
                                nn.ReLU(inplace=True), nn.Conv2d(channels // reduction, channels, 1))
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)
        self.gate = _Gate()

    def forward(self, x):
        return x * self.gate(self.fc(x))


class CBAM(nn.Module):
    """Channel attention from the average- and max-pooled features through one shared MLP, then spatial attention
    from the channel-wise average and maximum through a 7 x 7 convolution (Woo et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels // reduction, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        for layer in (self.mlp[-1], self.spatial):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.gate = _Gate()

    def forward(self, x):
        channel = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        x = x * self.gate(channel)
        return x * self.gate(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over every position of a feature map (BoTNet's idea, on the last stage), with a
    depthwise 3 x 3 convolution as position encoding (any map size), added as a residual whose scale starts at 0."""

    def __init__(self, channels: int, heads: int = 8):
        super().__init__()
        self.position = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm((x + self.position(x)).flatten(2).transpose(1, 2))  # (B, h w, C)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + self.scale * attended.transpose(1, 2).reshape(b, c, h, w)


def add_attention(model: nn.Module, kind: str) -> nn.Module:
    """Add attention to a torchvision ResNet34 in place (its weights kept): ``se`` or ``cbam`` after the second
    batch norm of every basic block (before the residual sum), ``mhsa`` after the last stage. Returns the model,
    which computes exactly what it computed before until training moves the new modules' zero-initialised layers."""
    if kind not in ATTENTIONS:
        raise DeepLenseError(f"unknown attention {kind!r} (choose from {', '.join(ATTENTIONS)})")
    if kind == "mhsa":
        model.layer4 = nn.Sequential(*model.layer4, SelfAttention2d(model.fc.in_features))
        return model
    make = SqueezeExcite if kind == "se" else CBAM
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            block.bn2 = nn.Sequential(block.bn2, make(block.bn2.num_features))
    return model


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
