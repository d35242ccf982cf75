"""Checkpoints: plain data loaded with weights_only=True, one-line errors, never running code from a file."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, TouchOnLoad, quiet

from deeplense.checkpoint import load_checkpoint
from deeplense.cli import main
from deeplense.config import recipe
from deeplense.train import train


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
