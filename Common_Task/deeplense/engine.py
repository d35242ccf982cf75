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
from .data import CLASSES, augment, augmentation_draws, d4_transform, input_fn
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
    bs = batch_size or config.eval_batch_size or (1024 if device.type == "cuda" else 128)
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
    """``cosine``: linear warm-up over ``warmup_epochs``, then cosine to zero, stepped per batch; ``onecycle``:
    torch's OneCycleLR peaking at ``lr``, stepped per batch; ``step``: StepLR, stepped per epoch."""
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        # stepped after every optimiser step, the last time after the last one: total + 1 positions
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total + 1)
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


def place_data(x_train: torch.Tensor, y_train: torch.Tensor, x_sel: torch.Tensor, device: torch.device):
    """Where the images live during training: ``(x_train, y_train, x_sel, resident)``.

    On CUDA, when they fit in half of the free GPU memory (30,000 images of 150 x 150 float32 take 2.7 GB),
    they are copied to the device once, so every step gathers, augments and resizes there without a
    host-to-device copy; otherwise they stay in pinned host memory and each batch is copied asynchronously.
    On the CPU they are where the model is already.
    """
    if device.type != "cuda":
        return x_train, y_train, x_sel, device.type == "cpu"
    need = x_train.nbytes + y_train.nbytes + x_sel.nbytes
    free, _ = torch.cuda.mem_get_info(device)
    if need < 0.5 * free:
        return x_train.to(device), y_train.to(device), x_sel.to(device), True
    return x_train.pin_memory(), y_train.pin_memory(), x_sel.pin_memory(), False


def train_one_epoch(net, opt, sched, scaler, x_train: torch.Tensor, y_train: torch.Tensor, config: TrainConfig,
                    device: torch.device, *, epoch: int, rank: int = 0, world: int = 1,
                    progress: bool = True) -> dict:
    """Train ``net`` for one epoch; return ``train_loss``, ``train_images`` (all ranks),
    ``train_images_distinct``, ``lr``, ``train_seconds`` and ``train_images_per_s``.

    The epoch's order is a permutation seeded by (seed, epoch); under torchrun rank r takes the r-th of
    ``world`` equal, disjoint slices of it. The augmentation choices are drawn from the same generator at the start
    of the epoch, so CPU runs repeat bit for bit. Images may live on the device (:func:`place_data`): then a
    step does no host-to-device copy, and the loss is summed on the device, read by the progress bar every
    few seconds only.
    """
    net.train()
    per_rank = len(x_train) // world
    steps = steps_per_epoch(per_rank, config.batch_size)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    perm = torch.randperm(len(x_train), generator=gen)[rank * per_rank : (rank + 1) * per_rank]
    draws = augmentation_draws(config.augmentation, len(perm), gen)
    perm = perm.to(x_train.device)
    draws = None if draws is None else draws.to(device)
    fn = input_fn(config)
    t0 = shown = time.perf_counter()
    loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0
    trained_on = torch.zeros(len(x_train), dtype=torch.int32, device=x_train.device)  # uses of each image
    bar = progress_bar(range(steps), desc=f"epoch {epoch}/{config.epochs}", unit="step",
                       disable=not (progress and rank == 0), leave=False)
    for step in bar:
        batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
        idx = perm[batch]
        xb = x_train[idx].to(device, non_blocking=True)  # (B, 1, h, w) in [0, 1]; no copy when resident
        yb = y_train[idx].to(device, non_blocking=True)
        trained_on[idx] += 1
        xb = augment(xb, config.augmentation, draws=None if draws is None else draws[batch])
        xb = _layout(fn(xb), device)  # (B, 3, S, S) in [-1, 1]
        with autocast_for(device):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=config.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if config.schedule != "step":  # per-step schedules
            sched.step()
        loss_sum += loss.detach() * len(idx)
        seen += len(idx)
        if not bar.disable and time.perf_counter() - shown > 2.0:  # the one host synchronisation, now and then
            shown = time.perf_counter()
            bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}", img_s=f"{seen / (shown - t0):.1f}")
    bar.close()
    seconds = time.perf_counter() - t0
    lr_used = opt.param_groups[0]["lr"]
    if config.schedule == "step":
        sched.step()
    counts = trained_on.to(device)
    if world > 1:  # reduced on the training device: NCCL reduces only CUDA tensors
        stats = torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(stats)
        loss_sum, seen = stats[0], int(stats[1])
        torch.distributed.all_reduce(counts)  # every rank's share: together they cover each image once
    return {"train_loss": float(loss_sum) / max(seen, 1), "train_images": seen,
            "train_images_distinct": int((counts > 0).sum()), "lr": lr_used, "train_seconds": seconds,
            "train_images_per_s": seen / seconds}


def validate(model, x: torch.Tensor, y: np.ndarray, config: TrainConfig, device: torch.device) -> dict:
    """Loss, accuracy and AUCs of ``model`` on the selection images ``x`` with labels ``y``."""
    probs = predict_proba(model, x, config, device)
    m = quick_metrics(y, probs)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_macro_auc": m["macro_auc"],
            "val_micro_auc": m["micro_auc"], "val_per_class_auc": m["per_class_auc"]}
