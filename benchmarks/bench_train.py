"""Training and inference benchmarks, measured side by side in one run.

- ``train_step``: training images/s of the engine's own step (``engine.train_step``; with the data pipeline:
  gather from the cached array, D4 augmentation, resize, [-1, 1], forward, backward, AdamW step) against the
  same step on a batch already in memory at the input size, without augmentation, at 224 and 150 px,
  alternating step by step; the line says how much step times vary, so a ratio within that of 1 reads as "no
  measurable cost". Goal: the pipeline costs under 5% of step time (ratio >= 0.95).
- ``input_stem``: ResNet34 with a 1-channel first convolution (the RGB kernels summed) against 3 replicated
  channels: outputs must match to 1e-5 (asserted); forward speed ratio; and a few SGD and AdamW steps in
  float64 with the folded kernel's learning rate x3 and weight decay /3, compared with the 3-channel model.
- ``inference``: ``predict`` images/s without and with 8-way TTA (``torch.inference_mode``), and with
  ``torch.compile`` (``--full`` only on CPU: compiling takes minutes) with its compile time.
- ``memory``: peak RSS of a training step at batch 32, 224 and 150 px (each in a fresh process).

Usage: ``python benchmarks/bench_train.py`` (quick) or ``--full``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from deeplense import engine
from deeplense.config import recipe
from deeplense.model import build_model
from deeplense.transforms import augmentation_draws

from common import emit


def _model():
    torch.manual_seed(0)
    return build_model("none")[0]


def train_step(size: int, batch: int, steps: int) -> tuple[float, float, float]:
    """Images/s of a training step with the data pipeline and with the model alone, and the step-time spread.

    Both are the engine's own step (``engine.train_step``, fp32 on the CPU): with the pipeline it gathers a batch
    from the cached array, draws D4 and resizes 150 px to ``size``; alone it gets one fixed batch already at
    ``size`` with augmentation off. One model and optimiser take ``steps`` steps of each kind, alternating
    (pipeline, alone, pipeline, ...), after one warm-up step of each, so a busy moment of the shared machine hits
    both; each rate is the batch over the median step time. The spread is the larger relative interquartile range
    of the two kinds' step times: a ratio closer to 1 than that is within noise.
    """
    rng = np.random.default_rng(0)
    cached = rng.random((batch * 8, 1, 150, 150), dtype=np.float32)  # stands in for the mmap cache
    labels = torch.from_numpy(rng.integers(0, 3, len(cached)))
    gen = torch.Generator().manual_seed(0)
    cfg = recipe("default", image_size=size, batch_size=batch, weights="none", precision="fp32")
    alone = cfg.replace(augmentation="none")
    plan = engine.as_plan(torch.device("cpu"), cfg)
    model = _model().train()
    opt = engine.build_optimizer(model, cfg, plan)  # fused AdamW, as in training
    scaler = plan.grad_scaler()
    fixed = F.interpolate(torch.from_numpy(cached[:batch]), size=(size, size), mode="bilinear",
                          antialias=size < 150).contiguous()
    times: dict[bool, list[float]] = {True: [], False: []}
    for s in range(steps + 1):  # step 0 warms up
        for pipeline in (True, False):
            t0 = time.perf_counter()
            if pipeline:
                idx = torch.randperm(len(cached), generator=gen)[:batch].sort().values
                draws = augmentation_draws("d4", batch, gen)
                engine.train_step(model, opt, scaler, torch.from_numpy(cached[idx.numpy()]), labels[idx], cfg, plan,
                                  draws)
            else:
                engine.train_step(model, opt, scaler, fixed, labels[:batch], alone, plan)
            if s:
                times[pipeline].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    spread = max(float(np.subtract(*np.percentile(v, [75, 25]))) / med[k] for k, v in times.items())
    return batch / med[True], batch / med[False], spread


def optimizer_step() -> None:
    """AdamW's step alone over ResNet34's 21.3 M parameters: fused kernel against the foreach one."""
    t = {}
    for mode in ("foreach", "fused", "foreach", "fused"):
        model = _model()
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **{mode: True})
        opt.step()
        t0 = time.perf_counter()
        for _ in range(5):
            opt.step()
        t[mode] = min(t.get(mode, 1e9), (time.perf_counter() - t0) / 5)
    emit("optimizer_step", f"{t['fused'] * 1e3:.0f} ms per AdamW step (fused), ratio {t['foreach'] / t['fused']:.2f} "
         f"vs foreach {t['foreach'] * 1e3:.0f} ms (fused is used in training on CPU and CUDA)",
         value=t["fused"] * 1e3, unit="ms", ratio=t["foreach"] / t["fused"])


def fold_stem(model):
    """A copy of ``model`` whose first convolution takes 1 channel: the RGB kernels summed."""
    folded = copy.deepcopy(model)
    w = model.conv1.weight.detach()
    folded.conv1 = torch.nn.Conv2d(1, w.shape[0], kernel_size=7, stride=2, padding=3, bias=False,
                                   dtype=w.dtype)
    with torch.no_grad():
        folded.conv1.weight.copy_(w.sum(dim=1, keepdim=True))
    return folded


def input_stem(size: int, batch: int) -> None:
    model = _model().eval()
    folded = fold_stem(model).eval()
    x1 = torch.rand(batch, 1, size, size) * 2 - 1
    x3 = x1.expand(-1, 3, -1, -1).contiguous()
    with torch.inference_mode():
        err = float((model.conv1(x3) - folded.conv1(x1)).abs().max())  # the stem's own output
        assert err < 1e-5, f"folded stem differs by {err}"
        a, b = model(x3), folded(x1)
        logit_err = float((a - b).abs().max() / a.abs().max())
        ts = {}
        for name, m, x in (("3ch", model, x3), ("1ch", folded, x1)):
            m(x)
            t0 = time.perf_counter()
            for _ in range(3):
                m(x)
            ts[name] = (time.perf_counter() - t0) / 3
    emit("input_stem", f"max |stem output difference| {err:.1e} (asserted < 1e-5; logits differ by {logit_err:.0e} "
         f"relative, float32 rounding), forward ratio {ts['3ch'] / ts['1ch']:.3f} vs 3 replicated channels at "
         f"{size} px (folded is faster if > 1)", value=err, ratio=ts["3ch"] / ts["1ch"])

    # training equivalence in float64: the folded kernel needs lr x3 and weight decay /3
    for opt_name in ("sgd", "adamw"):
        torch.manual_seed(1)
        m3 = build_model("none")[0].double().train()
        m1 = fold_stem(m3).train()
        xs = [torch.rand(4, 1, 64, 64, dtype=torch.float64) for _ in range(3)]
        ys = [torch.randint(0, 3, (4,)) for _ in range(3)]

        def make(m, stem_scale, opt_name=opt_name):
            stem = [m.conv1.weight]
            rest = [p for n, p in m.named_parameters() if n != "conv1.weight"]
            lr, wd = 1e-3, 0.05
            groups = [{"params": rest}, {"params": stem, "lr": lr * stem_scale, "weight_decay": wd / stem_scale}]
            if opt_name == "sgd":
                return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)
            return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, eps=1e-12)

        o3, o1 = make(m3, 1.0), make(m1, 3.0)
        for x, y in zip(xs, ys, strict=True):
            for m, o, inp in ((m3, o3, x.expand(-1, 3, -1, -1)), (m1, o1, x)):
                o.zero_grad()
                F.cross_entropy(m(inp), y).backward()
                o.step()
        diff = float((m3.conv1.weight.sum(1, keepdim=True) - m1.conv1.weight).abs().max())
        out_diff = float((m3(xs[0].expand(-1, 3, -1, -1)) - m1(xs[0])).abs().max())
        emit(f"input_stem_training_{opt_name}", f"after 3 steps in float64, max |folded - summed RGB kernel| "
             f"{diff:.1e}, max |logit difference| {out_diff:.1e} (lr x3, weight decay /3 on the folded kernel)",
             value=diff)


def inference(size: int, n: int, compile_too: bool) -> None:
    from deeplense.config import TrainConfig
    from deeplense.engine import predict_proba

    model = _model().eval()
    cfg = TrainConfig(image_size=size, eval_batch_size=32)
    x = torch.rand(n, 1, 150, 150)
    dev = torch.device("cpu")
    predict_proba(model, x[:32], cfg, dev)
    res = {}
    for tta in (False, True):
        t0 = time.perf_counter()
        predict_proba(model, x if not tta else x[: max(32, n // 8)], cfg, dev, tta=tta)
        res[tta] = (n if not tta else max(32, n // 8)) / (time.perf_counter() - t0)
    emit("inference", f"{res[False]:.1f} img/s at {size} px (inference_mode, eval), 8-way TTA {res[True]:.1f} img/s, "
         f"ratio {res[False] / res[True]:.2f} vs TTA (expected about 8)", value=res[False], unit="img/s",
         ratio=res[False] / res[True])
    if not compile_too:
        emit("inference_compile", "skipped at quick scale (compiling ResNet34 on CPU takes minutes; use --full)")
        return
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    predict_proba(compiled, x[:32], cfg, dev)
    ctime = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict_proba(compiled, x, cfg, dev)
    rate = n / (time.perf_counter() - t0)
    emit("inference_compile", f"{rate:.1f} img/s with torch.compile, ratio {rate / res[False]:.2f} vs eager "
         f"(compile time {ctime:.0f} s)", value=rate, unit="img/s", ratio=rate / res[False])


MEMORY_CHILD = r"""
import json, sys, torch
from deeplense import engine
from deeplense.config import recipe
from deeplense.model import build_model
size = int(sys.argv[1])
cfg = recipe("default", image_size=size, batch_size=32, weights="none", precision="fp32")
plan = engine.as_plan(torch.device("cpu"), cfg)
m = build_model("none")[0].train(); opt = engine.build_optimizer(m, cfg, plan); scaler = plan.grad_scaler()
x = torch.rand(32, 1, 150, 150); y = torch.randint(0, 3, (32,))
for _ in range(2):  # the engine's own training step
    engine.train_step(m, opt, scaler, x, y, cfg, plan, torch.randint(0, 8, (32,)))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of a large parent reports the
