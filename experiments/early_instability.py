"""Why does the default recipe's selection loss jump in its early epochs? A check of one cause: BatchNorm.

In the accuracy study's ``default`` runs the selection loss jumps at epoch 2 or 3 (e.g. 1.10 -> 3.55 on seed 1)
while the training loss keeps falling, then recovers. One candidate is BatchNorm's running statistics: evaluation
uses running averages of the batch statistics (momentum 0.1), which lag behind weights that move fast under the
peak learning rate just after warm-up, so the network is evaluated with statistics of earlier weights.

The check: train a study arm to epoch ``--epochs`` (the study's own config and data, so the run is the study's, bit
for bit), then score the selection images three ways with the same weights: as recorded (eval mode, running
statistics), after recalibrating the running statistics on the training images with these weights (a cumulative
average over one pass in train mode, no gradient: ``torch.optim.swa_utils.update_bn``), and in train mode (each
batch's own statistics). If recalibration brings the loss back, the jump is the running statistics, not the
weights.

Usage: ``python experiments/early_instability.py --data experiments/out/study_v4/data --seed 1 --epochs 3``;
writes ``experiments/results/early_instability.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from deeplense.checkpoint import load_checkpoint, model_from_checkpoint
from deeplense.data import load_splits
from deeplense.engine import validate
from deeplense.splits import ProtocolSplit
from deeplense.train import train
from deeplense.transforms import input_fn, native_crop
from deeplense.util import REPO, versions, write_json_atomic

from accuracy_study import arm_config


def scores(model, x_sel, y_sel, config) -> dict:
    r = validate(model, x_sel, y_sel, config, torch.device("cpu"))
    return {"loss": r["val_loss"], "macro_auc": r["val_macro_auc"], "accuracy": r["val_accuracy"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the study's simulated set (OUT/data of accuracy_study.py)")
    p.add_argument("--arm", default="default")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3, help="train to this epoch, then check (default 3)")
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "early_instability.json"))
    args = p.parse_args(argv)
    config = arm_config(args.arm, "quick", args.seed, "clean")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(config, args.data, run, device="cpu", stop_after_epoch=args.epochs, progress=False,
              log=lambda *a: None)
        ck = load_checkpoint(run / "last.pt")
        split = ProtocolSplit.from_record(ck["data"], ck["data"]["n_train"] + ck["data"]["n_selection"], None)
        x, y = load_splits(args.data, ("train",), progress=False)["train"]
        x_sel, y_sel = native_crop(x, split.selection_idx, config.crop), y[split.selection_idx]
        x_tr = native_crop(x, split.train_idx, config.crop)
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        model = model_from_checkpoint(ck, torch.device("cpu"))
        rows.append({"how": "as recorded: eval mode, running statistics", **scores(model, x_sel, y_sel, config)})
        fn = input_fn(config)
        batches = [fn(x_tr[i : i + 128]) for i in range(0, len(x_tr), 128)]
        torch.optim.swa_utils.update_bn(batches, model)  # cumulative average of the batch statistics, no gradient
        rows.append({"how": "running statistics recalibrated on the training images with these weights",
                     **scores(model, x_sel, y_sel, config)})
        model = model_from_checkpoint(ck, torch.device("cpu"))
        with torch.no_grad():
            probs = []
            model.train()  # each batch normalised by its own statistics
            for i in range(0, len(x_sel), 128):
                probs.append(torch.softmax(model(fn(x_sel[i : i + 128])), 1))
            probs = torch.cat(probs).numpy()
        rows.append({"how": "train mode: each batch's own statistics (batches of 128)",
                     "loss": float(-np.log(np.clip(probs[np.arange(len(y_sel)), y_sel], 1e-12, None)).mean())})
    result = {"arm": args.arm, "seed": args.seed, "epoch": args.epochs, "config": config.to_dict(),
              "history": [{k: h[k] for k in ("epoch", "train_loss", "val_loss", "val_macro_auc", "lr")}
                          for h in history],
              "checks": rows, "versions": versions(),
              "command": shlex.join(["python", "experiments/early_instability.py",
                                     *(sys.argv[1:] if argv is None else argv)])}
    write_json_atomic(args.out, result)
    for r in rows:
        print(f"{r['how']}: selection loss {r['loss']:.3f}"
              + (f", macro AUC {r['macro_auc']:.3f}" if r.get("macro_auc") is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
