"""The realism check: each statistic on constructed images whose answer is known, the two-sample test, the
command, and the default preset held to the real sample's committed targets (no real file needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deeplense import realism as R
from deeplense.cli import main
from deeplense.data import CLASSES
from deeplense.simulate import SimulationConfig, simulate_image

N = 150
YY, XX = np.mgrid[:N, :N].astype(float)
C = (N - 1) / 2


def _norm(x):
    return (x - x.min()) / (x.max() - x.min())


def ring(radius=25.0, width=1.5, cx=C, cy=C):
    return np.exp(-((np.hypot(XX - cx, YY - cy) - radius) ** 2) / (2 * width**2))


def blob(cx, cy, sx=2.0, sy=2.0):
    return np.exp(-((XX - cx) ** 2 / (2 * sx**2) + (YY - cy) ** 2 / (2 * sy**2)))


def test_every_statistic_has_a_one_line_definition():
    d = R.describe()
    assert list(d) == list(R.STATISTICS) and len(d) >= 11
    assert all(doc and "\n" not in doc for doc in d.values())


def test_ring_geometry():
    x = ring(radius=25.0)
    assert R.ring_radius_px(x) == pytest.approx(25.0, abs=0.3)
    assert R.ring_width_px(x) < 1.5
    assert R.ellipticity(x) < 0.01
    assert R.azimuthal_contrast(x) == pytest.approx(1.0, abs=0.05)
    assert R.center_level(x) < 1e-6 and R.outer_flux_fraction(x) < 1e-3
    a = np.radians(360 / 32)  # the middle of a sector
    knotty = _norm(x + 3 * blob(C + 25 * np.cos(a), C + 25 * np.sin(a)))  # one bright knot on the ring
    assert R.azimuthal_contrast(knotty) > 2
    halo = _norm(x + 0.08 * np.exp(-np.hypot(XX - C, YY - C) / 30))  # an extended halo adds outer flux
    assert R.outer_flux_fraction(halo) > 0.05
    centred = _norm(x + blob(C, C, 3, 3))
    assert R.center_level(centred) > 0.3


def test_ellipticity_and_axis_of_an_elongated_blob():
    along_x = blob(C, C, sx=8.0, sy=4.0)  # second moments 64 : 16
    assert R.ellipticity(along_x) == pytest.approx(0.6, abs=0.01)
    assert R.axis_angle_deg(along_x) == pytest.approx(0.0, abs=0.5)
    assert R.axis_angle_deg(along_x.T) == pytest.approx(90.0, abs=0.5)
    diagonal = np.exp(-(((XX - C) + (YY - C)) ** 2 / (2 * 64) + ((XX - C) - (YY - C)) ** 2 / (2 * 16)))
    assert R.axis_angle_deg(diagonal) == pytest.approx(45.0, abs=1.0)
    assert R.ellipticity(diagonal) == pytest.approx(0.6, abs=0.02)


def test_fractions_and_mean():
    x = np.zeros((N, N))
    x[:15] = 1.0  # 10% of the pixels at 1
    x[15:30] = 0.3  # another 10% at 0.3
    assert R.frac_gt_01(x) == pytest.approx(0.2) and R.frac_gt_05(x) == pytest.approx(0.1)
    assert R.image_mean(x) == pytest.approx(0.13)


def test_counts_levels_corners_and_sky_fano():
    rng = np.random.default_rng(0)
    counts = rng.poisson(10 + 800 * ring()).astype(float)
    x = (counts - counts.min()) / (counts.max() - counts.min())
    k = counts.max() - counts.min()
    assert R.log10_levels(x) == pytest.approx(np.log10(k), abs=1e-9)
    corners = np.concatenate([counts[:10, :10].ravel(), counts[:10, -10:].ravel(), counts[-10:, :10].ravel(),
                              counts[-10:, -10:].ravel()])
    assert R.corner_mean(x) == pytest.approx((corners.mean() - counts.min()) / k)
    assert R.corner_std(x) == pytest.approx(corners.std() / k)
    assert abs(R.log10_sky_fano(x)) < 0.1  # Poisson: variance = mean
    # a continuous image has ~float32 levels, and Gaussian noise of rms 3 on a sky of 10: fano 0.9
    smooth = _norm(ring() + 1e-3 * rng.standard_normal((N, N)))
    assert R.log10_levels(smooth) > 5
    wide = rng.poisson(10 + 800 * ring()).astype(float) + rng.normal(0, 3, (N, N))
    assert R.log10_sky_fano(np.round(_norm(wide) * 1e6) / 1e6) > 3  # levels 1e6 apart: not counts


def test_knots_counts_separate_peaks():
    four = _norm(ring() * 0.2 + sum(blob(C + dx, C + dy) for dx, dy in ((28, 0), (-28, 0), (0, 18), (0, -18))))
    assert R.knots(four) == 4
    assert R.knots(_norm(blob(C, C, 4, 4))) == 1


@pytest.mark.slow
def test_two_sample_test_tells_apart_only_what_differs():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(120, 4))
    same = R.two_sample_test(a, b, n_bootstrap=100, repeats=2)
    for name in ("logistic_regression", "random_forest"):
        assert 0.25 < same[name]["auc"] < 0.75, same
        lo, hi = same[name]["ci95"]
        assert lo < same[name]["auc"] < hi
    shifted = R.two_sample_test(a + 3.0, b, n_bootstrap=100, repeats=2)
    assert shifted["logistic_regression"]["auc"] > 0.95 and shifted["random_forest"]["auc"] > 0.95
    c = R.compare({k: np.arange(10.0) for k in R.STATISTICS}, {k: np.arange(10.0) for k in R.STATISTICS})
    assert all(v["ks"] == 0.0 and v["sim_median_in_real_10_90"] for v in c.values())


def _folder(root, cls_images):
    for cls, images in cls_images.items():
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images, 1):
            np.save(d / f"{i}.npy", img[None].astype(np.float64))
    return root


def _sim(preset, n, seed=3):
    cfg = SimulationConfig.from_preset(preset)
    return {c: [simulate_image(cfg, seed, "train", c, i, dtype=np.float64)[0][0] for i in range(1, n + 1)]
            for c in CLASSES}


@pytest.mark.slow
def test_realism_command_writes_numbers_and_histograms(tmp_path, capsys):
    _folder(tmp_path / "real" / "wrapper", _sim("realistic", 4, seed=1))  # class folders at any depth
    _folder(tmp_path / "sim" / "val", _sim("common_task", 4))
    out = tmp_path / "out"
    assert main(["realism", "--real", str(tmp_path / "real"), "--data", str(tmp_path / "sim"), "--n", "4",
                 "--bootstrap", "20", "--out", str(out), "--save-targets", str(tmp_path / "t.json")]) == 0
    r = json.loads((out / "realism.json").read_text())
    assert set(r["comparison"]) == set(R.STATISTICS) and r["real"]["n"] == 12
    assert set(r["per_class"]) == set(CLASSES)
    assert r["two_sample"]["logistic_regression"]["auc"] > 0.9  # realistic vs common_task: plainly apart
    assert r["versions"] and "--data" in r["command"]
    assert (out / "realism.png").stat().st_size > 0 and (out / "realism.pdf").stat().st_size > 0
    t = R.load_targets(tmp_path / "t.json")
    assert t["n"] == 12 and set(t["statistics"]) == set(R.STATISTICS)
    assert "two-sample AUC" in capsys.readouterr().out
    assert main(["realism", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(k in listed for k in R.STATISTICS)


def test_realism_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    real = _folder(tmp_path / "real", _sim("realistic", 2))
    (real / "no" / "3.npy").write_text("not an array")
    assert main(["realism", "--real", str(real), "--preset", "model_i", "--n", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3.npy" in err and "not a .npy file" in err
    (tmp_path / "empty").mkdir()
    assert main(["realism", "--real", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no .npy files" in capsys.readouterr().err
    assert main(["realism", "--out", str(tmp_path / "o")]) == 2
    assert "--real" in capsys.readouterr().err


def _blank_folder(root, per_class=3, classes=CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    return _folder(root, {c: [_norm(ring() + 0.1 * rng.standard_normal((N, N))) for _ in range(per_class)]
                          for c in classes})


@pytest.mark.parametrize("argv, expected", [
    (["--bootstrap", "0"], "--bootstrap 0: must be at least 1"),
    (["--bootstrap", "-1"], "--bootstrap -1: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be 0 or more"),
    (["--n", "1"], "--n 1: must be at least 2"),
    (["--save-targets", "{tmp}"], "is a folder, not a file"),
    (["--data", "{real}"], "identical image(s) on both sides"),
    (["--data", "{other}"], "--data {other}: no vort/ images below it"),
    (["--real", "{other}", "--data", "{real}"], "--real {other}: no vort/ images below it"),
])
def test_realism_refuses_what_it_cannot_compare_before_any_work(argv, expected, tmp_path, capsys, monkeypatch):
    """Issue 37, items 8 and 11: the same folder on both sides (it once gave a two-sample AUC of 0.000 where 0.5
    means 'cannot tell apart'), a class missing on one side (pooled different class mixes), a --bootstrap or
    --seed out of range (tracebacks after all the work), --save-targets naming a folder (an error naming an
    internal temp file, after the run): each one line, exit 2, nothing written, nothing simulated."""
    monkeypatch.setattr(R, "simulate_images", lambda *a, **k: pytest.fail("simulated before refusing"))
    real = _blank_folder(tmp_path / "real")
    other = _blank_folder(tmp_path / "other", classes=("no", "sphere"), seed=1)
    fill = {"{tmp}": str(tmp_path), "{real}": str(real), "{other}": str(other)}
    argv = [fill.get(a, a) for a in argv]
    expected = expected.replace("{other}", str(other))
    base = ["realism", "--real", str(real), "--out", str(tmp_path / "out")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_committed_targets_come_from_the_real_sample():
    t = R.load_targets()
    assert t["n"] == 30 and "realdata" in t["source"]
    for k, v in t["statistics"].items():
        assert v["p10"] <= v["median"] <= v["p90"], k


def test_the_default_preset_keeps_the_real_look():
    """The default (realistic) preset's median of every statistic lies in the real sample's 10-90% range (the
    committed targets); the old common_task preset does not, so this test can fail."""
    t = R.load_targets()
    imgs = np.stack([img for c in _sim("realistic", 8, seed=11).values() for img in c])
    assert R.outside_targets(R.statistics(imgs), t) == {}
    old = np.stack([img for c in _sim("common_task", 8, seed=11).values() for img in c])
    assert {"log10_levels", "corner_mean", "ellipticity", "axis_angle_deg"} <= set(R.outside_targets(
        R.statistics(old), t))


def test_read_images_keeps_every_accepted_layout_as_float64(tmp_path):
    x = _norm(ring())
    d = tmp_path / "no"
    d.mkdir()
    np.save(d / "1.npy", x[None])
    np.save(d / "2.npy", x[:, :, None])
    np.save(d / "3.npy", x)
    imgs, labels = R.read_images(tmp_path)
    assert imgs.dtype == np.float64 and imgs.shape == (3, N, N) and labels.tolist() == [0, 0, 0]
    assert all(np.array_equal(img, x) for img in imgs)  # no float32 round trip: count levels stay apart
