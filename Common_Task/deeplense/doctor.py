"""``python -m deeplense doctor``: what this project will do on this machine, checked before the first real run.

One line each: versions; the device and why; the precision path; memory and the data residency and validation
batch it implies; whether the ImageNet weights are in the torch hub cache; the dataset and its cache state; free
disk for the cache; and a few training steps of the real engine on the device, in images/s, so that a broken
device path shows here first. Every problem is one more line starting ``problem:`` on stderr, and the exit status
is then 2 (0 when everything works).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from .config import recipe
from .device import (
    activation_bytes,
    free_memory,
    gpu_present_but_unusable,
    hardware_name,
    memory_plan,
    pick_device,
    plan_for,
)
from .util import DeepLenseError, cache_dir, versions

FULL_SCALE_BYTES = (30_000 + 6_750) * 150 * 150 * 4
"""The official set's training and selection images as float32 (what a GPU run would place on the device)."""


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _existing(folder: Path) -> Path:
    for p in (folder, *folder.parents):
        if p.exists():
            return p
    return Path("/")


def doctor(data: str | None = None, device: str | None = None, precision: str = "auto", steps: int = 3,
           allow_pickle: bool = False, say=print, weights: str = "auto") -> list[str]:
    """Print what the project will do here (through ``say``); return the problems, one line each."""
    problems: list[str] = []
    v = versions()
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    say(f"versions: python {v['python']}, torch {v.get('torch')} ({build}), torchvision {v.get('torchvision')}, "
        f"numpy {v.get('numpy')}, deeplense {v.get('deeplense')}")
    dev = _check_device(device, say, problems)
    plan = None
    if dev is not None:
        try:
            plan = plan_for(dev, precision)
            say(f"precision: {plan.describe()}")
        except DeepLenseError as exc:
            problems.append(f"precision: {exc}")
    need_cache, data_bytes = _check_data(data, allow_pickle, say, problems)
    _check_disk(data, need_cache, say, problems)
    _check_memory(dev, plan, data_bytes, say)
    _check_weights(problems, say, weights)
    if plan is not None and steps > 0:  # a few real training steps
        rate, err = _steps(plan, steps)
        if err:
            problems.append(f"speed: the training step fails on {plan.device} ({plan.precision}): {err}")
        else:
            size = "resnet34 at 224 px, batch 64" if plan.kind == "cuda" else "the demo's d4net at 97 px, batch 32"
            say(f"speed: {rate:.1f} training images/s on {plan.device} ({plan.precision}; {size}; "
                f"{steps} steps of the real engine after one warm-up)")
    return problems


def _check_device(device: str | None, say, problems: list[str]):
    """The device that would be used, and why (None when the asked-for one cannot be used)."""
    warned: list[str] = []
    try:
        dev = pick_device(device, warn=warned.append)
    except DeepLenseError as exc:
        problems.append(f"device: {exc}")
        dev = None
    if dev is not None:
        if device and device != "auto":
            why = "requested"
        elif dev.type == "cuda":
            why = f"CUDA available ({torch.cuda.device_count()} device(s))"
        elif dev.type == "mps":
            why = "Apple MPS available, no CUDA"
        else:
            why = "no CUDA GPU, no Apple MPS"
        say(f"device: {dev} ({hardware_name(dev)}): {why}")
    unusable = warned[0].removeprefix("warning: ") if warned else (
        gpu_present_but_unusable() if dev is not None and dev.type == "cpu" else None)  # also when cpu was asked for
    if unusable:
        problems.append(f"device: {unusable}")
    return dev


def _check_data(data: str | None, allow_pickle: bool, say, problems: list[str]) -> tuple[int, int]:
    """The dataset and its cache: ``(bytes the cache still needs, bytes of the images)`` (the full-scale size when
    no dataset is given)."""
    need_cache, data_bytes = 0, FULL_SCALE_BYTES
    if data:
        from .data import cache_state

        try:
            state = cache_state(data, allow_pickle=allow_pickle)
            parts = ", ".join(f"{s} {st['n']} images" for s, st in state.items())
            shape = next(iter(state.values()))["shape"]
            uncached = [s for s, st in state.items() if not st["cached"]]
            need_cache = sum(state[s]["bytes"] for s in uncached)
            data_bytes = sum(st["bytes"] for st in state.values())
            cache = ("cache built" if not uncached else
                     f"cache not built yet for {', '.join(uncached)} ({need_cache / 1e9:.2f} GB; the first run or "
                     f"`python -m deeplense inspect --data {data}` builds it)")
            say(f"data: {data}: {parts} of {shape[0]}x{shape[1]}; {cache}")
        except DeepLenseError as exc:
            problems.append(f"data: {exc}")
    else:
        say("data: none given (--data DIR): train and the notebook would use a simulated set")
    return need_cache, data_bytes


