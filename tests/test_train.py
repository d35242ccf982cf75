"""Training runs end to end: learning, repeatability, resume after a kill, DDP, and which epoch best.pt holds."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from conftest import FAST, quiet, subprocess_env

from deeplense.checkpoint import load_checkpoint
from deeplense.config import recipe
from deeplense.data import split_holdout
from deeplense.evaluate import evaluate
from deeplense.metrics import quick_metrics
from deeplense.train import train


def test_learns_a_separable_toy_set(toy, tmp_path):
    cfg = recipe("default", epochs=3, lr=1e-3, **FAST)
    s = train(cfg, toy, tmp_path / "run", progress=False, log=lambda *a: None)
    h = s["history"]
    assert len(h) == 3
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    best = max(h, key=lambda r: r["val_macro_auc"])
    assert best["val_macro_auc"] > 0.8 and max(r["val_accuracy"] for r in h) > 0.5  # chance is 1/3
    # run folder contents
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "history.jsonl", "last.pt", "best.pt"}
    lines = (run / "history.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_auc", "lr", "train_images_per_s"} <= set(
        json.loads(lines[0]))
    assert all(r["train_images"] == r["train_images_distinct"] == 120 for r in h)  # every image once per epoch
    # checkpoints are plain data + tensors, loadable with weights_only=True
    for name in ("best.pt", "last.pt"):
        ck = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ck["classes"] == ["no", "sphere", "vort"] and isinstance(ck["config"], dict)
        assert all(isinstance(v, str) for v in ck["versions"].values())
    assert load_checkpoint(run / "best.pt")["epoch"] == s["best_epoch"]
    # the held-out test part of val was never used: selection count is val minus the 10% test part
    cfg_json = json.loads((run / "config.json").read_text())
    _, test_idx = split_holdout(np.repeat(np.arange(3), 12), 0.1, seed=0)
    assert cfg_json["data"]["n_selection"] == 36 - len(test_idx)
    assert cfg_json["data"]["n_heldout_test_untouched"] == len(test_idx)

def test_bitwise_repeatable_on_cpu(small, tmp_path):
    cfg = recipe("default", epochs=2, **FAST)
    a = train(cfg, small, tmp_path / "a", progress=False, log=lambda *a: None, device="cpu")
    b = train(cfg, small, tmp_path / "b", progress=False, log=lambda *a: None, device="cpu")
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    c = train(cfg.replace(seed=1), small, tmp_path / "c", progress=False, log=lambda *a: None, device="cpu")
    assert [h["train_loss"] for h in c["history"]] != [h["train_loss"] for h in a["history"]]

def test_resume_after_kill_mid_epoch(toy, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "deeplense", "train", "--data", str(toy), "--out", str(run), "--epochs", "3",
           "--image-size", "32", "--batch-size", "4", "--weights", "none"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        hist = run / "history.jsonl"
        if hist.exists() and len(hist.read_text().splitlines()) >= 1:
            break
        time.sleep(0.05)
    time.sleep(1.0)  # well inside epoch 2 (an epoch takes several seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len((run / "history.jsonl").read_text().splitlines())
    assert done < 3, "the run finished before it could be killed; the test needs a slower epoch"
    assert load_checkpoint(run / "last.pt")["epoch"] == done
    assert not list(run.glob(".*tmp*"))  # the kill left no half-written file behind... or only temp names
    r = subprocess.run([sys.executable, "-m", "deeplense", "train", "--resume", str(run)], env=subprocess_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hist = [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert load_checkpoint(run / "last.pt")["epoch"] == 3
    best = load_checkpoint(run / "best.pt")
    assert 1 <= best["epoch"] <= 3 and best["metrics"]["val_macro_auc"] == max(h["val_macro_auc"] for h in hist)

def test_resume_equals_uninterrupted(small, tmp_path):
    cfg = recipe("default", epochs=2, **FAST)
    train(cfg, small, tmp_path / "full", progress=False, log=lambda *a: None, device="cpu")
    s = train(cfg, small, tmp_path / "staged", progress=False, stop_after_epoch=1, log=lambda *a: None, device="cpu")
    assert len(s["history"]) == 1
    train(None, None, None, resume=tmp_path / "staged", progress=False, log=lambda *a: None, device="cpu")
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "staged" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

def test_ddp_two_gloo_processes(small, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "deeplense",
           "train", "--data", str(small), "--out", str(run), "--epochs", "2", "--image-size", "32",
           "--batch-size", "4", "--weights", "none", "--device", "cpu"]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    hist = [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert load_checkpoint(run / "best.pt")["epoch"] in (1, 2)
    # each rank trains on its own half of every epoch, none seen by both ranks: 18 images, 9 per rank, of
    # which 2 batches of 4 (a last batch of 1 is skipped: BatchNorm cannot train on one image)
    for h in hist:
        assert h["train_images"] == 16 and h["train_images_distinct"] == 16, h

def _script_selection_auc(monkeypatch, values):
    """Make the per-epoch selection macro AUC follow ``values`` (the rest of the metrics stay real)."""
    import deeplense.engine as engine

    it = iter(values)

    def scripted(labels, probabilities):
        return {**quick_metrics(labels, probabilities), "macro_auc": next(it)}

    monkeypatch.setattr(engine, "quick_metrics", scripted)

def test_best_checkpoint_holds_the_peak_epoch_also_across_resume(small, tmp_path, monkeypatch):
    """Selection AUC 0.6, 0.9, 0.7: best.pt must be epoch 2's weights, whether or not the run was resumed."""
    cfg = recipe("default", epochs=3, **FAST)
    _script_selection_auc(monkeypatch, [0.6, 0.9, 0.7])
    s = train(cfg, small, tmp_path / "straight", **quiet())
    assert s["best_epoch"] == 2 and s["best_metric"] == 0.9
    _script_selection_auc(monkeypatch, [0.6, 0.9])
    train(cfg, small, tmp_path / "staged", **quiet(stop_after_epoch=2))
    epoch2 = torch.load(tmp_path / "staged" / "last.pt", weights_only=True)["model"]
    _script_selection_auc(monkeypatch, [0.7])
    train(None, None, None, resume=tmp_path / "staged", **quiet())
    for run in ("straight", "staged"):
        best = load_checkpoint(tmp_path / run / "best.pt")
        assert best["epoch"] == 2 and best["best_metric"] == 0.9, run
        assert all(torch.equal(best["model"][k], epoch2[k]) for k in epoch2), run  # bitwise: CPU is repeatable
        assert load_checkpoint(tmp_path / run / "last.pt")["epoch"] == 3
    # evaluate reports on the peak epoch's weights
    m = evaluate(tmp_path / "staged" / "best.pt", small, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    assert m["provenance"]["checkpoint_epoch"] == 2
