"""Saliency (pytorch-grad-cam, captum) on every arch, mapped back through test-time averaging onto the native image,
and the enrichment measure on maps where the answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deeplense.config import ARCHS, recipe
from deeplense.explain import METHODS, _inverse, enrichment, near_fraction, saliency
from deeplense.model import model_for
from deeplense.transforms import d4_transform


def _net(arch: str, size: int = 32, **kw):
    size = {"maxvit_t": 224, "lensnet": 32, "d4net": 32}.get(arch, size)  # the native networks take the crop
    cfg = recipe("default", image_size=size, crop=32, weights="none", arch=arch,
                 **({"attention": "mhsa"} if arch == "resnet34_attn" else {}), **kw)
    torch.manual_seed(0)
    model, _ = model_for(cfg)
    return cfg, model.eval()


def test_each_symmetrys_inverse_undoes_it():
    x = torch.arange(12.0).reshape(3, 4)[None].expand(2, 3, 4)[:, :3, :3].contiguous()
    for k in range(8):
        assert torch.equal(d4_transform(d4_transform(x, k), _inverse(k)), x), k


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "maxvit_t"] + [
    pytest.param("maxvit_t", marks=pytest.mark.slow)])
def test_every_arch_gives_grad_cam_maps_on_the_native_image(arch):
    """At 64 px input (the 32 px crop enlarged): the ResNets' last map is 2 x 2, the coarsest of all."""
    cfg, model = _net(arch, size=64)
    crops = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32)
    for method in ("gradcam", "gradcam++"):
        m = saliency(model, cfg, crops, np.array([1, 2]), method=method, native=40)
        assert m.shape == (2, 40, 40) and np.allclose(m.sum(axis=(1, 2)), 1)
        assert (m >= 0).all() and m[:, :4].sum() == 0 and m[:, :, 36:].sum() == 0  # zero outside the central crop
        # a map, not a constant; except d4net's Grad-CAM with random weights, whose weighted sum of 32 invariant
        # feature maps is often negative everywhere (so 0 after Grad-CAM's ReLU, uniform here); Grad-CAM++ takes the
        # positive gradients only, and a trained d4net's maps are in the demo's saliency figure
        if not (arch == "d4net" and method == "gradcam"):
            assert m[:, 4:36, 4:36].std() > 0


@pytest.mark.parametrize("arch", ["lensnet", "resnet18"])
def test_integrated_gradients_stay_on_the_pixels_that_differ_from_the_black_baseline(arch):
    """IG's attribution of a pixel equal to the baseline is exactly 0, so with the image lit in one corner only, a
    map mapped back wrongly through the 8 TTA views (or placed at the wrong offset) would show up elsewhere."""
    cfg, model = _net(arch)
    crops = np.zeros((2, 1, 32, 32), np.float32)
    crops[:, :, 2:12, 3:15] = np.random.default_rng(1).random((2, 1, 10, 12))
    for tta in (False, True):
        m = saliency(model, cfg, crops, np.array([0, 1]), method="integrated_gradients", tta=tta, native=40)
        assert np.allclose(m.sum(axis=(1, 2)), 1)
        inside = m[:, 4 + 2 : 4 + 12, 4 + 3 : 4 + 15].sum(axis=(1, 2))
        np.testing.assert_allclose(inside, 1, atol=1e-6)


def test_tta_maps_are_the_mean_of_each_views_map_turned_back():
    cfg, model = _net("lensnet")
    crops = np.random.default_rng(2).random((1, 1, 32, 32)).astype(np.float32)
    views = []
    for k in range(8):
        turned = d4_transform(torch.from_numpy(crops), k).numpy()
        views.append(d4_transform(torch.from_numpy(saliency(model, cfg, turned, [2], method="gradcam")),
                                  _inverse(k)).numpy())
    mean = np.mean(views, axis=0)
    np.testing.assert_allclose(saliency(model, cfg, crops, [2], method="gradcam", tta=True), mean / mean.sum(),
                               rtol=1e-5, atol=1e-9)


def _blobs(points, side=150, sigma=1.5):
    rows, cols = np.indices((side, side), dtype=float)
    m = sum(np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * sigma**2)) for x, y in points)
    return m / m.sum()