def _check_disk(data: str | None, need_cache: int, say, problems: list[str]) -> None:
    """Free disk where the cache goes, against what the dataset's cache still needs."""
    folder = cache_dir()
    free_disk = shutil.disk_usage(_existing(folder)).free
    say(f"disk: {free_disk / 1e9:.1f} GB free for the cache ({folder}; DEEPLENSE_CACHE moves it)")
    if need_cache and free_disk < need_cache * 1.02:
        problems.append(f"disk: {folder}: {free_disk / 1e9:.2f} GB free, the cache of {data} needs "
                        f"{need_cache / 1e9:.2f} GB; free some space or point DEEPLENSE_CACHE at a larger disk")


def _check_memory(dev, plan, data_bytes: int, say) -> None:
    """GPU memory and what it implies (residency, validation batch), or the RAM a CPU training step needs."""
    config = recipe("default", weights="none")
    if plan is not None and plan.kind == "cuda":
        from .model import build_model

        n_params = sum(p.numel() for p in build_model("none")[0].parameters())
        mem = memory_plan(config.arch, config.image_size, config.batch_size, n_params, data_bytes,
                          free_memory(plan.device), element_bytes=2 if plan.autocast_dtype else 4)
        say(f"memory: {mem.describe()} (resnet34, 224 px, batch {config.batch_size})")
    elif dev is not None:
        ram = _available_ram()
        per = activation_bytes("resnet34", 64, 4)[0] * 32
        say(f"memory: {'unknown' if ram is None else f'{ram / 1e9:.1f} GB'} of RAM available; the images are "
            f"memory-mapped from the cache; a demo-input training step (64 px, batch 32) needs about "
            f"{per / 1e9:.2f} GB")


def _check_weights(problems: list[str], say, weights: str = "auto") -> None:
    """Whether the initial weights the runs will use (``--weights``) are there: nothing to check for ``none``; the
    file for a path; for ``auto`` and ``imagenet`` the ImageNet ResNet34 weights in the torch hub cache (without
    them ``imagenet`` stops and ``auto`` trains from random weights, not what the task asks for)."""
    from .model import hub_checkpoint_path

    if weights in ("none", "random"):
        say("weights: none (random initialisation, as --weights none trains): nothing to check")
        return
    if weights not in ("auto", "imagenet"):
        path = Path(weights).expanduser()
        if path.is_file():
            say(f"weights: the state dict file {path} is there")
        else:
            problems.append(f"weights: {path}: no such file (--weights FILE)")
        return
    cached = hub_checkpoint_path("resnet34")
    if cached.is_file():
        say(f"weights: ImageNet ResNet34 weights in the torch hub cache ({cached})")
    else:
        then = "training stops" if weights == "imagenet" else "training would start from random weights"
        problems.append(f"weights: no ImageNet ResNet34 weights at {cached}: {then}; copy {cached.name} there "
                        f"(TORCH_HOME sets the folder), pass --weights FILE, or check with --weights none if you "
                        f"train from random weights")


def _steps(plan, steps: int) -> tuple[float, str | None]:
    """Images/s of ``steps`` training steps of the engine (after one warm-up), or the error."""
    from . import engine
    from .model import build_model

    cuda = plan.kind == "cuda"
    # the network each scale trains there: the task's ResNet34 at 224 px on a GPU, the demo's d4net on a CPU
    cfg = recipe("default", scale="full", weights="none") if cuda else recipe("d4net", scale="demo", weights="none")
    try:
        torch.manual_seed(0)
        model = build_model("none", arch=cfg.arch)[0].to(plan.device).train()
        opt = engine.build_optimizer(model, cfg, plan)
        scaler = plan.grad_scaler()
        side = cfg.crop or 150
        x = torch.rand(cfg.batch_size, 1, side, side, device=plan.device)
        y = torch.randint(0, 3, (cfg.batch_size,), device=plan.device)
        draws = torch.randint(0, 8, (cfg.batch_size,), device=plan.device)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        loss = engine.train_step(model, opt, scaler, x, y, cfg, plan, draws)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = engine.train_step(model, opt, scaler, x, y, cfg, plan, draws)
        if not torch.isfinite(loss).item():
            return 0.0, f"the loss is {float(loss)}"
        sync()
        return steps * cfg.batch_size / (time.perf_counter() - t0), None
    except (RuntimeError, TypeError, ValueError) as exc:
        return 0.0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def main(args) -> int:
    problems = doctor(args.data, args.device, getattr(args, "precision", None) or "auto", args.steps, args.allow_pickle,
                      weights=getattr(args, "weights", None) or "auto")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    if not problems:
        print("doctor: everything works")
    return 2 if problems else 0
