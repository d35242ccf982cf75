"""The notebook runs top to bottom on a tiny simulated set, with planted weights, in a temporary folder."""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pytest

from deeplense.notebook import NOTEBOOK, output_signature, run_notebook
from deeplense.report import calibration_table, enrichment_table, report, results_table, update_readme


@pytest.mark.slow
def test_notebook_executes_and_figures_are_stable(tmp_path):
    run, figs = tmp_path / "run", tmp_path / "figures"
    env = {"DEEPLENSE_SCALE": "tiny", "DEEPLENSE_OUTPUT": str(run), "DEEPLENSE_FIGURES": str(figs),
           "DEEPLENSE_SIM_VAL_PER_CLASS": "50", "DEEPLENSE_DEVICE": "cpu", "TQDM_DISABLE": "1"}
    out = run_notebook(NOTEBOOK, env=env, save_to=tmp_path / "executed.ipynb", timeout=600)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    first = next(o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    text = first.get("text", "")
    assert text.startswith("Ran on: commit ") and "device cpu" in text and "data: simulated" in text
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)

    # what make demo leaves behind: metrics.json, predictions.npz and every figure
    metrics = json.loads((run / "metrics.json").read_text())
    # the demo's (and tiny's) network: d4net from scratch on the native crop; the task's ResNet34 is the full scale's
    assert metrics["provenance"]["config"]["arch"] == "d4net" and metrics["provenance"]["pretrained"] is False
    assert metrics["provenance"]["tta"] is True  # the cell's TTA = True reaches the evaluation
    # the results the notebook shows are this run's, read from metrics.json, not typed into a cell
    shown = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "text/markdown" in o.get("data", {})]
    assert results_table(metrics) in shown
    assert calibration_table(metrics) in shown and metrics["calibration"]["temperature"] is not None
    saliency = json.loads((run / "explain" / "enrichment.json").read_text())
    assert enrichment_table(saliency) in shown and set(saliency["per_class"]) == {"sphere", "vort"}
    said = next(t for t in shown if "Hardest class" in t)
    for c, v in metrics["auc"]["per_class"].items():
        assert f"(`{c}`): AUC {v:.3f} [" in said
    assert metrics["n"] == 15  # 5 per class: the fewest with AUC intervals, so every sentence is shown
    z = np.load(run / "predictions.npz")
    assert z["probabilities"].shape == (15, 3)
    names = ["examples", "training_curves", "roc_classwise", "roc_average", "confusion_matrix", "reliability",
             "hardest", "confident_errors", "saliency_examples"]
    for name in names:
        for ext, min_size in (("png", 20_000), ("pdf", 5_000)):
            p = figs / f"{name}.{ext}"
            assert p.is_file() and p.stat().st_size > min_size, p
    from PIL import Image

    with Image.open(figs / "roc_classwise.png") as im:
        w, h = im.size
        assert w > 1000 and h > 1000 and abs(w - h) / w < 0.15  # 300 dpi, square axes

    # the notebook stores screen-size previews, not second copies of the figure files, and no timings
    import base64
    import io

    shown = [base64.b64decode(d.get("image/png") or d["image/jpeg"]) for c in nb.cells if c.cell_type == "code"
             for d in (o.get("data", {}) for o in c.get("outputs", [])) if "image/png" in d or "image/jpeg" in d]
    assert len(shown) == 9
    for preview in shown:
        with Image.open(io.BytesIO(preview)) as im:
            assert im.width <= 720
        assert all(preview != (figs / f"{name}.png").read_bytes() for name in names)
    assert not any("execution" in c.metadata for c in nb.cells)

    # the committed notebook shows what this code shows: same figures, same tables and sentences (numbers aside);
    # a change to what the package prints there fails here until `make demo` is run again
    committed = output_signature(NOTEBOOK)
    for k, (now, then) in enumerate(zip(output_signature(nb), committed, strict=True), 1):
        assert now == then, (f"code cell {k}: the committed notebook's outputs are stale (the code now shows "
                             f"{now!r}, the notebook {then!r}): run `make demo` and commit the notebook")

    # report redraws them from the saved files, byte for byte
    redrawn = report(run, tmp_path / "redrawn")
    assert len(redrawn) == 16  # all but the examples grid, which shows the data
    for p in redrawn:
        assert p.read_bytes() == (figs / p.name).read_bytes(), p.name

    # the README table is produced from metrics.json, not typed
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\ny\n")
    update_readme(run / "metrics.json", readme)
    text = readme.read_text()
    assert "old" not in text and f"{metrics['accuracy']:.3f}" in text and text.endswith("y\n")
    assert calibration_table(metrics) in text  # the ECE before and after temperature scaling, from the same file
    assert enrichment_table(saliency) in text  # and the notebook's saliency check


