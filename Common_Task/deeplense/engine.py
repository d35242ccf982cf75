"""The training engine: one training step, one epoch of training, one validation pass, predictions; each returns
plain numbers.

Images arrive as float32 ``(N, 1, h, w)`` tensors in [0, 1], already cropped (:func:`deeplense.transforms.native_crop`);
:func:`deeplense.transforms.input_fn` turns a batch into the model's ``(B, 3, S, S)`` input in [-1, 1] on the
training device. Every device-dependent choice (precision, copies, memory layout, the dtype of sums) comes from a
:class:`deeplense.device.Plan`: bf16 autocast on CUDA GPUs with native bf16, fp16 with a gradient scaler on older
ones, fp32 on MPS and the CPU (bf16 there on request), ``channels_last`` on CUDA. Functions that take ``device``
accept a ``torch.device`` (the plan is then made from ``config.precision``) or a ready :class:`Plan`.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig
from .data import CLASSES
from .device import Plan, free_memory, is_out_of_memory, memory_plan, plan_for
from .metrics import quick_metrics
from .transforms import augment, augmentation_draws, d4_transform, input_fn, tta_views
from .util import progress_bar


def as_plan(device, config: TrainConfig) -> Plan:
    """``device`` if it is a :class:`Plan` already, else the plan for it at ``config.precision``."""
    return device if isinstance(device, Plan) else plan_for(device, config.precision)


def default_eval_batch_size(plan: Plan) -> int:
    return 1024 if plan.kind == "cuda" else 128


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@torch.inference_mode()
def predict_proba(model, x: torch.Tensor, config: TrainConfig, device, *, tta: bool = False,
                  batch_size: int | None = None, progress: bool = False, desc: str = "predicting",
                  log=_say, with_log: bool = False):
    """Softmax probabilities ``(N, 3)`` float32 for images ``x`` ``(N, 1, h, w)`` in [0, 1] (already cropped).

    The model runs in ``eval()`` mode; with ``tta`` the probabilities are averaged over the symmetries the run
    trained with (:func:`deeplense.transforms.symmetries`: the 4 of D2 for ``d2``, the 8 of D4 otherwise).
    Softmax is computed in float32 even under autocast. Batches of ``batch_size`` (default
    ``config.eval_batch_size``, else 1024 on CUDA, 128 elsewhere); when the device runs out of memory the batch is
    halved once and the pass goes on, with a line to ``log`` saying so.

    ``with_log``: return ``(probabilities, log_probabilities)``; the log-probabilities are computed as such
    (``log_softmax``, and with ``tta`` the log of the mean by ``logsumexp``), so they stay finite where a float32
    probability underflows to 0: what temperature scaling is fitted and applied on (:mod:`deeplense.calibration`).
    """
    plan = as_plan(device, config)
    model.eval()
    fn = input_fn(config)
    bs = batch_size or config.eval_batch_size or default_eval_batch_size(plan)
    out, logs, s, retried = [], [], 0, False
    bar = progress_bar(total=len(x), desc=desc, unit="img", disable=not progress, leave=False)
    while s < len(x):
        try:
            xb = plan.layout(fn(plan.to_device(x[s : s + bs])))
            probs, logp = 0, None
            views = tta_views(config, tta)
            for k in views:
                with plan.autocast():
                    logits = model(d4_transform(xb, k) if k else xb)
                probs = probs + torch.softmax(logits.float(), dim=1)
                if with_log:
                    lp = torch.log_softmax(logits.float(), dim=1)
                    logp = lp if logp is None else torch.logaddexp(logp, lp)
            out.append((probs / len(views)).cpu())
            if with_log:
                logs.append((logp - math.log(len(views))).cpu())
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if retried or bs < 2 or not is_out_of_memory(exc):
                raise
            retried, xb, probs, logp = True, None, None, None
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"{desc}: out of memory at batch {bs} on {plan.device}; retrying at batch {bs // 2} "
                f"(set --eval-batch-size to choose)")
            bs //= 2
            continue
        bar.update(len(out[-1]))
        s += bs
    bar.close()

    def joined(parts):
        return torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros((0, len(CLASSES)), np.float32)

    return (joined(out), joined(logs)) if with_log else joined(out)


def build_optimizer(model, config: TrainConfig, device) -> torch.optim.Optimizer:
    dev = device.device if isinstance(device, Plan) else torch.device(device)
    if config.optimizer == "adamw":
        # the fused kernel: 2.6-3.2x faster than the foreach one on 2 CPU cores (optimizer_step, benchmarks/README.md)
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 fused=dev.type in ("cpu", "cuda"))
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


class Placement:
    """Where the images live during training and how a batch reaches the device.

    ``resident``: the training images are on the device (or the device is the CPU): a batch is a gather there, with
    no copy. Otherwise they stay in host memory and :meth:`batch` gathers each batch into one of two pinned
    buffers and copies it asynchronously; a buffer is refilled only after its previous copy has finished (a CUDA
    event), so the copy of one batch overlaps the step of the one before. ``eval_batch_size``: the validation
    batch that fits beside them (:func:`deeplense.device.memory_plan`); ``memory``: that plan, on CUDA.
    """

    def __init__(self, x_train, y_train, x_sel, plan: Plan, resident: bool, eval_batch_size: int | None = None,
                 memory=None, batch_size: int = 64):
        self.x_train, self.y_train, self.x_sel, self.plan = x_train, y_train, x_sel, plan
        self.resident, self.eval_batch_size, self.memory = resident, eval_batch_size, memory
        self._buffers: list[torch.Tensor] = []
        self._events: list = [None, None]
        self._next = 0
        self._batch_size = batch_size

    @property
    def index_device(self) -> torch.device:
        return self.x_train.device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, 1, h, w)`` and labels of training indices ``idx`` (on :attr:`index_device`), on the
        device."""
        if self.resident:
            return self.plan.to_device(self.x_train[idx]), self.plan.to_device(self.y_train[idx])
        if not self._buffers:
            shape = (self._batch_size, *self.x_train.shape[1:])
            self._buffers = [torch.empty(shape, dtype=self.x_train.dtype).pin_memory() for _ in range(2)]
        k = self._next
        self._next ^= 1
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy out of this buffer, two batches ago, has finished
        buf = self._buffers[k][: len(idx)]
        torch.index_select(self.x_train, 0, idx, out=buf)
        xb = buf.to(self.plan.device, non_blocking=True)
        self._events[k] = new_event()
        self._events[k].record()
        return xb, self.y_train[idx].to(self.plan.device)