def _structures(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            r, a = rng.uniform(15, 40, 5), rng.uniform(0, 2 * np.pi, 5)
            out.append(("subhalo", np.c_[74.5 + r * np.cos(a), 74.5 + r * np.sin(a)]))
        else:
            a = rng.uniform(0, np.pi)
            half = rng.uniform(8, 25)
            out.append(("vortex_end", 74.5 + np.array([[-half * np.cos(a), -half * np.sin(a)],
                                                       [half * np.cos(a), half * np.sin(a)]])))
    return out


def test_enrichment_is_high_on_the_substructure_and_about_one_for_uniform_maps():
    """Maps placed on the subhalos: far above 1 and near the ideal; on a vortex line, which passes through the lens
    centre as the simulator's do (so any turn of it shares the centre), above 1 but lower; uniform maps: 1."""
    structures = _structures(40)
    for kind, low, high_ in (("subhalo", 5, 12), ("vortex_end", 1.2, 3)):
        mine = [st for st in structures if st[0] == kind]
        on = []
        for _, p in mine:
            if kind == "vortex_end":  # along the line, between the ends
                p = p[0] + np.linspace(0.2, 0.8, 7)[:, None] * (p[1] - p[0])
            on.append(_blobs(p))
        e = enrichment(np.array(on), mine, n_bootstrap=200)
        assert low < e["ratio"] < high_ and e["ci"][0] > low * 0.9 and e["near_true"] > 0.95, (kind, e)
        assert e["ratio"] <= e["ideal_ratio"] * 1.05
        uniform = enrichment(np.full((len(mine), 150, 150), 1 / 150**2), mine, n_bootstrap=200)
        assert 0.9 < uniform["ratio"] < 1.1 and uniform["ci"][0] < 1 < uniform["ci"][1], (kind, uniform)
    # the middle of a vortex line counts as near it (the segment, not only its two ends)
    kind, p = structures[0]
    assert near_fraction(_blobs([(p[0] + p[1]) / 2]), kind, p) > 0.9
    with pytest.raises(ValueError, match="one structure per map"):
        enrichment(np.zeros((2, 150, 150)), structures)


@pytest.mark.slow
def test_explain_files_and_an_evaluation_end_to_end(tmp_path, capsys):
    from deeplense.cli import main
    from deeplense.evaluate import evaluate
    from deeplense.simulate import SimulationConfig, simulate_dataset
    from deeplense.testing import FAST, quiet
    from deeplense.train import train

    data = tmp_path / "sim"
    simulate_dataset(data, train_per_class=6, val_per_class=4, seed=0, progress=False,
                     config=SimulationConfig.from_preset("benchmark"))
    run = tmp_path / "run"
    train(recipe("default", epochs=1, crop=96, protocol="clean", **FAST), data, run, **quiet())
    evaluate(run / "best.pt", data, tmp_path / "ev", tta=True, progress=False, n_bootstrap=0)

    files = [str(data / "val" / "sphere" / "1.npy"), str(data / "val" / "vort" / "2.npy")]
    assert main(["explain", "--checkpoint", str(run / "best.pt"), *files, "--out", str(tmp_path / "ex"),
                 "--tta"]) == 0
    for stem in ("sphere_1", "vort_2"):
        assert (tmp_path / "ex" / f"{stem}.png").stat().st_size > 10_000 and (tmp_path / "ex" / f"{stem}.pdf").is_file()
    z = np.load(tmp_path / "ex" / "saliency.npz")
    assert z["gradcam"].shape == (2, 150, 150) and np.allclose(z["integrated_gradients"].sum(axis=(1, 2)), 1)

    assert main(["explain", "--evaluation", str(tmp_path / "ev"), "--out", str(tmp_path / "en"), "--per-class", "3",
                 "--method", "gradcam", "--method", "integrated_gradients"]) == 0
    said = capsys.readouterr().out
    r = json.loads((tmp_path / "en" / "enrichment.json").read_text())
    assert r["tta"] is True and r["heldout_check"] and set(r["per_class"]) == {"sphere", "vort"}
    for cls in ("sphere", "vort"):
        for m in ("gradcam", "integrated_gradients"):
            e = r["per_class"][cls][m]
            assert e["n"] == 3 and np.isfinite(e["ratio"]) and f"{cls}: {m} enrichment {e['ratio']:.2f}" in said
    from deeplense.plots import SALIENCY_EXAMPLES, draw_saliency_examples  # redrawn from what explain kept

    again = draw_saliency_examples(tmp_path / "en" / SALIENCY_EXAMPLES, tmp_path / "again")  # byte for byte
    assert [p.read_bytes() for p in again] == [(tmp_path / "en" / p.name).read_bytes() for p in again]

    # the per-arch saliency study on a study folder whose set predates substructure.csv: it writes the same file
    import importlib.util
    import shutil

    from deeplense.util import REPO

    spec = importlib.util.spec_from_file_location("saliency_study", REPO / "experiments" / "saliency_study.py")
    study_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study_mod)
    study = tmp_path / "study"
    (study / "eval").mkdir(parents=True)
    (study / "data").symlink_to(data)
    shutil.copytree(tmp_path / "ev", study / "eval" / "default-seed0")
    original = (data / "substructure.csv").read_bytes()
    (data / "substructure.csv").unlink()
    assert study_mod.main(["--study", str(study), "--arms", "default", "--per-class", "2"]) == 0
    assert (data / "substructure.csv").read_bytes() == original
    got = json.loads((study / "saliency" / "saliency.json").read_text())
    assert got["arms"]["default"]["per_class"]["vort"]["gradcam"]["n"] == 2 and "| `default` | `vort` |" in \
        capsys.readouterr().out

    # issue 37, item 6: train/no/1.npy and val/no/1.npy once both became no_1.png (the second over the first, and
    # the count printed was wrong); every file gets its own figure, the same file given twice one
    both = [str(data / "train" / "no" / "1.npy"), str(data / "val" / "no" / "1.npy"), str(data / "val" / "no")]
    assert main(["explain", "--checkpoint", str(run / "best.pt"), *both, str(data / "val" / "no" / "1.npy"),
                 "--out", str(tmp_path / "clash"), "--method", "gradcam"]) == 0
    pngs = sorted(p.name for p in (tmp_path / "clash").glob("*.png"))
    assert pngs == ["no_2.png", "no_3.png", "no_4.png", "train_no_1.png", "val_no_1.png"], pngs
    written = len(list((tmp_path / "clash").iterdir()))
    assert f"wrote {written} files" in capsys.readouterr().out
    assert len(np.load(tmp_path / "clash" / "saliency.npz")["paths"]) == 5

    # issue 37, item 20: one image per class has no interval (evaluate says n/a), not a zero-width one
    assert main(["explain", "--evaluation", str(tmp_path / "ev"), "--out", str(tmp_path / "one"), "--per-class",
                 "1", "--method", "gradcam"]) == 0
    said = capsys.readouterr().out
    assert "(1 images)" in said and "[interval n/a: 1 image]" in said and "[0." not in said.split("enrichment")[1]

    # issue 37, item 7: best.pt replaced after the evaluation (another run's checkpoint): refused, not explained
    other = tmp_path / "other"
    train(recipe("default", epochs=1, crop=96, protocol="clean", seed=1, **FAST), data, other, **quiet())
    evaluated = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes((other / "best.pt").read_bytes())
    assert main(["explain", "--evaluation", str(tmp_path / "ev"), "--out", str(tmp_path / "swap")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not the checkpoint" in err and "evaluated" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "swap" / "enrichment.json").exists()
    (run / "best.pt").write_bytes(evaluated)

    # one line, exit status 2: a file that is not an image, a set that records no substructure, both modes at once
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an array")
    assert main(["explain", "--checkpoint", str(run / "best.pt"), str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1
    (data / "substructure.csv").unlink()
    assert main(["explain", "--evaluation", str(tmp_path / "ev"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "substructure.csv: not found" in err and len(err.splitlines()) == 1
    assert main(["explain", "--evaluation", str(tmp_path / "ev"), "--checkpoint", str(run / "best.pt"),
                 "--out", str(tmp_path / "z")]) == 2
    assert METHODS[0] == "gradcam"