def _cell_values(**changes) -> dict:
    """The parameters cell as shipped, with some values changed."""
    values = {"DATA": None, "SCALE": None, "RECIPE": None, "ARCH": None, "EPOCHS": None,
              "IMAGE_SIZE": None, "CROP": None, "BATCH_SIZE": None, "PROTOCOL": "reference", "WEIGHTS": "auto",
              "SEED": 0, "DEVICE": None, "OUTPUT": None, "FIGURES": None, "SIM_TRAIN_PER_CLASS": None,
              "SIM_VAL_PER_CLASS": None, "TTA": True, "unrelated": object()}
    return {**values, **changes}


def test_resolve_gives_one_frozen_config_from_cell_environment_and_scale(monkeypatch, tmp_path):
    import dataclasses

    from deeplense.config import SCALES, TrainConfig
    from deeplense.notebook import PARAMETERS, resolve

    for name in PARAMETERS:
        monkeypatch.delenv(f"DEEPLENSE_{name}", raising=False)
    cfg, spec = resolve(_cell_values(SCALE="demo", DEVICE="cpu"))
    demo = SCALES["demo"]
    assert demo.recipe == "d4net" and SCALES["full"].recipe == "default"  # each scale's network (notebook intro)
    assert isinstance(cfg, TrainConfig) and (cfg.arch, cfg.epochs, cfg.image_size, cfg.crop, cfg.batch_size) == (
        "d4net", demo.epochs, 97, 97, demo.batch_size)
    task, _ = resolve(_cell_values(SCALE="demo", DEVICE="cpu", RECIPE="default", ARCH="resnet34"))
    assert (task.arch, task.image_size, task.crop, task.epochs) == ("resnet34", demo.image_size, demo.crop,
                                                                   demo.epochs)
    assert (spec.scale, spec.device, spec.sim_train_per_class) == ("demo", "cpu", demo.sim_train_per_class)
    assert spec.data is None and "simulated" in spec.data_kind
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    # the cell's values win over the scale, the environment over the cell; strings are cast by the field's type
    cfg, _ = resolve(_cell_values(SCALE="demo", DEVICE="cpu", EPOCHS=2, CROP=49))
    assert (cfg.epochs, cfg.image_size) == (2, 49)
    monkeypatch.setenv("DEEPLENSE_EPOCHS", "3")
    monkeypatch.setenv("DEEPLENSE_CROP", "none")  # documented as "no crop"
    monkeypatch.setenv("DEEPLENSE_SEED", "7")
    monkeypatch.setenv("DEEPLENSE_OUTPUT", str(tmp_path / "run"))
    cfg, spec = resolve(_cell_values(SCALE="demo", DEVICE="cpu", EPOCHS=2))
    assert (cfg.epochs, cfg.crop, cfg.seed) == (3, None, 7) and spec.output == str(tmp_path / "run")
    monkeypatch.setenv("DEEPLENSE_EPOCHS", "many")
    with pytest.raises(Exception, match="epochs='many'"):
        resolve(_cell_values(SCALE="demo", DEVICE="cpu"))
    monkeypatch.delenv("DEEPLENSE_EPOCHS")
    # TTA: the cell's boolean, overridden by the environment's words; anything else is a named error
    assert spec.tta is True and resolve(_cell_values(SCALE="demo", DEVICE="cpu", TTA=False))[1].tta is False
    monkeypatch.setenv("DEEPLENSE_TTA", "off")
    assert resolve(_cell_values(SCALE="demo", DEVICE="cpu"))[1].tta is False
    monkeypatch.setenv("DEEPLENSE_TTA", "maybe")
    with pytest.raises(Exception, match="tta=.maybe. is not true or false"):
        resolve(_cell_values(SCALE="demo", DEVICE="cpu"))
    monkeypatch.delenv("DEEPLENSE_TTA")
    # the run's own parameters are cast as the training config's are: "40" is 40, a word is a named error
    monkeypatch.setenv("DEEPLENSE_SIM_TRAIN_PER_CLASS", "40")
    assert resolve(_cell_values(SCALE="demo", DEVICE="cpu"))[1].sim_train_per_class == 40
    monkeypatch.setenv("DEEPLENSE_SIM_TRAIN_PER_CLASS", "forty")
    with pytest.raises(Exception, match="notebook parameters: sim_train_per_class='forty' is not a valid int"):
        resolve(_cell_values(SCALE="demo", DEVICE="cpu"))
    monkeypatch.setenv("DEEPLENSE_SIM_TRAIN_PER_CLASS", "0")
    with pytest.raises(Exception, match="must be at least 1"):
        resolve(_cell_values(SCALE="demo", DEVICE="cpu"))


