"""The engine's behaviour as the network sees it: eval-mode predictions, TTA, augmented training batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from deeplense.checkpoint import load_checkpoint, model_from_checkpoint
from deeplense.cli import main
from deeplense.config import TrainConfig, recipe
from deeplense.data import load_split
from deeplense.engine import predict_proba
from deeplense.model import build_model
from deeplense.testing import FAST, quiet
from deeplense.train import train
from deeplense.transforms import d4_transform, native_crop, preprocess


def test_predictions_use_eval_mode(tmp_path):
    """Probabilities come from the network in eval mode: per image, whatever the batch, and no state changes."""
    torch.manual_seed(0)
    model, _ = build_model("none")
    with torch.no_grad():  # BatchNorm running statistics unlike any single batch's
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 1, 32, 32)
    cfg = TrainConfig(image_size=32, eval_batch_size=6, precision="fp32")  # compared with fp32 forward passes below
    model.train()  # as the training loop leaves it before validating
    whole = predict_proba(model, x, cfg, torch.device("cpu"))
    pairs = predict_proba(model.train(), x, cfg, torch.device("cpu"), batch_size=2)
    np.testing.assert_allclose(whole, pairs, atol=1e-6)  # an image's probabilities do not depend on its batch
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running statistics untouched
    with torch.no_grad():
        eval_mode = torch.softmax(model.eval()(preprocess(x, 32)), 1).numpy()
        train_mode = torch.softmax(model.train()(preprocess(x, 32)), 1).numpy()
    np.testing.assert_allclose(whole, eval_mode, atol=1e-6)
    assert np.abs(train_mode - eval_mode).max() > 1e-3  # the check above can tell the two modes apart

@pytest.mark.slow
def test_tta_is_the_mean_over_the_8_symmetries(small, tmp_path):

    run = tmp_path / "run"
    train(recipe("default", epochs=1, precision="fp32", **FAST), small, run, **quiet())  # fp32: exact comparisons
    probs = {}
    for tta in (False, True):
        out = tmp_path / f"ev-tta{tta}"
        assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(small), "--out", str(out),
                     "--bootstrap", "0", "--device", "cpu", "--split", "val"] + (["--tta"] if tta else [])) == 0
        probs[tta] = np.load(out / "predictions.npz")["probabilities"]
    ckpt = load_checkpoint(run / "best.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = model_from_checkpoint(ckpt, torch.device("cpu"))
    images, _ = load_split(small, "val", progress=False)
    x = native_crop(images, np.load(tmp_path / "ev-ttaTrue" / "predictions.npz")["val_indices"], cfg.crop)
    views = np.stack([predict_proba(model, d4_transform(x, k), cfg, torch.device("cpu")) for k in range(8)])
    np.testing.assert_allclose(probs[True], views.mean(0), atol=1e-5)
    np.testing.assert_allclose(probs[False], views[0], atol=1e-6)
    assert np.abs(probs[True] - probs[False]).max() > 1e-4  # the views disagree, so averaging changes something

@pytest.mark.slow
def test_training_batches_are_d4_augmented(small, tmp_path, monkeypatch):
    """What the network sees in training: each image once per epoch, most of them flipped or turned."""
    import deeplense.train as train_mod

    seen = []
    real = train_mod.model_for

    def spy(*a, **k):
        model, info = real(*a, **k)
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
        return model, info

    monkeypatch.setattr(train_mod, "model_for", spy)
    # crop 32 at 32 px: no resize, so the input is exactly the native crop mapped to [-1, 1]
    # no BatchNorm recalibration: its forward passes are in train mode too, but they are not training batches
    cfg = recipe("default", epochs=1, image_size=32, crop=32, batch_size=6, weights="none", warmup_epochs=0.0,
                 bn_recalibration=None)
    train(cfg, small, tmp_path / "run", **quiet())
    fed = (torch.cat(seen)[:, 0] + 1) / 2  # (18, 32, 32) back in [0, 1]
    images, _ = load_split(small, "train", progress=False)
    o = (150 - 32) // 2
    crops = torch.from_numpy(np.ascontiguousarray(images[:, 0, o : o + 32, o : o + 32]))
    found = []
    for f in fed:
        hits = [(i, k) for i in range(len(crops)) for k in range(8)
                if torch.allclose(d4_transform(crops[i], k), f, atol=1e-6)]
        assert len(hits) == 1, "a training input is not an exact D4 transform of one training image"
        found.append(hits[0])
    assert sorted(i for i, _ in found) == list(range(len(crops)))  # each image exactly once in the epoch
    assert sum(k != 0 for _, k in found) >= len(found) // 2  # 7 of 8 are expected to be transformed


@pytest.mark.slow
def test_onecycle_and_label_smoothing_reach_training(small, tmp_path, monkeypatch):
    import deeplense.engine as engine

    base = recipe("default", epochs=3, **FAST)
    one = train(base.replace(schedule="onecycle"), small, tmp_path / "one", **quiet())
    lrs = [h["lr"] for h in one["history"]]  # the learning rate after each epoch's last step
    assert lrs[0] > 0.8 * base.lr and lrs[-1] < 1e-3 * base.lr  # near the peak after 1/3 of the steps, then down
    smoothing = []
    real = engine.F.cross_entropy

    def spy(*a, **k):
        smoothing.append(k.get("label_smoothing", 0.0))
        return real(*a, **k)

    monkeypatch.setattr(engine.F, "cross_entropy", spy)
    train(base.replace(label_smoothing=0.1), small, tmp_path / "smooth", **quiet(stop_after_epoch=1))
    assert smoothing and set(smoothing) == {0.1}  # every training step's loss, and only those (validation: NLL)
    assert "label smoothing 0.1" in base.replace(label_smoothing=0.1).describe()


def test_d2_runs_average_over_the_d2_symmetries_only():
    """TTA of a run trained with d2 is the mean over its 4 symmetries, not over D4's 8."""
    from deeplense.transforms import D2_ELEMENTS

    torch.manual_seed(0)
    cfg = recipe("default", augmentation="d2", **FAST)
    model = build_model("none")[0]
    x = torch.rand(5, 1, 40, 40)
    views = np.stack([predict_proba(model, d4_transform(x, k), cfg, torch.device("cpu")) for k in range(8)])
    got = predict_proba(model, x, cfg, torch.device("cpu"), tta=True)
    np.testing.assert_allclose(got, views[list(D2_ELEMENTS)].mean(0), atol=1e-6)
    assert np.abs(got - views.mean(0)).max() > 1e-5  # and the quarter turns would have changed it


