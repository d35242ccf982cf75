"""Every setting of a training run in one frozen dataclass, the named recipes, and the notebook's scales.

A :class:`TrainConfig` is made once (from a recipe, the command line or the notebook's parameters cell) and
handed down unchanged; ``config.json`` and every checkpoint store it with :func:`dataclasses.asdict`.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache

from .util import DeepLenseError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""``precision`` choices (what each means on which device: :mod:`deeplense.device`)."""

EVAL_SPLITS = ("test", "selection", "val")
"""What ``evaluate --split`` can report on: the run's held-out test, or the images that selected the checkpoint
(``val`` is their old name)."""

ARCHS = ("resnet34", "resnet18", "resnet50", "efficientnet_b0", "efficientnet_b3", "convnext_tiny", "swin_t",
         "vit_b_16", "maxvit_t", "resnet34_attn", "lensnet", "d4net")
"""The networks (deeplense.model): torchvision's, which take 3 channels (the transformers among them: ``swin_t``,
``vit_b_16``, ``maxvit_t``), ``resnet34_attn`` (ResNet34 with attention added, ``attention``), and the two trained
from scratch on 1 channel at the native pixels: ``lensnet`` and ``d4net`` (exactly invariant to quarter turns and
flips, :mod:`deeplense.equivariant`)."""
NATIVE_ARCHS = ("lensnet", "d4net")
"""Networks that take the native pixels (the crop, or the whole 150 px) in 1 channel, without resizing."""
INVARIANT_ARCHS = ("d4net",)
"""Networks whose output is exactly the same for the 8 flips and quarter turns of the input: test-time averaging
over them cannot change it, so it is skipped (and their training augmentation changes nothing either)."""
NATIVE_CROP = {"d4net": 97}
"""The crop a native network takes at a scale that crops (the scale's crop, e.g. 96, otherwise): ``d4net`` takes an
odd one, whose downsampling grids are those the symmetries keep (either parity is exact; the odd 97 px is the
central ring region the prototype measured on)."""

ATTENTIONS = ("se", "cbam", "mhsa")
"""``resnet34_attn``'s attention: squeeze-and-excitation channel attention in every block (``se``), channel and
spatial attention in every block (``cbam``), or multi-head self-attention over the last stage's feature map, as in
BoTNet (``mhsa``)."""

INPUT_MULTIPLE = {"vit_b_16": 16, "maxvit_t": 224}
"""Networks that take only some input sides: ViT-B/16 a multiple of its 16 px patches (its position embeddings are
interpolated to the side), MaxViT-T a multiple of 224 (its 7 x 7 windows must tile every stage)."""


def input_channels(arch: str) -> int:
    """How many channels the network takes: 1 for ``lensnet`` (the image as it is), 3 for the ImageNet networks
    (the grey image repeated)."""
    return 1 if arch in NATIVE_ARCHS else 3


def at_least(low, unit: str = "", why: str = ""):
    """A field's range (``valid`` of :func:`_setting`): ``low`` or more."""
    return (lambda v: v >= low), f"at least {low}{unit}{why}"


def positive(why: str = ""):
    return (lambda v: v > 0), f"positive{why}"


def between(low, high, text: str):
    """``low <= v < high``, said as ``text`` (``"in [0, 1)"``)."""
    return (lambda v: low <= v < high), text


