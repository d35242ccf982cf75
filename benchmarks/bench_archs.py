"""The networks behind ``--arch``, side by side: parameters, input, and CPU speed of training and prediction.

For each arch, at two inputs:

- the recipe's own (``recipe("default", arch=...)``): 3 channels at 224 px for the torchvision networks, the
  whole native 150 px image in 1 channel for ``lensnet`` and ``d4net``;
- the quick scale of the accuracy study (``experiments/accuracy_study.py``): the central 96 px shrunk to 64 px
  (``lensnet``: the central 96 native px, 1 channel; ``d4net``: the central 97).

``train`` is images/s of the engine's own training step (``engine.train_step``: D4 augmentation, input
transform, forward, backward, fused AdamW step; fp32) on a fixed batch in memory, median of a few steps after a
warm-up; ``predict`` is ``engine.predict_proba`` in eval mode. Each line: ``arch_<name>: ...``. With ``--readme``
the table between the ``archs`` markers (docs/networks.md) is rewritten, with the held-out macro AUC of the arms the
committed studies hold (:data:`STUDIES`: ``default`` is resnet34; each other network's arm with its paired
difference from the ``default`` of its own study, since the studies ran on different machines).

Usage: ``python benchmarks/bench_archs.py [--archs resnet34,lensnet] [--readme]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import torch

from deeplense.config import ARCHS, NATIVE_ARCHS, input_channels, recipe
from deeplense.engine import as_plan, build_optimizer, predict_proba, train_step
from deeplense.model import build_model, model_for, parameter_count
from deeplense.report import write_section
from deeplense.transforms import augmentation_draws
from deeplense.util import REPO, DeepLenseError, cpu_name

from common import emit

RESULTS = REPO / "experiments" / "results"
STUDIES = ("study", "study_issue25", "study_issue25_cnns")
"""The committed studies on the ``benchmark`` preset (``experiments/results/NAME.json``) whose network arms fill the
first AUC column; the first one holding an arch gives its cell, and ``default`` (resnet34) comes from the first,
``study``."""
REALISTIC_STUDIES = ("study_realistic",)
"""The committed studies on the ``realistic`` preset, which fill the second AUC column."""
STUDY = RESULTS / "study.json"


def configs(arch: str) -> dict:
    """The recipe's input and the quick scale's; the quick one is None for a network that cannot take it
    (``maxvit_t``: multiples of 224 px only)."""
    try:
        quick = recipe("default", scale="quick", arch=arch)
    except DeepLenseError:
        quick = None
    return {"recipe": recipe("default", arch=arch), "quick": quick}


def speed(arch: str, cfg, steps: int) -> tuple[float, float]:
    """(train images/s, predict images/s) on the CPU for ``cfg``'s input at its batch size (16 at most at the
    recipe's input, to keep the run short)."""
    plan = as_plan(torch.device("cpu"), cfg.replace(precision="fp32"))
    torch.manual_seed(0)
    model = model_for(cfg, "none")[0]
    opt = build_optimizer(model, cfg, plan)
    scaler = plan.grad_scaler()
    batch = min(cfg.batch_size, 16 if (cfg.crop is None) else cfg.batch_size)
    side = cfg.crop or 150
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, side, side, generator=gen)
    y = torch.randint(0, 3, (batch,), generator=gen)
    times = []
    model.train()
    for s in range(steps + 1):  # step 0 warms up
        draws = augmentation_draws(cfg.augmentation, batch, gen)
        t0 = time.perf_counter()
        train_step(model, opt, scaler, x, y, cfg, plan, draws)
        if s:
            times.append(time.perf_counter() - t0)
    train_rate = batch / float(np.median(times))
    xp = torch.rand(4 * batch, 1, side, side, generator=gen)
    predict_proba(model, xp[:batch], cfg, plan, batch_size=batch)
    t0 = time.perf_counter()
    predict_proba(model, xp, cfg, plan, batch_size=batch)
    return train_rate, len(xp) / (time.perf_counter() - t0)


def geometry(cfg) -> str:
    if cfg is None:
        return "n/a (its 7 x 7 windows need multiples of 224 px)"
    c = input_channels(cfg.arch)
    if cfg.arch in NATIVE_ARCHS:
        return f"{c} x {cfg.image_size} px (native{', central crop' if cfg.crop else ''})"
    crop = f", central {cfg.crop} px" if cfg.crop else ""
    return f"{c} x {cfg.image_size} px{crop}"


def arm_arch(arm: str) -> tuple[str, str | None] | None:
    """(arch, attention) of a study arm that changes only the network (``default`` is resnet34, ``resnet18``,
    ``lensnet``, ``convnext_tiny``, ``resnet34_attn_se``, ...); None for a recipe arm (``default_ema``,
    ``default_tta``)."""
    if arm == "default":
        return "resnet34", None
    if "_lr" in arm:  # the network at another learning rate than its study's default: a recipe arm
        return None
    arch, _, attention = arm.partition("_attn_")
    if attention:
        return arch + "_attn", attention
    return (arm, None) if arm in ARCHS else None