def test_fresh_run_folder_replaces_only_a_previous_notebook_run(tmp_path):
    """Issue 37, item 1: a `train` run, or any folder the notebook did not write, is refused and left whole; a
    previous notebook run is emptied file by file, only when everything in it is something a notebook run writes."""
    from deeplense.notebook import RUN_MARKER, fresh_run_folder
    from deeplense.util import DeepLenseError

    run = tmp_path / "run"  # what `python -m deeplense train` leaves
    run.mkdir()
    for name in ("config.json", "last.pt", "best.pt", "notes.txt"):
        (run / name).write_text(name)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(DeepLenseError, match="holds a training run that no notebook run wrote; nothing was deleted"):
        fresh_run_folder(run)
    assert sorted(p.name for p in run.iterdir()) == before
    other = tmp_path / "my_thesis"
    other.mkdir()
    (other / "chapter1.tex").write_text("precious")
    with pytest.raises(DeepLenseError, match="no notebook run wrote"):
        fresh_run_folder(other)
    assert (other / "chapter1.tex").read_text() == "precious"
    # a notebook run's folder: marked; the next notebook run replaces its files
    new = fresh_run_folder(tmp_path / "new")
    assert [p.name for p in new.iterdir()] == [RUN_MARKER]
    for name in ("config.json", "best.pt", "figures/examples.png", "explain/enrichment.json"):
        (new / name).parent.mkdir(exist_ok=True)
        (new / name).write_text("x")
    assert fresh_run_folder(new) == new and [p.name for p in new.iterdir()] == [RUN_MARKER]
    # ... unless the user put something of their own in it
    (new / "figures").mkdir()
    (new / "figures" / "my_plot.py").write_text("precious")
    (new / "best.pt").write_text("x")
    with pytest.raises(DeepLenseError, match="my_plot.py is not something it wrote; nothing was deleted"):
        fresh_run_folder(new)
    assert (new / "best.pt").exists() and (new / "figures" / "my_plot.py").read_text() == "precious"


