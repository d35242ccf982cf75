"""The notebook runs top to bottom on a tiny simulated set, with planted weights, in a temporary folder."""

from __future__ import annotations

import json

import nbformat
import numpy as np
import torch
from torchvision.models import resnet34

from deeplense.model import hub_checkpoint_path
from deeplense.notebook import NOTEBOOK, results_table, run_notebook, update_readme
from deeplense.report import report


def test_notebook_executes_and_figures_are_stable(tmp_path):
    cached = hub_checkpoint_path()  # inside this test's temporary $TORCH_HOME
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(resnet34(weights=None).state_dict(), cached)

    run, figs = tmp_path / "run", tmp_path / "figures"
    env = {"DEEPLENSE_SCALE": "tiny", "DEEPLENSE_OUTPUT": str(run), "DEEPLENSE_FIGURES": str(figs),
           "DEEPLENSE_SIM_VAL_PER_CLASS": "20", "DEEPLENSE_DEVICE": "cpu", "TQDM_DISABLE": "1"}
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
    assert metrics["provenance"]["pretrained"] is True  # the planted file went through the real loading path
    # the results the notebook shows are this run's, read from metrics.json, not typed into a cell
    shown = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "text/markdown" in o.get("data", {})]
    assert results_table(metrics) in shown
    said = next(t for t in shown if "Hardest class" in t)
    for c, v in metrics["auc"]["per_class"].items():
        assert f"(`{c}`): AUC {v:.3f} [" in said
    assert metrics["n"] == 6
    z = np.load(run / "predictions.npz")
    assert z["probabilities"].shape == (6, 3)
    names = ["examples", "training_curves", "roc_classwise", "roc_average", "confusion_matrix"]
    for name in names:
        for ext, min_size in (("png", 20_000), ("pdf", 5_000)):
            p = figs / f"{name}.{ext}"
            assert p.is_file() and p.stat().st_size > min_size, p
    from PIL import Image

    with Image.open(figs / "roc_classwise.png") as im:
        w, h = im.size
        assert w > 1000 and h > 1000 and abs(w - h) / w < 0.15  # 300 dpi, square axes

    # report redraws them from the saved files, byte for byte
    redrawn = report(run, tmp_path / "redrawn")
    assert len(redrawn) == 8
    for p in redrawn:
        assert p.read_bytes() == (figs / p.name).read_bytes(), p.name

    # the README table is produced from metrics.json, not typed
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\ny\n")
    update_readme(run / "metrics.json", readme)
    text = readme.read_text()
    assert "old" not in text and f"{metrics['accuracy']:.3f}" in text and text.endswith("y\n")