def study_auc(names=STUDIES, results=RESULTS) -> dict:
    """{arch: cell} from the committed studies: 'mean ± std (n seeds)' for resnet34 (``default``); for another
    network, that and its paired difference from its own study's ``default`` with the 95% t interval over seeds, and
    the study's name. ``resnet34_attn`` lists each attention kind."""
    out: dict[str, list[str]] = {}
    taken: dict[str, str] = {}
    for name in names:
        path = Path(results) / f"{name}.json"
        if not path.exists():
            continue
        study = json.loads(path.read_text())
        for arm, a in study["arms"].items():
            base = arm.removesuffix("_bf16")
            if base != arm and base in study["arms"]:
                continue  # the network's fp32 arm speaks for it; a bf16 arm alone stands in, marked
            net = arm_arch(base)
            t = a["test"]["macro_auc"]
            if net is None or t["mean"] is None or taken.setdefault(net[0], name) != name:
                continue
            arch, attention = net
            cell = f"{'bf16: ' if base != arm else ''}{t['mean']:.4f} ± {t['std']:.4f} ({a['seeds']} seeds)"
            d = a.get("paired_vs_default")
            if d and d["mean"] is not None and d["t_ci"][0] == d["t_ci"][0]:  # NaN: one seed, no interval
                lo, hi = d["t_ci"]
                cell = (f"{attention + ': ' if attention else ''}{cell}; Δ {d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}], "
                        f"{d['verdict']}")
            out.setdefault(arch, []).append(cell)
    return {arch: "; ".join(cells) + ("" if arch == "resnet34" else f" (`{taken[arch]}`)")
            for arch, cells in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {','.join(ARCHS)}")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per input (default 3)")
    p.add_argument("--readme", action="store_true", help="rewrite the arch table (docs/networks.md)")
    args = p.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        p.error(f"unknown arch(s) {bad}; choose from {', '.join(ARCHS)}")
    aucs = study_auc()
    rows = []
    t_start = time.time()
    for arch in archs:
        cfgs = configs(arch)
        params = parameter_count(build_model("none", arch=arch)[0])
        (tr, pr), (tq, pq) = (speed(arch, cfgs[k], args.steps) if cfgs[k] else (float("nan"),) * 2
                              for k in ("recipe", "quick"))
        emit(f"arch_{arch}", f"{params / 1e6:.2f} M parameters; input {geometry(cfgs['recipe'])}: train {tr:.1f} "
             f"img/s, predict {pr:.1f} img/s; quick input {geometry(cfgs['quick'])}: train {tq:.1f} img/s, "
             f"predict {pq:.1f} img/s", value=tq, unit="img/s (quick-input training)")
        rows.append((arch, params, geometry(cfgs["recipe"]), tr, pr, geometry(cfgs["quick"]), tq, pq))
    if args.readme:
        study = json.loads(STUDY.read_text())["scale"] if STUDY.exists() else None
        minutes = (time.time() - t_start) / 60
        lines = [f"- Command: `python benchmarks/bench_archs.py --readme` on {cpu_name()}, "
                 f"{dt.date.today().isoformat()}, torch {torch.__version__} ({minutes:.1f} min).",
                 f"- Speeds: training images/s of the real step at the batch shown, median of {args.steps} steps. The "
                 "machine is shared, so read ratios, not digits. GPU speeds are not measured yet.",
                 "- Macro AUC: the held-out test of the committed accuracy studies, mean ± std over seeds. Each "
                 "column is one preset's studies"
                 + (f" (benchmark: {study['description']}, {study['n_test']} test images)." if study else "."),
                 "- For each network but resnet34, Δ is its paired difference from the `default` (resnet34) of the "
                 "same study, with the 95% t interval over seeds.",
                 "- The study is named (`experiments/results/NAME.json`, its command inside). The studies ran on "
                 "different CPUs, so compare Δs, not AUCs across studies.", "",
                 "| arch | parameters | recipe input | train img/s (CPU, batch 16) | predict img/s (CPU) | "
                 "quick-scale input | train img/s (CPU, batch 32) | predict img/s (CPU) | held-out macro AUC, "
                 "benchmark preset, quick scale (5 epochs) | held-out macro AUC, realistic preset, quick scale "
                 "(15 epochs) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        realistic = study_auc(REALISTIC_STUDIES)

        def rate(v: float) -> str:
            return "n/a" if v != v else f"{v:.1f}"  # NaN: the network cannot take that input

        for arch, params, g, tr, pr, gq, tq, pq in rows:
            lines.append(f"| `{arch}` | {params / 1e6:.2f} M | {g} | {rate(tr)} | {rate(pr)} | {gq} | {rate(tq)} | "
                         f"{rate(pq)} | {aucs.get(arch, 'not in the study')} | "
                         f"{realistic.get(arch, 'not in the study')} |")
        print(f"wrote the arch table into {write_section('archs', chr(10).join(lines))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
