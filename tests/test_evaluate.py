"""Evaluation and prediction: the held-out protocol, metrics files, the command line round trip."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from conftest import FAST, quiet

from deeplense.cli import main
from deeplense.config import recipe
from deeplense.data import load_split, split_holdout
from deeplense.evaluate import evaluate
from deeplense.train import train
from deeplense.util import DeepLenseError


def _row_keys(x) -> list[bytes]:
    return [np.ascontiguousarray(r, dtype=np.float32).tobytes() for r in np.asarray(x)]

def test_selection_and_heldout_test_share_no_image(small, tmp_path, monkeypatch):
    """The images training selects on and the images evaluate reports on are disjoint and together make up val."""
    import deeplense.engine as engine

    selected = []
    real = engine.predict_proba

    def spy(model, x, *a, **k):
        selected.append(x.clone())
        return real(model, x, *a, **k)

    monkeypatch.setattr(engine, "predict_proba", spy)
    train(recipe("default", epochs=1, **FAST), small, tmp_path / "run", **quiet())
    evaluate(tmp_path / "run" / "best.pt", small, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    images, _ = load_split(small, "val", progress=False)
    tested = images[np.load(tmp_path / "ev" / "predictions.npz")["val_indices"]]
    sel, test, everything = set(_row_keys(selected[0])), set(_row_keys(tested)), set(_row_keys(images))
    assert len(sel) == 27 and len(test) == 3 and len(everything) == 30
    assert not sel & test, "a held-out test image was used for model selection"
    assert sel | test == everything

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


def test_a_changed_val_is_refused_not_silently_resplit(small, tmp_path):
    """Two extra files in one class would shift every index: the held-out images can no longer be found, so
    evaluating (or resuming) on that val must stop rather than report on images used for selection."""
    run = tmp_path / "run"
    train(recipe("default", epochs=2, **FAST), small, run, **quiet(stop_after_epoch=1))
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)  # a plain copy (new modification times) is the same dataset
    m = evaluate(run / "best.pt", copy, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    assert m["provenance"]["heldout_check"].startswith("the checkpoint's recorded held-out images")
    for name in ("11.npy", "12.npy"):
        shutil.copy(copy / "val" / "no" / "1.npy", copy / "val" / "no" / name)
    with pytest.raises(DeepLenseError, match="is not the one .* trained with"):
        evaluate(run / "best.pt", copy, tmp_path / "ev2", device="cpu", n_bootstrap=0, progress=False)
    with pytest.raises(DeepLenseError, match="is not the one this run started with"):
        train(None, copy, None, resume=run, **quiet())
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(copy), "--out",
                 str(tmp_path / "ev3")]) == 2
    assert not (tmp_path / "ev3" / "metrics.json").exists()
