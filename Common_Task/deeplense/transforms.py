"""The model's input: the native-pixel crop, resizing to the input size, [-1, 1], the channels an arch takes, and
the exact D4 augmentation (flips and quarter turns) with its test-time counterpart's building block."""

from __future__ import annotations

import numpy as np

from .util import DeepLenseError


def native_crop(images: np.ndarray, idx: np.ndarray, crop: int | None):
    """Gather ``images[idx]`` into a contiguous float32 tensor ``(n, 1, h, w)``, centre-cropped to ``crop``.

    The crop commutes with the D4 augmentation (it is centred and square), so it is done once here, on the
    native pixels, before any resizing.
    """
    import torch

    if crop is not None and crop > images.shape[-1]:
        raise DeepLenseError(f"--crop {crop}: larger than the {images.shape[-2]}x{images.shape[-1]} px images")
    idx = np.asarray(idx)
    order = np.argsort(idx, kind="stable")  # memory-mapped reads in file order
    x = np.empty((len(idx), *images.shape[1:]), dtype=np.float32)
    x[order] = images[idx[order]]
    if crop is not None and crop < x.shape[-1]:
        o = (x.shape[-1] - crop) // 2
        x = np.ascontiguousarray(x[..., o : o + crop, o : o + crop])
    return torch.from_numpy(x)


def preprocess(x, image_size: int = 224, *, resize_then_crop: int | None = None, channels: int = 3):
    """Turn a batch of (already cropped) images into model input, on whatever device ``x`` lives.

    Parameters
    ----------
    x : float tensor ``(B, 1, H, W)`` in [0, 1]
    image_size : side of the output in pixels.
    resize_then_crop : if given, resize to this side and then crop the central ``image_size`` (the
        reference solution's Resize(256) + CenterCrop(224)).
    channels : 3 replicates the grey image (the ImageNet stem), 1 keeps it (a folded stem).

    Returns
    -------
    float tensor ``(B, channels, image_size, image_size)`` in [-1, 1].
    """
    import torch.nn.functional as F

    side = resize_then_crop or image_size
    fresh = False  # whether x is a new tensor we may modify in place (saves a 6 MB allocation per batch)
    if x.shape[-1] != side or x.shape[-2] != side:
        fresh = True
        # Antialiasing matters only when shrinking; when enlarging it gives the same pixels (to 1e-5),
        # three times slower.
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=side < x.shape[-1],
                          align_corners=False)
    if resize_then_crop:
        o = (side - image_size) // 2
        x = x[..., o : o + image_size, o : o + image_size]
    x = x.mul_(2.0).sub_(1.0) if fresh else x.mul(2.0).sub_(1.0)
    return x.expand(-1, channels, -1, -1) if channels != x.shape[1] else x


def input_fn(config):
    """A run's model-input transform (``config``: a :class:`~deeplense.config.TrainConfig`):
    ``(B, 1, h, w)`` in [0, 1], already cropped by :func:`native_crop` -> ``(B, C, S, S)`` in [-1, 1] with the
    arch's channels (3 for the ImageNet networks, 1 for ``lensnet``, which also takes ``h`` as it is)."""

    def fn(x):
        return preprocess(x, config.image_size, resize_then_crop=config.resize_then_crop,
                          channels=config.in_channels)

    return fn


def d4_transform(x, k: int):
    """Apply element ``k`` (0..7) of the dihedral group D4 to the last two axes of ``x``.

    ``k % 4`` quarter turns, preceded by a horizontal flip when ``k >= 4``. Exact: pixels are permuted.
    """
    import torch

    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


D2_ELEMENTS = (0, 2, 4, 6)
"""The elements of D4 (:func:`d4_transform`) that keep the x axis: identity, the half turn, the horizontal flip
and the vertical flip (a horizontal flip and a half turn). The real images' lens and shear lie along x, so their
distribution is symmetric under these 4, not under quarter turns."""


def symmetries(mode: str) -> tuple[int, ...]:
    """The D4 elements test-time averaging uses for a run trained with augmentation ``mode``: the 4 of D2 for
    ``d2``, all 8 otherwise."""
    return D2_ELEMENTS if mode == "d2" else tuple(range(8))


def tta_views(config, tta: bool) -> tuple[int, ...]:
    """The D4 elements a prediction with (``tta``) or without test-time averaging runs ``config``'s network on:
    :func:`symmetries` of its augmentation, or only the identity without TTA or for a network whose output the
    symmetries cannot change (:data:`~deeplense.config.INVARIANT_ARCHS`: 8 passes for the same numbers)."""
    from .config import INVARIANT_ARCHS

    return symmetries(config.augmentation) if tta and config.arch not in INVARIANT_ARCHS else (0,)


def augmentation_draws(mode: str, n: int, generator=None):
    """The random choices of ``n`` augmentations, drawn up front (an epoch's worth at once, so that no step waits
    on the host): the D4 element ``k`` (int64, 0..7; one of :data:`D2_ELEMENTS` for ``d2``) per image, a flip flag
    per image for ``hflip``, None for ``none``."""
    import torch

    if mode == "none":
        return None
    if mode == "d4":
        return torch.randint(0, 8, (n,), generator=generator)
    if mode == "d2":
        return 2 * torch.randint(0, 4, (n,), generator=generator)
    if mode == "hflip":
        return torch.rand(n, generator=generator) < 0.5
    raise ValueError(f"unknown augmentation {mode!r}")


def augment(x, mode: str, generator=None, draws=None):
    """Random training augmentation of a batch ``(B, C, H, W)``.

    ``mode``: ``"d4"`` applies one of the 8 flips/rotations per image, ``"d2"`` one of the 4 that keep the x axis,
    ``"hflip"`` flips half the images
    horizontally (the reference solution), ``"none"`` returns ``x`` unchanged. ``draws``: the choices from
    :func:`augmentation_draws` on ``x``'s device (drawn from ``generator`` here when not given). Exact (pixels are
    permuted). On an accelerator it is free of host synchronisation (every symmetry is computed and the drawn one
    kept per image); on the CPU, where nothing waits, each symmetry is applied only to the images that drew it
    (about 2x faster there: ``data_pipeline`` in benchmarks/README.md). Both give the same pixels.
    """
    import torch

    if mode == "none":
        return x
    if draws is None:
        draws = augmentation_draws(mode, x.shape[0], generator).to(x.device)
    if mode == "hflip":
        return torch.where(draws.view(-1, 1, 1, 1), torch.flip(x, dims=(-1,)), x)
    if mode not in ("d4", "d2"):
        raise ValueError(f"unknown augmentation {mode!r}")
    return _d4_by_group(x, draws) if x.device.type == "cpu" else _d4_by_select(x, draws)


def _d4_by_select(x, draws):
    """D4 without host synchronisation: all 8 symmetries of the batch, the drawn one kept per image."""
    import torch

    out = x
    for k in range(1, 8):
        out = torch.where((draws == k).view(-1, 1, 1, 1), d4_transform(x, k), out)
    return out


def _d4_by_group(x, draws):
    """D4 with one transform per symmetry drawn, on the images that drew it (reads the draws on the host)."""
    import torch

    out = torch.empty_like(x)
    for k in range(8):
        idx = torch.nonzero(draws == k).flatten()
        if len(idx):
            out[idx] = d4_transform(x[idx], k) if k else x[idx]
    return out