def test_clip_grad_bounds_each_step(monkeypatch):
    """With clip_grad c and plain SGD at lr 1, no step moves the weights by more than c (the gradient's global
    norm is clipped after unscaling, before the step); without it the same step moves them much further."""
    from deeplense.device import plan_for
    from deeplense.engine import build_optimizer, train_step

    plan = plan_for(torch.device("cpu"), "fp32")
    x, y = torch.rand(6, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    moved = {}
    for clip in (None, 1e-3):
        torch.manual_seed(0)
        model = build_model("none")[0]
        cfg = recipe("default", optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, augmentation="none",
                     clip_grad=clip, **{k: v for k, v in FAST.items() if k != "warmup_epochs"})
        opt = build_optimizer(model, cfg, plan)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train_step(model, opt, plan.grad_scaler(), x, y, cfg, plan)
        moved[clip] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())
    assert moved[1e-3] <= 1e-3 * (1 + 1e-4) and moved[None] > 100 * moved[1e-3]


def test_clip_grad_clips_the_unscaled_gradients_under_a_gradient_scaler():
    """Under fp16's gradient scaler (forced on the CPU: torch's GradScaler runs there) the gradients are unscaled
    before clipping, so a clipped SGD step at lr 1 moves the weights by the clip norm itself, not by the clip norm
    divided by the scale (65536)."""
    from deeplense.device import plan_for
    from deeplense.engine import build_optimizer, train_step

    plan = plan_for(torch.device("cpu"), "fp32")
    torch.manual_seed(0)
    model = build_model("none")[0]
    cfg = recipe("default", optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, augmentation="none",
                 clip_grad=1e-3, **{k: v for k, v in FAST.items() if k != "warmup_epochs"})
    opt = build_optimizer(model, cfg, plan)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_step(model, opt, scaler, torch.rand(6, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]), cfg, plan)
    moved = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())
    assert moved == pytest.approx(1e-3, rel=1e-2)  # fp32 rounding of the weights; the fault gives 1.5e-8


def test_recalibrate_bn_is_update_bn_over_the_seeds_drawn_training_images():
    """recalibrate_bn sets every BatchNorm's running statistics to torch's update_bn over the drawn training images
    (not augmented, model input), uses a generator of its own (the global random state is untouched, the same
    images every call), drops a last batch of one image, and does nothing to a network without BatchNorm."""
    from deeplense.engine import place_data, recalibrate_bn, recalibration_indices
    from deeplense.transforms import input_fn

    cfg = recipe("default", bn_recalibration=21, eval_batch_size=10, precision="fp32", **FAST)  # as update_bn
    x, y = torch.rand(40, 1, 32, 32), torch.arange(40) % 3
    torch.manual_seed(0)
    model = build_model("none")[0]
    reference = copy.deepcopy(model)
    state = torch.get_rng_state()
    idx = recalibration_indices(40, cfg)
    assert torch.equal(idx, recalibration_indices(40, cfg)) and torch.equal(state, torch.get_rng_state())
    assert len(idx) == 21 and len(set(idx.tolist())) == 21 and torch.equal(idx, idx.sort().values)
    assert not torch.equal(idx, recalibration_indices(40, cfg.replace(seed=1)))
    placed = place_data(x, y, x[:6], torch.device("cpu"), cfg, 0)
    assert recalibrate_bn(model, placed, cfg) == 20  # 10 + 10; the 21st alone would be a batch of one
    torch.optim.swa_utils.update_bn([input_fn(cfg)(x[idx[:10]]), input_fn(cfg)(x[idx[10:20]])], reference)
    bns = [(a, b) for a, b in zip(model.modules(), reference.modules(), strict=True)
           if isinstance(a, torch.nn.BatchNorm2d)]
    assert bns and all(torch.allclose(a.running_mean, b.running_mean, atol=1e-6) and
                       torch.allclose(a.running_var, b.running_var, rtol=1e-4) for a, b in bns)
    assert torch.equal(state, torch.get_rng_state())
    assert recalibrate_bn(model, placed, cfg.replace(bn_recalibration=None)) == 0
    no_bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(3 * 32 * 32))
    assert recalibrate_bn(no_bn, placed, cfg) == 0
