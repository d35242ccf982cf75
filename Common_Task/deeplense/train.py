"""Train (or resume) a run: data -> model -> optimiser -> epochs of :mod:`deeplense.engine` -> checkpoints.

Protocol: train on ``train``; choose the checkpoint on the model-selection part of ``val`` (from
:func:`deeplense.data.split_holdout` with the run's seed); never load the held-out test part.

A run folder holds ``config.json``, ``history.jsonl`` (one JSON line per epoch), ``last.pt`` and
``best.pt`` (see :mod:`deeplense.checkpoint`). The same entry point runs under ``torchrun --nproc_per_node=N``
(DistributedDataParallel, each rank a disjoint shard of every epoch's permutation).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from . import engine
from .checkpoint import FORMAT, config_of, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import CLASSES, SPLITS, combine_fingerprints, holdout_from_test, load_splits, native_crop, split_holdout
from .model import build_model
from .util import DeepLenseError, pick_device, read_jsonl, versions, write_json_atomic, write_text_atomic


def train(config: TrainConfig | None, data: str | os.PathLike | None, out: str | os.PathLike | None, *,
          resume: str | os.PathLike | None = None, device: str | None = None, progress: bool = True,
          allow_pickle: bool = False, stop_after_epoch: int | None = None, heldout_test=None, log=print) -> dict:
    """Train (or resume) a run; return a summary dict (``run``, ``best_epoch``, ``best_metric``, ``history``,
    ``weights``, ``device``, ``config``).

    With ``resume`` the config, data path and run folder come from ``resume/last.pt`` (``out`` is
    ignored; ``data`` may override the stored path), and the run continues after the last finished epoch.
    ``stop_after_epoch`` ends this call early (the schedule still spans ``config.epochs``), for staged jobs
    on time-limited queues: resume later to continue. ``heldout_test``: the indices of the ``val`` images held
    out for the final test, when the caller drew them already (default: :func:`split_holdout` with the seed).
    The checkpoints record them, with a fingerprint of the ``val`` listing, so ``evaluate`` reports on exactly
    these images and a resume continues with them.
    """
    world, rank, dev = _start_processes(device)
    say = log if rank == 0 else (lambda *a, **k: None)
    run, ckpt, val_listing = Path(resume or out or ""), None, None
    if resume is not None:
        ckpt = load_checkpoint(run / "last.pt", map_location="cpu")
        config, data = config_of(ckpt, run / "last.pt"), data or ckpt["data"]["root"]
        heldout_test, val_listing = ckpt["data"].get("heldout_test_indices"), ckpt["data"].get("val_listing")
        say(f"resuming {run} after epoch {ckpt['epoch']} of {config.epochs}")
    elif out is None:
        raise DeepLenseError("train: --out RUN is required (or --resume RUN)")
    elif (run / "last.pt").exists():
        raise DeepLenseError(f"{run}: already holds a run (last.pt); use --resume {run} or another --out")
    if data is None:
        raise DeepLenseError("train: no dataset given")

    if world > 1 and rank > 0:
        torch.distributed.barrier()  # rank 0 builds the cache first; the others then open it
    x_train, y_train, x_sel, y_sel, data_info = _load(config, data, allow_pickle, progress and rank == 0, dev,
                                                      heldout_test, val_listing)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    torch.manual_seed(config.seed)
    model, weights_info = build_model(config.weights if ckpt is None else "none")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        weights_info = ckpt["weights"]
    if weights_info.get("warning"):
        say(f"WARNING: {weights_info['warning']}")
    model = model.to(dev, memory_format=torch.channels_last if dev.type == "cuda" else torch.preserve_format)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    steps = engine.steps_per_epoch(len(x_train) // world, config.batch_size)
    if steps == 0:
        raise DeepLenseError(f"{data}: {len(x_train)} training images are too few for {world} process(es)")
    opt = engine.build_optimizer(model, config, dev)
    sched = engine.build_scheduler(opt, config, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and not torch.cuda.is_bf16_supported())
    start, best_metric, best_epoch, history = 1, -math.inf, 0, []
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start, best_metric, best_epoch = ckpt["epoch"] + 1, ckpt["best_metric"], ckpt["best_epoch"]
        history = [h for h in read_jsonl(run / "history.jsonl") if h["epoch"] < start]

    stamp = {"classes": list(CLASSES), "weights": weights_info, "data": data_info, "versions": versions(),
             "device": str(dev)}
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run / "config.json", {"config": config.to_dict(), "world_size": world, **stamp})
        _write_history(run, history)
    say(f"training {config.recipe} on {dev} (world {world}): {len(x_train)} train images, {len(x_sel)} selection "
        f"images, input {config.image_size} px, weights {weights_info['source']}")
    for epoch in range(start, min(config.epochs, stop_after_epoch or config.epochs) + 1):
        rec = {"epoch": epoch, **engine.train_one_epoch(net, opt, sched, scaler, x_train, y_train, config, dev,
                                                        epoch=epoch, rank=rank, world=world, progress=progress),
               **engine.validate(model, x_sel, y_sel, config, dev)}
        history.append(rec)
        score = rec["val_accuracy"] if config.select_metric == "accuracy" else (rec["val_macro_auc"] or -1.0)
        improved = score > best_metric
        if improved:
            best_metric, best_epoch = score, epoch
        say(f"epoch {epoch}/{config.epochs}: train loss {rec['train_loss']:.4f}, val loss {rec['val_loss']:.4f}, "
            f"val acc {rec['val_accuracy']:.4f}, val macro AUC {rec['val_macro_auc'] or float('nan'):.4f}, "
            f"{rec['train_images_per_s']:.1f} img/s" + (" *best*" if improved else ""))
        if rank == 0:
            payload = {"model": model.state_dict(), "config": config.to_dict(), "epoch": epoch, "metrics": rec,
                       "best_metric": best_metric, "best_epoch": best_epoch, "format": FORMAT, **stamp}
            if improved:
                save_checkpoint(run / "best.pt", payload)
            save_checkpoint(run / "last.pt", {**payload, "optimizer": opt.state_dict(),
                                              "scheduler": sched.state_dict(), "scaler": scaler.state_dict()})
            _write_history(run, history)
        if world > 1:
            torch.distributed.barrier()
    if world > 1:
        torch.distributed.destroy_process_group()
    return {"run": str(run), "best_epoch": best_epoch, "best_metric": best_metric, "history": history,
            "weights": weights_info, "device": str(dev), "config": config.to_dict()}


def _start_processes(device: str | None) -> tuple[int, int, torch.device]:
    """``(world size, rank, device)``; under torchrun, the process group is started and each rank gets its GPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev = pick_device(device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
    return world, rank, dev


def _load(config: TrainConfig, data, allow_pickle: bool, progress: bool, dev: torch.device, heldout_test=None,
          val_listing: str | None = None):
    """``train`` and the selection part of ``val`` as cropped tensors (the held-out test part is never loaded),
    and what ``config.json`` and the checkpoints record about the data."""
    info: dict = {}
    loaded = load_splits(data, SPLITS, allow_pickle=allow_pickle, progress=progress, info=info)
    (tr_images, tr_labels), (va_images, va_labels) = loaded["train"], loaded["val"]
    if val_listing is not None and info["val"].listing != val_listing:
        raise DeepLenseError(f"{data}: its val/ is not the one this run started with (files added, removed or "
                             f"renamed), so the held-out test part cannot be kept out; resume on the original data")
    if heldout_test is None:
        sel_idx, test_idx = split_holdout(va_labels, config.holdout_fraction, seed=config.seed)
    else:
        sel_idx, test_idx = holdout_from_test(heldout_test, len(va_labels))
    tr_idx = _limit(tr_labels, np.arange(len(tr_labels)), config.limit_per_class)
    sel_idx = _limit(va_labels, sel_idx, config.limit_per_class)
    x_train, x_sel = native_crop(tr_images, tr_idx, config.crop), native_crop(va_images, sel_idx, config.crop)
    if dev.type == "cuda":
        x_train, x_sel = x_train.pin_memory(), x_sel.pin_memory()
    data_info = {"root": str(Path(data).resolve()),
                 "fingerprint": combine_fingerprints([info[s].fingerprint for s in SPLITS]),
                 "split_fingerprints": {s: info[s].fingerprint for s in SPLITS},
                 "n_train": int(len(tr_idx)), "n_selection": int(len(sel_idx)),
                 "n_heldout_test_untouched": int(len(test_idx)), "val_listing": info["val"].listing,
                 "heldout_test_indices": test_idx.tolist()}
    return x_train, torch.from_numpy(tr_labels[tr_idx]), x_sel, va_labels[sel_idx], data_info


def _limit(labels: np.ndarray, idx: np.ndarray, n: int | None) -> np.ndarray:
    """The first ``n`` of ``idx`` per class (all of them when ``n`` is None)."""
    if n is None:
        return idx
    return np.sort(np.concatenate([idx[labels[idx] == c][:n] for c in range(len(CLASSES))]))


def _write_history(run: Path, history: list[dict]) -> None:
    write_text_atomic(run / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
