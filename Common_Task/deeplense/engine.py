"""The training engine: one epoch of training, one validation pass, predictions; each returns plain numbers.

Images arrive as float32 ``(N, 1, h, w)`` tensors in [0, 1], already cropped (:func:`deeplense.data.native_crop`);
:func:`deeplense.data.input_fn` turns a batch into the model's ``(B, 3, S, S)`` input in [-1, 1] on the
training device. On CUDA the model runs under bf16 autocast (fp16 with a gradient scaler where bf16 is missing)
in ``channels_last``; elsewhere in float32.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import CLASSES, augment, d4_transform, input_fn
from .metrics import quick_metrics
from .util import progress_bar


def autocast_for(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision elsewhere."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@torch.inference_mode()
def predict_proba(model, x: torch.Tensor, config: TrainConfig, device: torch.device, *, tta: bool = False,
                  batch_size: int | None = None, progress: bool = False, desc: str = "predicting") -> np.ndarray:
    """Softmax probabilities ``(N, 3)`` float32 for images ``x`` ``(N, 1, h, w)`` in [0, 1] (already cropped).

    The model runs in ``eval()`` mode; with ``tta`` the probabilities are averaged over the 8 D4
    symmetries. Softmax is computed in float32 even under autocast.
    """
    model.eval()
    fn = input_fn(config)
    bs = batch_size or config.eval_batch_size
    out = []
    for s in progress_bar(range(0, len(x), bs), desc=desc, unit="batch", disable=not progress, leave=False):
        xb = _layout(fn(x[s : s + bs].to(device, non_blocking=True)), device)
        probs = 0
        for k in range(8) if tta else (0,):
            with autocast_for(device):
                logits = model(d4_transform(xb, k) if k else xb)
            probs = probs + torch.softmax(logits.float(), dim=1)
        out.append((probs / (8 if tta else 1)).cpu())
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, len(CLASSES)), np.float32)


def build_optimizer(model, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        # the fused kernel: 2.6-3.2x faster than the foreach one on 2 CPU cores (optimizer_step, benchmarks/README.md)
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def build_scheduler(opt, config: TrainConfig, steps_per_epoch: int):
    """``cosine``: linear warm-up over ``warmup_epochs``, then cosine to zero, stepped per batch;
    ``step``: StepLR, stepped per epoch."""
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    total = config.epochs * steps_per_epoch
    warm = int(round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def steps_per_epoch(n_per_rank: int, batch_size: int) -> int:
    """Batches per epoch: the last partial batch is kept unless it holds a single image (BatchNorm cannot train
    on one)."""
    return n_per_rank // batch_size + (1 if n_per_rank % batch_size >= 2 else 0)


def train_one_epoch(net, opt, sched, scaler, x_train: torch.Tensor, y_train: torch.Tensor, config: TrainConfig,
                    device: torch.device, *, epoch: int, rank: int = 0, world: int = 1,
                    progress: bool = True) -> dict:
    """Train ``net`` for one epoch; return ``train_loss``, ``train_images`` (all ranks),
    ``train_images_distinct``, ``lr``, ``train_seconds`` and ``train_images_per_s``.

    The epoch's order is a permutation seeded by (seed, epoch); under torchrun rank r takes the r-th of
    ``world`` equal, disjoint slices of it. Augmentation draws from the same generator, so CPU runs repeat bit
    for bit.
    """
    net.train()
    per_rank = len(x_train) // world
    steps = steps_per_epoch(per_rank, config.batch_size)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    perm = torch.randperm(len(x_train), generator=gen)[rank * per_rank : (rank + 1) * per_rank]
    fn = input_fn(config)
    t0 = time.perf_counter()
    loss_sum, seen = 0.0, 0
    trained_on = torch.zeros(len(x_train), dtype=torch.int32)  # how often each image was used this epoch
    bar = progress_bar(range(steps), desc=f"epoch {epoch}/{config.epochs}", unit="step",
                       disable=not (progress and rank == 0), leave=False)
    for step in bar:
        idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
        xb = x_train[idx].to(device, non_blocking=True)  # (B, 1, h, w) in [0, 1]
        yb = y_train[idx].to(device, non_blocking=True)
        trained_on[idx] += 1
        xb = _layout(fn(augment(xb, config.augmentation, generator=gen)), device)  # (B, 3, S, S) in [-1, 1]
        with autocast_for(device):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if config.schedule == "cosine":
            sched.step()
        loss_sum += float(loss.detach()) * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
    bar.close()
    seconds = time.perf_counter() - t0
    lr_used = opt.param_groups[0]["lr"]
    if config.schedule == "step":
        sched.step()
    if world > 1:  # reduced on the training device: NCCL reduces only CUDA tensors
        stats = torch.tensor([loss_sum, seen], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(stats)
        loss_sum, seen = float(stats[0]), int(stats[1])
        counts = trained_on.to(device)
        torch.distributed.all_reduce(counts)  # every rank's share: together they cover each image once
        trained_on = counts.cpu()
    return {"train_loss": loss_sum / max(seen, 1), "train_images": seen,
            "train_images_distinct": int((trained_on > 0).sum()), "lr": lr_used, "train_seconds": seconds,
            "train_images_per_s": seen / seconds}


def validate(model, x: torch.Tensor, y: np.ndarray, config: TrainConfig, device: torch.device) -> dict:
    """Loss, accuracy and AUCs of ``model`` on the selection images ``x`` with labels ``y``."""
    probs = predict_proba(model, x, config, device)
    m = quick_metrics(y, probs)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_macro_auc": m["macro_auc"],
            "val_micro_auc": m["micro_auc"], "val_per_class_auc": m["per_class_auc"]}
