"""Train (or resume) a run: data -> model -> optimiser -> epochs of :mod:`deeplense.engine` -> checkpoints.

Protocol: train on ``train``; choose the checkpoint on the model-selection part of ``val`` (from
:func:`deeplense.splits.split_holdout` with the run's seed); never load the held-out test part.

A run folder holds ``config.json``, ``history.jsonl`` (one JSON line per epoch), ``last.pt`` and
``best.pt`` (see :mod:`deeplense.checkpoint`). The same entry point runs under ``torchrun --nproc_per_node=N``
(DistributedDataParallel, each rank a disjoint shard of every epoch's permutation).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from . import engine
from .checkpoint import (
    checkpoint_payload,
    config_of,
    load_checkpoint,
    restore_training_state,
    resumable,
    save_checkpoint,
)
from .config import TrainConfig
from .data import CLASSES, SPLITS, combine_fingerprints, load_splits
from .device import default_timeout_minutes, pick_device, plan_for
from .model import model_for
from .splits import ProtocolSplit, check_disjoint, limit_per_class, pixel_digest, protocol_split
from .transforms import native_crop
from .util import (
    DeepLenseError,
    folder_lock,
    read_jsonl,
    sweep_stale_temps,
    versions,
    write_json_atomic,
    write_text_atomic,
)


def train(config: TrainConfig, data: str | os.PathLike, out: str | os.PathLike, *, device: str | None = None,
          split: ProtocolSplit | None = None, **options) -> dict:
    """Train a new run into the folder ``out``; return a summary dict (``run``, ``best_epoch``, ``best_metric``,
    ``history``, ``weights``, ``device``, ``config``).

    ``split``: which images train, select and test, when the caller drew it already (default:
    :func:`~deeplense.splits.protocol_split` of ``config.protocol`` with the seed). The checkpoints record it, with
    fingerprints of the file listings, so ``evaluate`` reports on exactly the held-out images and a resume continues
    with the same split. ``options`` (also :func:`resume`'s): ``stop_after_epoch`` ends this call early (the schedule
    still spans ``config.epochs``), for staged jobs on time-limited queues: :func:`resume` later continues;
    ``compile_model``: ``torch.compile`` the network for training (on a GPU; the first steps then take a while);
    ``progress``, ``allow_pickle``, ``log``.

    Under torchrun every rank trains its shard; rank 0 alone validates, writes and logs, and sends the
    validation record to the other ranks, so every rank returns the same summary.
    """
    world, rank, dev = _start_processes(device)
    if out is None:
        raise DeepLenseError("train: --out RUN is required (or --resume RUN)")
    run = Path(out)
    if (run / "last.pt").exists():
        raise DeepLenseError(f"{run}: already holds a run (last.pt); use --resume {run} or another --out")
    if results := _results_in(run):
        raise DeepLenseError(f"{run}: already holds a run's results ({', '.join(results)}; its last.pt is gone); "
                             f"use another --out, or remove the folder to start again")
    if rank == 0 and run.is_dir():
        sweep_stale_temps(run)  # half-written checkpoints of a killed earlier try (a dead writer's only)
    if data is None:
        raise DeepLenseError("train: no dataset given")
    return _run(config, data, run, None, (world, rank, dev), split=split, **options)


def resume(run: str | os.PathLike, data: str | os.PathLike | None = None, *, device: str | None = None,
           precision: str | None = None, **options) -> dict:
    """Continue the run in folder ``run`` after its last finished epoch, with the settings it started with (from
    ``run/last.pt``); return :func:`train`'s summary. ``data`` may replace the dataset path the run recorded (a
    moved copy: the recorded listings and pixels are still checked); ``precision`` may change how it computes (the
    history then mixes precisions; ``config.json`` records each call's). ``options``: as :func:`train`'s."""
    world, rank, dev = _start_processes(device)
    run = Path(run)
    if not (run / "last.pt").is_file() and (run / "config.json").is_file():
        done = read_jsonl(run / "history.jsonl")
        if done or (run / "best.pt").exists():
            raise DeepLenseError(f"{run / 'last.pt'}: missing (deleted?), but the run finished "
                                 f"{len(done)} epoch(s): it cannot be resumed without it; its best.pt still "
                                 f"evaluates, and a new run needs another --out")
        raise DeepLenseError(f"{run / 'last.pt'}: not there: the run stopped before it finished its first epoch; "
                             f"start it again with `train --out {run}` and the same options")
    ckpt = load_checkpoint(run / "last.pt", map_location="cpu")
    if rank == 0:
        sweep_stale_temps(run, all_of_them=True)  # half-written checkpoints of the killed process
    config = config_of(ckpt, run / "last.pt")
    if precision is not None:
        config = config.replace(precision=precision)
    if rank == 0:
        options.get("log", print)(f"resuming {run} after epoch {ckpt['epoch']} of {config.epochs}")
    return _run(config, data or ckpt["data"]["root"], run, ckpt, (world, rank, dev), **options)


def _run(config: TrainConfig, data, run: Path, ckpt: dict | None, processes: tuple, *, progress: bool = True,
         allow_pickle: bool = False, stop_after_epoch: int | None = None, split: ProtocolSplit | None = None,
         compile_model: bool = False, log=print) -> dict:
    """The one training loop of :func:`train` (``ckpt`` None) and :func:`resume` (``ckpt``: the run's last.pt)."""
    world, rank, dev = processes
    say = log if rank == 0 else (lambda *a, **k: None)
    plan = plan_for(dev, config.precision)  # a precision the device cannot do is refused before any work

    if world > 1 and rank > 0:
        torch.distributed.barrier()  # rank 0 builds the cache first; the others then open it
    x_train, y_train, x_sel, y_sel, data_info = _load(config, data, allow_pickle, progress and rank == 0, dev,
                                                      split, ckpt["data"] if ckpt else None)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    torch.manual_seed(config.seed)
    model, weights_info = model_for(config, None if ckpt is None else "none")
    placed = engine.place_data(x_train, y_train, x_sel, plan, config, sum(p.numel() for p in model.parameters()),
                               log=say)
    if ckpt is not None:
        model.load_state_dict(ckpt.get("raw_model", ckpt["model"]))  # with EMA, "model" holds the averaged weights
        weights_info = ckpt["weights"]
    if weights_info.get("warning"):
        say(f"WARNING: {weights_info['warning']}")
    model, net = _on_device(model, plan, world, compile_model)
    ema = engine.build_ema(model, config)  # the weights selection, best.pt and evaluation use when it is on
    if ema is not None and ckpt is not None and "ema" in ckpt:
        ema.load_state_dict(ckpt["ema"])
    steps = engine.steps_per_epoch(len(x_train) // world, config.batch_size)
    if steps == 0:
        raise DeepLenseError(f"{data}: {len(x_train)} training images are too few for {world} process(es)")
    opt = engine.build_optimizer(model, config, plan)
    sched = engine.build_scheduler(opt, config, steps)
    scaler = plan.grad_scaler()
    start, best_metric, best_epoch, history = 1, -math.inf, 0, []
    if ckpt is not None:
        start, best_metric, best_epoch = restore_training_state(ckpt, opt, sched, scaler)
        history = _history_before(run, ckpt, start)

    # one process writes a run folder at a time (a second train on the same --out stops with one line)
    with folder_lock(run, "a training run") if rank == 0 else contextlib.nullcontext():
        if rank == 0 and ckpt is None and ((run / "last.pt").exists() or _results_in(run)):
            raise DeepLenseError(f"{run}: another run wrote its results there meanwhile; use another --out")
        stamp = {"classes": list(CLASSES), "weights": weights_info, "data": data_info, "versions": versions(),
                 "device": str(dev)}
        if rank == 0:
            _write_start(run, config, world, stamp, placed, compile_model, history)
        say(_start_line(config, dev, world, len(x_train), len(x_sel), data_info, weights_info, placed, compile_model))
        used = ema.module if ema is not None else model  # what is selected, saved as "model" and evaluated
        stopped_early = None
        for epoch in range(start, min(config.epochs, stop_after_epoch or config.epochs) + 1):
            if (stopped_early := _out_of_patience(config, epoch, best_epoch, say)) is not None:
                break
            rec = {"epoch": epoch, **engine.train_one_epoch(net, opt, sched, scaler, placed, config, epoch=epoch,
                                                            rank=rank, world=world, progress=progress, ema=ema,
                                                            model=model)}
            _check_finite(rec, run, config)
            rec.update(_validate_on_rank0(used, placed, y_sel, config, rank, world))
            history.append(rec)
            score = selection_score(rec, config)
            improved = score > best_metric
            if improved:
                best_metric, best_epoch = score, epoch
            say(_epoch_line(rec, config, improved))
            if rank == 0:
                payload = checkpoint_payload(used, config, epoch, rec, best_metric, best_epoch, stamp)
                if improved:
                    save_checkpoint(run / "best.pt", payload)
                save_checkpoint(run / "last.pt", resumable(payload, opt, sched, scaler, raw_model=model, ema=ema))
                _write_history(run, history)
            if world > 1:
                torch.distributed.barrier()
        if rank == 0 and (run / "best.pt").exists():
            _fit_temperature(run / "best.pt", placed, y_sel, config, say)
        if world > 1:
            torch.distributed.destroy_process_group()
        return {"run": str(run), "best_epoch": best_epoch, "best_metric": best_metric, "history": history,
                "weights": weights_info, "device": str(dev), "precision": plan.precision, "rank": rank,
                "config": config.to_dict(), "stopped_early_after": stopped_early}


def _out_of_patience(config: TrainConfig, epoch: int, best_epoch: int, say) -> int | None:
    """The last epoch trained when ``config.patience`` epochs passed without a better selection score (said), else
    None: train ``epoch``."""
    if config.patience and epoch - 1 - best_epoch >= config.patience:
        say(f"stopping after epoch {epoch - 1}: no better selection score in {config.patience} epoch(s) "
            f"(patience); best epoch {best_epoch}")
        return epoch - 1
    return None


def _check_finite(rec: dict, run: Path, config: TrainConfig) -> None:
    """One line, not a run of NaNs, when the training loss is not finite (every rank sees the same all-reduced
    loss, so every rank stops)."""
    if not math.isfinite(rec["train_loss"]):
        raise DeepLenseError(f"{run}: training diverged at epoch {rec['epoch']} (loss {rec['train_loss']}); lower "
                             f"--lr (now {config.lr:g}) and start again; the epochs before it are kept")


def _start_line(config: TrainConfig, dev, world: int, n_train: int, n_sel: int, data_info: dict, weights_info: dict,
                placed: engine.Placement, compile_model: bool) -> str:
    """The run's first line: what trains on what, where and how."""
    return (f"training {config.recipe} ({config.arch}) on {dev} (world {world}), {config.protocol} protocol: "
            f"{n_train} train images, {n_sel} selection images ({data_info['selection_split']}), input "
            f"{config.image_size} px, batch {config.batch_size}, lr {config.lr:g}, weights {weights_info['source']}, "
            f"data {'on the device' if placed.resident else 'in host memory, staged through pinned buffers'}, "
            f"{placed.plan.describe()}" + (", compiled" if compile_model else "")
            + (f", EMA {config.ema:g}" if config.ema else "")
            + (f", BatchNorm recalibrated on {min(config.bn_recalibration, n_train)} training images before each "
               f"validation" if config.bn_recalibration else ""))


def _epoch_line(rec: dict, config: TrainConfig, improved: bool) -> str:
    return (f"epoch {rec['epoch']}/{config.epochs}: train loss {rec['train_loss']:.4f}, val loss "
            f"{rec['val_loss']:.4f}, val acc {rec['val_accuracy']:.4f}, val macro AUC "
            f"{rec['val_macro_auc'] or float('nan'):.4f}, {rec['train_images_per_s']:.1f} img/s"
            + (" *best*" if improved else ""))


def _on_device(model, plan, world: int, compile_model: bool):
    """``(model, net)``: the network on the plan's device in its memory format, and what training steps call (the
    same network, wrapped for several processes and compiled when asked)."""
    dev = plan.device
    model = model.to(dev, memory_format=torch.channels_last if plan.channels_last else torch.preserve_format)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model,
                                                        device_ids=[dev.index] if dev.type == "cuda" else None)
    if plan.kind == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels once
    if compile_model:
        net = torch.compile(net)
    return model, net


def _write_start(run: Path, config: TrainConfig, world: int, stamp: dict, placed: engine.Placement,
                 compile_model: bool, history: list[dict]) -> None:
    """``config.json`` (the settings, and how this call computes) and the history so far, before any epoch."""
    plan = placed.plan
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / "config.json", {
        "config": config.to_dict(), "world_size": world, **stamp,
        "execution": {"data_on_device": placed.resident, "compiled": compile_model, "precision": plan.precision,
                      "precision_reason": plan.reason, "eval_batch_size": placed.eval_batch_size,
                      "memory": None if placed.memory is None else placed.memory.describe()}})
    _write_history(run, history)


def selection_score(rec: dict, config: TrainConfig) -> float:
    """What chooses ``best.pt`` from an epoch's record: its selection accuracy or macro AUC (-1 where the AUC is
    undefined, e.g. a selection set missing a class)."""
    return rec["val_accuracy"] if config.select_metric == "accuracy" else (rec["val_macro_auc"] or -1.0)


def _fit_temperature(best: Path, placed: engine.Placement, y_sel, config: TrainConfig, say=print) -> None:
    """Store in ``best.pt`` the temperatures that calibrate its probabilities (:mod:`deeplense.calibration`), fitted
    on the selection images only, without and with test-time averaging (``evaluate``/``predict --calibrated``
    apply the one that matches their TTA setting), on the log-probabilities the network computes. A fit that would
    raise the selection NLL stores 1; one that stops at a bound is said. Refitted only when best.pt changed since."""
    ck = load_checkpoint(best)
    if (ck.get("temperature") or {}).get("epoch") == ck["epoch"]:
        return
    from .calibration import T_BOUNDS, fit_temperature
    from .checkpoint import model_from_checkpoint

    model = model_from_checkpoint(ck, placed.plan.device, best)
    fitted: dict = {"epoch": int(ck["epoch"]), "fitted_on": "selection", "n": int(len(y_sel))}
    for name, tta in (("plain", False), ("tta", True)):
        _, logp = engine.predict_proba(model, placed.x_sel, config, placed.plan, tta=tta,
                                       batch_size=placed.eval_batch_size, with_log=True)
        fit = fit_temperature(y_sel, logp)
        fitted[name] = fit["temperature"]
        fitted[f"{name}_selection_nll"] = [fit["nll_before"], fit["nll_after"]]
        fitted[f"{name}_fit"] = {k: fit[k] for k in ("fitted", "at_bound", "kept")}
        views = "with TTA" if tta else "plain"
        if not fit["kept"]:
            say(f"temperature ({views}): the fit (T = {fit['fitted']:.3g}) would not lower the selection NLL "
                f"({fit['nll_before']:.4f}); T = 1 stored, the probabilities stay as predicted")
        elif fit["at_bound"] is not None:
            say(f"WARNING: temperature ({views}) stopped at the bound T = {fit['at_bound']:g} of {T_BOUNDS}: the "
                f"selection probabilities are degenerate (too few images, or one class predicted for all?); "
                f"selection NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}")
    save_checkpoint(best, {**ck, "temperature": fitted})


def _results_in(run: Path) -> list[str]:
    """The files of ``run`` that only a run that finished an epoch (or an evaluation) leaves."""
    found = [f for f in ("best.pt", "metrics.json", "predictions.npz") if (run / f).exists()]
    return found + (["history.jsonl"] if read_jsonl(run / "history.jsonl") else [])


def _validate_on_rank0(model, placed: engine.Placement, y_sel, config: TrainConfig, rank: int, world: int) -> dict:
    """The selection metrics, computed by rank 0 alone (after recalibrating BatchNorm when the config asks) and sent
    to the other ranks (which wait meanwhile)."""
    if rank == 0:
        engine.recalibrate_bn(model, placed, config)  # statistics of these weights (config.bn_recalibration)
    rec = [engine.validate(model, placed.x_sel, y_sel, config, placed.plan, placed.eval_batch_size)
           if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(rec, src=0)
    return rec[0]


def rank_device(device: str | None) -> str | None:
    """The device this process asks for: under torchrun an unnamed or plain ``cuda`` device becomes the rank's own
    GPU (``cuda:LOCAL_RANK``), so that no rank touches another's card, not even to check it."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and device in (None, "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def _start_processes(device: str | None) -> tuple[int, int, torch.device]:
    """``(world size, rank, device)``; under torchrun, the process group is started and each rank gets its GPU."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev = pick_device(rank_device(device))  # a CUDA device is made the current one
    if world > 1:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            # the timeout covers rank 0's first cache build, which the others wait for at a barrier
            timeout = datetime.timedelta(minutes=default_timeout_minutes())
            if dev.type == "cuda":
                dist.init_process_group(backend="nccl", timeout=timeout, device_id=dev)
            else:
                dist.init_process_group(backend="gloo", timeout=timeout)
    return world, rank, dev


def _load(config: TrainConfig, data, allow_pickle: bool, progress: bool, dev: torch.device,
          split: ProtocolSplit | None = None, recorded: dict | None = None):
    """The training images and the selection images as cropped tensors (the test images are never loaded), and
    what ``config.json`` and the checkpoints record about the data. ``recorded``: a resumed run's data record."""
    needed = SPLITS if config.protocol == "reference" else ("train",)  # clean: val is not even read
    info: dict = {}
    loaded = load_splits(data, needed, allow_pickle=allow_pickle, progress=progress, info=info)
    tr_images, tr_labels = loaded["train"]
    va_images, va_labels = loaded.get("val", (None, None))
    n_val = None if va_labels is None else len(va_labels)
    if recorded is not None and "selection_indices" in recorded:  # a resume continues with its own split
        changed = [s for s in needed if recorded["listings"].get(s) != info[s].listing]
        if changed:
            raise DeepLenseError(f"{data}: its {changed[0]}/ is not the one this run started with (files added, "
                                 f"removed or renamed), so the held-out images cannot be kept out; resume on the "
                                 f"original data")
        split = ProtocolSplit.from_record(recorded, len(tr_labels), n_val)
    elif split is None:
        split = protocol_split(config.protocol, tr_labels, va_labels, config.holdout_fraction, seed=config.seed)
    elif split.protocol != config.protocol:
        raise DeepLenseError(f"train: a {split.protocol}-protocol split given for a {config.protocol}-protocol run")
    if va_images is not None:  # a val/ that is train/ (a link, hard links, copies) would hold nothing out
        check_disjoint(info["train"], info["val"], tr_images, va_images)
    sel_images, sel_labels = (va_images, va_labels) if split.selection_split == "val" else (tr_images, tr_labels)
    tr_idx = limit_per_class(tr_labels, split.train_idx, config.limit_per_class)
    sel_idx = limit_per_class(sel_labels, split.selection_idx, config.limit_per_class)
    if len(sel_idx) == 0:
        raise DeepLenseError(f"{data}: the selection part of {split.selection_split} is empty ({config.protocol} "
                             f"protocol, holdout_fraction {config.holdout_fraction}); use more images")
    x_train, x_sel = native_crop(tr_images, tr_idx, config.crop), native_crop(sel_images, sel_idx, config.crop)
    data_info = {"root": str(Path(data).resolve()),
                 "fingerprint": combine_fingerprints([info[s].fingerprint for s in needed]),
                 "split_fingerprints": {s: info[s].fingerprint for s in needed},
                 "listings": {s: info[s].listing for s in needed},
                 "n_train": int(len(tr_idx)), "n_selection": int(len(sel_idx)),
                 "image_shape": [int(v) for v in tr_images.shape[-2:]],
                 "n_test": n_val if split.test_idx is None else int(len(split.test_idx)),
                 "test": "all of val" if split.test_idx is None else "held-out part of val",
                 "heldout_digest": None if split.test_idx is None else pixel_digest(va_images, split.test_idx),
                 **split.record()}
    return x_train, torch.from_numpy(tr_labels[tr_idx]), x_sel, sel_labels[sel_idx], data_info


def _history_before(run: Path, ckpt: dict, start: int) -> list[dict]:
    """The records of the epochs a resumed run keeps: those before ``start`` in history.jsonl, and the checkpoint's
    own epoch when the history missed it."""
    history = [h for h in read_jsonl(run / "history.jsonl") if h["epoch"] < start]
    if (not history or history[-1]["epoch"] < ckpt["epoch"]) and ckpt.get("metrics", {}).get("epoch") == \
            ckpt["epoch"]:
        history.append(ckpt["metrics"])  # killed between the checkpoint and the history write: it is in both
    return history


def _write_history(run: Path, history: list[dict]) -> None:
    write_text_atomic(run / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
