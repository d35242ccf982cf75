"""The smooth lens fit: counts recovered from a normalised image, and a simulated image's own lens, shear and source
recovered by the fit (the evidence that the real sample's fitted parameters, from which the realistic preset draws
its own, mean what they say)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from deeplense.lensfit import counts_and_sky, fit_image
from deeplense.simulate import SimulationConfig, draw_parameters, einstein_radius_arcsec, simulate_image
from deeplense.util import DeepLenseError

REAL = SimulationConfig.from_preset("realistic")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


def test_counts_and_sky_undo_the_min_max_normalisation():
    rng = np.random.default_rng(0)
    counts = rng.poisson(9.0, (150, 150)).astype(float)
    counts[70:80, 70:80] += 700
    x = (counts - counts.min()) / (counts.max() - counts.min())
    c, k, sky = counts_and_sky(x)
    assert k == pytest.approx(counts.max() - counts.min())
    np.testing.assert_array_equal(c, counts - counts.min())
    assert sky == pytest.approx(9.0 - counts.min(), abs=0.5)
    with pytest.raises(DeepLenseError, match="not an image of integer counts"):
        counts_and_sky(rng.random((150, 150)))  # continuous values: no count scale


@pytest.mark.slow
def test_the_fit_recovers_a_simulated_lens():
    p = draw_parameters(REAL, 3, "val", "no", 2)
    x = simulate_image(REAL, 3, "val", "no", 2, dtype=np.float64)[0][0]
    fit = fit_image(x, psf_fwhm_arcsec=REAL.psf_fwhm_arcsec, particles=40, iterations=80)
    assert fit["chi2_red"] < 1.2  # the model that made the image fits it to the noise (read-out noise adds ~0.09)
    assert fit["lens"]["theta_E"] == pytest.approx(einstein_radius_arcsec(p.value("lens_mass_msun", REAL), REAL),
                                                   abs=0.03)
    assert fit["shear"]["gamma1"] == pytest.approx(p.value("shear_gamma1", REAL), abs=0.02)
    assert fit["source"]["center_x"] == pytest.approx(p.source_x, abs=0.03)
    assert fit["source"]["center_y"] == pytest.approx(p.source_y, abs=0.03)
    assert fit["source"]["n_sersic"] == pytest.approx(p.value("source_n_sersic", REAL), abs=0.15)
    # the amplitude in counts over the exposure is the source brightness in counts/s
    assert fit["amp_counts"] / p.exposure_s == pytest.approx(p.value("source_amp", REAL), rel=0.1)


@pytest.mark.slow
def test_fit_real_lenses_writes_numbers_and_resumes(tmp_path, capsys, monkeypatch):
    import fit_real_lenses

    for c in ("no", "sphere"):
        (tmp_path / "real" / c).mkdir(parents=True)
        np.save(tmp_path / "real" / c / "1.npy", simulate_image(REAL, 0, "val", c, 1, dtype=np.float64)[0])
    out = tmp_path / "fits.json"
    args = ["--real", str(tmp_path / "real"), "--out", str(out), "--particles", "8", "--iterations", "2",
            "--workers", "1"]
    assert fit_real_lenses.main(args) == 0
    record = json.loads(out.read_text())
    assert [f["image"] for f in record["fits"]] == ["no/1.npy", "sphere/1.npy"]
    assert record["summary"]["0.2"]["n"] == 2 and "lens.theta_E" in record["summary"]["0.2"]["parameters"]
    assert "versions" in record and record["command"].startswith("python experiments/fit_real_lenses.py")
    a, b = fit_real_lenses.readme_tables(record, record)  # the README's tables, from the file alone
    assert "| `lens.theta_E` |" in a and "| `source.radius` |" in a
    assert "on the 2 files fitted at every width" in b and '| 0.2" |' in b
    before = out.read_text()

    def refit(task):
        raise AssertionError(f"{task[0]} fitted again")

    monkeypatch.setattr(fit_real_lenses, "_fit", refit)
    assert fit_real_lenses.main(args) == 0  # nothing left to fit: the same fits, none redone
    assert json.loads(out.read_text())["fits"] == json.loads(before)["fits"]
    with pytest.raises(AssertionError, match="fitted again"):  # other settings: fitted anew
        fit_real_lenses.main([*args[:-2], "--workers", "1", "--seed", "1"])
    assert fit_real_lenses.main(["--real", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_psf_scan_table_compares_the_same_files_at_every_width():
    import copy

    import fit_real_lenses

    def fit(chi2, n):
        return {"lens": {"theta_E": 1.2, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0},
                "shear": {"gamma1": 0.1, "gamma2": 0.0},
                "source": {"R_sersic": 0.5, "n_sersic": n, "e1": 0.0, "e2": 0.0, "center_x": 0.1, "center_y": 0.0},
                "amp_counts": 4e4, "K": 800.0, "sky": 9.0, "chi2_red": chi2}

    fits = [{"image": f"no/{i}.npy", "class": "no", "psf_fwhm": w, "fit": fit(c, n)}
            for i, w, c, n in [(1, 0.2, 1.0, 1.5), (2, 0.2, 1.2, 1.5), (1, 0.1, 1.5, 1.0), (2, 0.1, 1.8, 1.0),
                               (3, 0.1, 0.5, 9.0)]]  # no/3.npy only at 0.1": left out of the comparison
    record = {"command": "c", "fits": fits, "summary": {"0.2": {"n": 2, "parameters": {
        k: {"median": 0.0, "p10": 0.0, "p90": 0.0, "median_per_class": {"no": 0.0}, "kruskal_p": None}
        for k in fit_real_lenses.flat(fit(1.0, 1.0))}}}}
    _, b = fit_real_lenses.readme_tables(record, copy.deepcopy(record))
    assert "on the 2 files fitted at every width" in b
    assert '| 0.1" | 1.650 | 1.500 | 1.00 | 0.500 |' in b  # medians of files 1 and 2 only; ratios 1.5 and 1.5
    assert '| 0.2" | 1.100 | 1.000 | 1.50 | 0.500 |' in b