def new_event():
    """A CUDA event (the tests replace it to run the pinned path on the CPU)."""
    return torch.cuda.Event()


def place_data(x_train: torch.Tensor, y_train: torch.Tensor, x_sel: torch.Tensor, device, config: TrainConfig,
               n_params: int, log=None) -> Placement:
    """Where the images live during training (a :class:`Placement`).

    On CUDA they are copied to the device once when they fit together with the model, its optimiser state, the
    training step and a validation batch (:func:`deeplense.device.memory_plan`, with the memory PyTorch already
    holds counted as free); every step then gathers, augments and resizes there without a host-to-device copy.
    Otherwise each batch is staged through pinned buffers. On the CPU (and MPS) they stay where they are.
    """
    plan = as_plan(device, config)
    if plan.kind != "cuda":
        return Placement(x_train, y_train, x_sel, plan, True, config.eval_batch_size, batch_size=config.batch_size)
    mem = memory_plan(config.arch, config.image_size, config.batch_size, n_params,
                      x_train.nbytes + y_train.nbytes + x_sel.nbytes, free_memory(plan.device),
                      eval_batch_size=config.eval_batch_size, element_bytes=2 if plan.autocast_dtype else 4)
    if log is not None:
        log(f"memory: {mem.describe()}")
    if mem.resident:
        return Placement(plan.to_device(x_train), plan.to_device(y_train), plan.to_device(x_sel), plan, True,
                         mem.eval_batch_size, mem, config.batch_size)
    return Placement(x_train, y_train, x_sel, plan, False, mem.eval_batch_size, mem, config.batch_size)


def train_step(net, opt, scaler, xb: torch.Tensor, yb: torch.Tensor, config: TrainConfig, plan: Plan,
               draws: torch.Tensor | None = None) -> torch.Tensor:
    """One optimiser step on a batch already on the device: ``xb`` ``(B, 1, h, w)`` in [0, 1] and labels ``yb``.
    Augments it (``draws``: this batch's choices, see :func:`deeplense.transforms.augmentation_draws`), makes the model
    input in the plan's layout, runs the forward pass under the plan's autocast, the loss in float32, the backward
    pass and the (scaled) optimiser step. Returns the loss as a device tensor (reading it synchronises).

    The one training step of the project: :func:`train_one_epoch` and every benchmark call it.
    """
    xb = augment(xb, config.augmentation, draws=draws)
    xb = plan.layout(input_fn(config)(xb))  # (B, 3, S, S) in [-1, 1]
    with plan.autocast():
        logits = net(xb)
    loss = F.cross_entropy(logits.float(), yb, label_smoothing=config.label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if config.clip_grad:
        scaler.unscale_(opt)  # clip the true gradients, not the fp16 scaler's scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], config.clip_grad)
    scaler.step(opt)
    scaler.update()
    return loss


def build_ema(model, config: TrainConfig):
    """The exponential moving average of ``model``'s weights and buffers (torch's ``AveragedModel`` with its EMA
    update, decay ``config.ema`` per step), or None when ``config.ema`` is off."""
    if not config.ema:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)


