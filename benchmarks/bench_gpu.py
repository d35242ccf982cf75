"""GPU benchmarks, every figure from one process and one run (``make bench-gpu``; about 4 minutes on one H100).

- ``gpu_train_step``: the engine's own training step (:func:`deeplense.engine.train_step`, the function
  ``train_one_epoch`` calls: ``default`` recipe, 224 px, its batch; the data on the device as
  :func:`deeplense.engine.place_data` puts them, indices and D4 draws on the device, the precision
  :func:`deeplense.device.plan_for` picks, channels_last, fused AdamW) against the model alone on a fixed batch at
  the same batch size and precision. Goal: >= 0.9.
- ``gpu_vs_reference``: the same engine against the reference solution's pipeline (per-sample PIL transforms in
  a DataLoader with one worker per CPU this process may use (``os.sched_getaffinity``), pin_memory, batch 256,
  fp32, SGD), timed only after the batches its workers prefetched are used up, so the workers are the bottleneck
  if they are one. Goal: >= 3.
- ``gpu_batch``: the engine at batch 64 and at 256 (images/s), and with cudnn.benchmark off and on.
- ``gpu_compile``: ``torch.compile`` of the training step: compile time and the speed-up after it
  (``--no-compile`` skips it: compiling takes minutes).
- ``gpu_epoch``: one full-scale epoch end to end (30,000 images from the cache built on the spot, 224 px,
  validation on 6,750 images included); ``gpu_run_20_epochs``: that times 20 plus the cache build.
  Goal: a 20-epoch full-scale run <= 3 minutes.
- ``gpu_inference``: evaluation images/s without and with 8-way TTA.

Lines read ``name: value, ratio x vs baseline (goal >= g)``; the GPU's name comes first. Without CUDA the script
prints one line saying it was skipped and exits 0. ``--quick`` shrinks every measurement (a smoke test).

Needs only torch, torchvision, numpy and this package: on a GPU node with its own torch and no package registry,
run it from a checkout as ``PYTHONPATH=Common_Task python3 benchmarks/bench_gpu.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import emit, reference_sample, reference_transform, synchronizer, timed


def cpu_workers() -> int:
    """CPUs this process may run on (a cluster job's allocation, not the whole node's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def engine_step_rate(x_all, y_all, dev, batch: int, steps: int, *, image_size: int = 224, benchmark: bool = True,
                     compiled: bool = False, arch: str = "resnet34", sync=None) -> tuple[float, float, str]:
    """``(engine images/s, model-alone images/s, precision)`` at ``batch``: the engine's own
    :func:`~deeplense.engine.train_step` on batches gathered as ``train_one_epoch`` gathers them (indices and
    augmentation draws already on the device, no copy per step), against the same step function on one fixed
    batch already at the input size, with augmentation off."""
    import torch

    from deeplense import engine
    from deeplense.config import recipe
    from deeplense.model import build_model

    sync = sync or synchronizer(dev)
    torch.backends.cudnn.benchmark = benchmark
    cfg = recipe("default", batch_size=batch, weights="none", image_size=image_size, arch=arch)
    torch.manual_seed(0)
    model = build_model("none", arch=arch)[0]
    plan = engine.as_plan(dev, cfg)
    placed = engine.place_data(x_all, y_all, x_all[:batch], plan, cfg, sum(p.numel() for p in model.parameters()))
    model = model.to(dev, memory_format=torch.channels_last if plan.channels_last else torch.preserve_format).train()
    net = torch.compile(model) if compiled else model
    opt = engine.build_optimizer(model, cfg, plan)
    scaler = plan.grad_scaler()
    gen = torch.Generator().manual_seed(0)
    n_steps = steps + 3
    perm = torch.randint(0, len(x_all), (n_steps * batch,), generator=gen).to(placed.index_device)
    draws = plan.to_device(torch.randint(0, 8, (n_steps * batch,), generator=gen))
    state = {"k": 0}

    def real():
        k = state["k"] % n_steps
        state["k"] += 1
        b = slice(k * batch, (k + 1) * batch)
        xb, yb = placed.batch(perm[b])
        engine.train_step(net, opt, scaler, xb, yb, cfg, plan, draws[b])

    fixed_x, fixed_y = placed.batch(perm[:batch])
    # the model alone: a batch already at the input size (the step then only maps it to [-1, 1]), no augmentation
    fixed_x = torch.nn.functional.interpolate(fixed_x, size=(cfg.image_size, cfg.image_size), mode="bilinear")
    alone = cfg.replace(augmentation="none", resize_then_crop=None)
    t_real = timed(real, 3, steps, sync)
    t_alone = timed(lambda: engine.train_step(net, opt, scaler, fixed_x, fixed_y, alone, plan), 3, steps, sync)
    return batch / t_real, batch / t_alone, plan.precision


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile figure (minutes of compiling)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        emit("gpu", "skipped (no CUDA device on this machine)")
        return 0
    from deeplense.device import pick_device

    dev = pick_device("cuda")
    emit("gpu", f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    n_images = 2_000 if args.quick else 30_000
    steps = 5 if args.quick else 30
    rng = np.random.default_rng(0)
    x_all = torch.from_numpy(rng.random((min(n_images, 4_096), 1, 150, 150), dtype=np.float32))
    y_all = torch.from_numpy(rng.integers(0, 3, len(x_all)))
    best = _bench_steps(x_all, y_all, dev, steps)
    _bench_compile(x_all, y_all, dev, steps, best, args.no_compile)
    _bench_reference(x_all, y_all, dev, steps, best)
    _bench_epochs(n_images)
    _bench_inference(x_all, dev)
    _bench_eval_memory(x_all, dev)
    return 0


def _bench_steps(x_all, y_all, dev, steps: int) -> float:
    """The engine's training step against the model alone, at the default batch and a card-filling one; cuDNN's
    autotuner on against off. Returns the engine's images/s at batch 256."""
    for batch in (64, 256):
        ours, alone, precision = engine_step_rate(x_all, y_all, dev, batch, steps)
        emit(f"gpu_train_step_b{batch}", f"{ours:.0f} img/s (engine.train_step, 224 px, D4 on the device, "
             f"{precision}, channels_last), ratio {ours / alone:.3f} vs model alone {alone:.0f} img/s", value=ours,
             unit="img/s", ratio=ours / alone, goal=">= 0.9")
        if batch == 256:
            best = ours
    off, _, _ = engine_step_rate(x_all, y_all, dev, 256, steps, benchmark=False)
    emit("gpu_cudnn_benchmark", f"{best:.0f} img/s on, ratio {best / off:.3f} vs off {off:.0f} img/s (batch 256)",
         value=best, unit="img/s", ratio=best / off)
    return best


def _bench_compile(x_all, y_all, dev, steps: int, best: float, skip: bool) -> None:
    """torch.compile's training step against eager."""
    t0 = time.perf_counter()
    if skip:
        emit("gpu_compile", "skipped (--no-compile)")
    else:
        try:
            compiled, _, _ = engine_step_rate(x_all, y_all, dev, 256, steps, compiled=True)
            emit("gpu_compile", f"{compiled:.0f} img/s compiled, ratio {compiled / best:.3f} vs eager {best:.0f} "
                 f"img/s (compile and measure {time.perf_counter() - t0:.0f} s)", value=compiled, unit="img/s",
                 ratio=compiled / best)
        except Exception as exc:  # noqa: BLE001 - report, do not stop the other figures
            emit("gpu_compile", f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")


def _bench_reference(x_all, y_all, dev, steps: int, best: float) -> None:
    """The reference solution's pipeline (PIL transforms in DataLoader workers, fp32, SGD) against the engine."""
    import torch
    import torch.nn.functional as F

    from deeplense.model import build_model

    sync = synchronizer(dev)
    workers = cpu_workers()
    prefetched = 2 * workers + 1  # DataLoader's prefetch_factor 2 per worker, and the first batch
    n_batches = prefetched + steps

    class Reference(torch.utils.data.Dataset):
        tf = reference_transform()

        def __len__(self):
            return n_batches * 256

        def __getitem__(self, i):
            i = i % len(x_all)
            return reference_sample(x_all[i, 0].numpy(), self.tf), int(y_all[i])

    loader = torch.utils.data.DataLoader(Reference(), batch_size=256, shuffle=True, num_workers=workers,
                                         pin_memory=True, drop_last=True)
    torch.backends.cudnn.benchmark = False
    model = build_model("none")[0].to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    seen, t0 = 0, None
    for k, (x, y) in enumerate(loader):
        if k == prefetched:  # every batch from here on was made while the GPU waited or worked
            sync()
            t0, seen = time.perf_counter(), 0
        loss = F.cross_entropy(model(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if t0 is not None:
            seen += len(y)
    sync()
    reference = seen / (time.perf_counter() - t0)
    emit("gpu_vs_reference", f"{best:.0f} img/s engine at batch 256, ratio {best / reference:.2f} vs the reference "
         f"pipeline {reference:.0f} img/s (PIL DataLoader, {workers} workers, {steps} batches timed after "
         f"{prefetched} prefetched, fp32, SGD)", value=best, unit="img/s", ratio=best / reference, goal=">= 3")


def _bench_epochs(n_images: int) -> None:
    """Full-scale epochs end to end, through the real train() on a dataset of the official size."""
    from deeplense.config import recipe
    from deeplense.testing import write_dataset
    from deeplense.train import train

    per_class = n_images // 3
    with tempfile.TemporaryDirectory(prefix="deeplense-gpu-") as tmp:
        os.environ["DEEPLENSE_CACHE"] = str(Path(tmp) / "cache")
        t0 = time.perf_counter()
        data = write_dataset(Path(tmp) / "data", n_train=per_class, n_val=max(10, per_class // 4))
        written = time.perf_counter() - t0
        stamps = []
        t0 = time.perf_counter()
        s = train(recipe("default", epochs=2, weights="none"), data, Path(tmp) / "run", device="cuda",
                  progress=False, log=lambda *a: stamps.append(time.perf_counter()))
        total = time.perf_counter() - t0
        per_epoch = stamps[-1] - stamps[-2]  # the second epoch: training, validation and checkpoints
        h = s["history"][-1]
        emit("gpu_epoch", f"{per_epoch:.1f} s per full-scale epoch ({h['train_images']} images at 224 px, batch "
             f"{s['config']['batch_size']}, {h['train_images_per_s']:.0f} img/s training, validation and "
             f"checkpoints included); the first, with the cache build: {total - per_epoch:.1f} s (files written "
             f"beforehand in {written:.0f} s, not counted)", value=per_epoch, unit="s")
        emit("gpu_run_20_epochs", f"{(total + 18 * per_epoch) / 60:.1f} min estimated (2 epochs measured: "
             f"{total:.0f} s; the goal is for one H100)", value=(total + 18 * per_epoch) / 60, unit="min",
             goal="<= 3", on="value")


def _bench_inference(x_all, dev) -> None:
    """Prediction images/s, with and without 8-way TTA."""
    import torch

    from deeplense import engine
    from deeplense.config import recipe
    from deeplense.model import build_model

    sync = synchronizer(dev)
    cfg = recipe("default", weights="none")
    model = build_model("none")[0].to(dev, memory_format=torch.channels_last).eval()
    xe = x_all[:2048]
    rates = {}
    for tta in (False, True):
        t = timed(lambda tta=tta: engine.predict_proba(model, xe, cfg, dev, tta=tta), 1, 2, sync)
        rates[tta] = len(xe) / t
    emit("gpu_inference", f"{rates[False]:.0f} img/s at 224 px, 8-way TTA {rates[True]:.0f} img/s, ratio "
         f"{rates[False] / rates[True]:.2f} (expected about 8)", value=rates[False], unit="img/s",
         ratio=rates[False] / rates[True])


def _bench_eval_memory(x_all, dev) -> None:
    """Peak memory of validation at batch 1024, against the estimate the memory plan budgets with."""
    import torch

    from deeplense import engine
    from deeplense.config import recipe
    from deeplense.device import activation_bytes
    from deeplense.model import build_model

    for arch in ("resnet34", "resnet50", "efficientnet_b3"):
        cfg = recipe("default", weights="none", arch=arch, eval_batch_size=1024)
        net = build_model("none", arch=arch)[0].to(dev, memory_format=torch.channels_last).eval()
        xm = x_all[:1024].to(dev)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        engine.predict_proba(net, xm, cfg, dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        plan = engine.as_plan(dev, cfg)
        estimate = 1024 * activation_bytes(arch, 224, 2 if plan.autocast_dtype else 4)[1]
        emit(f"gpu_eval_memory_{arch}", f"{peak / 1e9:.2f} GB peak at batch 1024, 224 px, {plan.precision}, ratio "
             f"{peak / estimate:.2f} vs the memory plan's estimate {estimate / 1e9:.2f} GB", value=peak / 1e9,
             unit="GB", ratio=peak / estimate, goal="<= 1")
        del net, xm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
