"""GPU benchmarks, every figure from one process and one run (``make bench-gpu``; about 4 minutes on one H100).

- ``gpu_train_step``: the real engine's training step (``default`` recipe, 224 px, its batch; data on the device,
  D4 on the device, bf16 autocast, channels_last, fused AdamW) against the model alone on a fixed batch at the
  same batch size. Goal: >= 0.9.
- ``gpu_vs_reference``: the same engine against the reference solution's pipeline (per-sample PIL transforms in
  a DataLoader with ``num_workers=os.cpu_count()``, pin_memory, batch 256, fp32, SGD). Goal: >= 3.
- ``gpu_batch``: the engine at batch 64 and at 256 (images/s), and with cudnn.benchmark off and on.
- ``gpu_compile``: ``torch.compile`` of the training step: compile time and the speed-up after it.
- ``gpu_epoch``: one full-scale epoch end to end (30,000 images from the cache built on the spot, 224 px,
  validation on 6,750 images included); ``gpu_run_20_epochs``: that times 20 plus the cache build.
  Goal: a 20-epoch full-scale run <= 3 minutes.
- ``gpu_inference``: evaluation images/s without and with 8-way TTA.

Lines read ``name: value, ratio x vs baseline (goal >= g)``; the GPU's name comes first. Without CUDA the script
prints one line saying it was skipped and exits 0. ``--quick`` shrinks every measurement (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(fn, warmup: int, steps: int, sync) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls, the device synchronised around the timing."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device on this machine)")
        return 0
    import torch.nn.functional as F

    from deeplense import engine
    from deeplense.config import recipe
    from deeplense.data import augment, input_fn
    from deeplense.model import build_model

    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    print(f"gpu: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    n_images = 2_000 if args.quick else 30_000
    steps = 5 if args.quick else 30
    rng = np.random.default_rng(0)
    x_all = torch.from_numpy(rng.random((min(n_images, 4_096), 1, 150, 150), dtype=np.float32))
    y_all = torch.from_numpy(rng.integers(0, 3, len(x_all)))

    def engine_step_rate(batch: int, benchmark: bool = True, compiled: bool = False) -> tuple[float, float]:
        """(engine images/s, model-alone images/s) at ``batch``."""
        torch.backends.cudnn.benchmark = benchmark
        cfg = recipe("default", batch_size=batch, weights="none")
        torch.manual_seed(0)
        model = build_model("none")[0].to(dev, memory_format=torch.channels_last).train()
        net = torch.compile(model) if compiled else model
        opt = engine.build_optimizer(model, cfg, dev)
        xd, yd = x_all.to(dev), y_all.to(dev)
        gen = torch.Generator().manual_seed(0)
        fn = input_fn(cfg)

        def step(x, y):
            with engine.autocast_for(dev):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def real():
            idx = torch.randint(0, len(xd), (batch,), generator=gen).to(dev)
            draws = torch.randint(0, 8, (batch,), generator=gen).to(dev)
            step(engine._layout(fn(augment(xd[idx], "d4", draws=draws)), dev), yd[idx])

        fixed = engine._layout(fn(xd[:batch]), dev)
        alone_y = yd[:batch]
        t_real = _timed(real, 3, steps, sync)
        t_alone = _timed(lambda: step(fixed, alone_y), 3, steps, sync)
        return batch / t_real, batch / t_alone

    # the engine against the model alone, at the default batch and at a card-filling one
    for batch in (64, 256):
        ours, alone = engine_step_rate(batch)
        print(f"gpu_train_step_b{batch}: {ours:.0f} img/s (engine, 224 px, D4 on the device, bf16, channels_last), "
              f"ratio {ours / alone:.3f} vs model alone {alone:.0f} img/s (goal >= 0.9)", flush=True)
        if batch == 256:
            best = ours
    off, _ = engine_step_rate(256, benchmark=False)
    print(f"gpu_cudnn_benchmark: {best:.0f} img/s on, ratio {best / off:.3f} vs off {off:.0f} img/s (batch 256)",
          flush=True)

    # torch.compile
    t0 = time.perf_counter()
    try:
        compiled, _ = engine_step_rate(256, compiled=True)
        print(f"gpu_compile: {compiled:.0f} img/s compiled, ratio {compiled / best:.3f} vs eager {best:.0f} img/s "
              f"(compile and measure {time.perf_counter() - t0:.0f} s)", flush=True)
    except Exception as exc:  # noqa: BLE001 - report, do not stop the other figures
        print(f"gpu_compile: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", flush=True)

    # the reference solution's pipeline
    from torchvision import transforms

    class Reference(torch.utils.data.Dataset):
        tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])

        def __len__(self):
            return len(x_all)

        def __getitem__(self, i):
            from PIL import Image

            img = Image.fromarray((x_all[i, 0].numpy() * 255).astype(np.uint8), mode="L").convert("RGB")
            return self.tf(img), int(y_all[i])

    loader = torch.utils.data.DataLoader(Reference(), batch_size=256, shuffle=True, num_workers=os.cpu_count(),
                                         pin_memory=True, persistent_workers=True, drop_last=True)
    torch.backends.cudnn.benchmark = False
    model = build_model("none")[0].to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    it = iter(loader)
    next(it)  # workers started before the timing
    seen, t0 = 0, None
    for k, (x, y) in enumerate(it):
        if k == 2:
            sync()
            t0, seen = time.perf_counter(), 0
        loss = F.cross_entropy(model(x.to(dev, non_blocking=True)), y.to(dev, non_blocking=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
        if k >= 2 + steps // 3 + 3:
            break
    sync()
    reference = seen / (time.perf_counter() - t0)
    print(f"gpu_vs_reference: {best:.0f} img/s engine at batch 256, ratio {best / reference:.2f} vs the reference "
          f"pipeline {reference:.0f} img/s (PIL DataLoader, {os.cpu_count()} workers, fp32, SGD; goal >= 3)",
          flush=True)

    # full-scale epochs end to end, through the real train() on a dataset of the official size
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
        print(f"gpu_epoch: {per_epoch:.1f} s per full-scale epoch ({h['train_images']} images at 224 px, batch "
              f"{s['config']['batch_size']}, {h['train_images_per_s']:.0f} img/s training, validation and checkpoints "
              f"included); the first, with the cache build: {total - per_epoch:.1f} s (files written beforehand in "
              f"{written:.0f} s, not counted)", flush=True)
        print(f"gpu_run_20_epochs: {(total + 18 * per_epoch) / 60:.1f} min estimated (2 epochs measured: "
              f"{total:.0f} s; goal <= 3 min on one H100)", flush=True)

    # evaluation
    cfg = recipe("default", weights="none")
    model = build_model("none")[0].to(dev, memory_format=torch.channels_last).eval()
    xe = x_all[:2048]
    rates = {}
    for tta in (False, True):
        t = _timed(lambda tta=tta: engine.predict_proba(model, xe, cfg, dev, tta=tta), 1, 2, sync)
        rates[tta] = len(xe) / t
    print(f"gpu_inference: {rates[False]:.0f} img/s at 224 px, 8-way TTA {rates[True]:.0f} img/s, ratio "
          f"{rates[False] / rates[True]:.2f} (expected about 8)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
