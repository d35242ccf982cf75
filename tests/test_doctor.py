"""``python -m deeplense doctor``: what it says on a machine that works, and one line per problem otherwise."""

from __future__ import annotations

import pytest
import torch
import torchvision

import deeplense.doctor as doctor_mod
import deeplense.engine as engine
from deeplense.cli import main
from deeplense.model import hub_checkpoint_path


def _plant_weights():
    path = hub_checkpoint_path("resnet34")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    return path


def _run(capsys, *args):
    rc = main(["doctor", *args])
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err.strip().splitlines()


@pytest.mark.slow
def test_a_machine_that_works(small, capsys):
    weights = _plant_weights()
    rc, out, err = _run(capsys, "--data", str(small), "--device", "cpu", "--steps", "1")
    assert rc == 0 and not err, err
    said = {ln.split(":", 1)[0]: ln for ln in out}
    assert set(said) >= {"versions", "device", "precision", "data", "disk", "memory", "weights", "speed", "doctor"}
    assert said["device"].startswith("device: cpu") and "requested" in said["device"]
    from deeplense.device import cpu_native_bf16

    assert said["precision"].startswith("precision: bf16 autocast on cpu" if cpu_native_bf16() else
                                        "precision: fp32 on cpu")
    assert "train 18 images, val 30 images" in said["data"] and "cache not built yet" in said["data"]
    assert str(weights) in said["weights"]
    rate = float(said["speed"].split()[1])
    assert rate > 0
    assert out[-1] == "doctor: everything works"


def test_each_problem_is_one_line_and_exit_2(small, capsys, monkeypatch):
    # weights missing (the isolated TORCH_HOME is empty): one problem, the rest still reported
    rc, out, err = _run(capsys, "--device", "cpu", "--steps", "0")
    assert rc == 2 and len(err) == 1 and err[0].startswith("problem: weights: no ImageNet ResNet34 weights at ")
    assert any(ln.startswith("device: cpu") for ln in out)
    # issue 37, item 12: it checks the weights the runs will use: none needs no file, so an offline machine that
    # trains from random weights hears "everything works"; a --weights FILE that is not there is the problem
    rc, out, err = _run(capsys, "--device", "cpu", "--steps", "0", "--weights", "none")
    assert rc == 0 and not err and out[-1] == "doctor: everything works", err
    assert any(ln.startswith("weights: none") for ln in out)
    rc, out, err = _run(capsys, "--device", "cpu", "--steps", "0", "--weights", str(small / "no.pth"))
    assert rc == 2 and err == [f"problem: weights: {small / 'no.pth'}: no such file (--weights FILE)"]
    _plant_weights()
    # a device this machine cannot use
    if not torch.cuda.is_available():
        rc, out, err = _run(capsys, "--device", "cuda", "--steps", "0")
        assert rc == 2 and err == ["problem: device: --device cuda: CUDA is not available on this machine"]
    # a full disk for the cache the data would need
    with monkeypatch.context() as m:
        m.setattr(doctor_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
        rc, out, err = _run(capsys, "--data", str(small), "--device", "cpu", "--steps", "0")
    assert rc == 2 and len(err) == 1 and err[0].startswith("problem: disk: ") and "GB free, the cache of" in err[0]
    # a device path that breaks in the training step itself
    with monkeypatch.context() as m:
        m.setattr(engine, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("MPS backend boom")))
        rc, out, err = _run(capsys, "--device", "cpu", "--steps", "1")
    from deeplense.device import plan_for

    assert rc == 2 and err == [f"problem: speed: the training step fails on cpu ({plan_for('cpu').precision}): "
                               "RuntimeError: MPS backend boom"]
    # a dataset that is not one
    rc, out, err = _run(capsys, "--data", str(small / "nope"), "--device", "cpu", "--steps", "0")
    assert rc == 2 and len(err) == 1 and err[0].startswith("problem: data: ") and "no such folder" in err[0]
