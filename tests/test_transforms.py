"""deeplense.transforms: the model's input geometry and the exact D4 augmentation."""

from __future__ import annotations

import numpy as np
import torch

from deeplense.transforms import augment, d4_transform, input_fn, native_crop, preprocess


def test_preprocess_shapes_and_range():
    x = torch.rand(4, 1, 150, 150)
    x[:, :, 0, 0] = 0.0
    x[:, :, 1, 1] = 1.0
    y = preprocess(x, 224)
    assert y.shape == (4, 3, 224, 224) and y.dtype == torch.float32
    assert y.min() >= -1.0 - 1e-5 and y.max() <= 1.0 + 1e-5
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])
    assert preprocess(x, 150).shape == (4, 3, 150, 150)
    torch.testing.assert_close(preprocess(x, 150, channels=1), x * 2 - 1)
    assert preprocess(x, 224, resize_then_crop=256).shape == (4, 3, 224, 224)
    # the reference geometry: resize to 256, keep the centre 224
    big = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", antialias=False, align_corners=False)
    torch.testing.assert_close(preprocess(x, 224, resize_then_crop=256, channels=1), big[..., 16:240, 16:240] * 2 - 1)


def test_native_crop_gathers_in_any_order_and_keeps_the_centre():
    images = np.random.default_rng(0).random((10, 1, 150, 150), dtype=np.float32)
    idx = np.array([7, 2, 9])
    x = native_crop(images, idx, 96)
    assert x.shape == (3, 1, 96, 96) and x.dtype == torch.float32 and x.is_contiguous()
    np.testing.assert_array_equal(x.numpy(), images[idx][..., 27:123, 27:123])
    np.testing.assert_array_equal(native_crop(images, idx, None).numpy(), images[idx])
    # the model input of a run: crop first (native pixels), then resize to the input side
    from deeplense.config import recipe

    cfg = recipe("default", image_size=64, crop=96)
    torch.testing.assert_close(input_fn(cfg)(x), preprocess(x, 64))


def test_d4_augmentation_is_exact_and_covers_the_group():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    seen = {tuple(d4_transform(x, k).flatten().tolist()) for k in range(8)}
    assert len(seen) == 8  # 8 distinct symmetries of an asymmetric image
    batch = x.repeat(400, 1, 1, 1)
    out = augment(batch, "d4", generator=torch.Generator().manual_seed(0))
    got = {tuple(o.flatten().tolist()) for o in out}
    assert got == seen
    out = augment(batch, "hflip", generator=torch.Generator().manual_seed(0))
    assert {tuple(o.flatten().tolist()) for o in out} == {
        tuple(x.flatten().tolist()), tuple(torch.flip(x, dims=(-1,)).flatten().tolist())}
    assert torch.equal(augment(batch, "none"), batch)


def test_d4_paths_agree_pixel_for_pixel():
    """The CPU's grouped D4 and the accelerator's synchronisation-free D4 give the same images for the same
    draws, each image transformed by its own draw."""
    from deeplense.transforms import _d4_by_group, _d4_by_select, augmentation_draws

    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 1, 9, 9, generator=gen)
    draws = augmentation_draws("d4", len(x), gen)
    a, b = _d4_by_group(x, draws), _d4_by_select(x, draws)
    assert torch.equal(a, b)
    for i in (0, 17, 63):
        assert torch.equal(a[i], d4_transform(x[i : i + 1], int(draws[i]))[0])


def test_d2_augmentation_keeps_the_x_axis_and_covers_its_four_symmetries():
    """d2 draws only the identity, the two flips and the half turn: an image elongated along x stays elongated
    along x (no quarter turn), and all four occur."""
    from deeplense.transforms import D2_ELEMENTS, symmetries

    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = {tuple(t.flatten().tolist()) for t in (x, torch.flip(x, dims=(-1,)), torch.flip(x, dims=(-2,)),
                                                       torch.rot90(x, 2, dims=(-2, -1)))}
    assert {tuple(d4_transform(x, k).flatten().tolist()) for k in D2_ELEMENTS} == expected
    out = augment(x.repeat(200, 1, 1, 1), "d2", generator=torch.Generator().manual_seed(0))
    assert {tuple(o.flatten().tolist()) for o in out} == expected
    bar = torch.zeros(1, 1, 8, 8)
    bar[..., 4, 1:7] = 1  # a bar along x
    for o in augment(bar.repeat(50, 1, 1, 1), "d2", generator=torch.Generator().manual_seed(1)):
        assert o[0].sum(dim=1).max() == 6  # still one row of 6: never turned onto the y axis
    assert symmetries("d2") == D2_ELEMENTS and symmetries("d4") == tuple(range(8)) == symmetries("none")
