"""An exactly rotation- and flip-invariant network: group convolutions over D4, the 8 symmetries of the pixel grid.

The classes do not depend on orientation (a subhalo or a vortex line is the same turned or mirrored), so a network
whose output cannot change under the quarter turns and flips of its input gets for free what an ordinary CNN must
learn from 8x the data. This one is written with torch alone (``escnn`` needs a Fortran compiler to build here and
``e2cnn`` fails on numpy 2).

How (Cohen and Welling 2016, group equivariant CNNs, on the group D4):

- **The group action** is :func:`deeplense.transforms.d4_transform` (element ``k``: ``k % 4`` quarter turns after a
  horizontal flip when ``k >= 4``), exact on the square grid; :class:`D4` reads its multiplication table and
  inverses off that function, so the network and the augmentation share one definition.
- A **lifting convolution** turns the image into 8 copies of each field, one per group element ``g``: the image
  correlated with the filter transformed by ``g``. A **group convolution** takes fields with 8 copies to fields with
  8 copies: each filter is used in its 8 transformed versions, its group axis permuted by ``g^-1 h``. Turning or
  flipping the input then turns or flips every feature map and permutes its 8 copies (equivariance), exactly: the
  filters are permuted, never interpolated.
- **BatchNorm** is shared by the 8 copies of a field (``BatchNorm3d`` over ``(B, C, 8, H, W)``), so it stays
  equivariant; ReLU is pointwise.
- **Downsampling** is a convolution with stride 2 on an odd side (its grid 0, 2, ..., N-1 is the one the
  symmetries keep: 97, 49, 25, 13, 7 px) and, on an even side, where a stride-2 grid is not symmetric, the
  convolution at full resolution followed by a 2x2 average (a flip maps each 2x2 block onto another): exact
  either way.
- At the end, the **maximum over the 8 copies** (invariant to the permutation), the mean over the image, and a
  linear head: the logits are invariant, to float rounding (about 1e-6 of their scale).
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from .data import CLASSES
from .transforms import d4_transform

ORDER = 8
"""The elements of D4."""


class D4:
    """The group D4 as :func:`~deeplense.transforms.d4_transform` acts: ``compose[a][b]`` is the element doing
    ``b`` then ``a``, ``inverse[a]`` the one undoing ``a``. Read off the transform itself, on an asymmetric grid."""

    @staticmethod
    @cache
    def tables() -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        # no symmetry of its own: each element gives a different grid (on the CPU, whatever the default device)
        probe = torch.arange(9.0, device="cpu").reshape(3, 3)
        seen = [d4_transform(probe, k) for k in range(ORDER)]

        def which(grid):
            return next(k for k, s in enumerate(seen) if torch.equal(s, grid))

        compose = tuple(tuple(which(d4_transform(seen[b], a)) for b in range(ORDER)) for a in range(ORDER))
        inverse = tuple(next(b for b in range(ORDER) if compose[a][b] == 0) for a in range(ORDER))
        return compose, inverse

    @classmethod
    def compose(cls, a: int, b: int) -> int:
        return cls.tables()[0][a][b]

    @classmethod
    def inverse(cls, a: int) -> int:
        return cls.tables()[1][a]


def _filter_index(c_out: int, c_in: int, k: int, group_in: bool) -> torch.Tensor:
    """Indices into a flattened filter bank (``(c_out, c_in, [8,] k, k)``) that give the 8 transformed copies,
    ``(c_out * 8, c_in * [8 *] k * k)`` as one gather: for output element ``g``, the filter's pixels transformed by
    ``g`` and (for a group input) its group axis permuted so that input element ``h`` reads ``g^-1 h``."""
    shape = (c_out, c_in, ORDER, k, k) if group_in else (c_out, c_in, k, k)
    ids = torch.arange(math.prod(shape), device="cpu").reshape(shape)
    copies = []
    for g in range(ORDER):
        w = ids
        if group_in:  # input copy h reads the filter's copy g^-1 h
            w = w[:, :, [D4.compose(D4.inverse(g), h) for h in range(ORDER)]]
        copies.append(d4_transform(w, g))
    return torch.stack(copies, dim=1).reshape(c_out * ORDER, -1)


def _conv(x, w, stride: int):
    """``w`` correlated with ``x`` ('same' padding), at ``stride`` 1 or 2, exactly equivariant for either parity of
    the side (module docstring)."""
    pad = w.shape[-1] // 2
    if stride == 1 or x.shape[-1] % 2:
        return F.conv2d(x, w, stride=stride, padding=pad)
    return F.avg_pool2d(F.conv2d(x, w, padding=pad), 2)


class LiftConv(nn.Module):
    """Image ``(B, c_in, H, W)`` -> fields with 8 copies ``(B, c_out * 8, H', W')`` (copy ``g`` of field ``o`` at
    channel ``o * 8 + g``): the image correlated with each filter transformed by each element of D4."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self.register_buffer("index", _filter_index(c_out, c_in, kernel, False), persistent=False)
        self.shape, self.stride = (c_out * ORDER, c_in, kernel, kernel), stride

    def forward(self, x):
        return _conv(x, self.weight.flatten()[self.index].reshape(self.shape), self.stride)


