"""The D4-invariant network (issue 38): the group read off the transform, equivariant feature maps, logits that do
not move under the 8 flips and quarter turns (random weights and after training steps), BatchNorm shared by the 8
copies, and the paths the device code takes."""

from __future__ import annotations

import pytest
import torch

from deeplense.equivariant import D4, ORDER, D4Net, GroupBatchNorm
from deeplense.transforms import d4_transform


def _logits_spread(net, x) -> tuple[float, float]:
    """The largest change of the logits over the 8 symmetries of ``x``, and the logits' scale."""
    with torch.no_grad():
        base = net(x)
        moved = max(float((net(d4_transform(x, k)) - base).abs().max()) for k in range(1, ORDER))
    return moved, float(base.abs().max())


def test_the_group_is_read_off_the_transform():
    x = torch.randn(2, 5, 5)
    for a in range(ORDER):
        assert torch.equal(d4_transform(d4_transform(x, D4.inverse(a)), a), x)
        for b in range(ORDER):
            assert torch.equal(d4_transform(d4_transform(x, b), a), d4_transform(x, D4.compose(a, b))), (a, b)
    assert sorted(D4.compose(a, b) for a in range(ORDER) for b in [3]) == list(range(ORDER))  # a permutation


@pytest.mark.parametrize("side", [97, 96, 33])
def test_logits_are_invariant_with_random_weights(side):
    """Goal of issue 38: logits under each of the 8 symmetries equal within 1e-5 of their scale, float32; odd and
    even sides alike (the downsampling is exact for both)."""
    torch.manual_seed(0)
    net = D4Net().eval()
    moved, scale = _logits_spread(net, torch.rand(3, 1, side, side) * 2 - 1)
    assert scale > 0.1 and moved <= 1e-5 * scale, (moved, scale)


def test_logits_stay_invariant_after_training_steps_in_both_modes():
    """Training moves the weights and BatchNorm's running statistics; both keep the symmetry (a BatchNorm with its
    own statistics per copy would not). In train mode (batch statistics) too, without dropout."""
    torch.manual_seed(1)
    net = D4Net(dropout=0.0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x, y = torch.rand(8, 1, 33, 33) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    norms = [m.norm for m in net.modules() if isinstance(m, GroupBatchNorm)]
    assert norms and all(float(n.running_var.std()) > 0 for n in norms)  # statistics that differ per field
    for mode in (net.eval, net.train):
        mode()
        moved, scale = _logits_spread(net, torch.rand(4, 1, 33, 33) * 2 - 1)
        assert moved <= 1e-5 * scale, (mode.__name__, moved, scale)


def test_d4_augmentation_changes_no_loss_and_no_gradient_in_train_mode():
    """Why the study does not run ``d4net_no_aug``: a flip or quarter turn drawn per image (what ``--augmentation d4``
    does) leaves d4net's training loss and every parameter's gradient as they were, batch statistics included; the
    arm would differ from ``d4net`` only by the order of its batches (the draws share the shuffle's generator)."""
    torch.manual_seed(3)
    net = D4Net(dropout=0.0).train()
    x, y = torch.rand(12, 1, 33, 33) * 2 - 1, torch.arange(12) % 3
    draws = torch.randint(0, ORDER, (12,), generator=torch.Generator().manual_seed(0))
    assert len(set(draws.tolist())) > 3
    moved = torch.stack([d4_transform(img, int(k)) for img, k in zip(x, draws, strict=True)])

    def loss_and_grads(inputs):
        net.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(inputs), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    loss, grads = loss_and_grads(x)
    loss_moved, grads_moved = loss_and_grads(moved)
    torch.testing.assert_close(loss_moved, loss, atol=1e-6, rtol=1e-5)
    for g, gm in zip(grads, grads_moved, strict=True):
        torch.testing.assert_close(gm, g, atol=1e-6, rtol=1e-4)
    assert max(float(g.abs().max()) for g in grads) > 1e-3  # gradients that are not trivially zero


def test_an_intermediate_feature_map_is_equivariant():
    """Turning the input by h turns every feature map by h and permutes its 8 copies: copy g of the turned input's
    map is copy h^-1 g of the original's, turned by h."""
    torch.manual_seed(2)
    net = D4Net().eval()
    x = torch.rand(2, 1, 49, 49)
    features = torch.nn.Sequential(net.lift, net.stages[:3])
    with torch.no_grad():
        f = features(x)
        b, c, hh, ww = f.shape
        f = f.view(b, c // ORDER, ORDER, hh, ww)
        for h in range(ORDER):
            turned = features(d4_transform(x, h)).view(b, c // ORDER, ORDER, hh, ww)
            expected = torch.stack([d4_transform(f[:, :, D4.compose(D4.inverse(h), g)], h) for g in range(ORDER)], 2)
            torch.testing.assert_close(turned, expected, atol=1e-5, rtol=1e-5)
    # and not invariant: the copies differ, so the symmetry is carried, not lost
    assert float((f[:, :, 0] - f[:, :, 1]).abs().max()) > 1e-3


def test_one_channel_few_parameters_and_the_cuda_memory_layout():
    """1 channel at any side; 0.35 M parameters; channels_last (what the CUDA plan converts a network to) gives the
    same logits: forced here on the CPU."""
    torch.manual_seed(3)
    net = D4Net().eval()
    assert 300_000 < sum(p.numel() for p in net.parameters()) < 400_000
    x = torch.rand(2, 1, 65, 65) * 2 - 1
    with torch.no_grad():
        before = net(x)
        net = net.to(memory_format=torch.channels_last)
        after = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):
        net(torch.zeros(2, 3, 65, 65))


def test_tta_makes_one_pass_for_an_invariant_network(monkeypatch):
    """--tta cannot change d4net's output: predict_proba runs it once per batch, not 8 times, and returns what one
    pass gives; explain's maps likewise."""
    import numpy as np

    from deeplense.config import recipe
    from deeplense.engine import predict_proba
    from deeplense.explain import saliency
    from deeplense.model import model_for

    cfg = recipe("default", arch="d4net", crop=33, weights="none")
    assert (cfg.image_size, cfg.in_channels) == (33, 1)
    torch.manual_seed(4)
    net = model_for(cfg)[0].eval()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    x = torch.rand(5, 1, 33, 33)
    plain = predict_proba(net, x, cfg, torch.device("cpu"))
    n = len(calls)
    tta = predict_proba(net, x, cfg, torch.device("cpu"), tta=True)
    assert len(calls) - n == n == 1 and np.array_equal(plain, tta)
    maps = [saliency(net, cfg, x.numpy(), np.array([0, 1, 2, 0, 1]), method="gradcam", tta=t) for t in (False, True)]
    np.testing.assert_array_equal(*maps)
