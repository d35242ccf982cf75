"""Checkpoints: plain data loaded with weights_only=True, one-line errors, never running code from a file."""

from __future__ import annotations

import pytest
import torch

from deeplense.checkpoint import load_checkpoint
from deeplense.cli import main
from deeplense.config import recipe
from deeplense.testing import FAST, TouchOnLoad, quiet
from deeplense.train import train


@pytest.mark.slow
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

@pytest.mark.slow
def test_checkpoint_with_code_is_refused_without_running_it(small, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    ck = torch.load(run / "best.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**ck, "extra": TouchOnLoad(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="evil.pt: not a deeplense checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "evil.pt"), str(small / "val" / "no")]) == 2
    assert "evil.pt: not a deeplense checkpoint" in capsys.readouterr().err
    assert not marker.exists(), "loading the checkpoint ran code from it"


@pytest.mark.parametrize("damage, expected", [
    ("head", "weights do not fit a 3-class resnet34"),
    ("missing_keys", "weights do not fit a 3-class resnet34"),
    ("string_config", "unusable training config in the checkpoint"),
    ("bad_value_config", "unusable training config in the checkpoint"),
])
@pytest.mark.slow
def test_loadable_but_unfit_checkpoints_are_one_line(small, tmp_path, capsys, damage, expected):
    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    ck = torch.load(run / "best.pt", weights_only=True)
    if damage == "head":
        ck["model"]["fc.weight"] = torch.zeros(5, 512)
        ck["model"]["fc.bias"] = torch.zeros(5)
    elif damage == "missing_keys":
        del ck["model"]["layer4.2.bn2.running_var"]
    elif damage == "string_config":
        ck["config"] = "lr=0.1"
    else:
        ck["config"]["epochs"] = "many"
    path = tmp_path / f"{damage}.pt"
    torch.save(ck, path)
    for argv in (["evaluate", "--checkpoint", str(path), "--data", str(small), "--out", str(tmp_path / "ev")],
                 ["predict", "--checkpoint", str(path), str(small / "val" / "no" / "1.npy")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}: ") and expected in err[0], err
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_refusal_of_pickled_objects_does_not_advise_weights_only_false(small, tmp_path, capsys):
    torch.save({"model": {}, "config": {}, "classes": ["no", "sphere", "vort"], "epoch": 1,
                "x": TouchOnLoad(tmp_path / "ran")}, tmp_path / "evil.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "evil.pt"), str(small / "val" / "no")]) == 2
    err = capsys.readouterr().err
    assert "could run code" in err and "weights_only" not in err and not (tmp_path / "ran").exists()
