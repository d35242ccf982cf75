"""The accuracy study's bookkeeping: study.json in the issue's shape, figures, README copy, reuse of finished runs.

Runs the real script on a few simulated images for one epoch; the numbers mean nothing, the plumbing is checked.
"""

from __future__ import annotations

import importlib.util
import json
import urllib.error
from pathlib import Path

import pytest

import deeplense.model as model_mod
from deeplense.data import CLASSES
from deeplense.util import DeepLenseError

pytestmark = pytest.mark.slow  # every test here shares a fixture that trains study runs (about 25 s)

REPO = Path(__file__).resolve().parents[1]


def _offline(*args):
    raise urllib.error.URLError("offline (test)")


def _study_module():
    spec = importlib.util.spec_from_file_location("accuracy_study", REPO / "experiments" / "accuracy_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Two arms that share two trainings (the TTA arm evaluates the default arm's checkpoints)."""
    study = _study_module()
    out = tmp_path_factory.mktemp("study")
    args = ["--arms", "default,default_tta", "--train-per-class", "10", "--val-per-class", "10",
            "--epochs", "1", "--seeds", "2", "--bootstrap", "50", "--device", "cpu", "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse per-test isolation is not active yet
        mp.setenv("DEEPLENSE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        mp.setattr(model_mod, "_download_imagenet", _offline)  # the same path with or without internet
        assert study.main(args) == 0
    return study, out, args


def test_study_json_has_the_issue_shape(tiny_study):
    _, out, args = tiny_study
    s = json.loads((out / "study.json").read_text())
    assert s["scale"]["seeds"] == 2 and s["scale"]["n_test"] == 30  # clean protocol: all of val
    assert (s["scale"]["preset"], s["scale"]["protocol"]) == ("benchmark", "clean")
    assert s["scale"]["command"].endswith(" ".join(args[:-1]) + " " + str(out))
    assert "random" in s["scale"]["weights"] and s["scale"]["versions"]["torch"]
    assert list(s["arms"]) == ["default", "default_tta"]
    for arm in s["arms"].values():
        t = arm["test"]
        for key in ("macro_auc", "micro_auc", "accuracy"):
            assert set(t[key]) >= {"mean", "std", "ci95"}
            assert len(t[key]["per_seed"]) == 2 and 0.0 <= t[key]["mean"] <= 1.0
            lo, hi = t[key]["ci95"]
            assert lo <= hi
        assert set(t["per_class_auc"]) == set(CLASSES)
        assert arm["train_seconds"]["mean"] > 0 and arm["train_images_per_s"]["mean"] > 0
        assert arm["device"] == "cpu"
    assert s["arms"]["default_tta"]["tta"] and not s["arms"]["default"]["tta"]
    # each arm against default, paired by seed: per-seed differences of the macro AUCs above, two intervals
    d = s["arms"]["default_tta"]["paired_vs_default"]
    per_seed = [a - b for a, b in zip(s["arms"]["default_tta"]["test"]["macro_auc"]["per_seed"],
                                      s["arms"]["default"]["test"]["macro_auc"]["per_seed"], strict=True)]
    assert d["per_seed"] == pytest.approx(per_seed, abs=1e-9) and d["mean"] == pytest.approx(sum(per_seed) / 2)
    assert d["t_ci"][0] <= d["mean"] <= d["t_ci"][1] and len(d["bootstrap_ci"]) == 2
    assert d["verdict"] in ("wins", "loses", "within noise") and "paired_vs_default" not in s["arms"]["default"]
    for name in ("study_auc.png", "study_auc.pdf", "study_roc.png", "study_roc.pdf"):
        assert (out / name).stat().st_size > 0


def test_tta_arm_reuses_default_checkpoints_and_rerun_trains_nothing(tiny_study):
    study, out, args = tiny_study
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["default-seed0", "default-seed1"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")}
    assert study.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.pt")} == stamps


def test_readme_gets_the_table_and_images_the_figures(tiny_study, tmp_path):
    study, out, _ = tiny_study
    s = json.loads((out / "study.json").read_text())
    (tmp_path / "README.md").write_text("# x\n\n<!-- study:start -->\nold\n<!-- study:end -->\n\nafter\n")
    study.write_readme(s, out, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "old" not in text and text.endswith("<!-- study:end -->\n\nafter\n")
    assert "| `default_tta` | AdamW 0.001, D4, central 96 px → 64 px, D4 TTA |" in text
    assert (tmp_path / "images" / "study_roc.png").read_bytes() == (out / "study_roc.png").read_bytes()
    assert json.loads((tmp_path / "experiments" / "results" / "study.json").read_text()) == s
    (tmp_path / "README.md").write_text("# no markers\n")
    with pytest.raises(DeepLenseError, match="section 'study': its markers must be in exactly one document"):
        study.write_readme(s, out, tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "studies.md").write_text("<!-- study_b:start -->\n<!-- study_b:end -->\n")
    study.write_readme(s, out, tmp_path, "study_b")  # a second study beside the first: its own names everywhere
    assert "| `default_tta` |" in (tmp_path / "docs" / "studies.md").read_text()
    assert (tmp_path / "images" / "study_b_auc.pdf").read_bytes() == (out / "study_auc.pdf").read_bytes()
    assert json.loads((tmp_path / "experiments" / "results" / "study_b.json").read_text()) == s


def test_recipe_column_names_each_arms_geometry():
    from deeplense.config import recipe

    describe = _study_module().describe

    from dataclasses import asdict

    ref = recipe("reference", image_size=64, resize_then_crop=73)
    assert describe({"config": asdict(ref)}) == "SGD 0.0001, h-flips, resize 73 px, centre 64 px"
    native = recipe("default", image_size=150)
    assert describe({"config": asdict(native), "tta": True}) == "AdamW 0.001, D4, whole image at 150 px, D4 TTA"
    no_aug = recipe("default", image_size=64, crop=96, augmentation="none")
    assert describe({"config": asdict(no_aug)}) == "AdamW 0.001, no aug., central 96 px → 64 px"
    cycle = recipe("default", image_size=64, crop=96, schedule="onecycle", label_smoothing=0.1)
    assert describe({"config": asdict(cycle)}) == ("AdamW 0.001, one-cycle, label smoothing 0.1, D4, "
                                                   "central 96 px → 64 px")
    bf16 = _study_module().arm_config("default_bf16", "quick", 0, "clean")
    assert bf16.precision == "bf16" and describe({"config": asdict(bf16)}).endswith("central 96 px → 64 px, bf16")


def test_network_arms_change_only_the_network_and_no_recal_only_the_recalibration():
    from dataclasses import asdict

    study = _study_module()
    default = asdict(study.arm_config("default", "quick", 3, "clean"))
    assert default["bn_recalibration"]
    for arm in (*study.NETWORK_ARMS, "default_no_recal"):
        if arm == "maxvit_t":
            with pytest.raises(DeepLenseError, match="multiple of 224"):  # hence a GPU-scale arm only
                study.arm_config(arm, "quick", 3, "clean")
            assert study.arm_config(arm, "gpu", 3, "clean").image_size == 224
            continue
        cfg = asdict(study.arm_config(arm, "quick", 3, "clean"))
        changed = {k for k in cfg if cfg[k] != default[k]}
        assert changed == ({"bn_recalibration"} if arm == "default_no_recal" else
                           {"arch", "attention"} if "_attn_" in arm else {"arch"}), arm
    se = study.arm_config("resnet34_attn_mhsa", "quick", 0, "clean")
    assert (se.arch, se.attention) == ("resnet34_attn", "mhsa")
    assert study.describe({"config": asdict(se)}).startswith("resnet34_attn/mhsa, AdamW 0.001")
    assert "no BN recalibration" in study.describe({"config": asdict(study.arm_config("default_no_recal", "quick", 0,
                                                                                      "clean"))})
    assert not set(study.GPU_ONLY) & set(study.SCALES["quick"]["arms"])


def test_learning_rate_arms_change_only_the_learning_rate():
    from dataclasses import asdict

    study = _study_module()
    for arm, base, lr in (("convnext_tiny_lr1e-4", "convnext_tiny", 1e-4), ("default_lr3e-4", "default", 3e-4),
                          ("resnet34_attn_se_lr0.0002", "resnet34_attn_se", 2e-4)):
        assert study.learning_rate_arm(arm) == (base, lr)
        cfg = asdict(study.arm_config(arm, "quick", 1, "clean"))
        ref = asdict(study.arm_config(base, "quick", 1, "clean"))
        assert {k for k in cfg if cfg[k] != ref[k]} == {"lr"} and cfg["lr"] == lr
        assert f"AdamW {lr:g}," in study.describe({"config": cfg})
    for bad in ("default_ema_lr1e-4", "convnext_tiny_lr", "convnext_tiny_lrfast", "default_lr0", "default_lr-1",
                "default_lrnan", "default_lrinf", "nonsense_lr1e-3"):
        assert study.learning_rate_arm(bad) is None, bad
    with pytest.raises(SystemExit) as exc:
        study.main(["--arms", "default,default_lrfast", "--out", "/nonexistent/never"])
    assert exc.value.code == 2


def test_a_one_seed_comparison_has_no_t_interval_and_no_verdict():
    study = _study_module()
    nan = float("nan")
    text = study._delta({"mean": -0.3, "t_ci": [nan, nan], "bootstrap_ci": [-0.33, -0.27]})
    assert text == "-0.3000 [no t interval: 1 seed] {-0.3300, -0.2700}"
    assert study._delta({"mean": 0.01, "t_ci": [0.0, 0.02], "bootstrap_ci": None}) == "+0.0100 [+0.0000, +0.0200]"


def test_d4net_arms_change_only_augmentation_or_precision():
    """Issue 38's arms: d4net on its own recipe at the quick scale (the central 97 native px); without augmentation,
    or under bf16, nothing else changes."""
    from dataclasses import asdict

    study = _study_module()
    d4 = asdict(study.arm_config("d4net", "quick", 2, "clean"))
    assert (d4["arch"], d4["crop"], d4["image_size"], d4["recipe"], d4["epochs"]) == ("d4net", 97, 97, "d4net", 5)
    for arm, changed in (("d4net_no_aug", {"augmentation"}), ("d4net_bf16", {"precision"})):
        cfg = asdict(study.arm_config(arm, "quick", 2, "clean"))
        assert {k for k in cfg if cfg[k] != d4[k]} == changed, arm
    lens = asdict(study.arm_config("lensnet", "quick", 2, "clean"))
    lens16 = asdict(study.arm_config("lensnet_bf16", "quick", 2, "clean"))
    assert {k for k in lens if lens[k] != lens16[k]} == {"precision"}
    assert study.describe({"config": d4}).startswith("d4net, AdamW 0.002") and "native 97 px" in study.describe(
        {"config": d4})
    assert study.arm_config("d4net", "quick", 2, "clean", epochs=15).epochs == 15


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_learning_curve_runs_see_the_same_number_of_images():
    curves = _script("learning_curves")
    for n in (100, 300, 1000):
        for arch in curves.ARCHS:
            cfg = curves.arch_config(arch, n, 1, 45_000)
            assert cfg.limit_per_class == n and cfg.protocol == "clean" and cfg.seed == 1 and cfg.arch == arch
            assert cfg.epochs == -(-45_000 // (3 * n)) and 45_000 <= cfg.epochs * 3 * n < 45_000 + 3 * n
    runs = [{"arch": "d4net", "n_per_class": 100, "seed": s, "macro_auc": a, "macro_auc_ci": [a - 0.1, a + 0.1],
             "epochs": 150} for s, a in ((0, 0.7), (1, 0.8))]
    result = {"sizes": [100, 300], "images": 45_000, "n_test": 1500, "data_seed": 4321, "hardware": "CPU",
              "command": "python experiments/learning_curves.py", "curves": curves.summarise(runs)}
    p = result["curves"]["d4net"]["100"]
    assert p["mean"] == pytest.approx(0.75) and p["std"] == pytest.approx(0.0707, abs=1e-4)
    table = curves.table(result)
    assert "| `d4net` | 0.750 ± 0.071 (2 seed(s); seed 0: 0.700 [0.600, 0.800]; 150 epochs) | not run |" in table


def test_learning_curves_reuse_only_their_own_simulated_set(tmp_path):
    """--data: another budget may reuse the curves' images only when they are the realistic preset at the curves'
    data seed with enough training images and the same test images."""
    curves = _script("learning_curves")
    from deeplense.simulate import SimulationConfig

    data = tmp_path / "data"
    assert "simulation.json" in curves.reused_data_problem(data, 10, 5)
    for split, n in (("train", 12), ("val", 5)):
        for c in ("no", "sphere", "vort"):
            (data / split / c).mkdir(parents=True)
            for i in range(1, n + 1):
                (data / split / c / f"{i}.npy").write_bytes(b"")
    settings = {"seed": curves.DATA_SEED, "config": SimulationConfig.from_preset("realistic").to_dict()}
    (data / "simulation.json").write_text(json.dumps(settings))
    assert curves.reused_data_problem(data, 12, 5) is None and curves.reused_data_problem(data, 10, 5) is None
    assert curves.reused_data_problem(data, 13, 5) == "train/no holds 12 images, at least 13 needed"
    assert curves.reused_data_problem(data, 10, 4) == "val/no holds 5 images, exactly 4 needed"
    for other in ({**settings, "seed": 1}, {**settings, "config": SimulationConfig.from_preset("benchmark").to_dict()}):
        (data / "simulation.json").write_text(json.dumps(other))
        assert "another seed or preset" in curves.reused_data_problem(data, 10, 5)


def test_sim_to_real_reads_a_study_and_named_runs(tmp_path):
    s2r = _script("sim_to_real")
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"scale": {"seed_list": [0, 1]},
                                                  "arms": {"default": {}, "default_tta": {}, "d4net": {}}}))
    nets = s2r.networks(study, ["demo=runs/demo"])
    assert list(nets) == ["default", "d4net", "demo"]  # a TTA arm has no runs of its own
    assert nets["d4net"] == [(0, study / "runs" / "d4net-seed0" / "best.pt"), (1, study / "runs" / "d4net-seed1" /
                                                                               "best.pt")]
    assert nets["demo"] == [(None, Path("runs/demo/best.pt"))]
    with pytest.raises(DeepLenseError, match="expected NAME=RUN_FOLDER"):
        s2r.networks(None, ["runs/demo"])
