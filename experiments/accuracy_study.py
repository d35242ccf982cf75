"""A controlled accuracy study on the simulated benchmark: which of our choices pay off, beyond seed noise?

One simulated set (the ``benchmark`` preset by default, data seed 1234), the same epoch budget for every arm,
several training seeds per arm, the clean protocol by default (select on 10% of ``train``, train on the rest,
test on all of ``val``, so the test set is large). Each arm is compared with ``default`` **paired**: per training
seed on the same data and test images, with a t interval over seeds and a paired bootstrap over test images. An
arm wins (or loses) only when both 95% intervals exclude 0; otherwise it is within noise.

Arms (``--arms`` picks a subset):

- ``reference``: the reference recipe (SGD 1e-4, momentum 0.9, StepLR(7, 0.1), batch 256, horizontal flips,
  resize then centre-crop, best epoch by accuracy);
- ``default``: our recipe (AdamW + warm-up + cosine, D4 augmentation, best epoch by macro AUC, BatchNorm's
  statistics recomputed before each validation);
- ``default_no_d4``: ``default`` without augmentation;
- ``default_tta``: ``default``'s checkpoints evaluated with 8-way D4 test-time averaging;
- ``default_150px``: ``default`` on the whole native 150 px image (no crop, no resize);
- ``default_ls``: ``default`` with label smoothing 0.1;
- ``default_d2``: ``default`` with D2 augmentation (the 4 symmetries that keep the x axis, along which the real
  lenses lie) instead of D4; ``default_d2_tta``: its checkpoints evaluated with D2 test-time averaging (4 views);
- ``default_ema``: ``default`` selected and evaluated on an exponential moving average of its weights (decay 0.99
  per step at the quick scale, whose 5 epochs are about 340 steps; 0.999 at the GPU scale);
- ``default_clip``: ``default`` with the gradients' global norm clipped to 1;
- ``default_no_recal``: ``default`` without recomputing BatchNorm's running statistics before each validation (the
  recipe before that fix: the same training, bit for bit; only what is evaluated, selected and saved differs);
- the networks (:data:`NETWORK_ARMS`): ``default`` on ``resnet34_attn`` with each attention (``resnet34_attn_se``,
  ``_cbam``, ``_mhsa``), ``convnext_tiny``, ``swin_t``, ``vit_b_16``, ``efficientnet_b3``, ``maxvit_t``;
- ``<arm>_lr<value>`` (``default`` or a network arm, e.g. ``convnext_tiny_lr1e-4``): that arm at another peak
  learning rate (``default``'s 1e-3 is tuned for the ResNets with BatchNorm at batch 32; the transformers and
  ConvNeXt were published with about 1e-3 at batch 1,024 to 4,096);
- ``default_onecycle``: ``default`` with a one-cycle schedule instead of warm-up + cosine;
- ``resnet18``: ``default`` on torchvision's ResNet18 (11.2 M parameters instead of 21.3 M);
- ``default_bf16``: ``default`` under bf16 autocast (on a CPU only where bf16 is native; not in the default arms:
  ``--arms default_bf16`` answers whether bf16 keeps the held-out macro AUC of fp32 within noise);
- ``lensnet``: ``default`` on the small from-scratch network (2.7 M parameters, 1 channel, the native pixels:
  the central 96 px at the quick scale, the whole 150 px image on a GPU);
- ``d4net``: the ``d4net`` recipe (the D4-invariant network, 0.35 M parameters, 1 channel, the central 97 native
  px at the quick scale; one-cycle to 2e-3, D4 augmentation); ``d4net_no_aug``: the same without augmentation
  (for an invariant network it changes no loss and no gradient, only the order of the batches from the second
  epoch on: tests/test_equivariant.py; so it measures seed noise);
- ``d4net_bf16``, ``lensnet_bf16``: those under bf16 autocast (with ``default_bf16``: does bf16 keep the held-out
  macro AUC on a CPU with native bf16?).

``--scale quick`` (the default, for a 2-core CPU): 800 train and 1,000 val images per class, 5 epochs, random
initial weights (ImageNet weights when the torch hub cache holds them), input = the central 96 px shrunk to 64 px
(the reference arm: the whole image resized to 73 px, centre 64 px, its 256 -> 224 geometry scaled); 4 seeds; every
arm but those of :data:`GPU_ONLY` (``default_150px``: 4.7x the training time of ``default`` on a CPU;
``reference``: from random weights its SGD at lr 1e-4 stays at chance in 5 epochs, macro AUC 0.508 ± 0.025 in the
earlier common_task study; ``maxvit_t``, which takes 224 px only; ``vit_b_16``, 7.7x ``default``'s time), about 5
to 14 minutes per arm and seed. ``--scale gpu``: 10,000 / 2,500 per class at the recipes' own settings (224 px,
or 150 px for ``default_150px`` and ``lensnet``; 20 epochs), every arm.

Writes ``OUT/study.json``, ``OUT/study_auc.png|pdf`` (macro AUC per arm, and each arm's paired difference from
``default``) and ``OUT/study_roc.png|pdf`` (class-wise ROC of the best arm against the reference); ``--readme``
copies study.json into ``experiments/results/``, the table into docs/studies.md and the figures into images/.
Interrupted? Run the same command again: finished runs are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from deeplense.checkpoint import load_checkpoint
from deeplense.config import NATIVE_ARCHS, choices, recipe
from deeplense.data import CLASSES
from deeplense.device import hardware_name
from deeplense.evaluate import evaluate
from deeplense.metrics import paired_difference
from deeplense.report import write_section
from deeplense.simulate import SimulationConfig, simulate_dataset
from deeplense.train import resume, train
from deeplense.util import REPO, atomic_path, read_jsonl, versions, write_json_atomic

NETWORK_ARMS = ("resnet34_attn_se", "resnet34_attn_cbam", "resnet34_attn_mhsa", "convnext_tiny", "swin_t", "vit_b_16",
                "efficientnet_b3", "maxvit_t")
"""The arms that change the network only (the reference solution's two ideas, and the CNNs that lead): each is
``default`` on that ``--arch`` (``resnet34_attn_<kind>``: ``--arch resnet34_attn --attention <kind>``)."""
ARMS = ("reference", "default", "default_no_recal", "default_no_d4", "default_tta", "default_150px", "default_ls",
        "default_onecycle", "resnet18", "lensnet", "default_bf16", "default_d2", "default_d2_tta", "default_ema",
        "default_clip", *NETWORK_ARMS, "d4net", "d4net_no_aug", "d4net_bf16", "lensnet_bf16")
GPU_ONLY = ("default_150px", "reference", "default_bf16", "maxvit_t", "vit_b_16", "d4net_bf16", "lensnet_bf16")
"""Arms the quick scale leaves out, and why: ``default_150px`` trains 4.7x as long as ``default`` on a CPU;
``reference`` stays at chance from random weights in 5 epochs; the ``_bf16`` arms need native bf16; ``maxvit_t``
takes only multiples of 224 px (20x the quick input's pixels); ``vit_b_16`` trains 7.7 times as long as ``default``
at the quick input (about 9 minutes a seed on a 2-core AMD EPYC; ``--arms ...,vit_b_16`` runs it, as the committed
``study_issue25_cnns`` did)."""
SCALES = {
    # each study scale: the simulated set, the seeds and arms, and the training scale (deeplense.config.SCALES) that
    # sets every arm's epochs, input and batch
    "quick": {"training_scale": "quick", "train_per_class": 800, "val_per_class": 1000, "seeds": 4,
              "arms": tuple(a for a in ARMS if a not in GPU_ONLY)},
    "gpu": {"training_scale": "full", "train_per_class": 10_000, "val_per_class": 2_500, "seeds": 4, "arms": ARMS},
}
DATA_SEED = 1234
ONE_SEED = "no verdict (1 seed)"
"""The verdict of a comparison run with one seed: without a t interval over seeds it is a diagnostic, not a test."""
TRAINED_AS = {"default_tta": "default", "default_d2_tta": "default_d2"}
"""The arms that evaluate another arm's checkpoints with test-time averaging."""


def learning_rate_arm(arm: str) -> tuple[str, float] | None:
    """``(base arm, lr)`` of ``<arm>_lr<value>`` (``default`` or a :data:`NETWORK_ARMS` arm at another peak learning
    rate), None for any other name."""
    base, sep, value = arm.rpartition("_lr")
    if not sep or base not in ("default", *NETWORK_ARMS):
        return None
    try:
        lr = float(value)
    except ValueError:
        return None
    return (base, lr) if lr > 0 and np.isfinite(lr) else None


def arm_config(arm: str, scale: str, seed: int, protocol: str, epochs: int | None = None):
    """The training config of an arm (a TTA arm trains as the arm it evaluates, :data:`TRAINED_AS`) at the study
    scale ``scale``."""
    at_lr = learning_rate_arm(arm)
    if at_lr:
        return arm_config(at_lr[0], scale, seed, protocol, epochs).replace(lr=at_lr[1])
    training = SCALES[scale]["training_scale"]
    # on a CPU every arm but the _bf16 ones trains in fp32, whatever `auto` picks on this CPU, so that the arms
    # compare the same things on every machine (on a GPU, auto: bf16 or fp16)
    base = {"seed": seed, "protocol": protocol, "precision": "auto" if training == "full" else "fp32"}
    default = recipe("default", scale=training, **base)
    # the reference recipe's own input is 224 px from 256; at the quick scale the same ratio at 64 px
    reference = (recipe("reference", **base) if training == "full" else
                 recipe("reference", image_size=64, resize_then_crop=73, epochs=default.epochs, **base))
    cfgs = {"reference": reference, "default": default, "default_150px": default.replace(image_size=150, crop=None),
            "lensnet": recipe("default", scale=training, arch="lensnet", **base),
            "lensnet_bf16": recipe("default", scale=training, arch="lensnet", **{**base, "precision": "bf16"}),
            "d4net": recipe("d4net", scale=training, **base),
            "d4net_no_aug": recipe("d4net", scale=training, augmentation="none", **base),
            "d4net_bf16": recipe("d4net", scale=training, **{**base, "precision": "bf16"}),
            "default_no_d4": default.replace(augmentation="none"),
            "default_ls": default.replace(label_smoothing=0.1),
            "default_onecycle": default.replace(schedule="onecycle"),
            "default_bf16": default.replace(precision="bf16"),
            "resnet18": default.replace(arch="resnet18"),
            "default_d2": default.replace(augmentation="d2"),
            "default_ema": default.replace(ema=0.999 if training == "full" else 0.99),
            "default_clip": default.replace(clip_grad=1.0),
            "default_no_recal": default.replace(bn_recalibration=None)}
    name = TRAINED_AS.get(arm, arm)
    if name in NETWORK_ARMS:  # built only when asked: maxvit_t refuses the quick scale's 64 px
        arch, _, attention = name.partition("_attn_")
        cfg = default.replace(arch="resnet34_attn" if attention else arch, attention=attention or None)
    else:
        cfg = cfgs[name]
    return cfg.replace(epochs=epochs) if epochs else cfg


def run_one(arm: str, seed: int, data: Path, out: Path, scale: str, protocol: str, epochs: int | None = None,
            device: str | None = None) -> dict:
    """Train (or reuse) one arm's run for one seed and evaluate it on the test images; return metrics.json plus
    the training time and speed."""
    train_arm = TRAINED_AS.get(arm, arm)
    run = out / "runs" / f"{train_arm}-seed{seed}"
    ev = out / "eval" / f"{arm}-seed{seed}"
    if not (ev / "metrics.json").exists():
        t0 = time.time()
        if (run / "last.pt").exists():
            ck = load_checkpoint(run / "last.pt")
            if ck["epoch"] < ck["config"]["epochs"]:  # interrupted: continue; finished (default_tta): reuse
                resume(run, data, device=device)
        else:
            train(arm_config(arm, scale, seed, protocol, epochs), data, run, device=device)
        evaluate(run / "best.pt", data, ev, split="test", tta=arm in TRAINED_AS, device=device)
        write_json_atomic(ev / "timing.json", {"wall_seconds_this_call": time.time() - t0})
    m = json.loads((ev / "metrics.json").read_text())
    hist = read_jsonl(run / "history.jsonl")
    m["train_seconds"] = float(sum(h["train_seconds"] for h in hist))
    m["train_images_per_s"] = float(np.mean([h["train_images_per_s"] for h in hist]))
    return m


def summarise(per_seed: list[dict]) -> dict:
    def stat(values, intervals):
        v = [x for x in values if x is not None]
        ci = [c for c in intervals if c is not None]
        return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "per_seed": values,
                "ci95": [float(np.mean([c[0] for c in ci])), float(np.mean([c[1] for c in ci]))] if ci else None}

    test = {
        "macro_auc": stat([m["auc"]["macro"] for m in per_seed], [m["ci"]["macro_auc"] for m in per_seed]),
        "micro_auc": stat([m["auc"]["micro"] for m in per_seed], [m["ci"]["micro_auc"] for m in per_seed]),
        "accuracy": stat([m["accuracy"] for m in per_seed], [m["ci"]["accuracy"] for m in per_seed]),
        "per_class_auc": {c: stat([m["auc"]["per_class"][c] for m in per_seed],
                                  [m["ci"]["per_class_auc"][c] for m in per_seed]) for c in CLASSES},
        "n": per_seed[0]["n"],
    }
    return {"test": test, "seeds": len(per_seed),
            "train_seconds": {"mean": float(np.mean([m["train_seconds"] for m in per_seed]))},
            "train_images_per_s": {"mean": float(np.mean([m["train_images_per_s"] for m in per_seed]))},
            "pretrained": bool(per_seed[0]["provenance"]["pretrained"]),
            "tta": bool(per_seed[0]["provenance"]["tta"]),
            "device": per_seed[0]["provenance"]["device"],
            "config": per_seed[0]["provenance"]["config"]}


def paired(out: Path, arm: str, seeds: list[int], n_bootstrap: int = 1000) -> dict:
    """``arm`` minus ``default`` in macro AUC, paired by seed and test image (see metrics.paired_difference),
    with the verdict: ``wins``/``loses`` when both intervals exclude 0, else ``within noise``."""
    loaded = {}
    for name in (arm, "default"):
        for s in seeds:
            with np.load(out / "eval" / f"{name}-seed{s}" / "predictions.npz") as z:
                loaded[name, s] = (z["labels"], z["probabilities"], z["val_indices"])
    same_images = all(np.array_equal(loaded[k][2], loaded[arm, seeds[0]][2]) for k in loaded)
    labels = loaded[arm, seeds[0]][0]
    d = paired_difference(labels, [loaded[arm, s][1] for s in seeds], [loaded["default", s][1] for s in seeds],
                          n_bootstrap=n_bootstrap if same_images else 0, seed=DATA_SEED)
    if not same_images:  # reference protocol: each seed tests other images, so no bootstrap pairs them
        d["bootstrap_ci"] = None
    if len(seeds) < 2:  # no t interval: one seed says nothing of how the difference moves with the seed
        d["verdict"] = ONE_SEED
        return d
    intervals = [c for c in (d["t_ci"], d["bootstrap_ci"]) if c is not None]
    d["verdict"] = ("wins" if all(c[0] > 0 for c in intervals) else
                    "loses" if all(c[1] < 0 for c in intervals) else "within noise")
    return d


def describe(arm: dict) -> str:
    """The arm's recipe in a few words: optimiser, schedule, augmentation, input geometry, TTA."""
    c = arm["config"]
    size = c["image_size"]
    if c.get("crop"):
        geometry = f"central {c['crop']} px → {size} px"
    elif c.get("resize_then_crop"):
        geometry = f"resize {c['resize_then_crop']} px, centre {size} px"
    else:
        geometry = f"whole image at {size} px"
    if c.get("arch", "resnet34") in NATIVE_ARCHS:
        geometry = f"native {c.get('crop') or size} px, 1 channel"
    aug = {"d4": "D4", "d2": "D2", "hflip": "h-flips", "none": "no aug."}.get(c["augmentation"], c["augmentation"])
    opt = f"{'AdamW' if c['optimizer'] == 'adamw' else c['optimizer'].upper()} {c['lr']:g}"
    extra = (", one-cycle" if c.get("schedule") == "onecycle" else "") + (
        f", label smoothing {c['label_smoothing']:g}" if c.get("label_smoothing") else "") + (
        f", EMA {c['ema']:g}" if c.get("ema") else "") + (f", clip {c['clip_grad']:g}" if c.get("clip_grad") else "")
    if c.get("recipe") == "default" and not c.get("bn_recalibration"):
        extra += ", no BN recalibration"
    attention = f"/{c['attention']}" if c.get("attention") else ""
    net = "" if c.get("arch", "resnet34") == "resnet34" else f"{c['arch']}{attention}, "
    precision = f", {c['precision']}" if c.get("precision", "auto") not in ("auto", "fp32") else ""
    tta = f", {'D2' if c['augmentation'] == 'd2' else 'D4'} TTA" if arm.get("tta") else ""
    return f"{net}{opt}{extra}, {aug}, {geometry}{precision}{tta}"


def _delta(d: dict | None) -> str:
    if d is None:
        return "(baseline)"
    lo, hi = d["t_ci"]
    text = f"{d['mean']:+.4f} " + ("[no t interval: 1 seed]" if lo != lo else f"[{lo:+.4f}, {hi:+.4f}]")
    if d.get("bootstrap_ci"):
        text += f" {{{d['bootstrap_ci'][0]:+.4f}, {d['bootstrap_ci'][1]:+.4f}}}"
    return text


def table(study: dict) -> str:
    s = study["scale"]
    lines = [f"- Scale: {s['description']}.",
             f"- Hardware: {s['hardware']}. Initial weights: {s['weights']}.",
             f"- Command: `{s['command']}`.",
             f"- Cells: mean ± std over {s['seeds']} training seeds on the same data; test n = {s['n_test']} images "
             f"per seed ({s['test']}).",
             "- Δ: the arm minus `default` in macro AUC, paired by seed. [ ]: its 95% t interval over seeds; { }: a "
             "95% paired bootstrap interval over test images.",
             "- An arm wins or loses only when both intervals exclude 0.", "",
             "| arm | recipe | macro AUC | Δ macro AUC vs `default` | verdict | accuracy | AUC no | AUC sphere | "
             "AUC vort | train time | train img/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(d):
        return "n/a" if d["mean"] is None else f"{d['mean']:.4f} ± {d['std']:.4f}"

    for arm, a in study["arms"].items():
        t = a["test"]
        pc = t["per_class_auc"]
        d = a.get("paired_vs_default")
        lines.append(f"| `{arm}` | {describe(a)} | {f(t['macro_auc'])} | {_delta(d)} | "
                     f"{d['verdict'] if d else '—'} | {f(t['accuracy'])} | {pc['no']['mean']:.4f} | "
                     f"{pc['sphere']['mean']:.4f} | {pc['vort']['mean']:.4f} | "
                     f"{a['train_seconds']['mean'] / 60:.1f} min | {a['train_images_per_s']['mean']:.1f} |")
    return "\n".join(lines)


def figures(study: dict, out: Path) -> None:
    from deeplense import plots

    with plots.style():
        _draw_figures(study, out, plots)


def _draw_figures(study: dict, out: Path, plots) -> None:
    arms = list(study["arms"])
    fig, (a1, a2) = plots.figure(1, 2, figsize=(10.0, 3.8))
    for i, arm in enumerate(arms):
        t = study["arms"][arm]["test"]["macro_auc"]
        a1.errorbar([i], [t["mean"]], yerr=[t["std"]], fmt="o", color="#0072B2", capsize=4)
        a1.plot([i] * len(t["per_seed"]), t["per_seed"], ".", color="0.5", ms=4)
    a1.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    a1.set_ylabel("test macro AUC (mean ± std, seeds as dots)")
    a1.grid(alpha=0.3)
    a1.set_title("Macro AUC per arm")
    others = [a for a in arms if study["arms"][a].get("paired_vs_default")]
    colours = {"wins": "#009E73", "loses": "#D55E00", "within noise": "0.4", ONE_SEED: "0.6"}
    for i, arm in enumerate(others):
        d = study["arms"][arm]["paired_vs_default"]
        lo, hi = d["t_ci"]
        a2.errorbar([i], [d["mean"]], yerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o", capsize=4,
                    color=colours[d["verdict"]], label=d["verdict"])
        a2.plot([i] * len(d["per_seed"]), d["per_seed"], ".", color="0.5", ms=4)
    a2.axhline(0, color="0.3", lw=1, ls="--")
    a2.set_xticks(range(len(others)), others, rotation=30, ha="right")
    a2.set_ylabel("Δ macro AUC vs default (95% t interval)")
    handles = {h.get_label(): h for h in a2.get_legend_handles_labels()[0]}
    a2.legend(handles.values(), handles.keys(), frameon=False, fontsize=8)
    a2.grid(alpha=0.3)
    a2.set_title("Paired difference from default")
    fig.tight_layout()
    plots.save_figure(fig, out / "study_auc")
    rest = [a for a in arms if a != "reference"] or arms
    best = max(rest, key=lambda a: study["arms"][a]["test"]["macro_auc"]["mean"])
    shown = ("reference", best) if "reference" in arms and best != "reference" else (best,)
    fig, axes = plots.figure(1, len(shown), figsize=(4.6 * len(shown), 4.6), squeeze=False)
    from deeplense.metrics import roc_curves

    for ax, arm in zip(axes[0], shown, strict=True):
        z = np.load(out / "eval" / f"{arm}-seed{study['scale']['seed_list'][0]}" / "predictions.npz")
        curves = roc_curves(z["labels"], z["probabilities"])
        for c in CLASSES:
            cc = curves["per_class"][c]
            if cc is not None:
                ax.plot(cc["fpr"], cc["tpr"], color=plots.CLASS_COLORS[c], label=f"{c}, AUC = {cc['auc']:.3f}")
        plots.square_roc_axes(ax, f"{arm} (seed {study['scale']['seed_list'][0]})")
    plots.save_figure(fig, out / "study_roc")


def write_readme(study: dict, out: Path, repo: Path, name: str = "study") -> None:
    """Copy study.json to ``repo/experiments/results/NAME.json``, the table into the document with the ``NAME``
    markers (:func:`deeplense.report.write_section`) and the two figures into ``repo/images/NAME_auc|roc.png|pdf``."""
    readme = write_section(name, table(study), repo)
    write_json_atomic(repo / "experiments" / "results" / f"{name}.json", study)
    for figure in ("auc.png", "auc.pdf", "roc.png", "roc.pdf"):
        with atomic_path(repo / "images" / f"{name}_{figure}") as tmp:
            shutil.copyfile(out / f"study_{figure}", tmp)
    print(f"updated {readme}, {repo / 'experiments' / 'results' / f'{name}.json'} and "
          f"{repo / 'images'}/{name}_auc.png, {name}_roc.png")


def rewrite_tables(results: Path = REPO / "experiments" / "results", repo: Path = REPO) -> int:
    """Rewrite the table of each committed study whose markers a document holds, from its JSON file alone."""
    from deeplense.util import DeepLenseError

    for path in sorted(results.glob("study*.json")):
        try:
            where = write_section(path.stem, table(json.loads(path.read_text())), repo)
        except DeepLenseError:
            continue  # a study whose table is kept by hand (the earliest ones) or nowhere
        print(f"{path.stem}: rewrote its table in {where}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=list(SCALES), default="quick", help="quick (2-core CPU, default) or gpu")
    p.add_argument("--preset", default="benchmark", help="simulation preset (default benchmark)")
    p.add_argument("--protocol", choices=choices()["protocol"], default="clean", help="default clean")
    p.add_argument("--seeds", type=int, help="training seeds per arm (default 4)")
    p.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)} (default: the scale's)")
    p.add_argument("--out", default="experiments/out/study", help="output folder (default experiments/out/study/)")
    p.add_argument("--train-per-class", type=int, help="override the scale's simulated train images per class")
    p.add_argument("--val-per-class", type=int, help="override the scale's simulated val images per class")
    p.add_argument("--epochs", type=int, help="override the scale's epochs (all arms)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: pick automatically)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    p.add_argument("--readme", action="store_true",
                   help="copy study.json to experiments/results/, the table into its README section, the figures "
                        "into images/")
    p.add_argument("--tables", action="store_true",
                   help="only rewrite the table of every committed study (experiments/results/NAME.json) between its "
                        "markers; no training")
    p.add_argument("--name", default="study",
                   help="with --readme: the results file experiments/results/NAME.json, the document section between "
                        "the NAME markers and the figures images/NAME_auc|roc (default study)")
    args = p.parse_args(argv)
    if args.tables:
        return rewrite_tables()
    scale = SCALES[args.scale]
    arms = [a for a in (args.arms.split(",") if args.arms else scale["arms"]) if a]
    bad = [a for a in arms if a not in ARMS and not learning_rate_arm(a)]
    if bad:
        p.error(f"unknown arm(s) {bad}; choose from {ARMS}, or default or a network arm with _lr<value> (e.g. "
                f"convnext_tiny_lr1e-4)")
    if any(a != "default" for a in arms) and "default" not in arms:
        arms = ["default", *arms]  # every comparison is paired with default
    out = Path(args.out).resolve()
    ntr = args.train_per_class or scale["train_per_class"]
    nva = args.val_per_class or scale["val_per_class"]
    data = out / "data"
    simulate_dataset(data, train_per_class=ntr, val_per_class=nva, seed=DATA_SEED, workers=os.cpu_count() or 1,
                     config=SimulationConfig.from_preset(args.preset))
    seeds = list(range(args.seeds or scale["seeds"]))
    results = {arm: [run_one(arm, s, data, out, args.scale, args.protocol, args.epochs, args.device) for s in seeds]
               for arm in arms}
    first = next(iter(results.values()))[0]
    study = {
        "scale": {"description": (f"{args.scale}: `{args.preset}` preset, {ntr}/{nva} simulated train/val images per "
                                  f"class, {first['provenance']['config']['epochs']} epochs, {args.protocol} protocol"),
                  "preset": args.preset, "protocol": args.protocol, "train_per_class": ntr, "val_per_class": nva,
                  "n_test": first["n"], "test": first["provenance"]["split_description"], "seeds": len(seeds),
                  "seed_list": seeds, "data_seed": DATA_SEED, "hardware": hardware_name(first["provenance"]["device"]),
                  "command": shlex.join(["python", "experiments/accuracy_study.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
                  "weights": "ImageNet" if first["provenance"]["pretrained"] else "random (no ImageNet weights here)",
                  "versions": versions()},
        "arms": {arm: summarise(ms) for arm, ms in results.items()},
    }
    for arm in arms:
        if arm != "default":
            study["arms"][arm]["paired_vs_default"] = paired(out, arm, seeds, args.bootstrap)
    write_json_atomic(out / "study.json", study)
    figures(study, out)
    print(table(study))
    if args.readme:
        write_readme(study, out, REPO, args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