def train_one_epoch(net, opt, sched, scaler, data: Placement, config: TrainConfig, *, epoch: int, rank: int = 0,
                    world: int = 1, progress: bool = True, ema=None, model=None) -> dict:
    """Train ``net`` for one epoch on ``data`` (a :class:`Placement`); return ``train_loss``, ``train_images``
    (all ranks), ``train_images_distinct``, ``lr``, ``train_seconds`` and ``train_images_per_s``.

    The epoch's order is a permutation seeded by (seed, epoch); under torchrun rank r takes the r-th of
    ``world`` equal, disjoint slices of it. The augmentation choices are drawn from the same generator at the start
    of the epoch, so CPU runs repeat bit for bit. The loss is summed on the device (in the plan's ``sum_dtype``)
    and read by the progress bar every few seconds only. ``ema`` (:func:`build_ema`) is updated from ``model``
    (the unwrapped network) after every step.
    """
    plan = data.plan
    net.train()
    n = len(data.x_train)
    per_rank = n // world
    steps = steps_per_epoch(per_rank, config.batch_size)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)[rank * per_rank : (rank + 1) * per_rank]
    draws = augmentation_draws(config.augmentation, len(perm), gen)
    perm = perm.to(data.index_device)
    draws = None if draws is None else plan.to_device(draws)
    t0 = shown = time.perf_counter()
    loss_sum, seen = torch.zeros((), dtype=plan.sum_dtype, device=plan.device), 0
    trained_on = torch.zeros(n, dtype=torch.int32, device=data.index_device)  # uses of each image
    bar = progress_bar(range(steps), desc=f"epoch {epoch}/{config.epochs}", unit="step",
                       disable=not (progress and rank == 0), leave=False)
    for step in bar:
        batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
        idx = perm[batch]
        xb, yb = data.batch(idx)  # (B, 1, h, w) in [0, 1] on the device
        trained_on[idx] += 1
        loss = train_step(net, opt, scaler, xb, yb, config, plan, None if draws is None else draws[batch])
        if ema is not None:
            ema.update_parameters(model if model is not None else net)
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
    counts = plan.to_device(trained_on)
    if world > 1:  # reduced on the training device: NCCL reduces only CUDA tensors
        stats = torch.stack([loss_sum, torch.tensor(float(seen), dtype=plan.sum_dtype, device=plan.device)])
        torch.distributed.all_reduce(stats)
        loss_sum, seen = stats[0], int(stats[1])
        torch.distributed.all_reduce(counts)  # every rank's share: together they cover each image once
    return {"train_loss": float(loss_sum) / max(seen, 1), "train_images": seen,
            "train_images_distinct": int((counts > 0).sum()), "lr": lr_used, "train_seconds": seconds,
            "train_images_per_s": seen / seconds}


def has_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibration_indices(n_train: int, config: TrainConfig) -> torch.Tensor:
    """The training images :func:`recalibrate_bn` uses: ``config.bn_recalibration`` of them (all when fewer),
    drawn once from a generator of the seed (never the global one, so training is untouched), in index order; a
    last batch of one image is dropped (BatchNorm cannot average a single image's 1x1 map)."""
    n = min(config.bn_recalibration or 0, n_train)
    idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed + 7919))[:n]
    return idx.sort().values


def recalibrate_bn(model, data: Placement, config: TrainConfig) -> int:
    """Recompute ``model``'s BatchNorm running statistics from training images with its current weights (precise
    BatchNorm, :func:`torch.optim.swa_utils.update_bn`: a cumulative average over one pass in train mode, no
    gradient), so that validation and the saved checkpoint use statistics of these weights rather than a running
    average over the last steps' moving weights. Images: :func:`recalibration_indices`, not augmented, in
    validation-sized batches under the plan's autocast. Returns the number of images used (0: off, or no
    BatchNorm). Model parameters, optimiser and random state are not touched."""
    if not config.bn_recalibration or not has_batchnorm(model):
        return 0
    plan = data.plan
    idx = recalibration_indices(len(data.x_train), config).to(data.index_device)
    # BatchNorm in train mode needs 2 images a batch: a validation batch of 1 (--eval-batch-size 1) recalibrates in 2s
    bs = max(2, data.eval_batch_size or config.eval_batch_size or default_eval_batch_size(plan))
    if len(idx) % bs == 1:
        idx = idx[:-1]
    fn = input_fn(config)
    batches = (plan.layout(fn(plan.to_device(data.x_train[idx[s : s + bs]]))) for s in range(0, len(idx), bs))
    with plan.autocast():
        torch.optim.swa_utils.update_bn(batches, model)
    return len(idx)


def validate(model, x: torch.Tensor, y: np.ndarray, config: TrainConfig, device,
             batch_size: int | None = None) -> dict:
    """Loss, accuracy and AUCs of ``model`` on the selection images ``x`` with labels ``y``."""
    probs = predict_proba(model, x, config, device, batch_size=batch_size)
    if not np.isfinite(probs).all():
        from .util import DeepLenseError

        raise DeepLenseError("the network's outputs on the selection images are not finite (its activations "
                             "overflowed in eval mode: BatchNorm's running statistics do not fit these weights); "
                             "lower --lr, train longer with more images, or recompute the statistics before each "
                             "validation (--bn-recalibration 1024)")
    m = quick_metrics(y, probs)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_macro_auc": m["macro_auc"],
            "val_micro_auc": m["micro_auc"], "val_per_class_auc": m["per_class_auc"]}
