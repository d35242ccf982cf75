"""The run's numbers as text: the README table, the notebook's reading of the curves, intervals formatted once."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deeplense.metrics import compute_metrics
from deeplense.report import averaged_words, findings, format_ci, results_table, update_readme


def _metrics():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 50)
    logits = rng.normal(size=(150, 3)) + np.eye(3)[y] * np.array([4.0, 0.8, 1.5])  # sphere the hardest
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(y, p, n_bootstrap=100, seed=0)
    m["provenance"] = {"split_description": "held-out test part of val", "recipe": "default", "seed": 0,
                       "device": "cpu", "tta": False, "pretrained": False,
                       "config": {"epochs": 5, "image_size": 64, "crop": 96}}
    return m


def test_format_ci():
    assert format_ci(0.95712, [0.9251, 0.98349]) == "0.957 [0.925, 0.983]"
    assert format_ci(0.95712, [0.9251, 0.98349], 4) == "0.9571 [0.9251, 0.9835]"
    assert format_ci(0.5, None) == "0.500" and format_ci(None, [0, 1]) == "n/a"


def test_results_table_and_findings_read_the_metrics(tmp_path):
    m = _metrics()
    table = results_table(m)
    assert f"| accuracy | {format_ci(m['accuracy'], m['ci']['accuracy'])} |" in table
    assert f"| macro AUC (mean of per-class one-vs-rest) | {format_ci(m['auc']['macro'], m['ci']['macro_auc'])} |" \
        in table
    assert "n = 150" in table and "5 epochs. Input 64 px (central 96 px crop)" in table and "TTA off" in table
    said = findings(m)
    auc = m["auc"]["per_class"]
    assert min(auc, key=auc.get) == "sphere" and "Hardest class in this run: **subhalos**" in said
    assert said.index("(`no`)") < said.index("(`vort`)") < said.index("(`sphere`)")  # easiest first
    assert str(m["confusion_matrix"]) in said
    width = m["ci"]["macro_auc"][1] - m["ci"]["macro_auc"][0]
    assert f"{width:.3f} wide with n = 150" in said


def test_update_readme_fills_only_the_marked_section(tmp_path):
    import json

    m = _metrics()
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    update_readme(tmp_path / "metrics.json", readme, extra="From a test.\n\n")
    text = readme.read_text()
    assert text.startswith("head\n<!-- results:start -->\nFrom a test.\n\n| metric |") and text.endswith("tail\n")
    assert "old" not in text


@pytest.mark.slow
def test_report_refuses_predictions_from_another_evaluation(small, tmp_path):
    """metrics.json names the hash of the predictions it was computed from: a predictions.npz written by a second
    evaluation (or left by a killed one) is refused, not drawn beside the wrong numbers (issue 22, item 4)."""
    import shutil

    import pytest

    from deeplense.config import recipe
    from deeplense.evaluate import evaluate
    from deeplense.report import report
    from deeplense.testing import FAST, quiet
    from deeplense.train import train
    from deeplense.util import DeepLenseError

    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    evaluate(run / "best.pt", small, tmp_path / "a", device="cpu", n_bootstrap=0, progress=False)
    evaluate(run / "best.pt", small, tmp_path / "b", device="cpu", n_bootstrap=0, progress=False, split="selection")
    assert report(tmp_path / "a", tmp_path / "figs")
    shutil.copy(tmp_path / "b" / "predictions.npz", tmp_path / "a" / "predictions.npz")
    with pytest.raises(DeepLenseError, match="not the predictions metrics.json was computed from"):
        report(tmp_path / "a", tmp_path / "figs2")


@pytest.mark.slow
def test_a_metrics_json_of_the_wrong_shape_is_one_line(small, tmp_path):
    import json

    import pytest

    from deeplense.config import recipe
    from deeplense.evaluate import evaluate
    from deeplense.report import report
    from deeplense.testing import FAST, quiet
    from deeplense.train import train
    from deeplense.util import DeepLenseError

    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    evaluate(run / "best.pt", small, tmp_path / "a", device="cpu", n_bootstrap=0, progress=False)
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    m["confusion_matrix"] = [[1, 2], [3, 4]]
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(DeepLenseError, match="is not what `evaluate` writes"):
        report(tmp_path / "a", tmp_path / "figs")


def test_write_section_finds_the_document_that_holds_the_markers(tmp_path):
    from deeplense.report import write_section
    from deeplense.util import DeepLenseError

    (tmp_path / "README.md").write_text("# readme\n<!-- a:start -->\nold a\n<!-- a:end -->\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "studies.md").write_text("# studies\n<!-- b:start -->\nold b\n<!-- b:end -->\n")
    assert write_section("b", "new b", tmp_path) == tmp_path / "docs" / "studies.md"  # a table moved to docs/
    assert "new b" in (tmp_path / "docs" / "studies.md").read_text()
    assert write_section("a", "new a", tmp_path) == tmp_path / "README.md"
    assert (tmp_path / "README.md").read_text() == "# readme\n<!-- a:start -->\nnew a\n<!-- a:end -->\n"
    with pytest.raises(DeepLenseError, match="section 'c': its markers must be in exactly one document"):
        write_section("c", "x", tmp_path)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "README.md").write_text("<!-- a:start -->\n<!-- a:end -->\n")  # in two places
    with pytest.raises(DeepLenseError, match="exactly one document"):
        write_section("a", "x", tmp_path)


def test_readme_module_table_lists_every_module_and_the_documents_links_resolve():
    """The module table (docs/development.md) is the layout (each module of the package once), and every relative
    link or image in the README and docs/ points at a file that exists."""
    import re

    from deeplense.report import documents
    from deeplense.util import REPO

    readme = (REPO / "docs" / "development.md").read_text()
    table = readme[readme.index("| module | holds |"):]
    listed = re.findall(r"`(\w+\.py)`", table.split("\n\n", 1)[0])
    modules = sorted(p.name for p in (REPO / "Common_Task" / "deeplense").glob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    assert sorted(listed) == modules
    for doc in documents(REPO):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)}: link to {target} is broken"


def test_error_examples_pick_the_highest_losses_and_the_most_confident_errors():
    from deeplense.report import error_examples

    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.array([[0.9, 0.05, 0.05],   # right, sure
                      [0.2, 0.7, 0.1],     # wrong, 0.7
                      [0.4, 0.3, 0.3],     # right, unsure
                      [0.05, 0.05, 0.9],   # wrong, 0.9: the most confident error
                      [0.1, 0.8, 0.1],
                      [0.3, 0.3, 0.4]])
    hardest, confident = error_examples(labels, probs, per_class=2)
    assert hardest[0].tolist() == [1, 2] and hardest[1].tolist() == [3, 4] and hardest[2].tolist() == [5]
    assert confident.tolist() == [3, 1]


@pytest.mark.slow
def test_report_draws_the_error_figures_from_the_evaluated_images_and_skips_them_without_the_data(small, tmp_path):
    import shutil

    from deeplense.config import recipe
    from deeplense.evaluate import evaluate
    from deeplense.report import report
    from deeplense.testing import FAST, quiet
    from deeplense.train import train

    data = tmp_path / "data"
    shutil.copytree(small, data)
    run = tmp_path / "run"
    train(recipe("default", epochs=1, protocol="clean", **FAST), data, run, **quiet())
    evaluate(run / "best.pt", data, run, device="cpu", n_bootstrap=0, progress=False)
    names = {p.name for p in report(run, tmp_path / "f1")}
    assert {"hardest.png", "hardest.pdf", "confident_errors.png", "confident_errors.pdf"} <= names
    again = report(run, tmp_path / "f2")
    assert all(p.read_bytes() == (tmp_path / "f1" / p.name).read_bytes() for p in again)
    # a split that no longer lists the evaluated images (one removed): the error figures would show other images
    split = json.loads((run / "metrics.json").read_text())["provenance"]["data"]["split"]
    sorted((data / split).rglob("*.npy"))[-1].unlink()
    said = []
    names = {p.name for p in report(run, tmp_path / "f4", log=said.append)}
    assert "hardest.png" not in names and len(said) == 1 and "no longer lists the images" in said[0]
    shutil.rmtree(data)
    said = []
    names = {p.name for p in report(run, tmp_path / "f3", log=said.append)}
    assert "hardest.png" not in names and "roc_classwise.png" in names and "training_curves.png" in names
    assert len(said) == 1 and "error figures skipped" in said[0] and str(data) in said[0]


@pytest.mark.slow
def test_a_hand_edited_confusion_matrix_is_refused_in_one_line(small, tmp_path, capsys):
    """Issue 37, item 10: report drew the confusion matrix from metrics.json as it was (a hand-edited one with 100s
    on the diagonal, beside ROC curves from predictions.npz), and a word in it gave a ValueError traceback."""
    import json

    from deeplense.cli import main
    from deeplense.config import recipe
    from deeplense.evaluate import evaluate
    from deeplense.testing import FAST, quiet
    from deeplense.train import train

    run = tmp_path / "run"
    train(recipe("default", epochs=1, **FAST), small, run, **quiet())
    evaluate(run / "best.pt", small, tmp_path / "a", device="cpu", n_bootstrap=0, progress=False)
    assert main(["report", "--run", str(tmp_path / "a"), "--figures", str(tmp_path / "ok")]) == 0
    original = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for edited in ([[100, 0, 0], [0, 100, 0], [0, 0, 100]], [["a", 0, 0], [0, 1, 0], [0, 0, 1]]):
        (tmp_path / "a" / "metrics.json").write_text(json.dumps({**original, "confusion_matrix": edited}))
        capsys.readouterr()
        assert main(["report", "--run", str(tmp_path / "a"), "--figures", str(tmp_path / "figs")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not the one of predictions.npz" in err[0], err
        assert not (tmp_path / "figs" / "confusion_matrix.png").exists()


def test_the_table_says_what_tta_did_for_an_invariant_network():
    # d4net with --tta runs one pass (its 8 views give the same numbers): the README must not say "TTA on"
    m = _metrics()
    m["provenance"].update(tta=True, config={**m["provenance"]["config"], "arch": "lensnet"})
    assert "TTA on." in results_table(m)
    m["provenance"]["config"]["arch"] = "d4net"
    table = results_table(m)
    assert "TTA on" not in table and "TTA not needed (the network is exactly invariant" in table
    assert averaged_words(True, "d4net") == "" and averaged_words(False, "resnet34") == ""
    assert averaged_words(True, "resnet34") == ", averaged over the TTA views"
