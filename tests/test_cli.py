"""The command line as a user on a cluster meets it: every mistake is one line `error: <path>: <reason>`, exit
status 2, no traceback, nothing half-written; arguments are checked before any work."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deeplense.cli import main
from deeplense.config import recipe
from deeplense.testing import FAST, quiet, subprocess_env, write_dataset
from deeplense.train import resume, train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a trained checkpoint, a plain file, and a path under that file."""
    root = tmp_path_factory.mktemp("world")
    data = write_dataset(root / "dataset", n_train=6, n_val=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPLENSE_CACHE", str(root / "cache"))
        train(recipe("default", epochs=1, **FAST), data, root / "run", **quiet())
    (root / "file.txt").write_text("not a folder")
    return {"data": data, "ckpt": root / "run" / "best.pt", "run": root / "run", "file": root / "file.txt",
            "under": root / "file.txt" / "sub", "missing": root / "missing"}


def _cases(w):
    d, ck, f, under, missing = str(w["data"]), str(w["ckpt"]), str(w["file"]), str(w["under"]), str(w["missing"])
    return {
        "inspect --data file": (["inspect", "--data", f], "not a folder"),
        "inspect --data missing": (["inspect", "--data", missing], "no such folder"),
        "simulate --out file": (["simulate", "--out", f], "is a file"),
        "simulate --out under a file": (["simulate", "--out", under], "is a file"),
        "simulate --figure under a file": (["simulate", "--out", missing, "--figure", under + "/fig"], "is a file"),
        "train --out file": (["train", "--data", d, "--out", f, "--weights", "none"], "is a file"),
        "train --out under a file": (["train", "--data", d, "--out", under, "--weights", "none"], "is a file"),
        "train --data missing": (["train", "--data", missing, "--out", missing + "/run"], "no such folder"),
        "train --resume missing": (["train", "--resume", missing], "checkpoint not found"),
        "evaluate --checkpoint missing": (["evaluate", "--checkpoint", missing, "--data", d], "checkpoint not found"),
        "evaluate --checkpoint folder": (["evaluate", "--checkpoint", d, "--data", d], "checkpoint not found"),
        "evaluate --checkpoint file": (["evaluate", "--checkpoint", f, "--data", d], "not a deeplense checkpoint"),
        "evaluate --out file": (["evaluate", "--checkpoint", ck, "--data", d, "--out", f], "is a file"),
        "evaluate --out under a file": (["evaluate", "--checkpoint", ck, "--data", d, "--out", under], "is a file"),
        "evaluate --data missing": (["evaluate", "--checkpoint", ck, "--data", missing], "no such folder"),
        "predict --checkpoint missing": (["predict", "--checkpoint", missing, d], "checkpoint not found"),
        "predict path missing": (["predict", "--checkpoint", ck, missing], "no such file or folder"),
        "predict --output folder": (["predict", "--checkpoint", ck, d, "--output", d], "is a folder"),
        "predict --output under a file": (["predict", "--checkpoint", ck, d, "--output", under + "/p.csv"],
                                          "is a file"),
        "report --run missing": (["report", "--run", missing], "not found"),
        "report --figures under a file": (["report", "--run", str(w["run"]), "--figures", under], "is a file"),
    }


CASES = list(_cases({k: Path("/x") for k in ("data", "ckpt", "file", "under", "missing", "run")}))


@pytest.mark.parametrize("case", CASES)
def test_every_path_mistake_is_one_line_and_exit_2(world, case, capsys, tmp_path):
    argv, expected = _cases(world)[case]
    before = sorted(p for p in world["run"].parent.rglob("*") if "cache" not in p.parts)
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (case, err)
    after = sorted(p for p in world["run"].parent.rglob("*") if "cache" not in p.parts)
    assert after == before, f"{case} wrote {set(after) - set(before)}"


@pytest.mark.parametrize("cache", ["file", "under"])
def test_a_cache_setting_that_is_a_file_is_one_line(world, cache, monkeypatch, capsys):
    monkeypatch.setenv("DEEPLENSE_CACHE", str(world[cache]))
    assert main(["inspect", "--data", str(world["data"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(world["file"]) in err[0], err


@pytest.mark.parametrize("argv, expected", [
    (["train"], "--out RUN is required"),
    (["train", "--out", "{tmp}/run", "--seed", "-1"], "seed must be 0 or more"),
    (["train", "--out", "{tmp}/run", "--seed", "20261201120000"], "below 2**31"),
    (["train", "--out", "{tmp}/run", "--device", "gpu"], "--device gpu: not a device"),
    (["train", "--out", "{tmp}/run", "--device", "CUDA"], "--device CUDA: not a device"),
    (["train", "--out", "{tmp}/run", "--device", "cuda:x"], "--device cuda:x: not a device"),
    (["train", "--out", "{tmp}/run", "--device", "cpu", "--precision", "fp16"], "--precision fp16: needs a CUDA"),
    (["train", "--out", "{tmp}/run", "--batch-size", "1"], "batch_size must be at least 2"),
    (["train", "--out", "{tmp}/run", "--image-size", "10000"], "image_size must be between 16 and 1024"),
    (["train", "--out", "{tmp}/run", "--eval-batch-size", "0"], "eval_batch_size must be at least 1"),
    (["train", "--out", "{tmp}/run", "--crop", "0"], "crop must be at least 16"),
    (["train", "--out", "{tmp}/run", "--limit-per-class", "-1"], "limit_per_class must be at least 1"),
    (["train", "--out", "{tmp}/run", "--stop-after-epoch", "0"], "--stop-after-epoch 0"),
    (["train", "--resume", "{tmp}/run", "--epochs", "5"], "--epochs cannot change a run"),
    (["simulate", "--out", "{tmp}/sim", "--seed", "-1"], "--seed -1: must be 0 or more"),
    (["simulate", "--out", "{tmp}/sim", "--shard", ""], "--shard '': expected K/N"),
    (["evaluate", "--checkpoint", "{tmp}/x.pt", "--bootstrap", "-5"], "--bootstrap -5"),
    # issue 37, item 11: each once a traceback, or accepted and wrong; every range is the config's own (or the
    # command's, in cli.OPTION_RANGES), so the notebook and the study refuse the same values
    (["train", "--out", "{tmp}/run", "--weight-decay", "-1"], "weight_decay must be at least 0"),
    (["train", "--out", "{tmp}/run", "--schedule", "step", "--step-size", "0"], "step_size must be at least 1"),
    (["train", "--out", "{tmp}/run", "--momentum", "nan"], "momentum=nan is not a finite number"),
    (["train", "--out", "{tmp}/run", "--momentum", "1.5"], "momentum must be in [0, 1)"),
    (["train", "--out", "{tmp}/run", "--warmup-epochs", "-1"], "warmup_epochs must be at least 0"),
    (["train", "--out", "{tmp}/run", "--clip-grad", "inf"], "clip_grad=inf is not a finite number"),
    (["train", "--out", "{tmp}/run", "--lr", "nan"], "lr=nan is not a finite number"),
    (["train", "--out", "{tmp}/run", "--gamma", "0"], "gamma must be positive"),
    (["train", "--out", "{tmp}/run", "--recipe", "reference", "--resize-then-crop", "100"],
     "resize_then_crop (100) must be at least image_size (224)"),
    (["explain", "--evaluation", "{tmp}/ev", "--out", "{tmp}/x", "--per-class", "0"], "--per-class 0: must be at "
                                                                                         "least 1"),
    (["explain", "--evaluation", "{tmp}/ev", "--out", "{tmp}/x", "--per-class", "-1"], "--per-class -1"),
    (["realism", "--real", "{tmp}/r", "--bootstrap", "0"], "--bootstrap 0: must be at least 1"),
    (["realism", "--real", "{tmp}/r", "--seed", "-1"], "--seed -1: must be 0 or more"),
])
def test_arguments_are_checked_before_any_work(argv, expected, tmp_path, capsys, monkeypatch):
    """No simulation, no folder, no file before the arguments are known to be good."""
    import deeplense.simulate as sim

    work = []
    monkeypatch.setattr(sim, "default_simulated_dataset", lambda *a, **k: work.append("simulated") or tmp_path / "x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert work == [] and list(tmp_path.iterdir()) == []  # nothing simulated, nothing created


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, sig):
    """What `timeout`, `kill`, `docker stop` and a queue's time limit send (SIGTERM), and what closing the terminal
    or the SSH session sends (SIGHUP), during a cache build: exit 128 + the signal, one line, no temporary file
    left in the cache."""
    signum = getattr(signal, sig)
    data = write_dataset(tmp_path / "d", n_train=300, n_val=2)
    cache = tmp_path / "cache"
    env = {**subprocess_env(), "DEEPLENSE_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "deeplense", "inspect", "--data", str(data)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob("*.tmp")):
        time.sleep(0.01)
    assert list(cache.glob("*.tmp")), "the cache build did not start"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated: " if sig == "SIGTERM" else "hung up: ") and "Traceback" not in err
    assert not [p for p in cache.iterdir() if "tmp" in p.name]


def test_no_traceback_for_os_errors_raised_deep_inside(world, monkeypatch, capsys):
    """Whatever OSError escapes a job (here: the disk fills while a checkpoint is written) ends as one line."""
    import errno

    import deeplense.checkpoint as checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(world["run"] / "x.pt"))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    out = world["run"].parent / "full-disk-run"
    assert main(["train", "--data", str(world["data"]), "--out", str(out), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "6", "--weights", "none", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {world['run'] / 'x.pt'}: No space left on device"
    assert not [p for p in out.iterdir() if "tmp" in p.name]


def test_a_new_run_sweeps_dead_writers_temp_files_and_says_how_to_resume(small, tmp_path, monkeypatch, capsys):
    """A killed first try leaves a hidden checkpoint temp file (tens of MB at full scale): the next `train --out`
    removes it when its writer is dead, keeps a live writer's; an interrupted new run says to use --resume."""
    import os

    import deeplense.train as train_mod

    run = tmp_path / "run"
    run.mkdir()
    dead = run / f".last.pt.{2**22 + 7}.abc123.tmp"  # above Linux's pid_max: no such process
    live = run / f".best.pt.{os.getppid()}.def456.tmp"
    dead.write_bytes(b"half a checkpoint")
    live.write_bytes(b"another job's file")
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    assert not dead.exists() and live.exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert main(["train", "--data", str(small), "--out", str(tmp_path / "r2"), "--weights", "none"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted: finished work is kept; continue with `python -m deeplense train --resume "
                   f"{tmp_path / 'r2'}`"]


@pytest.mark.slow
def test_messages_say_what_is_true(small, tmp_path):
    """A finished run whose last.pt was deleted is not "stopped before its first epoch"; a pixel just above 1 is
    printed with enough digits to see it (issue 22, item 9)."""
    import numpy as np

    from deeplense.data import read_image
    from deeplense.util import DeepLenseError

    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    (run / "last.pt").unlink()
    with pytest.raises(DeepLenseError, match=r"missing \(deleted\?\), but the run finished 1 epoch\(s\)"):
        resume(run, **quiet())
    f = tmp_path / "x.npy"
    np.save(f, np.full((1, 8, 8), 1.000002, dtype=np.float32))
    shown = f"{float(np.float32(1.000002)):.9g}"
    with pytest.raises(DeepLenseError, match=rf"span \[{shown}, {shown}\], expected") as e:
        read_image(f)
    assert shown != "1"
    assert "[1, 1]" not in str(e.value)


def test_a_diverged_run_is_one_line(small, tmp_path, monkeypatch, capsys):
    import deeplense.engine as engine

    real = engine.F.cross_entropy
    monkeypatch.setattr(engine.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    run = tmp_path / "run"
    assert main(["train", "--data", str(small), "--out", str(run), "--epochs", "2", "--image-size", "32",
                 "--batch-size", "8", "--weights", "none", "--device", "cpu", "--lr", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training diverged at epoch 1 (loss nan); lower --lr (now 5)" in err[0], err
    assert not (run / "last.pt").exists()


@pytest.mark.slow
def test_none_switches_a_recipe_setting_off_and_tiny_eval_batches_work(small, tmp_path, capsys):
    """Issue 37, items 3, 4 and 19, through the command line: `--bn-recalibration none` and `--resize-then-crop none`
    were silently ignored (only values other than None were kept, so `none` could never override a recipe);
    `--eval-batch-size 1` ended in a traceback after epoch 1 (recalibration in batches of one); the start line said
    'recalibrated on 99999 images' with 12 training images."""
    import json

    def config(run):
        return json.loads((run / "config.json").read_text())["config"]

    common = ["--data", str(small), "--epochs", "1", "--device", "cpu", "--image-size", "32", "--batch-size", "8",
              "--weights", "none"]
    assert main(["train", *common, "--out", str(tmp_path / "off"), "--bn-recalibration", "none"]) == 0
    assert config(tmp_path / "off")["bn_recalibration"] is None
    assert main(["train", *common, "--out", str(tmp_path / "ref"), "--recipe", "reference", "--resize-then-crop",
                 "none", "--bn-recalibration", "64"]) == 0  # without it this tiny run's eval-mode outputs overflow
    assert config(tmp_path / "ref")["resize_then_crop"] is None and config(tmp_path / "ref")["recipe"] == "reference"
    capsys.readouterr()
    assert main(["train", *common, "--out", str(tmp_path / "one"), "--eval-batch-size", "1", "--bn-recalibration",
                 "99999"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm recalibrated on 18 training images" in out and "99999" not in out
    assert config(tmp_path / "one")["bn_recalibration"] == 99999 and (tmp_path / "one" / "best.pt").is_file()
    # a left-out option keeps the recipe's value
    assert main(["train", *common, "--out", str(tmp_path / "dflt")]) == 0
    assert config(tmp_path / "dflt")["bn_recalibration"] == recipe("default").bn_recalibration


def test_outputs_that_overflow_in_eval_mode_are_one_line(small, tmp_path, monkeypatch, capsys):
    """A network whose eval-mode outputs overflow (found with the reference recipe at 32 px, 18 images, no BatchNorm
    recalibration: activations of 1e38 by layer3) ended in scikit-learn's 'Input contains NaN' traceback."""
    import numpy as np

    import deeplense.engine as engine

    real = engine.predict_proba
    monkeypatch.setattr(engine, "predict_proba", lambda *a, **k: real(*a, **k) * np.nan)
    assert main(["train", "--data", str(small), "--out", str(tmp_path / "run"), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "8", "--weights", "none", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outputs on the selection images are not finite" in err[0], err


def test_preset_help_names_every_preset_and_the_true_default(capsys):
    """`simulate --help` and `realism --help` are built from simulate.PRESET_HELP: a preset added, or the default
    changed, cannot leave the help saying something else (it once called common_task the default)."""
    from deeplense.simulate import DEFAULT_PRESET, PRESET_HELP, PRESETS

    assert PRESETS == tuple(PRESET_HELP) and DEFAULT_PRESET in PRESETS
    for command in ("simulate", "realism"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for name in PRESETS:
            assert f"{name}:" in text
        assert f"(default {DEFAULT_PRESET})" in text and "common_task (default" not in text


def test_every_config_field_is_a_train_option_with_the_configs_choices():
    """`train`'s options are generated from TrainConfig's fields (help and choices in their metadata): every
    study arm can be run from the command line, e.g. default_no_d4 (`--augmentation none`), which the hand-kept
    list of 14 options could not express."""
    from deeplense.cli import TRAIN_OPTIONS, build_parser
    from deeplense.config import TrainConfig, choices, settings

    parser = build_parser()
    train_parser = next(a for a in parser._actions if a.dest == "command").choices["train"]
    options = {a.dest: a for a in train_parser._actions}
    for name, *_ in settings():
        if name != "recipe":
            assert name in TRAIN_OPTIONS and options[name].help, name
            assert tuple(options[name].choices or ()) == choices().get(name, ()), name
    args = parser.parse_args(["train", "--out", "r", "--epochs", "5", "--image-size", "64", "--crop", "96",
                              "--batch-size", "32", "--protocol", "clean", "--augmentation", "none",
                              "--warmup-epochs", "0.5", "--limit-per-class", "none"])
    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if hasattr(args, k)}  # the ones given
    cfg = recipe("default", **given)
    assert isinstance(cfg, TrainConfig) and cfg.augmentation == "none" and cfg.warmup_epochs == 0.5
    assert cfg == recipe("default", epochs=5, image_size=64, crop=96, batch_size=32, protocol="clean",
                         augmentation="none", warmup_epochs=0.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--out", "r", "--augmentation", "d8"])


def test_every_option_has_help_that_is_true_for_its_command(capsys):
    """Issue 37, item 12: `realism --help` printed '10-90%%'; evaluate's and predict's --checkpoint and explain's
    --out had no help; evaluate, predict and doctor said '(default recipe: ...)' and named config.json, which
    they have neither of; the bootstrap options hid their default."""
    import argparse

    from deeplense.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "%%" not in text, name
        if name in ("evaluate", "predict", "doctor"):
            assert "recipe" not in text and "config.json" not in text, name
    for name in ("evaluate", "realism"):
        bootstrap = next(a for a in commands[name]._actions if a.dest == "bootstrap")
        assert "default 1000" in bootstrap.help
