"""Simulate DeepLense-like strong-lensing images with lenstronomy, in the official dataset layout.

The recipe follows DeepLenseSim's "Model I" (the simulator behind the DeepLense datasets, on lenstronomy): an
SIE main lens with external shear at z = 0.5, a Sersic source at z = 1.0, a Gaussian PSF, Poisson and sky noise,
and per-image min-max normalisation. Substructure:

- ``no``: none;
- ``sphere``: 25 point-mass subhalos, masses from dN/dm ∝ m^-0.9 on [1e6, 1e10] Msun;
- ``vort``: a line of 100 equal point masses (total 3e10 Msun) through the lens centre, half-length
  L = 0.06" / (2 m_a / 1e-22 eV) for an axion mass m_a = 10^U(-24, -22) eV.

Every random draw of image ``index`` of ``(split, class)`` comes from a generator seeded by
``(seed, split, class, index)``, so the bytes do not depend on the number of workers or shards.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from .data import CLASSES, SPLITS
from .util import DeepLenseError, atomic_path, progress_bar, write_json_atomic, write_text_atomic

PRESETS = ("common_task", "model_i")
DISTANCE_CONVENTIONS = ("deeplense", "angular")


@dataclass(frozen=True)
class SimulationConfig:
    """Every physical setting of the simulator. Angles in arcsec, masses in solar masses.

    Attributes
    ----------
    preset : name of the preset these values came from (informational).
    num_pix : image side in pixels.
    pixel_scale_arcsec : pixel side, arcsec/pixel.
    z_lens, z_source : redshifts of the lens and the source.
    H0 : Hubble constant, km/s/Mpc (flat LambdaCDM).
    Om0, Ob0 : matter and baryon density parameters today.
    distance_convention : ``"deeplense"``: Einstein radii from *luminosity* distances with
        D_ls = D_s - D_l, as DeepLenseSim computes them (1.2815" for 1e12 Msun);
        ``"angular"``: from angular-diameter distances, the textbook formula (1.6645").
    lens_mass_msun : mass setting the SIE's Einstein radius through the point-mass formula.
    lens_e1, lens_e2 : SIE ellipticity components (lenstronomy convention), dimensionless.
    shear_gamma1, shear_gamma2 : external shear components, dimensionless.
    source_amp : Sersic amplitude (lenstronomy's surface brightness at R_sersic), counts/s/arcsec^2.
    source_R_sersic_arcsec : Sersic half-light radius, arcsec.
    source_n_sersic : Sersic index, dimensionless.
    source_e1, source_e2 : source ellipticity components.
    source_center_max_arcsec : source centre x and y each uniform in [-this, +this], arcsec.
    psf_fwhm_arcsec : Gaussian PSF full width at half maximum, arcsec.
    psf_truncation : PSF kernel truncation, in units of the Gaussian sigma.
    log10_exposure_s : exposure time t = 10^U(lo, hi) seconds.
    background_rms : Gaussian sky noise, counts/s per pixel.
    double_poisson : apply Poisson noise a second time after the sky noise, as DeepLenseSim does.
    n_subhalos : number of point-mass subhalos in ``sphere`` images.
    subhalo_mass_range_msun : (min, max) subhalo mass, Msun.
    subhalo_mass_slope : alpha in dN/dm ∝ m^-alpha.
    subhalo_radius_range_arcsec : subhalo distance from the lens centre, uniform in (min, max), arcsec.
    vortex_n_points : number of equal point masses along the vortex line.
    vortex_mass_msun : total vortex mass, Msun.
    log10_axion_mass_ev : axion mass m_a = 10^U(lo, hi) eV.
    vortex_length_scale_arcsec : L = this / (2 m_a / 1e-22 eV), the vortex half-length, arcsec.
    """

    preset: str = "common_task"
    num_pix: int = 150
    pixel_scale_arcsec: float = 0.05
    z_lens: float = 0.5
    z_source: float = 1.0
    H0: float = 70.0
    Om0: float = 0.3
    Ob0: float = 0.05
    distance_convention: str = "deeplense"
    lens_mass_msun: float = 1e12
    lens_e1: float = 0.1
    lens_e2: float = 0.0
    shear_gamma1: float = 0.05
    shear_gamma2: float = 0.0
    source_amp: float = 30.0
    source_R_sersic_arcsec: float = 1.0
    source_n_sersic: float = 2.0
    source_e1: float = -0.1
    source_e2: float = 0.1
    source_center_max_arcsec: float = 0.35
    psf_fwhm_arcsec: float = 0.087
    psf_truncation: float = 3.0
    log10_exposure_s: tuple[float, float] = (4.0, 4.5)
    background_rms: float = 0.01
    double_poisson: bool = True
    n_subhalos: int = 25
    subhalo_mass_range_msun: tuple[float, float] = (1e6, 1e10)
    subhalo_mass_slope: float = 0.9
    subhalo_radius_range_arcsec: tuple[float, float] = (0.25, 2.0)
    vortex_n_points: int = 100
    vortex_mass_msun: float = 3e10
    log10_axion_mass_ev: tuple[float, float] = (-24.0, -22.0)
    vortex_length_scale_arcsec: float = 0.06

    @classmethod
    def from_preset(cls, name: str = "common_task") -> SimulationConfig:
        """``model_i``: DeepLenseSim's Model I recipe literally (amp 20, R_sersic 0.25", n_sersic 1).
        ``common_task`` (default): the same lens and noise recipe with a larger, more concentrated and
        brighter source (R_sersic 1.0", n_sersic 2, amp 30) and 10x the exposure, which reproduces the
        smoother rings and darker sky of the common-task images (statistics in the README)."""
        if name == "common_task":
            return cls()
        if name == "model_i":
            return cls(preset="model_i", source_amp=20.0, source_R_sersic_arcsec=0.25, source_n_sersic=1.0,
                       log10_exposure_s=(3.0, 3.5))
        raise DeepLenseError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")

    def replace(self, **changes) -> SimulationConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- physics
@lru_cache(maxsize=16)
def _theta_e_per_sqrt_msun(convention: str, H0: float, Om0: float, Ob0: float, z_l: float, z_s: float) -> float:
    import astropy.units as u
    from astropy import constants as const
    from astropy.cosmology import FlatLambdaCDM

    cosmo = FlatLambdaCDM(H0=H0, Om0=Om0, Ob0=Ob0)
    if convention == "deeplense":
        d_l = cosmo.luminosity_distance(z_l)
        d_s = cosmo.luminosity_distance(z_s)
        d_ls = d_s - d_l
    elif convention == "angular":
        d_l = cosmo.angular_diameter_distance(z_l)
        d_s = cosmo.angular_diameter_distance(z_s)
        d_ls = cosmo.angular_diameter_distance(z_l, z_s)
    else:
        raise DeepLenseError(f"unknown distance convention {convention!r} (choose from "
                             f"{', '.join(DISTANCE_CONVENTIONS)})")
    k = 4 * const.G * u.M_sun / const.c**2 * d_ls / (d_l * d_s)
    return float(np.sqrt(k.decompose().value) * 180 / math.pi * 3600)


def einstein_radius_arcsec(mass_msun, config: SimulationConfig | None = None):
    """Point-mass Einstein radius, theta_E = sqrt(4 G M / c^2 * D_ls / (D_l D_s)), in arcsec.

    The distances follow ``config.distance_convention`` (see :class:`SimulationConfig`).
    """
    c = config or SimulationConfig()
    k = _theta_e_per_sqrt_msun(c.distance_convention, c.H0, c.Om0, c.Ob0, c.z_lens, c.z_source)
    return k * np.sqrt(mass_msun)


@dataclass(frozen=True)
class ImageParameters:
    """The random draws of one image. Positions in arcsec, masses in Msun."""

    split: str
    cls: str
    index: int
    source_x: float
    source_y: float
    exposure_s: float
    subhalo_masses: np.ndarray  # (n_subhalos,) Msun; empty unless sphere
    subhalo_x: np.ndarray
    subhalo_y: np.ndarray
    axion_mass_ev: float = float("nan")
    vortex_half_length: float = float("nan")  # arcsec
    vortex_angle: float = float("nan")  # radians


def _rng(seed: int, split: str, cls: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), CLASSES.index(cls),
                                                         int(index)]))


def draw_parameters(config: SimulationConfig, seed: int, split: str, cls: str, index: int,
                    rng: np.random.Generator | None = None) -> ImageParameters:
    """Draw the physical parameters of image ``index`` of ``(split, cls)``; deterministic for the seed."""
    rng = rng or _rng(seed, split, cls, index)
    c = config
    sx, sy = rng.uniform(-c.source_center_max_arcsec, c.source_center_max_arcsec, 2)
    exposure = 10 ** rng.uniform(*c.log10_exposure_s)
    empty = np.zeros(0)
    masses, hx, hy = empty, empty, empty
    m_a = length = angle = float("nan")
    if cls == "sphere":
        # inverse CDF of p(m) ∝ m^-alpha on [m_lo, m_hi]
        a = 1.0 - c.subhalo_mass_slope
        lo, hi = c.subhalo_mass_range_msun
        u = rng.uniform(0, 1, c.n_subhalos)
        masses = (lo**a + u * (hi**a - lo**a)) ** (1 / a)
        r = rng.uniform(*c.subhalo_radius_range_arcsec, c.n_subhalos)
        phi = rng.uniform(0, 2 * np.pi, c.n_subhalos)
        hx, hy = r * np.cos(phi), r * np.sin(phi)
    elif cls == "vort":
        m_a = 10 ** rng.uniform(*c.log10_axion_mass_ev)
        length = c.vortex_length_scale_arcsec / (2 * m_a / 1e-22)
        angle = rng.uniform(0, np.pi)
    elif cls != "no":
        raise DeepLenseError(f"unknown class {cls!r}")
    return ImageParameters(split, cls, int(index), float(sx), float(sy), float(exposure), masses, hx, hy,
                           float(m_a), float(length), float(angle))


def lens_model_list(config: SimulationConfig, cls: str) -> list[str]:
    n = {"no": 0, "sphere": config.n_subhalos, "vort": config.vortex_n_points}[cls]
    return ["SIE", "SHEAR"] + ["POINT_MASS"] * n


def lens_kwargs(config: SimulationConfig, p: ImageParameters) -> list[dict]:
    """lenstronomy keyword arguments for :func:`lens_model_list`, in the same order."""
    c = config
    kw = [
        {"theta_E": float(einstein_radius_arcsec(c.lens_mass_msun, c)), "e1": c.lens_e1, "e2": c.lens_e2,
         "center_x": 0.0, "center_y": 0.0},
        {"gamma1": c.shear_gamma1, "gamma2": c.shear_gamma2, "ra_0": 0.0, "dec_0": 0.0},
    ]
    if p.cls == "sphere":
        te = einstein_radius_arcsec(p.subhalo_masses, c)
        kw += [{"theta_E": float(t), "center_x": float(x), "center_y": float(y)}
               for t, x, y in zip(te, p.subhalo_x, p.subhalo_y, strict=True)]
    elif p.cls == "vort":
        te = float(einstein_radius_arcsec(c.vortex_mass_msun / c.vortex_n_points, c))
        s = np.linspace(-p.vortex_half_length, p.vortex_half_length, c.vortex_n_points)
        xs, ys = s * np.cos(p.vortex_angle), s * np.sin(p.vortex_angle)
        kw += [{"theta_E": te, "center_x": float(x), "center_y": float(y)} for x, y in zip(xs, ys, strict=True)]
    return kw


def source_kwargs(config: SimulationConfig, p: ImageParameters) -> list[dict]:
    c = config
    return [{"amp": c.source_amp, "R_sersic": c.source_R_sersic_arcsec, "n_sersic": c.source_n_sersic,
             "e1": c.source_e1, "e2": c.source_e2, "center_x": p.source_x, "center_y": p.source_y}]


_IMAGE_MODELS: dict = {}


def image_model(config: SimulationConfig, cls: str):
    """lenstronomy ``ImageModel`` for a class, built once per process (the profile list is fixed per class)."""
    key = (config, cls)
    if key not in _IMAGE_MODELS:
        from lenstronomy.Data.pixel_grid import PixelGrid
        from lenstronomy.Data.psf import PSF
        from lenstronomy.ImSim.image_model import ImageModel
        from lenstronomy.LensModel.lens_model import LensModel
        from lenstronomy.LightModel.light_model import LightModel
        from lenstronomy.Util import util

        _, _, ra0, dec0, _, _, pix2angle, _ = util.make_grid_with_coordtransform(
            num_pix=config.num_pix, delta_pix=config.pixel_scale_arcsec, center_ra=0, center_dec=0,
            subgrid_res=1, inverse=False)
        grid = PixelGrid(nx=config.num_pix, ny=config.num_pix, transform_pix2angle=pix2angle,
                         ra_at_xy_0=ra0, dec_at_xy_0=dec0)
        psf = PSF(psf_type="GAUSSIAN", fwhm=config.psf_fwhm_arcsec, truncation=config.psf_truncation,
                  pixel_size=config.pixel_scale_arcsec)
        _IMAGE_MODELS[key] = ImageModel(
            grid, psf, lens_model_class=LensModel(lens_model_list(config, cls)),
            source_model_class=LightModel(["SERSIC_ELLIPSE"]),
            kwargs_numerics={"supersampling_factor": 1, "supersampling_convolution": False})
    return _IMAGE_MODELS[key]


def render_noise_free(config: SimulationConfig, p: ImageParameters) -> np.ndarray:
    """Noise-free lensed image in counts/s per pixel, float64 ``(num_pix, num_pix)``."""
    return image_model(config, p.cls).image(kwargs_lens=lens_kwargs(config, p),
                                            kwargs_source=source_kwargs(config, p))


def add_noise(model: np.ndarray, exposure_s: float, config: SimulationConfig, rng: np.random.Generator):
    """Poisson noise on the counts, Gaussian sky, and (as DeepLenseSim) a second Poisson draw. counts/s."""
    t = exposure_s
    img = rng.poisson(np.clip(model, 0, None) * t) / t
    img = img + rng.normal(0.0, config.background_rms, model.shape)
    if config.double_poisson:
        pos = np.clip(img, 0, None)
        img = img + (rng.poisson(pos * t) / t - pos)
    return img


def simulate_image(config: SimulationConfig, seed: int, split: str, cls: str, index: int,
                   ) -> tuple[np.ndarray, ImageParameters]:
    """One image as float32 ``(1, num_pix, num_pix)`` min-max normalised to [0, 1], with its parameters."""
    rng = _rng(seed, split, cls, index)
    p = draw_parameters(config, seed, split, cls, index, rng)
    img = add_noise(render_noise_free(config, p), p.exposure_s, config, rng)
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo)
    return img.astype(np.float32)[None], p


# ----------------------------------------------------------------------------------------------- dataset
MANIFEST_COLUMNS = (
    "split", "class", "index", "path", "source_x_arcsec", "source_y_arcsec", "source_R_sersic_arcsec",
    "source_n_sersic", "exposure_s", "lens_einstein_radius_arcsec", "n_subhalos", "subhalo_mass_total_msun",
    "subhalo_mass_min_msun", "subhalo_mass_max_msun", "vortex_n_points", "vortex_mass_total_msun",
    "vortex_half_length_arcsec", "vortex_angle_rad", "axion_mass_ev",
)


def manifest_row(config: SimulationConfig, p: ImageParameters) -> list[str]:
    def f(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))

    sphere, vort = p.cls == "sphere", p.cls == "vort"
    return [
        p.split, p.cls, str(p.index), f"{p.split}/{p.cls}/{p.index}.npy", f(p.source_x), f(p.source_y),
        f(config.source_R_sersic_arcsec), f(config.source_n_sersic), f(p.exposure_s),
        f(einstein_radius_arcsec(config.lens_mass_msun, config)),
        str(len(p.subhalo_masses)) if sphere else "0",
        f(p.subhalo_masses.sum()) if sphere else "", f(p.subhalo_masses.min()) if sphere else "",
        f(p.subhalo_masses.max()) if sphere else "",
        str(config.vortex_n_points) if vort else "0", f(config.vortex_mass_msun) if vort else "",
        f(p.vortex_half_length), f(p.vortex_angle), f(p.axion_mass_ev),
    ]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise DeepLenseError(f"--shard {text}: expected K/N with integers, e.g. 0/4") from None
    if n < 1 or not 0 <= k < n:
        raise DeepLenseError(f"--shard {text}: need 0 <= K < N")
    return k, n


def _work(task) -> int:
    config, seed, out, split, cls, index = task
    path = Path(out) / split / cls / f"{index}.npy"
    if path.exists():
        return 0
    img, _ = simulate_image(config, seed, split, cls, index)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, img, allow_pickle=False)
    return 1


def _init_worker() -> None:
    # One process per core: keep the numerical libraries single-threaded inside each worker.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"


def simulate_dataset(out: str | os.PathLike, *, train_per_class: int, val_per_class: int, seed: int = 0,
                     workers: int = 1, config: SimulationConfig | None = None,
                     shard: tuple[int, int] | None = None, progress: bool = True) -> dict:
    """Write ``out/{train,val}/{no,sphere,vort}/<i>.npy`` (i from 1) and a manifest CSV.

    Files already present are skipped (not rewritten), so an interrupted run completes when restarted.
    With ``shard=(k, n)`` only images whose position in (split, class, index) order is k mod n are
    written, and the manifest is ``manifest.shard-k-of-n.csv``.

    Returns a dict with ``written``, ``skipped`` and ``manifest`` (path).
    """
    import multiprocessing as mp

    config = config or SimulationConfig()
    if train_per_class < 1 or val_per_class < 1:
        raise DeepLenseError("--train-per-class and --val-per-class must be at least 1")
    if workers < 1:
        raise DeepLenseError("--workers must be at least 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DeepLenseError(f"{out}: exists and is not a folder")
    settings = {"seed": int(seed), "config": config.to_dict()}
    settings_path = out / "simulation.json"
    if settings_path.exists():
        try:
            old = json.loads(settings_path.read_text())
        except (OSError, ValueError):
            raise DeepLenseError(f"{settings_path}: unreadable; remove it or choose another --out") from None
        if {k: old.get(k) for k in settings} != json.loads(json.dumps(settings)):
            raise DeepLenseError(f"{settings_path}: this folder was simulated with another seed or config; "
                                 f"choose another --out")
    for s in SPLITS:
        for c in CLASSES:
            (out / s / c).mkdir(parents=True, exist_ok=True)
    from .util import versions

    write_json_atomic(settings_path, {**settings, "versions": versions()})

    counts = {"train": train_per_class, "val": val_per_class}
    order = [(s, c, i) for s in SPLITS for c in CLASSES for i in range(1, counts[s] + 1)]
    if shard:
        order = [t for pos, t in enumerate(order) if pos % shard[1] == shard[0]]
    tasks = [(config, int(seed), str(out), s, c, i) for s, c, i in order]
    written = 0
    bar = progress_bar(total=len(tasks), desc="simulating", unit="img", disable=not progress)
    if workers == 1:
        for t in tasks:
            written += _work(t)
            bar.update()
    else:
        ctx = mp.get_context("spawn")  # safe beside torch and on every OS
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            for n in pool.imap_unordered(_work, tasks, chunksize=max(1, min(16, len(tasks) // (8 * workers)))):
                written += n
                bar.update()
    bar.close()

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    for s, c, i in order:
        w.writerow(manifest_row(config, draw_parameters(config, seed, s, c, i)))
    name = f"manifest.shard-{shard[0]}-of-{shard[1]}.csv" if shard else "manifest.csv"
    write_text_atomic(out / name, buf.getvalue())
    return {"written": written, "skipped": len(tasks) - written, "manifest": str(out / name)}


# ----------------------------------------------------------------------------------------------- statistics
def image_statistics(images: np.ndarray) -> dict[str, float]:
    """Six statistics that say whether simulated images look like the common-task ones.

    ``ring_fwhm_px`` (median width of the radial profile's peak, px), ``frac_gt_0.1`` and ``frac_gt_0.3``
    (fraction of pixels above 0.1 and 0.3), ``mean`` (mean pixel value), ``corner_std`` (median standard
    deviation of the four 20 px corners: the sky noise after normalisation) and ``peak_radius_px`` (median
    radius of the brightest ring, px). ``images``: ``(N, 1, H, W)`` or ``(N, H, W)`` in [0, 1].
    """
    x = np.asarray(images, dtype=np.float64).reshape(len(images), images.shape[-2], images.shape[-1])
    n, h, w = x.shape
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2).astype(int)
    nbins = r.max() + 1
    counts = np.bincount(r.ravel(), minlength=nbins)
    peaks, fwhms = [], []
    for img in x:
        prof = np.bincount(r.ravel(), weights=img.ravel(), minlength=nbins) / np.maximum(counts, 1)
        k = int(np.argmax(prof[: min(h, w) // 2]))
        peaks.append(k)
        half = prof[k] / 2 + prof[min(h, w) // 2 - 1] / 2
        above = np.flatnonzero(prof[: min(h, w) // 2] >= half)
        fwhms.append(float(above.max() - above.min() + 1) if above.size else float("nan"))
    c = 20
    corners = np.stack([x[:, :c, :c], x[:, :c, -c:], x[:, -c:, :c], x[:, -c:, -c:]], axis=1)
    return {
        "ring_fwhm_px": float(np.nanmedian(fwhms)),
        "frac_gt_0.1": float((x > 0.1).mean()),
        "frac_gt_0.3": float((x > 0.3).mean()),
        "mean": float(x.mean()),
        "corner_std": float(np.median(corners.reshape(n, 4, -1).std(axis=2))),
        "peak_radius_px": float(np.median(peaks)),
    }


DEMO_TRAIN_PER_CLASS = 1000
DEMO_VAL_PER_CLASS = 500


def default_simulated_dataset(seed: int = 0, train_per_class: int = DEMO_TRAIN_PER_CLASS,
                              val_per_class: int = DEMO_VAL_PER_CLASS, workers: int | None = None,
                              progress: bool = True) -> Path:
    """The simulated ``common_task`` set used when no dataset is given, generated once into
    ``$DEEPLENSE_CACHE/simulated/...`` (resumable; a finished set is reused)."""
    from .util import cache_dir

    out = cache_dir() / "simulated" / f"common_task-seed{seed}-train{train_per_class}-val{val_per_class}"
    if not (out / "manifest.csv").exists():
        simulate_dataset(out, train_per_class=train_per_class, val_per_class=val_per_class, seed=seed,
                         workers=workers or max(1, os.cpu_count() or 1), progress=progress)
    return out
