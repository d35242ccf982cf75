"""Evaluation and prediction: the held-out protocol, metrics files, the command line round trip."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

from deeplense.checkpoint import load_checkpoint
from deeplense.cli import main
from deeplense.config import recipe
from deeplense.data import load_split
from deeplense.evaluate import evaluate
from deeplense.splits import split_holdout
from deeplense.testing import FAST, quiet, write_dataset
from deeplense.train import resume, train
from deeplense.util import DeepLenseError


def _row_keys(x) -> list[bytes]:
    return [np.ascontiguousarray(r, dtype=np.float32).tobytes() for r in np.asarray(x)]

@pytest.mark.slow
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

@pytest.mark.slow
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


@pytest.mark.slow
def test_a_changed_val_is_refused_not_silently_resplit(small, tmp_path):
    """Two extra files in one class would shift every index: the held-out images can no longer be found, so
    evaluating (or resuming) on that val must stop rather than report on images used for selection."""
    run = tmp_path / "run"
    train(recipe("default", epochs=2, **FAST), small, run, **quiet(stop_after_epoch=1))
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)  # a plain copy (new modification times) is the same dataset
    m = evaluate(run / "best.pt", copy, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    assert m["provenance"]["heldout_check"].startswith("the checkpoint's recorded images")
    for name in ("11.npy", "12.npy"):
        shutil.copy(copy / "val" / "no" / "1.npy", copy / "val" / "no" / name)
    with pytest.raises(DeepLenseError, match="val/ is not the one .* trained with"):
        evaluate(run / "best.pt", copy, tmp_path / "ev2", device="cpu", n_bootstrap=0, progress=False)
    with pytest.raises(DeepLenseError, match="val/ is not the one this run started with"):
        resume(run, copy, **quiet())
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(copy), "--out",
                 str(tmp_path / "ev3")]) == 2
    assert not (tmp_path / "ev3" / "metrics.json").exists()


@pytest.mark.slow
def test_clean_protocol_keeps_val_out_of_training_and_selection(small, tmp_path, monkeypatch):
    """--protocol clean: training and selection see only train images (val is not even read), the test is all of
    val, and none of the three share an image."""
    import deeplense.engine as engine
    from deeplense.util import cache_dir

    fed = {"train": [], "selection": []}
    real_epoch, real_validate = engine.train_one_epoch, engine.validate

    def epoch_spy(net, opt, sched, scaler, placed, *a, **k):
        fed["train"].append(placed.x_train.clone())
        return real_epoch(net, opt, sched, scaler, placed, *a, **k)

    def validate_spy(model, x, *a, **k):
        fed["selection"].append(x.clone())
        return real_validate(model, x, *a, **k)

    monkeypatch.setattr(engine, "train_one_epoch", epoch_spy)
    monkeypatch.setattr(engine, "validate", validate_spy)
    run = tmp_path / "run"
    assert main(["train", "--data", str(small), "--out", str(run), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "6", "--weights", "none", "--device", "cpu", "--protocol", "clean"]) == 0
    assert not list(cache_dir().glob("val-*")), "training under the clean protocol read val"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["protocol"] == "clean" and cfg["data"]["selection_split"] == "train"
    assert load_checkpoint(run / "best.pt")["config"]["protocol"] == "clean"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(small), "--out", str(tmp_path / "ev"),
                 "--bootstrap", "0", "--device", "cpu"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["provenance"]["protocol"] == "clean" and m["n"] == 30  # all of val
    train_images, _ = load_split(small, "train", progress=False)
    val_images, _ = load_split(small, "val", progress=False)
    tested = val_images[np.load(tmp_path / "ev" / "predictions.npz")["val_indices"]]
    trained, selected = set(_row_keys(fed["train"][0])), set(_row_keys(fed["selection"][0]))
    train_set, val_set, test_set = set(_row_keys(train_images)), set(_row_keys(val_images)), set(_row_keys(tested))
    assert len(trained) == 15 and len(selected) == 3  # 18 train images: 10% per class (1 each) select
    assert trained | selected == train_set and not trained & selected
    assert test_set == val_set and not test_set & train_set
    # --split selection evaluates the train images that chose the checkpoint
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(small), "--out",
                 str(tmp_path / "ev-sel"), "--bootstrap", "0", "--device", "cpu", "--split", "selection"]) == 0
    z = np.load(tmp_path / "ev-sel" / "predictions.npz")
    assert set(_row_keys(train_images[z["train_indices"]])) == selected


@pytest.mark.slow
def test_allow_changed_data_is_an_explicit_and_visible_opt_in(small, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    copy = tmp_path / "copy"
    shutil.copytree(small, copy)
    shutil.copy(copy / "val" / "no" / "1.npy", copy / "val" / "no" / "11.npy")
    ev = tmp_path / "ev"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(copy), "--out", str(ev),
                 "--bootstrap", "20", "--device", "cpu", "--allow-changed-data"]) == 0
    assert "WARNING: NOT CHECKED" in capsys.readouterr().out
    m = json.loads((ev / "metrics.json").read_text())
    assert m["provenance"]["heldout_check"].startswith("NOT CHECKED")
    assert "NOT a checked held-out set" in m["provenance"]["split_description"]
    from deeplense.report import draw_evaluation, results_table

    assert "**Warning: NOT CHECKED" in results_table(m)
    import deeplense.plots as plots

    titles = []
    real = plots.save_figure

    def keep(fig, stem, formats=plots.FORMATS):  # each figure's title: its suptitle, else its one axes' title
        titles.append(fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title())
        return real(fig, stem, formats)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "save_figure", keep)
        draw_evaluation(ev, tmp_path / "figs")
    # ROC per class, averaged ROC, confusion matrix, reliability: each says it
    assert len(titles) == 4 and all("NOT a checked held-out set" in t for t in titles)


@pytest.mark.slow
def test_an_empty_heldout_part_is_refused_before_writing(tmp_path, capsys):
    data = write_dataset(tmp_path / "d", n_train=6, n_val=4)  # 10% of 4 rounds to 0 per class
    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), data, run, **quiet())
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(data), "--out",
                 str(tmp_path / "ev")]) == 2
    assert "held-out test part of val is empty" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow
def test_predict_names_the_image_of_another_size(small, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    folder = tmp_path / "mixed"
    shutil.copytree(small / "val" / "no", folder)
    np.save(folder / "5.npy", np.zeros((1, 64, 64)))
    assert main(["predict", "--checkpoint", str(run / "best.pt"), str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder / '5.npy'}: shape (64, 64) differs" in err[0]


# ---------------------------------------------------------------------------------------------- issue 22, item 1
def _fresh(small, tmp_path, name="data"):
    d = tmp_path / name
    shutil.copytree(small, d)
    return d


@pytest.mark.slow
def test_a_val_that_is_train_is_refused(small, tmp_path):
    """val/ as a symbolic link to train/, as hard links to its files, or as copies of them: training under the
    reference protocol and evaluation under either protocol refuse, naming the file."""
    import os

    cfg = recipe("default", epochs=1, **FAST)
    linked = _fresh(small, tmp_path, "linked")
    shutil.rmtree(linked / "val")
    (linked / "val").symlink_to(linked / "train", target_is_directory=True)
    with pytest.raises(DeepLenseError, match="is the same folder as"):
        train(cfg, linked, tmp_path / "r1", **quiet())
    hard = _fresh(small, tmp_path, "hard")
    (hard / "val" / "sphere" / "3.npy").unlink()
    os.link(hard / "train" / "sphere" / "2.npy", hard / "val" / "sphere" / "3.npy")
    with pytest.raises(DeepLenseError, match=r"val/sphere/3\.npy: is the same file as \S*train/sphere/2\.npy"):
        train(cfg, hard, tmp_path / "r2", **quiet())
    copied = _fresh(small, tmp_path, "copied")
    shutil.copy(copied / "train" / "vort" / "4.npy", copied / "val" / "no" / "7.npy")
    with pytest.raises(DeepLenseError, match=r"val/no/7\.npy: has the same pixels as \S*train/vort/4\.npy"):
        train(cfg, copied, tmp_path / "r3", **quiet())
    assert not (tmp_path / "r3" / "last.pt").exists()
    # the clean protocol never reads val in training: the evaluation is where it is caught
    run = tmp_path / "clean"
    train(cfg.replace(protocol="clean"), small, run, **quiet())
    with pytest.raises(DeepLenseError, match="same folder as"):
        evaluate(run / "best.pt", linked, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    m = evaluate(run / "best.pt", copied, tmp_path / "ev2", device="cpu", n_bootstrap=0, progress=False,
                 allow_changed_data=True)
    assert m["provenance"]["heldout_check"].startswith("NOT CHECKED") and "same pixels" in \
        m["provenance"]["heldout_check"]


@pytest.mark.slow
def test_clean_protocol_evaluation_checks_the_train_listing(small, tmp_path, capsys):
    run = tmp_path / "run"
    train(recipe("default", epochs=1, protocol="clean", **FAST), small, run, **quiet())
    m = evaluate(run / "best.pt", small, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    assert "train/ lists the files it trained on and val/ shares no file or pixels" in m["provenance"]["heldout_check"]
    moved = _fresh(small, tmp_path)
    shutil.move(moved / "train" / "no" / "6.npy", moved / "val" / "no" / "11.npy")  # a training image, now in val
    with pytest.raises(DeepLenseError, match="train/ is not the one .* trained with"):
        evaluate(run / "best.pt", moved, tmp_path / "ev2", device="cpu", n_bootstrap=0, progress=False)
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(moved), "--out",
                 str(tmp_path / "ev3"), "--bootstrap", "0", "--device", "cpu", "--allow-changed-data"]) == 0
    assert "WARNING: NOT CHECKED" in capsys.readouterr().out


@pytest.mark.slow
def test_files_renamed_within_a_class_are_caught_by_their_pixels(small, tmp_path):
    """Swapping two val files of one class keeps every name and label (the listing) but moves a selection image
    into a held-out slot: the pixel digest recorded at training catches it; a plain copy of the data passes."""
    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    test_idx = load_checkpoint(run / "best.pt")["data"]["heldout_test_indices"]
    held = int(test_idx[0])  # val index of a held-out image; its class's other files hold selection images
    cls, number = ("no", "sphere", "vort")[held // 10], held % 10 + 1
    other = 1 if number != 1 else 2
    data = _fresh(small, tmp_path)
    m = evaluate(run / "best.pt", data, tmp_path / "ev", device="cpu", n_bootstrap=0, progress=False)
    assert "pixels match the recorded digest (file times differ since training: a copy)" in \
        m["provenance"]["heldout_check"]
    a, b = data / "val" / cls / f"{number}.npy", data / "val" / cls / f"{other}.npy"
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(DeepLenseError, match="files modified since training"):
        evaluate(run / "best.pt", data, tmp_path / "ev2", device="cpu", n_bootstrap=0, progress=False)
    m = evaluate(run / "best.pt", data, tmp_path / "ev3", device="cpu", n_bootstrap=0, progress=False,
                 allow_changed_data=True)
    assert m["provenance"]["heldout_check"].startswith("NOT CHECKED: ") and "NOT a checked" in \
        m["provenance"]["split_description"]


@pytest.mark.slow
def test_predict_output_writes_into_special_files_and_through_links(small, tmp_path):
    """`--output` that is a FIFO (or /dev/null, /dev/stdout) is written into, never replaced by a regular file; a
    symbolic link stays a link and its target gets the CSV; a long legal name works (issue 22, item 3)."""
    import os
    import stat
    import threading

    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    one = str(small / "val" / "no" / "1.npy")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    assert main(["predict", "--checkpoint", str(run / "best.pt"), one, "--output", str(fifo), "--device", "cpu"]) == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert got and got[0].startswith("path,predicted,p_no,p_sphere,p_vort\n")
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    assert main(["predict", "--checkpoint", str(run / "best.pt"), one, "--output", str(link), "--device", "cpu"]) == 0
    assert link.is_symlink() and target.read_text().startswith("path,predicted")
    long = tmp_path / ("p" * 240 + ".csv")
    assert main(["predict", "--checkpoint", str(run / "best.pt"), one, "--output", str(long), "--device", "cpu"]) == 0
    assert long.read_text().startswith("path,predicted") and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow
def test_selection_after_limit_and_predict_of_another_size(small, tmp_path):
    """evaluate --split selection reports on the images that chose the checkpoint (with --limit-per-class, only
    those), and predict refuses images of another size than the model was trained on (issue 22, item 8)."""
    run = tmp_path / "run"
    train(recipe("default", epochs=1, limit_per_class=4, **FAST), small, run, **quiet())
    m = evaluate(run / "best.pt", small, tmp_path / "ev", split="selection", device="cpu", n_bootstrap=0,
                 progress=False)
    assert m["n"] == 12  # 4 per class, as in training's selection
    odd = tmp_path / "odd.npy"
    np.save(odd, np.random.default_rng(0).random((1, 64, 64)))
    with pytest.raises(DeepLenseError, match=r"odd\.npy: a 64x64 image, but .* was trained on 150x150 images"):
        from deeplense.evaluate import predict_files

        predict_files(run / "best.pt", [str(odd)], device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True])
def test_predict_csv_says_what_evaluate_computed_for_each_file(small, tmp_path, tta):
    """What `predict`'s CSV says about each file, read as a user reads it, is what `evaluate` computed for the same
    image: the same probabilities (to the CSV's 6 decimals), the arg-max as `predicted`, each row on its own file;
    also when the files are read in several batches and with a crop."""
    from deeplense.data import CLASSES, find_root, list_files
    from deeplense.evaluate import predict_files

    run = tmp_path / "run"
    train(recipe("default", epochs=1, crop=96, seed=5, **FAST), small, run, **quiet())
    evaluate(run / "best.pt", small, tmp_path / "ev", split="selection", tta=tta, device="cpu", n_bootstrap=0,
             progress=False)
    z = np.load(tmp_path / "ev" / "predictions.npz")
    files = list_files(find_root(small), "val")  # the loading order the indices refer to
    expected = {files[i][0]: (p, int(y)) for i, p, y in zip(z["val_indices"], z["probabilities"], z["labels"],
                                                            strict=True)}
    order = sorted(expected, reverse=True)  # not the loading order: rows must follow their files
    argv = ["predict", "--checkpoint", str(run / "best.pt"), *order, "--output", str(tmp_path / "p.csv")]
    assert main(argv + (["--tta"] if tta else [])) == 0
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == order
    predict_files(run / "best.pt", order, tmp_path / "q.csv", tta=tta, device="cpu", batch_size=4)
    with open(tmp_path / "q.csv", newline="") as fh:  # batches do not matter, beyond float rounding (some CPUs'
        again = list(csv.DictReader(fh))             # kernels sum in another order at another batch size)
    assert [(r["path"], r["predicted"]) for r in again] == [(r["path"], r["predicted"]) for r in rows]
    np.testing.assert_allclose([[float(r[f"p_{c}"]) for c in CLASSES] for r in again],
                               [[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], atol=2e-6)
    for r in rows:
        p, label = expected[r["path"]]
        assert r["path"].split("/")[-2] == CLASSES[label]
        np.testing.assert_allclose([float(r[f"p_{c}"]) for c in CLASSES], p, atol=2e-6)
        assert r["predicted"] == CLASSES[int(np.argmax(p))]
