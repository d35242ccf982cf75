"""Can a network fit one fixed batch? A check that a network which learns nothing in the accuracy study is not
broken in our pipeline (input transform, head, optimiser step, BatchNorm recalibration).

For each ``arch:lr`` pair: the study's quick-scale recipe (``recipe("default", scale="quick")``: 64 px from the
central 96 px, AdamW) with no augmentation, from random weights (seed 0), trained for ``--steps`` steps of the
engine's own training step on the same 32 training images of the simulated set ``--data``; printed: the training
loss every 10 steps, and the accuracy on that batch in eval mode with the running BatchNorm statistics and after
the recipe's BatchNorm recalibration on the same images. A network that cannot fit 32 images is broken or at a
learning rate it cannot take; one that fits them but learns nothing in the study is short of data, epochs or
pretraining.

Usage: ``python experiments/fit_one_batch.py --data experiments/out/study_v6/data
resnet34:1e-3 convnext_tiny:1e-3 convnext_tiny:1e-4 efficientnet_b3:1e-3`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from deeplense.config import ARCHS, recipe
from deeplense.data import load_splits
from deeplense.engine import as_plan, build_optimizer, predict_proba, train_step
from deeplense.model import model_for
from deeplense.transforms import augmentation_draws, input_fn
from deeplense.util import DeepLenseError


def parse(pair: str) -> tuple[str, float]:
    arch, _, lr = pair.partition(":")
    if arch not in ARCHS:
        raise argparse.ArgumentTypeError(f"{pair}: unknown arch {arch!r} (choose from {', '.join(ARCHS)})")
    try:
        value = float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{pair}: the learning rate after ':' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{pair}: the learning rate must be positive")
    return arch, value


def fit(arch: str, lr: float, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    """Train ``arch`` at ``lr`` on the batch ``(x, y)`` for ``steps`` steps; its losses and eval-mode accuracies."""
    cfg = recipe("default", scale="quick", arch=arch).replace(augmentation="none", precision="fp32", lr=lr)
    plan = as_plan(torch.device("cpu"), cfg)
    torch.manual_seed(0)
    model = model_for(cfg, "none")[0]
    opt, scaler = build_optimizer(model, cfg, plan), plan.grad_scaler()
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses = [float(train_step(model, opt, scaler, x, y, cfg, plan, augmentation_draws("none", len(x), gen)).detach())
              for _ in range(steps)]

    def accuracy() -> float:
        p = np.asarray(predict_proba(model, x, cfg, plan, batch_size=len(x)))
        return float((p.argmax(1) == y.numpy()).mean())

    running = accuracy()
    recalibrated = None
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        torch.optim.swa_utils.update_bn([input_fn(cfg)(x)], model)  # what engine.recalibrate_bn does, on this batch
        recalibrated = accuracy()
    return {"losses": losses, "running": running, "recalibrated": recalibrated}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="+", type=parse, metavar="ARCH:LR", help="e.g. convnext_tiny:1e-4")
    p.add_argument("--data", required=True, help="a simulated set (the study's OUT/data)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--batch", type=int, default=32, help="images in the batch (default 32)")
    args = p.parse_args(argv)
    try:
        images, labels = load_splits(args.data, ("train",), progress=False)["train"]
    except DeepLenseError as exc:
        print(f"fit_one_batch: {exc}", file=sys.stderr)
        return 2
    idx = np.sort(np.random.default_rng(0).choice(len(labels), min(args.batch, len(labels)), replace=False))
    x = torch.as_tensor(np.asarray(images[idx]), dtype=torch.float32)
    y = torch.as_tensor(labels[idx]).long()
    for arch, lr in args.pairs:
        r = fit(arch, lr, x, y, args.steps)
        shown = ", ".join(f"{v:.3f}" for v in r["losses"][::10])
        recal = "no BatchNorm" if r["recalibrated"] is None else f"{r['recalibrated']:.2f}"
        print(f"{arch} lr {lr:g}: loss every 10 steps {shown}, last {r['losses'][-1]:.4f}; eval accuracy on the "
              f"batch: running statistics {r['running']:.2f}, recalibrated {recal}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
