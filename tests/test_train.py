from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dataset

from deeplense.cli import main
from deeplense.data import split_holdout
from deeplense.evaluate import load_checkpoint
from deeplense.metrics import quick_metrics
from deeplense.train import RECIPES, TrainConfig, recipe, train

FAST = dict(image_size=32, batch_size=8, weights="none", warmup_epochs=0.0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("toy") / "dataset", n_train=40, n_val=12)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("small") / "dataset", n_train=6, n_val=10)


def _env():
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def test_recipes():
    ref = RECIPES["reference"]
    assert (ref.optimizer, ref.lr, ref.momentum, ref.schedule, ref.step_size, ref.gamma, ref.batch_size, ref.epochs,
            ref.augmentation, ref.resize_then_crop, ref.image_size, ref.select_metric) == (
        "sgd", 1e-4, 0.9, "step", 7, 0.1, 256, 20, "hflip", 256, 224, "accuracy")
    d = RECIPES["default"]
    assert (d.optimizer, d.schedule, d.augmentation, d.select_metric) == ("adamw", "cosine", "d4", "macro_auc")
    with pytest.raises(Exception, match="unknown recipe"):
        recipe("nope")
    with pytest.raises(Exception, match="optimizer"):
        TrainConfig(optimizer="lion")


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
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    r = subprocess.run([sys.executable, "-m", "deeplense", "train", "--resume", str(run)], env=_env(),
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
    env = {**_env(), "OMP_NUM_THREADS": "1"}
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


def test_cli_round_trip_train_evaluate_predict(small, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(small), "--out", str(run), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "6", "--weights", "none", "--seed", "3"]) == 0
    assert main(["train", "--data", str(small), "--out", str(run)]) == 2  # refuses to overwrite a run
    assert "already holds a run" in capsys.readouterr().err
    ev = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(small), "--out", str(ev),
                 "--bootstrap", "30"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    z = np.load(ev / "predictions.npz")
    assert z["labels"].dtype == np.int64 and z["probabilities"].dtype == np.float32
    assert z["probabilities"].shape == (m["n"], 3) and m["n"] == 3  # round(0.1 * 10) per class
    np.testing.assert_allclose(z["probabilities"].sum(1), 1, atol=1e-5)
    assert m["provenance"]["seed"] == 3 and m["provenance"]["split"] == "test"
    assert m["provenance"]["pretrained"] is False and "versions" in m["provenance"]
    _, test_idx = split_holdout(np.repeat(np.arange(3), 10), 0.1, seed=3)
    np.testing.assert_array_equal(z["val_indices"], test_idx)
    assert {"accuracy", "auc", "confusion_matrix", "n", "ci"} <= set(m)
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(small), "--out",
                 str(tmp_path / "ev2"), "--split", "val", "--tta", "--bootstrap", "10"]) == 0
    m2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert m2["n"] == 27 and m2["provenance"]["tta"] is True
    capsys.readouterr()
    # predict: to stdout, and to a file
    assert main(["predict", "--checkpoint", str(run / "best.pt"), str(small / "val" / "no" / "1.npy"),
                 str(small / "val" / "vort")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 11 and list(rows[0]) == ["path", "predicted", "p_no", "p_sphere", "p_vort"]
    assert rows[1]["path"].endswith("vort/1.npy") and rows[2]["path"].endswith("vort/2.npy")
    assert rows[0]["predicted"] in ("no", "sphere", "vort")
    assert main(["predict", "--checkpoint", str(run / "best.pt"), str(small / "val" / "no" / "1.npy"),
                 "--output", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().startswith("path,predicted,p_no,p_sphere,p_vort\n")


def test_bad_checkpoints(small, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, progress=False, log=lambda *a: None)
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["classes"] = ["no_sub", "cdm", "axion"]
    torch.save(ck, tmp_path / "other.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "other.pt"), "--data", str(small)]) == 2
    assert "trained for classes ['no_sub', 'cdm', 'axion']" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["predict", "--checkpoint", str(tmp_path / "junk.pt"), str(small)]) == 2
    assert "junk.pt: not a deeplense checkpoint" in capsys.readouterr().err
    torch.save({"a": torch.zeros(1)}, tmp_path / "sd.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "sd.pt"), str(small)]) == 2
    assert "not a deeplense checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ faults users fear
def _quiet(**kw):
    return dict(progress=False, log=lambda *a: None, device="cpu", **kw)


def _script_selection_auc(monkeypatch, values):
    """Make the per-epoch selection macro AUC follow ``values`` (the rest of the metrics stay real)."""
    import deeplense.metrics as metrics

    it = iter(values)

    def scripted(labels, probabilities):
        return {**quick_metrics(labels, probabilities), "macro_auc": next(it)}

    monkeypatch.setattr(metrics, "quick_metrics", scripted)


def test_best_checkpoint_holds_the_peak_epoch_also_across_resume(small, tmp_path, monkeypatch):
    """Selection AUC 0.6, 0.9, 0.7: best.pt must be epoch 2's weights, whether or not the run was resumed."""
    cfg = recipe("default", epochs=3, **FAST)
    _script_selection_auc(monkeypatch, [0.6, 0.9, 0.7])
    s = train(cfg, small, tmp_path / "straight", **_quiet())
    assert s["best_epoch"] == 2 and s["best_metric"] == 0.9
    _script_selection_auc(monkeypatch, [0.6, 0.9])
    train(cfg, small, tmp_path / "staged", **_quiet(stop_after_epoch=2))
    epoch2 = torch.load(tmp_path / "staged" / "last.pt", weights_only=True)["model"]
    _script_selection_auc(monkeypatch, [0.7])
    train(None, None, None, resume=tmp_path / "staged", **_quiet())
    for run in ("straight", "staged"):
        best = load_checkpoint(tmp_path / run / "best.pt")
        assert best["epoch"] == 2 and best["best_metric"] == 0.9, run
        assert all(torch.equal(best["model"][k], epoch2[k]) for k in epoch2), run  # bitwise: CPU is repeatable
        assert load_checkpoint(tmp_path / run / "last.pt")["epoch"] == 3
    # evaluate reports on the peak epoch's weights
    from deeplense.evaluate import evaluate

    m = evaluate(tmp_path / "staged" / "best.pt", small, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    assert m["provenance"]["checkpoint_epoch"] == 2


def _row_keys(x) -> list[bytes]:
    return [np.ascontiguousarray(r, dtype=np.float32).tobytes() for r in np.asarray(x)]


def test_selection_and_heldout_test_share_no_image(small, tmp_path, monkeypatch):
    """The images training selects on and the images evaluate reports on are disjoint and together make up val."""
    import deeplense.train as train_mod
    from deeplense.data import load_split
    from deeplense.evaluate import evaluate

    selected = []
    real = train_mod.predict_proba

    def spy(model, x, *a, **k):
        selected.append(x.clone())
        return real(model, x, *a, **k)

    monkeypatch.setattr(train_mod, "predict_proba", spy)
    train(recipe("default", epochs=1, **FAST), small, tmp_path / "run", **_quiet())
    evaluate(tmp_path / "run" / "best.pt", small, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    images, _ = load_split(small, "val", progress=False)
    tested = images[np.load(tmp_path / "ev" / "predictions.npz")["val_indices"]]
    sel, test, everything = set(_row_keys(selected[0])), set(_row_keys(tested)), set(_row_keys(images))
    assert len(sel) == 27 and len(test) == 3 and len(everything) == 30
    assert not sel & test, "a held-out test image was used for model selection"
    assert sel | test == everything


def test_tta_is_the_mean_over_the_8_symmetries(small, tmp_path):
    from deeplense.data import d4_transform, load_split
    from deeplense.evaluate import model_from_checkpoint
    from deeplense.train import native_crop, predict_proba

    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **_quiet())
    probs = {}
    for tta in (False, True):
        out = tmp_path / f"ev-tta{tta}"
        assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(small), "--out", str(out),
                     "--bootstrap", "0", "--device", "cpu", "--split", "val"] + (["--tta"] if tta else [])) == 0
        probs[tta] = np.load(out / "predictions.npz")["probabilities"]
    ckpt = load_checkpoint(run / "best.pt")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = model_from_checkpoint(ckpt, torch.device("cpu"))
    images, _ = load_split(small, "val", progress=False)
    x = native_crop(images, np.load(tmp_path / "ev-ttaTrue" / "predictions.npz")["val_indices"], cfg.crop)
    views = np.stack([predict_proba(model, d4_transform(x, k), cfg, torch.device("cpu")) for k in range(8)])
    np.testing.assert_allclose(probs[True], views.mean(0), atol=1e-5)
    np.testing.assert_allclose(probs[False], views[0], atol=1e-6)
    assert np.abs(probs[True] - probs[False]).max() > 1e-4  # the views disagree, so averaging changes something


def test_training_batches_are_d4_augmented(small, tmp_path, monkeypatch):
    """What the network sees in training: each image once per epoch, most of them flipped or turned."""
    import deeplense.model as model_mod
    from deeplense.data import d4_transform, load_split

    seen = []
    real = model_mod.build_model

    def spy(*a, **k):
        model, info = real(*a, **k)
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
        return model, info

    monkeypatch.setattr(model_mod, "build_model", spy)
    # crop 32 at 32 px: no resize, so the input is exactly the native crop mapped to [-1, 1]
    cfg = recipe("default", epochs=1, image_size=32, crop=32, batch_size=6, weights="none", warmup_epochs=0.0)
    train(cfg, small, tmp_path / "run", **_quiet())
    fed = (torch.cat(seen)[:, 0] + 1) / 2  # (18, 32, 32) back in [0, 1]
    images, _ = load_split(small, "train", progress=False)
    o = (150 - 32) // 2
    crops = torch.from_numpy(np.ascontiguousarray(images[:, 0, o : o + 32, o : o + 32]))
    found = []
    for f in fed:
        hits = [(i, k) for i in range(len(crops)) for k in range(8)
                if torch.allclose(d4_transform(crops[i], k), f, atol=1e-6)]
        assert len(hits) == 1, "a training input is not an exact D4 transform of one training image"
        found.append(hits[0])
    assert sorted(i for i, _ in found) == list(range(len(crops)))  # each image exactly once in the epoch
    assert sum(k != 0 for _, k in found) >= len(found) // 2  # 7 of 8 are expected to be transformed


def test_predictions_use_eval_mode(tmp_path):
    """Probabilities come from the network in eval mode: per image, whatever the batch, and no state changes."""
    from deeplense.data import preprocess
    from deeplense.model import build_model
    from deeplense.train import predict_proba

    torch.manual_seed(0)
    model, _ = build_model("none")
    with torch.no_grad():  # BatchNorm running statistics unlike any single batch's
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 1, 32, 32)
    cfg = TrainConfig(image_size=32, eval_batch_size=6)
    model.train()  # as the training loop leaves it before validating
    whole = predict_proba(model, x, cfg, torch.device("cpu"))
    pairs = predict_proba(model.train(), x, cfg, torch.device("cpu"), batch_size=2)
    np.testing.assert_allclose(whole, pairs, atol=1e-6)  # an image's probabilities do not depend on its batch
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # running statistics untouched
    with torch.no_grad():
        eval_mode = torch.softmax(model.eval()(preprocess(x, 32)), 1).numpy()
        train_mode = torch.softmax(model.train()(preprocess(x, 32)), 1).numpy()
    np.testing.assert_allclose(whole, eval_mode, atol=1e-6)
    assert np.abs(train_mode - eval_mode).max() > 1e-3  # the check above can tell the two modes apart


class _TouchOnLoad:
    """A pickled payload with a visible effect: unpickling it creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_code_is_refused_without_running_it(small, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **_quiet())
    ck = torch.load(run / "best.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**ck, "extra": _TouchOnLoad(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="evil.pt: not a deeplense checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "evil.pt"), str(small / "val" / "no")]) == 2
    assert "evil.pt: not a deeplense checkpoint" in capsys.readouterr().err
    assert not marker.exists(), "loading the checkpoint ran code from it"
