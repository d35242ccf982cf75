"""Fit a smooth lens model to one image: the lens and source parameters that made it, as far as a smooth model says.

The model is the simulator's macro model: an SIE lens with external shear (lenstronomy ``SIE`` + ``SHEAR``) and an
elliptical Sersic source (``SERSIC_ELLIPSE``), seen through a Gaussian PSF on the 150 x 150, 0.05"/px grid, fitted
with lenstronomy's particle swarm optimiser (:class:`lenstronomy.Workflow.fitting_sequence.FittingSequence`).

A min-max normalised image of integer counts is ``x = (counts - min) / K`` with ``K = max - min``
(:func:`deeplense.realism.log10_levels`), so ``x K`` is the counts above the minimum. The fit subtracts the sky (the
mean of the corners, in counts) and weighs each pixel by the Poisson variance ``sky + model``. Substructure
(subhalos, a vortex) is not in the model: on ``sphere`` and ``vort`` images the smooth parameters absorb part of
it and the residuals keep the rest (a larger reduced chi-square).

Used by ``experiments/fit_real_lenses.py`` to read the real sample's lens and source parameters, from which the
``realistic`` preset draws its own (docs/simulation.md, "How real is the simulation").
"""

from __future__ import annotations

import numpy as np

from .util import DeepLenseError

LENS_PARAMETERS = ("theta_E", "e1", "e2", "center_x", "center_y")
SHEAR_PARAMETERS = ("gamma1", "gamma2")
SOURCE_PARAMETERS = ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")

# (initial value, initial spread, lower bound, upper bound) of every fitted parameter, arcsec where an angle
_LENS = {"theta_E": (1.3, 0.1, 0.6, 2.2), "e1": (-0.05, 0.1, -0.6, 0.6), "e2": (0.0, 0.1, -0.6, 0.6),
         "center_x": (0.0, 0.05, -0.3, 0.3), "center_y": (0.0, 0.05, -0.3, 0.3)}
_SHEAR = {"gamma1": (0.0, 0.05, -0.4, 0.4), "gamma2": (0.0, 0.05, -0.4, 0.4)}
_SOURCE = {"R_sersic": (0.3, 0.1, 0.02, 2.0), "n_sersic": (1.5, 0.5, 0.3, 6.0), "e1": (0.0, 0.1, -0.7, 0.7),
           "e2": (0.0, 0.1, -0.7, 0.7), "center_x": (0.0, 0.1, -1.0, 1.0), "center_y": (0.0, 0.1, -1.0, 1.0)}


