"""CPU precision and compilation: the engine's training step in fp32 against bf16 autocast, side by side.

- ``cpu_bf16_<arch>_<input>``: images/s of :func:`deeplense.engine.train_step` (D4, resize, forward, backward,
  fused AdamW) under bf16 autocast against fp32, for resnet34, resnet18, lensnet and d4net at the demo input (the
  central 96 px shrunk to 64 px, batch 32; lensnet: the 96 px crop as it is; d4net: the 97 px crop as it is) and at
  the recipe's (224 px, batch 16; the native networks: the whole 150 px). The two kinds of step alternate on one
  model, after a warm-up step of each, so a busy
  moment of the shared machine hits both; each rate is the batch over the median step time, and the spread is the
  larger relative interquartile range of the two (a ratio within it of 1 is noise). The line says whether this
  CPU has native bf16 (AVX512-BF16 or AMX): without it torch emulates bf16, and ``--precision auto`` keeps fp32.
  Goal (native bf16 only): >= 1.4 at the demo input.
- ``cpu_compile_<arch>``: ``torch.compile`` of the same step in fp32 against eager, with the compile time
  (lensnet at the quick scale; ``--full`` adds resnet34).

Without native bf16 the recipe-input bf16 lines are skipped (an emulated bf16 step at 224 px takes minutes) and
the demo-input ones take 2 timed steps each. Usage: ``python benchmarks/bench_precision.py [--full]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from deeplense import engine
from deeplense.config import recipe
from deeplense.device import Plan, cpu_native_bf16
from deeplense.model import build_model

from common import emit

INPUTS = {  # name: (image_size, crop, batch) for the ImageNet networks; the native ones take the crop (or 150)
    "demo": (64, 96, 32),
    "recipe": (224, None, 16),
}


def _config(arch: str, inp: str, batch: int | None = None):
    size, crop, bs = INPUTS[inp]
    if arch == "lensnet":
        return recipe("default", arch="lensnet", crop=crop, batch_size=batch or bs, weights="none")
    if arch == "d4net":  # its own odd crop (97 px) where the input crops
        return recipe("d4net", crop=crop and 97, batch_size=batch or bs, weights="none")
    return recipe("default", arch=arch, image_size=size, crop=crop, batch_size=batch or bs, weights="none")


def paired_rates(arch: str, inp: str, plans: dict[str, Plan], steps: int, compiled: str | None = None):
    """``({name: images/s}, spread, compile seconds)``: steps of each plan alternating on one model;
    ``compiled`` names the plan whose network is ``torch.compile``-d (the others run eager)."""
    cfg = _config(arch, inp)
    side = cfg.crop or 150
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((cfg.batch_size * 4, 1, side, side), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 3, len(x)))
    torch.manual_seed(0)
    model = build_model("none", arch=arch)[0].train()
    nets = {name: torch.compile(model) if name == compiled else model for name in plans}
    opt = engine.build_optimizer(model, cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in plans}
    compile_s = None
    for s in range(steps + 1):  # step 0 warms up (and compiles)
        for name, plan in plans.items():
            idx = torch.randperm(len(x), generator=gen)[: cfg.batch_size]
            draws = torch.randint(0, 8, (cfg.batch_size,), generator=gen)
            t0 = time.perf_counter()
            engine.train_step(nets[name], opt, plan.grad_scaler(), x[idx], y[idx], cfg, plan, draws)
            took = time.perf_counter() - t0
            if s:
                times[name].append(took)
            elif name == compiled:
                compile_s = took
    med = {k: float(np.median(v)) for k, v in times.items()}
    spread = max(float(np.subtract(*np.percentile(v, [75, 25]))) / med[k] for k, v in times.items())
    return {k: cfg.batch_size / m for k, m in med.items()}, spread, compile_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="more steps, and torch.compile of resnet34 too")
    args = p.parse_args(argv)
    cpu = torch.device("cpu")
    native = cpu_native_bf16()
    fp32, bf16 = Plan(cpu, "fp32"), Plan(cpu, "bf16", "measured whether or not it is native")
    plans = {"bf16": bf16, "fp32": fp32}
    for inp in INPUTS:
        for arch in ("resnet34", "resnet18", "lensnet", "d4net"):
            name = f"cpu_bf16_{arch}_{inp}"
            if not native and inp == "recipe":
                emit(name, "skipped (no native bf16 on this CPU: an emulated bf16 step at this input takes "
                     "minutes; see the demo-input lines)")
                continue
            steps = (8 if args.full else 4) if native else 2
            rates, spread, _ = paired_rates(arch, inp, plans, steps)
            emit(name, f"{rates['bf16']:.1f} img/s bf16 autocast, ratio {rates['bf16'] / rates['fp32']:.2f} vs "
                 f"fp32 {rates['fp32']:.1f} img/s (batch {_config(arch, inp).batch_size}, step-time spread "
                 f"{spread:.0%}; native bf16 on this CPU: {'yes' if native else 'no, emulated'})",
                 value=rates["bf16"], unit="img/s", ratio=rates["bf16"] / rates["fp32"],
                 goal=">= 1.4" if native and inp == "demo" else None)
    for arch in ("lensnet", "resnet34") if args.full else ("lensnet",):
        name = f"cpu_compile_{arch}"
        try:
            rates, spread, compile_s = paired_rates(arch, "demo", {"compiled": fp32, "eager": fp32}, 4,
                                                    compiled="compiled")
        except Exception as exc:  # noqa: BLE001 - report (no C++ compiler, an inductor bug), keep the other lines
            emit(name, f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            continue
        emit(name, f"{rates['compiled']:.1f} img/s compiled, ratio {rates['compiled'] / rates['eager']:.2f} vs "
             f"eager {rates['eager']:.1f} img/s (fp32, demo input; compile and first step {compile_s:.0f} s; "
             f"step-time spread {spread:.0%})", value=rates["compiled"], unit="img/s",
             ratio=rates["compiled"] / rates["eager"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