def test_demo_refuses_a_training_run_before_the_kernel_starts(small, tmp_path, capsys):
    """Issue 37, item 1, through the command line: `demo --out RUN` on a folder `train` wrote exits 2 in one line,
    and every file of the run stays."""
    from deeplense.cli import main
    from deeplense.testing import FAST

    run = tmp_path / "run"
    assert main(["train", "--data", str(small), "--out", str(run), "--epochs", "1", "--device", "cpu",
                 *[f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]]) == 0
    (run / "notes.txt").write_text("my notes")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["demo", "--out", str(run), "--no-readme"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing was deleted" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_a_misspelt_notebook_variable_is_refused(monkeypatch, capsys, tmp_path):
    """Issue 37, item 9: DEEPLENSE_EPOCH=3 would be ignored (the run trains for the scale's epochs): refused in one
    line, naming the likely parameter, before the kernel starts; the package's other variables pass."""
    from deeplense.cli import main
    from deeplense.notebook import check_environment
    from deeplense.util import DeepLenseError

    check_environment({"DEEPLENSE_CACHE": "/c", "DEEPLENSE_EPOCHS": "3", "DEEPLENSE_DIST_TIMEOUT_MIN": "5"})
    with pytest.raises(DeepLenseError, match="DEEPLENSE_EPOCH: not a notebook parameter .did you mean "
                                             "DEEPLENSE_EPOCHS?"):
        check_environment({"DEEPLENSE_EPOCH": "3"})
    monkeypatch.setenv("DEEPLENSE_ARCHH", "lensnet")
    assert main(["demo", "--out", str(tmp_path / "out"), "--no-readme"]) == 2
    assert "DEEPLENSE_ARCHH: not a notebook parameter (did you mean DEEPLENSE_ARCH?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(DeepLenseError, match="DEEPLENSE_ARCHH"):
        from deeplense.notebook import resolve

        resolve(_cell_values(SCALE="demo", DEVICE="cpu"))


@pytest.mark.slow
def test_demo_no_readme_runs_into_a_new_folder_with_relative_data(small, tmp_path, monkeypatch, capsys):
    """Issue 37, items 2 and 9, with a real notebook run at the tiny scale (not a mock): `demo --out NEW
    --no-readme` completes into a new folder (cell 4 draws into OUT/figures before training starts), and a relative
    DEEPLENSE_DATA is the caller's folder, not the kernel's (Common_Task/); a second run replaces the first."""
    import shutil

    from deeplense.cli import main
    from deeplense.notebook import NOTEBOOK

    shutil.copytree(small, tmp_path / "d1")
    monkeypatch.chdir(tmp_path)
    for k, v in {"DEEPLENSE_SCALE": "tiny", "DEEPLENSE_DEVICE": "cpu", "DEEPLENSE_WEIGHTS": "none",
                 "DEEPLENSE_DATA": "d1", "DEEPLENSE_TTA": "false"}.items():
        monkeypatch.setenv(k, v)
    readme = (NOTEBOOK.parents[1] / "README.md").read_bytes()
    committed = NOTEBOOK.read_bytes()
    for _ in range(2):
        assert main(["demo", "--out", "fresh", "--no-readme"]) == 0, capsys.readouterr().err
        out = tmp_path / "fresh"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["provenance"]["data"]["root"] == str((tmp_path / "d1").resolve())
        assert (out / "figures" / "examples.png").is_file() and (out / NOTEBOOK.name).is_file()
    assert (NOTEBOOK.parents[1] / "README.md").read_bytes() == readme and NOTEBOOK.read_bytes() == committed


@pytest.mark.slow
def test_notebook_runs_the_clean_protocol(tmp_path):
    run = tmp_path / "run"
    env = {"DEEPLENSE_SCALE": "tiny", "DEEPLENSE_OUTPUT": str(run), "DEEPLENSE_FIGURES": str(tmp_path / "figures"),
           "DEEPLENSE_SIM_TRAIN_PER_CLASS": "10", "DEEPLENSE_SIM_VAL_PER_CLASS": "20", "DEEPLENSE_DEVICE": "cpu",
           "DEEPLENSE_PROTOCOL": "clean", "DEEPLENSE_WEIGHTS": "none", "TQDM_DISABLE": "1"}
    nb = nbformat.read(run_notebook(NOTEBOOK, env=env, save_to=tmp_path / "executed.ipynb", timeout=600),
                       as_version=4)
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert ("clean protocol: 27 train images train the model, 3 images of train choose the checkpoint, 60 images "
            "of val test it") in texts
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["provenance"]["protocol"] == "clean" and metrics["n"] == 60
    assert json.loads((run / "config.json").read_text())["data"]["selection_split"] == "train"


def test_demo_checks_out_first_and_no_readme_touches_nothing_of_the_repo(tmp_path, monkeypatch, capsys):
    """`demo --out` that cannot be written stops before the run; `--no-readme` sends the figures and the executed
    notebook to OUT, never to images/ or the committed notebook (issue 22, item 7; the real run:
    test_demo_no_readme_runs_into_a_new_folder_with_relative_data)."""
    import deeplense.notebook as nb_mod
    from deeplense.cli import main

    calls = []
    monkeypatch.setattr(nb_mod, "run_notebook", lambda **k: calls.append(k) or k.get("save_to"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "out")]) == 2
    assert not calls and "is a file" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--no-readme"]) == 0
    (k,) = calls
    assert k["save_to"] == out / nb_mod.NOTEBOOK.name and k["env"] == {"DEEPLENSE_FIGURES": out / "figures"}