class GroupConv(nn.Module):
    """Fields with 8 copies -> fields with 8 copies, ``(B, c_in * 8, H, W) -> (B, c_out * 8, H', W')``: each filter
    (one per input field and input copy) used in its 8 transformed versions (module docstring)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__()
        # stored as (c_out, c_in * 8, k, k), a 4-d tensor like any convolution's (channels_last can convert it)
        self.weight = nn.Parameter(torch.empty(c_out, c_in * ORDER, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        self.register_buffer("index", _filter_index(c_out, c_in, kernel, True), persistent=False)
        self.shape, self.stride = (c_out * ORDER, c_in * ORDER, kernel, kernel), stride

    def forward(self, x):
        return _conv(x, self.weight.flatten()[self.index].reshape(self.shape), self.stride)


class GroupBatchNorm(nn.Module):
    """BatchNorm with one mean, variance, scale and shift per field, shared by its 8 copies (so it stays
    equivariant): ``BatchNorm3d`` over the ``(B, C, 8, H, W)`` view."""

    def __init__(self, fields: int):
        super().__init__()
        self.norm = nn.BatchNorm3d(fields)

    def forward(self, x):
        b, c, h, w = x.shape
        return self.norm(x.view(b, c // ORDER, ORDER, h, w)).view(b, c, h, w)


class GroupBlock(nn.Module):
    """A residual block of group convolutions: 3x3 (at ``stride``), BatchNorm, ReLU, 3x3, BatchNorm, plus the input
    (through a 1x1 group convolution at ``stride`` and BatchNorm when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(GroupConv(c_in, c_out, 3, stride), GroupBatchNorm(c_out), nn.ReLU(inplace=True),
                                  GroupConv(c_out, c_out, 3), GroupBatchNorm(c_out))
        self.skip = nn.Identity() if c_in == c_out and stride == 1 else nn.Sequential(
            GroupConv(c_in, c_out, 1, stride), GroupBatchNorm(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class GroupMaxPool(nn.Module):
    """``(B, C * 8, H, W)`` -> ``(B, C, H, W)``: the maximum over each field's 8 copies, an invariant map (turning
    the input turns it, nothing more): the last feature map, the one Grad-CAM weighs."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, c // ORDER, ORDER, h, w).amax(dim=2)


class D4Net(nn.Module):
    """An exactly D4-invariant network for the native single-channel image (module docstring; 0.35 M parameters).

    ``(B, 1, H, W)`` in [-1, 1], any side (the crop, e.g. 97 px) -> logits ``(B, num_classes)``, the same for the
    input turned by quarter turns or mirrored. A 5x5 lifting convolution at stride 2 (``width`` fields); three
    stages of two residual group blocks (``width``, ``2 width``, ``4 width`` fields), each entered at stride 2
    (97 px: 49, 25, 13, 7); the maximum over the group, the mean over the image, dropout, a linear head.
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 8, dropout: float = 0.1):
        super().__init__()
        w = width
        self.lift = nn.Sequential(LiftConv(1, w, 5, 2), GroupBatchNorm(w), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(GroupBlock(w, w, 2), GroupBlock(w, w, 1),
                                    GroupBlock(w, 2 * w, 2), GroupBlock(2 * w, 2 * w, 1),
                                    GroupBlock(2 * w, 4 * w, 2), GroupBlock(4 * w, 4 * w, 1))
        self.pool = GroupMaxPool()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(4 * w, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.stages(self.lift(x))))


__all__ = ["D4", "D4Net", "GroupBatchNorm", "GroupBlock", "GroupConv", "GroupMaxPool", "LiftConv"]