def counts_and_sky(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(counts above the minimum, K, sky)`` of a min-max normalised image of integer counts; the sky is the mean
    of the four 10x10 corners, in counts."""
    from .realism import _corners, _levels

    x = np.asarray(x, dtype=np.float64)
    k = _levels(x)
    if not np.isfinite(k) or k < 2 or k > 1e5:
        raise DeepLenseError(f"K = {k:.4g} levels: not an image of integer counts (min-max normalised)")
    counts = np.rint(x * k)
    return counts, float(k), float(_corners(counts).mean())


def _grid(num_pix: int, pixel_scale: float):
    from lenstronomy.Util import util

    _, _, ra0, dec0, _, _, pix2angle, _ = util.make_grid_with_coordtransform(
        num_pix=num_pix, delta_pix=pixel_scale, center_ra=0, center_dec=0, subgrid_res=1, inverse=False)
    return {"ra_at_xy_0": ra0, "dec_at_xy_0": dec0, "transform_pix2angle": pix2angle}


def _params(table: dict) -> list[dict]:
    return [{k: v[0] for k, v in table.items()}, {k: v[1] for k, v in table.items()},
            {k: v[2] for k, v in table.items()}, {k: v[3] for k, v in table.items()}]


def fit_image(x: np.ndarray, *, psf_fwhm_arcsec: float, pixel_scale_arcsec: float = 0.05, particles: int = 80,
              iterations: int = 150, seed: int = 0) -> dict:
    """Fit the smooth model to one min-max normalised image of counts ``x`` (``(H, W)``).

    Two particle-swarm stages (``particles`` x ``iterations``, then half of each at a tenth of the spread around the
    best). Returns ``lens`` (SIE: theta_E, e1, e2, center_x, center_y), ``shear`` (gamma1, gamma2), ``source``
    (Sersic: R_sersic, n_sersic, e1, e2, center_x, center_y; lenstronomy's conventions, arcsec), ``amp_counts``
    (the Sersic amplitude, solved linearly, in counts: divide by an exposure time for counts/s), ``K``, ``sky``
    (counts per pixel) and ``chi2_red`` (sum of squared residuals over the variance ``sky + model``, per pixel).
    """
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Workflow.fitting_sequence import FittingSequence

    counts, k, sky = counts_and_sky(x)
    data = counts - sky
    kwargs_data = {"background_rms": float(np.sqrt(max(sky, 1e-3))), "exposure_time": 1.0, "image_data": data,
                   **_grid(data.shape[0], pixel_scale_arcsec)}
    kwargs_psf = {"psf_type": "GAUSSIAN", "fwhm": psf_fwhm_arcsec, "pixel_size": pixel_scale_arcsec,
                  "truncation": 3}
    numerics = {"supersampling_factor": 1, "supersampling_convolution": False}
    lens, shear, source = _params(_LENS), _params(_SHEAR), _params(_SOURCE)
    kwargs_params = {
        "lens_model": [[lens[0], {**shear[0], "ra_0": 0.0, "dec_0": 0.0}], [lens[1], shear[1]],
                       [{}, {"ra_0": 0.0, "dec_0": 0.0}], [lens[2], shear[2]], [lens[3], shear[3]]],
        "source_model": [[source[0]], [source[1]], [{}], [source[2]], [source[3]]],
    }
    model = {"lens_model_list": ["SIE", "SHEAR"], "source_light_model_list": ["SERSIC_ELLIPSE"]}
    # lenstronomy's swarm draws from numpy's legacy global generator: seed it, and put it back afterwards
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002
    try:
        fitting = FittingSequence({"multi_band_list": [[kwargs_data, kwargs_psf, numerics]],
                                   "multi_band_type": "single-band"}, model, {}, {"check_bounds": True},
                                  kwargs_params, verbose=False)
        fitting.fit_sequence([["PSO", {"sigma_scale": 1.0, "n_particles": particles, "n_iterations": iterations}],
                              ["PSO", {"sigma_scale": 0.1, "n_particles": max(2, particles // 2),
                                       "n_iterations": max(1, iterations // 2)}]])
        best = fitting.best_fit()
    finally:
        np.random.set_state(state)  # noqa: NPY002
    kl, ks = best["kwargs_lens"], best["kwargs_source"]
    ks = [{**ks[0], "amp": 1.0}]
    image = ImageModel(ImageData(**kwargs_data), PSF(**kwargs_psf), lens_model_class=LensModel(["SIE", "SHEAR"]),
                       source_model_class=LightModel(["SERSIC_ELLIPSE"]), kwargs_numerics=numerics)
    unit = image.image(kwargs_lens=kl, kwargs_source=ks)
    amp = float((unit * data).sum() / (unit * unit).sum())
    for _ in range(2):  # weighted least squares for the one linear amplitude
        var = sky + np.clip(amp * unit, 0, None)
        amp = float((unit * data / var).sum() / (unit * unit / var).sum())
    var = sky + np.clip(amp * unit, 0, None)
    return {
        "lens": {p: float(kl[0][p]) for p in LENS_PARAMETERS},
        "shear": {p: float(kl[1][p]) for p in SHEAR_PARAMETERS},
        "source": {p: float(ks[0][p]) for p in SOURCE_PARAMETERS},
        "amp_counts": amp, "K": k, "sky": sky,
        "chi2_red": float(((data - amp * unit) ** 2 / var).sum() / data.size),
    }
