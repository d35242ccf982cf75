"""The training config: recipes, casting of overrides, None where a field allows it, the prose description."""

from __future__ import annotations

import pytest

from deeplense.config import RECIPES, TrainConfig, recipe
from deeplense.util import DeepLenseError


def test_recipes():
    ref = RECIPES["reference"]
    assert (ref.optimizer, ref.lr, ref.momentum, ref.schedule, ref.step_size, ref.gamma, ref.batch_size, ref.epochs,
            ref.augmentation, ref.resize_then_crop, ref.image_size, ref.select_metric) == (
        "sgd", 1e-4, 0.9, "step", 7, 0.1, 256, 20, "hflip", 256, 224, "accuracy")
    d = RECIPES["default"]
    assert (d.optimizer, d.schedule, d.augmentation, d.select_metric) == ("adamw", "cosine", "d4", "macro_auc")
    with pytest.raises(Exception, match="unknown recipe"):
        recipe("nope")
    with pytest.raises(Exception, match="optimizer"):
        TrainConfig(optimizer="lion")


def test_overrides_are_cast_by_field_type():
    cfg = recipe("default", epochs="3", lr="0.0005", crop="96", seed=2)
    assert (cfg.epochs, cfg.lr, cfg.crop, cfg.seed) == (3, 5e-4, 96, 2)
    assert isinstance(cfg.epochs, int) and isinstance(cfg.lr, float)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
    with pytest.raises(Exception, match="epochs='many' is not a valid int"):
        recipe("default", epochs="many")
    with pytest.raises(Exception, match="epochs=2.5 is not a valid int"):
        recipe("default", epochs=2.5)
    with pytest.raises(Exception, match="unknown setting"):
        recipe("default", epoch=3)


def test_none_sets_optional_fields_and_is_refused_elsewhere():
    ref = recipe("reference")
    assert ref.resize_then_crop == 256
    assert recipe("reference", resize_then_crop=None).resize_then_crop is None  # no longer silently kept
    assert recipe("default", crop="none").crop is None and recipe("default", crop=96).replace(crop="").crop is None
    with pytest.raises(Exception, match="epochs cannot be none"):
        recipe("default", epochs=None)


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(crop=0), dict(limit_per_class=-1), dict(holdout_fraction=1.5),
                                 dict(image_size=8), dict(batch_size=0), dict(batch_size=1), dict(image_size=10000),
                                 dict(seed=2**31), dict(eval_batch_size=0), dict(precision="fp8")])
def test_nonsense_is_refused_before_any_work(bad):
    with pytest.raises(Exception, match="training config"):
        recipe("default", **bad)


def test_round_trip_through_a_dict_ignores_unknown_keys():
    cfg = recipe("reference", epochs=3, crop=96)
    assert TrainConfig.from_dict({**cfg.to_dict(), "a_future_field": 1}) == cfg


def test_describe_reads_the_values():
    text = recipe("default", epochs=7, lr=3e-4, image_size=64, crop=96).describe()
    for part in ("7 epochs", "batch 64", "AdamW (learning rate 0.0003, weight decay 0.05)", "warm-up over 1 epoch",
                 "cosine", "D4", "central 96 px", "64 px", "selection macro AUC", "seed 0"):
        assert part in text, part
    text = recipe("reference").describe()
    for part in ("SGD (learning rate 0.0001, momentum 0.9", "multiplied by 0.1 every 7 epochs", "horizontal flip",
                 "resized to 256 px, centre 224 px", "selection accuracy"):
        assert part in text, part


def test_a_scale_sets_the_geometry_and_lensnet_keeps_its_native_pixels():
    """recipe(scale=...) is the one place the demo geometry and the lensnet input rule live: the study, the
    calibration, the arch benchmark and the notebook all ask it."""
    from deeplense.config import SCALES, recipe

    demo = SCALES["demo"]
    cfg = recipe("default", scale="demo", seed=3)
    assert (cfg.epochs, cfg.image_size, cfg.crop, cfg.batch_size, cfg.seed) == (
        demo.epochs, demo.image_size, demo.crop, demo.batch_size, 3)
    lens = recipe("default", scale="demo", arch="lensnet")
    assert (lens.image_size, lens.crop, lens.batch_size) == (demo.crop, demo.crop, demo.batch_size)
    assert recipe("default", scale="demo", arch="lensnet", crop=None).image_size == 150
    assert recipe("default", scale="full", arch="lensnet").image_size == 150
    # d4net takes its own odd crop where the scale crops, and the native pixels as they are
    d4 = recipe("default", scale="demo", arch="d4net")
    assert (d4.crop, d4.image_size, d4.in_channels) == (97, 97, 1) and "as it is" in d4.describe()
    assert recipe("default", scale="demo", arch="d4net", crop=64).image_size == 64
    assert recipe("default", scale="full", arch="d4net").image_size == 150
    assert recipe("default", scale="demo", epochs=2).epochs == 2  # an override wins over the scale
    with pytest.raises(DeepLenseError, match="unknown scale"):
        recipe("default", scale="huge")


def test_training_options_of_the_leaders_are_checked_and_described():
    import pytest

    from deeplense.util import DeepLenseError

    cfg = recipe("default", clip_grad="1.5", ema="0.999", patience="3", augmentation="d2")
    assert (cfg.clip_grad, cfg.ema, cfg.patience) == (1.5, 0.999, 3)
    text = cfg.describe()
    assert "clipped to norm 1.5" in text and "decay 0.999" in text and "3 epoch(s) without" in text
    assert "keep the x axis" in text
    assert recipe("default").clip_grad is recipe("default").ema is recipe("default").patience is None
    for bad, msg in (({"clip_grad": 0}, "clip_grad must be positive"), ({"ema": 1.0}, "ema must be a decay"),
                     ({"patience": 0}, "patience must be at least 1")):
        with pytest.raises(DeepLenseError, match=msg):
            recipe("default", **bad)


def test_the_transformers_inputs_and_the_attention_setting_are_checked():
    import pytest

    from deeplense.util import DeepLenseError

    assert recipe("default", arch="resnet34_attn").attention == "se"  # its default
    assert recipe("default", arch="resnet34_attn", attention="mhsa").attention == "mhsa"
    assert recipe("default", arch="resnet34").attention is None
    with pytest.raises(DeepLenseError, match="attention applies to arch resnet34_attn only"):
        recipe("default", attention="cbam")
    with pytest.raises(DeepLenseError, match="attention must be one of se, cbam, mhsa"):
        recipe("default", arch="resnet34_attn", attention="bam")
    assert recipe("default", scale="demo", arch="vit_b_16").image_size == 64  # 4 x 4 patches of 16 px
    with pytest.raises(DeepLenseError, match="vit_b_16 takes an image_size that is a multiple of 16 px"):
        recipe("default", arch="vit_b_16", image_size=40)
    with pytest.raises(DeepLenseError, match="maxvit_t takes an image_size that is a multiple of 224 px"):
        recipe("default", scale="demo", arch="maxvit_t")
    assert recipe("default", arch="maxvit_t").image_size == 224