@pytest.mark.slow
def test_a_failing_cell_is_one_line(tmp_path):
    import nbformat

    from deeplense.notebook import run_notebook
    from deeplense.util import DeepLenseError

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("1 / 0")])
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    before = path.read_text()
    with pytest.raises(DeepLenseError) as e:
        run_notebook(path, timeout=120)
    assert str(e.value) == f"{path}: cell 2/2 failed: ZeroDivisionError: division by zero (the notebook file is left " \
                           f"as it was)"
    assert path.read_text() == before


def test_every_training_setting_is_a_notebook_parameter(monkeypatch):
    """The notebook's training parameters are TrainConfig's fields upper-cased, so a setting the cell does not
    show (AUGMENTATION) is still reachable, from the cell or from DEEPLENSE_AUGMENTATION."""
    from dataclasses import fields

    from deeplense.config import TrainConfig
    from deeplense.notebook import PARAMETERS, resolve

    for name in PARAMETERS:
        monkeypatch.delenv(f"DEEPLENSE_{name}", raising=False)
    assert all(f.name.upper() in PARAMETERS for f in fields(TrainConfig))
    monkeypatch.setenv("DEEPLENSE_AUGMENTATION", "none")
    cfg, _ = resolve({**_cell_values(SCALE="demo", DEVICE="cpu"), "WARMUP_EPOCHS": 0.5})
    assert (cfg.augmentation, cfg.warmup_epochs) == ("none", 0.5)


def test_committed_notebook_is_small_and_records_its_run():
    """Its outputs are screen-size previews (the figures live once, in images/), so the file stays small; its first
    output names the commit and scale that produced them."""
    # 9 previews (5 before the error, saliency and reliability figures) at 480-720 px: about 310 KB
    assert NOTEBOOK.stat().st_size < 350_000, f"{NOTEBOOK}: {NOTEBOOK.stat().st_size} bytes"
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert first["text"].startswith("Ran on: commit ") and "scale demo" in first["text"]


def test_output_signature_masks_the_run_and_keeps_the_wording():
    import nbformat

    def notebook(markdown: str, figures: int = 1):
        outs = [nbformat.v4.new_output("display_data", {"text/markdown": markdown})]
        outs += [nbformat.v4.new_output("display_data", {"image/jpeg": "AA=="})] * figures
        cell = nbformat.v4.new_code_cell("x")
        cell.outputs = outs
        return nbformat.v4.new_notebook(cells=[cell])

    a = notebook("- **vortex** (`vort`): AUC 0.600 [0.499, 0.690]\n- **subhalos** (`sphere`): AUC 0.512\n"
                 "weights: ImageNet; device cuda:1; data at /tmp/x/y")
    b = notebook("- **subhalos** (`sphere`): AUC 0.93 [0.9, 0.95]\n- **vortex** (`vort`): AUC 0.888\n"
                 "weights: random initialisation; device cpu; data at /root/z")
    assert output_signature(a) == output_signature(b)  # another run, another machine: the same signature
    assert output_signature(a) != output_signature(notebook("- **vortex** (`vort`): ROC AUC 0.6 [0.4, 0.6]\n"
                                                            "- **subhalos** (`sphere`): AUC 0.512\nweights: ImageNet; "
                                                            "device cpu; data at /a"))  # reworded
    assert output_signature(a) != output_signature(notebook(a.cells[0].outputs[0]["data"]["text/markdown"], 2))