# parent's peak
hwm_kb = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(json.dumps({"maxrss_mb": hwm_kb / 1024}))
"""


def memory() -> None:
    for size in (224, 150):
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(size)], capture_output=True, text=True,
                             check=True).stdout
        mb = json.loads(out.strip().splitlines()[-1])["maxrss_mb"]
        emit(f"memory_train_{size}px", f"{mb / 1024:.2f} GB peak RSS, batch 32, AdamW", value=mb / 1024, unit="GB",
             goal="<= 8", on="value")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="more steps; also time torch.compile")
    args = p.parse_args(argv)
    steps = 12 if args.full else 5
    rates = {}
    for size in (224, 150):
        full, alone, spread = train_step(size, 32, steps)
        rates[size] = full
        emit(f"train_step_{size}px", f"{full:.1f} img/s with the data pipeline, ratio {full / alone:.3f} vs model "
             f"alone {alone:.1f} img/s (median of {steps} alternating steps each, step times vary by {spread:.0%})",
             value=full, unit="img/s", ratio=full / alone, goal=">= 0.95")
    emit("train_step_150_vs_224", f"ratio {rates[150] / rates[224]:.2f} (150 px speed / 224 px speed)",
         ratio=rates[150] / rates[224])
    optimizer_step()
    input_stem(224, 16)
    inference(150, 256 if args.full else 96, compile_too=args.full)
    memory()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