def _setting(default, help: str, choices: tuple[str, ...] | None = None, valid=None):
    """A :class:`TrainConfig` field: its default, its one-line meaning (what ``train --help`` prints), for the
    settings that take a name the allowed names, and for numbers their range ``valid`` (:func:`at_least`,
    :func:`positive`, :func:`between`): checked by :func:`check_fields` wherever a config is made (the command
    line, the notebook, the study), the one place of every range."""
    return field(default=default, metadata={"help": help, "choices": choices, "valid": valid})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Saved in ``config.json`` and in every checkpoint.

    Each field's meaning is in its metadata (``help``; ``choices`` for named settings): the one description that
    ``python -m deeplense train --help`` and the checks in ``__post_init__`` are built from (:func:`settings`).
    The input geometry a config implies is recorded beside it (``to_dict``: ``input_channels``, ``input_range``),
    so a checkpoint says how to feed its network.
    """

    recipe: str = _setting("default", "name of the recipe (RECIPES) the values started from: a label, not checked")
    arch: str = _setting("resnet34", "the network: resnet34 (the task's), another torchvision ImageNet network (the "
                         "transformers swin_t, vit_b_16 with 16 px patches, maxvit_t at 224 px), resnet34_attn "
                         "(ResNet34 with --attention), lensnet (2.7 M parameters, from scratch, 1 channel at the "
                         "native 150 px or the crop) or d4net (0.35 M parameters, from scratch, 1 channel, exactly "
                         "invariant to the 8 flips and quarter turns)", ARCHS)
    attention: str | None = _setting(None, "resnet34_attn's attention: se (channel attention in every block), cbam "
                                     "(channel and spatial attention in every block) or mhsa (self-attention over the "
                                     "last stage, as BoTNet); each starts as plain ResNet34 (default for "
                                     "resnet34_attn: se)", ATTENTIONS)
    epochs: int = _setting(20, "training length in epochs", valid=at_least(1))
    batch_size: int = _setting(64, "images per training step (per process under torchrun)",
                               valid=at_least(2, why=" (BatchNorm cannot train on one image)"))
    optimizer: str = _setting("adamw", "the optimizer", ("adamw", "sgd"))
    lr: float = _setting(1e-3, "peak learning rate", valid=positive())
    momentum: float = _setting(0.9, "SGD momentum (sgd only)", valid=between(0, 1, "in [0, 1)"))
    weight_decay: float = _setting(0.05, "weight decay", valid=at_least(0))
    schedule: str = _setting("cosine", "learning-rate schedule: cosine (linear warm-up over warmup_epochs, then cosine "
                             "to zero, per step), onecycle (up to lr over the first 30% of the steps, then cosine "
                             "down to lr/1e4, per step) or step (multiply by gamma every step_size epochs)",
                             ("cosine", "onecycle", "step"))
    label_smoothing: float = _setting(0.0, "cross-entropy label smoothing in training (0: none)",
                                      valid=between(0, 1, "in [0, 1)"))
    warmup_epochs: float = _setting(1.0, "linear warm-up length of the cosine schedule, in epochs", valid=at_least(0))
    step_size: int = _setting(7, "epochs between learning-rate drops of the step schedule", valid=at_least(1))
    gamma: float = _setting(0.1, "learning-rate factor at each drop of the step schedule", valid=positive())
    augmentation: str = _setting("d4", "training augmentation: d4 (one of the 8 exact flips and quarter turns per "
                                 "image), d2 (one of the 4 that keep the x axis: identity, both flips, the half turn; "
                                 "TTA then averages over those 4), hflip (the reference's horizontal flip of half the "
                                 "images) or none", ("d4", "d2", "hflip", "none"))
    image_size: int = _setting(224, "model input side in pixels; images are resized (bilinear) to it (lensnet: the "
                               "native size or the crop, no resizing)",
                               valid=between(16, 1025, "between 16 and 1024 px (the images are 150 px)"))
    resize_then_crop: int | None = _setting(None, "resize to this side first, then keep the central image_size "
                                            "(the reference: 256); none: no such step", valid=at_least(16, " px"))
    crop: int | None = _setting(None, "keep the central CROP native pixels before resizing (the ring region), e.g. "
                                "96; none: the whole image", valid=at_least(16, " px"))
    select_metric: str = _setting("macro_auc", "validation metric that chooses best.pt", ("macro_auc", "accuracy"))
    weights: str = _setting("auto", "initial weights: auto (ImageNet if in the torch hub cache, else random, with "
                            "a warning), imagenet, none, or a path to a .pth state dict")
    seed: int = _setting(0, "one seed for the split, initialisation, shuffling and augmentation",
                         valid=between(0, 2**31, "0 or more and below 2**31"))
    limit_per_class: int | None = _setting(None, "use at most this many images per class of train and of the "
                                           "selection set; none: all", valid=at_least(1))
    protocol: str = _setting("reference", "reference: select on val minus a held-out part, report on that part; "
                             "clean: select on a held-out part of train, train on the rest, report on all of val "
                             "(which training and selection never see)", ("reference", "clean"))
    holdout_fraction: float = _setting(0.1, "the held-out part per class: of val for the test (reference), of train "
                                       "for selection (clean)", valid=between(1e-300, 1, "between 0 and 1"))
    eval_batch_size: int | None = _setting(None, "batch size of validation and prediction (none: 128 on a CPU; on "
                                           "a GPU the largest power of 2 up to 1024 that fits beside the data, "
                                           "halved once on an out-of-memory error)", valid=at_least(1))
    clip_grad: float | None = _setting(None, "clip the gradients' global norm to this before each step (none: no "
                                       "clipping)", valid=positive())
    ema: float | None = _setting(None, "keep an exponential moving average of the weights, this decay per step (e.g. "
                                 "0.999); selection, best.pt, evaluation and prediction use the averaged weights "
                                 "(none: off)", valid=between(1e-300, 1, "a decay between 0 and 1"))
    patience: int | None = _setting(None, "stop after this many epochs without a better selection score (none: "
                                    "train every epoch)", valid=at_least(1))
    bn_recalibration: int | None = _setting(None, "before each validation, recompute BatchNorm's running statistics "
                                            "from this many training images (not augmented, a fixed draw of the "
                                            "seed) with the current weights, as a cumulative average (precise "
                                            "BatchNorm); it changes what is evaluated and saved, never the training "
                                            "itself (none: off; networks without BatchNorm: nothing to do)",
                                            valid=at_least(2, " images"))
    precision: str = _setting("auto", "auto (bf16 autocast on CUDA GPUs with native bf16, fp16 with a gradient "
                              "scaler on older ones; bf16 on CPUs with native bf16, AVX512-BF16 or AMX; fp32 on MPS "
                              "and other CPUs), fp32, bf16 or fp16; what auto became is recorded in config.json "
                              "(execution.precision)", PRECISIONS)

    def __post_init__(self):
        check_fields(self, "training config")  # cast every value to its field's type; named settings checked
        if self.arch == "resnet34_attn" and self.attention is None:
            object.__setattr__(self, "attention", ATTENTIONS[0])
        multiple = INPUT_MULTIPLE.get(self.arch)
        checks = [
            (self.attention is None or self.arch == "resnet34_attn", "attention applies to arch resnet34_attn only"),
            (multiple is None or self.image_size % multiple == 0,
             f"{self.arch} takes an image_size that is a multiple of {multiple} px (not {self.image_size})"),
            (self.arch not in NATIVE_ARCHS or (self.resize_then_crop is None and self.image_size == (self.crop or 150)),
             f"{self.arch} takes the native pixels: image_size must equal the crop (or 150) and resize_then_crop "
             f"none"),
            (self.resize_then_crop is None or self.resize_then_crop >= self.image_size,
             f"resize_then_crop ({self.resize_then_crop}) must be at least image_size ({self.image_size}): the "
             f"centre image_size px are kept of it"),
        ]  # each field's own range is in its metadata (``valid``), checked by check_fields above
        for ok, msg in checks:
            if not ok:
                raise DeepLenseError(f"training config: {msg}")

    def replace(self, **changes) -> TrainConfig:
        """A copy with ``changes`` applied. Each value is cast to its field's type (``"64"`` -> 64); ``None``
        or ``"none"`` sets a field that may be None (``crop``, ``resize_then_crop``, ``limit_per_class``)."""
        unknown = sorted(set(changes) - set(field_types(TrainConfig)))
        if unknown:
            raise DeepLenseError(f"training config: unknown setting(s) {', '.join(unknown)}")
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config stored in ``config.json`` or a checkpoint (keys this version does not know are ignored)."""
        names = field_types(cls)
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def in_channels(self) -> int:
        return input_channels(self.arch)

    def to_dict(self) -> dict:
        """The fields, plus the input geometry they imply (read back by nothing: it documents the checkpoint)."""
        return {**asdict(self), "input_channels": self.in_channels, "input_range": "[-1, 1]"}

    def describe(self) -> str:
        """The recipe in one paragraph of prose (for the notebook and reports), read from the values."""
        opt = (f"AdamW (learning rate {self.lr:g}, weight decay {self.weight_decay:g})" if self.optimizer == "adamw"
               else f"SGD (learning rate {self.lr:g}, momentum {self.momentum:g}, weight decay {self.weight_decay:g})")
        sched = {"cosine": f"a linear warm-up over {self.warmup_epochs:g} epoch(s), then cosine decay to zero, "
                           f"per step",
                 "onecycle": "a one-cycle schedule (up over the first 30% of the steps, then cosine down), per step",
                 "step": f"the learning rate multiplied by {self.gamma:g} every {self.step_size} epochs"}[self.schedule]
        if self.label_smoothing:
            sched += f"; label smoothing {self.label_smoothing:g}"
        if self.clip_grad:
            sched += f"; gradients clipped to norm {self.clip_grad:g}"
        if self.ema:
            sched += f"; an exponential moving average of the weights (decay {self.ema:g} per step) selected and used"
        if self.patience:
            sched += f"; stopping after {self.patience} epoch(s) without a better selection score"
        if self.bn_recalibration:
            sched += (f"; BatchNorm's running statistics recomputed on {self.bn_recalibration} training images before "
                      f"each validation")
        aug = {"d4": "one of the 8 exact flips and quarter turns (D4) drawn per image",
               "d2": "one of the 4 symmetries that keep the x axis (D2: identity, both flips, the half turn) drawn "
                     "per image",
               "hflip": "a horizontal flip of half the images", "none": "no augmentation"}[self.augmentation]
        if self.arch in NATIVE_ARCHS:
            geometry = (f"the central {self.crop} px of each image" if self.crop else "each whole image") + \
                ", as it is (native pixels)"
        elif self.crop:
            geometry = f"the central {self.crop} px of each image, resized to {self.image_size} px"
        elif self.resize_then_crop:
            geometry = f"each image resized to {self.resize_then_crop} px, centre {self.image_size} px kept"
        else:
            geometry = f"each whole image resized to {self.image_size} px"
        metric = "macro AUC" if self.select_metric == "macro_auc" else "accuracy"
        held = f"{self.holdout_fraction:.0%}"
        protocol = (f"selection on `val` minus a held-out {held} per class, the test on that {held}"
                    if self.protocol == "reference" else
                    f"selection on a held-out {held} of `train` (training on the rest), the test on all of `val`")
        return (f"Recipe `{self.recipe}` on `{self.arch}`: {self.epochs} epochs of batch {self.batch_size} with {opt}, "
                f"{sched}; "
                f"training augmentation: {aug}; input: {geometry}, {self.in_channels} channel(s) in [-1, 1]; the "
                f"checkpoint kept is "
                f"the epoch with the best selection {metric}; {self.protocol} protocol ({protocol}); "
                f"seed {self.seed}.")


@cache
def field_types(cls) -> dict[str, tuple[object, bool]]:
    """``{name: (type, may_be_none)}`` for every field of the dataclass ``cls`` (:class:`TrainConfig`,
    :class:`~deeplense.simulate.SimulationConfig`, :class:`~deeplense.notebook.RunSpec`)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        args = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is not tuple else ()
        base = next((a for a in args if a is not type(None)), None) if args else hints[f.name]
        out[f.name] = (base, type(None) in args)
    return out


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _cast_to(base, value):
    """``value`` as ``base`` (int, float, str, bool or ``tuple[T, ...]``), or ValueError."""
    if typing.get_origin(base) is tuple:
        items = value.split(",") if isinstance(value, str) else value
        kinds = typing.get_args(base)
        if not isinstance(items, (list, tuple)) or len(items) != len(kinds):
            raise ValueError
        return tuple(_cast_to(k, v) for k, v in zip(kinds, items, strict=True))
    if base is bool and not isinstance(value, bool):
        word = str(value).strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError
        return word in _TRUE
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    if base is int and isinstance(value, float) and not value.is_integer():
        raise ValueError
    return base(value)


def cast(name: str, value, cls=None, label: str = "training config"):
    """``value`` as field ``name``'s type in ``cls`` (default :class:`TrainConfig`): strings from the command line
    or the environment are parsed (``"64"``, ``"none"``, ``"true"``, ``"0.1,0.2"`` for a pair)."""
    base, optional = field_types(cls or TrainConfig)[name]
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise DeepLenseError(f"{label}: {name} cannot be none")
    try:
        return _cast_to(base, value)
    except (TypeError, ValueError):
        kind = getattr(base, "__name__", None) if typing.get_origin(base) is not tuple else None
        what = {"bool": "true or false"}.get(kind, kind and f"a valid {kind}") or \
            f"a pair of {typing.get_args(base)[0].__name__}s"
        raise DeepLenseError(f"{label}: {name}={value!r} is not {what}") from None


def check_fields(obj, label: str) -> None:
    """Cast every field of the frozen dataclass ``obj`` to its type (values from a constructor call, a JSON file or
    the environment are treated alike), refuse a number that is not finite (``nan``, ``inf``: strict JSON cannot
    even store them), and check the named ones against their ``choices`` metadata and the numbers against their
    range (``valid``): the one way :class:`TrainConfig`, ``SimulationConfig`` and ``RunSpec`` are validated."""
    import math

    types = field_types(type(obj))
    for f in fields(obj):
        value = cast(f.name, getattr(obj, f.name), type(obj), label)
        object.__setattr__(obj, f.name, value)
        if value is None:
            continue
        allowed, valid = f.metadata.get("choices"), f.metadata.get("valid")
        if allowed and value not in allowed:
            raise DeepLenseError(f"{label}: {f.name} must be one of {', '.join(allowed)}")
        if types[f.name][0] is float and not math.isfinite(value):
            raise DeepLenseError(f"{label}: {f.name}={value!r} is not a finite number")
        if valid and not valid[0](value):
            raise DeepLenseError(f"{label}: {f.name} must be {valid[1]}" + (" (or none)" if types[f.name][1] else ""))


@cache
def choices() -> dict[str, tuple[str, ...]]:
    """``{field: allowed names}`` for every named setting of :class:`TrainConfig` (from the fields' metadata)."""
    return {f.name: f.metadata["choices"] for f in fields(TrainConfig) if f.metadata.get("choices")}


def settings() -> list[tuple[str, type, bool, str, tuple[str, ...] | None]]:
    """``(name, type, may_be_none, help, choices)`` of every field, in order: what the command line is built from."""
    types = field_types(TrainConfig)
    return [(f.name, *types[f.name], f.metadata["help"], f.metadata.get("choices")) for f in fields(TrainConfig)]


RECIPES: dict[str, TrainConfig] = {
    # The reference solution's choices, minus its bugs (eval mode, seeded split, map_location, ...).
    "reference": TrainConfig(recipe="reference", epochs=20, batch_size=256, optimizer="sgd", lr=1e-4, momentum=0.9,
                             weight_decay=0.0, schedule="step", warmup_epochs=0.0, step_size=7, gamma=0.1,
                             augmentation="hflip", image_size=224, resize_then_crop=256,
                             select_metric="accuracy"),
    # Ours: AdamW with warm-up and cosine decay, exact D4 augmentation, selection by macro AUC, BatchNorm's running
    # statistics recomputed before each validation (without it the selection loss jumps in the early epochs, while
    # the weights move fast: experiments/early_instability.py, docs/studies.md)
    "default": TrainConfig(recipe="default", epochs=20, batch_size=64, optimizer="adamw", lr=1e-3,
                           weight_decay=0.05, schedule="cosine", warmup_epochs=1.0, augmentation="d4",
                           image_size=224, select_metric="macro_auc", bn_recalibration=1024),
    # The demo's: the D4-invariant network (deeplense.equivariant) from scratch on the central 97 native px, with
    # the one-cycle schedule to 2e-3 it was first measured with (val macro AUC 0.958 after 15 epochs on 3,000
    # realistic images: ../shared/context/learning-from-little.md); D4 augmentation changes nothing for an
    # invariant network (tests/test_equivariant.py: no loss or gradient moves) and costs little
    "d4net": TrainConfig(recipe="d4net", arch="d4net", epochs=15, batch_size=32, optimizer="adamw", lr=2e-3,
                         weight_decay=0.05, schedule="onecycle", augmentation="d4", image_size=97, crop=97,
                         select_metric="macro_auc", bn_recalibration=1024),
}


def recipe(name: str, scale: str | None = None, **overrides) -> TrainConfig:
    """A named recipe, at a named scale (:data:`SCALES`: its epochs, input and batch) if given, with some fields
    overridden; every given value is applied (``None`` included).

    The one place of the native networks' rule (:data:`NATIVE_ARCHS`): their input is the native pixels, so unless
    ``image_size`` is given here, it is the crop (or 150) and there is no ``resize_then_crop``; a scale's
    ``image_size`` does not apply, and a scale's crop becomes the network's own (:data:`NATIVE_CROP`). A scale's
    ``arch`` (the demo's) applies unless ``arch`` is given.
    """
    if name not in RECIPES:
        raise DeepLenseError(f"unknown recipe {name!r} (choose from {', '.join(RECIPES)})")
    if scale is not None and scale not in SCALES:
        raise DeepLenseError(f"unknown scale {scale!r} (choose from {', '.join(SCALES)})")
    base = RECIPES[name]
    scaled = SCALES[scale].training() if scale else {}
    arch = overrides.get("arch", scaled.get("arch", base.arch))
    if arch in NATIVE_ARCHS and "image_size" not in overrides:  # its input follows the arch
        crop = cast("crop", overrides.get("crop", scaled.get("crop", base.crop)))
        if "crop" not in overrides and crop is not None:
            crop = NATIVE_CROP.get(arch, crop)
        scaled = {**scaled, "crop": crop, "image_size": crop or 150, "resize_then_crop": None}
    return base.replace(**{**scaled, **overrides})


@dataclass(frozen=True)
class Scale:
    """How much a run trains on and how long: the recipe's epochs, input and batch, the recipe the notebook starts
    from at this scale, and the size of the simulated set made when no dataset is given."""

    name: str
    epochs: int
    image_size: int
    crop: int | None
    batch_size: int
    sim_train_per_class: int
    sim_val_per_class: int
    recipe: str = "default"

    def training(self) -> dict:
        """The :class:`TrainConfig` fields this scale sets."""
        return {"epochs": self.epochs, "image_size": self.image_size, "crop": self.crop,
                "batch_size": self.batch_size}


SCALES = {
    # the official set's size and the recipe's own input (224 px), the task's ImageNet ResNet34; for a GPU
    "full": Scale("full", epochs=20, image_size=224, crop=None, batch_size=64, sim_train_per_class=10_000,
                  sim_val_per_class=2_500),
    # 2-core CPU, random initial weights, the network that learns from a few thousand images there: d4net on the
    # central 97 native px (a ResNet at this scale: the central 96 px shrunk to 64 px), 15 epochs: about 9 minutes
    # with the simulation on 2 cores under bf16 (fp32, on CPUs without native bf16, takes about 1.6x as long)
    "demo": Scale("demo", epochs=15, image_size=64, crop=96, batch_size=32, sim_train_per_class=1_000,
                  sim_val_per_class=500, recipe="d4net"),
    # the accuracy studies' and the benchmarks' (the demo scale before d4net): the central 96 px shrunk to 64 px,
    # 5 epochs of the default recipe (ResNet34)
    "quick": Scale("quick", epochs=5, image_size=64, crop=96, batch_size=32, sim_train_per_class=1_000,
                   sim_val_per_class=500),
    # the test suite's: seconds, not meaningful numbers; the demo's recipe, so that the notebook shows the same
    "tiny": Scale("tiny", epochs=1, image_size=32, crop=96, batch_size=8, sim_train_per_class=4,
                  sim_val_per_class=20, recipe="d4net"),
}
