"""Where does the network look? Saliency maps from maintained libraries, and a check of them against the true
substructure of simulated images.

- **Grad-CAM** and **Grad-CAM++** (pytorch-grad-cam) on each arch's last feature map (:func:`target_layer`; the
  transformers' tokens reshaped to a map), and **integrated gradients** (captum; 32 steps from a black image) as a
  second, gradient-based opinion. The maps are computed through the run's own input transform, so they come out
  on the pixels of the native crop the network saw; :func:`saliency` places them on the full native image (zero
  outside the crop) and normalises each to a total of 1. With ``tta`` the map is the mean over the symmetries
  the evaluation averaged, each mapped back onto the original orientation.
- **Enrichment** (:func:`enrichment`): the fraction of an image's saliency within ``radius`` pixels of its true
  substructure (each ``sphere`` subhalo; the ``vort`` line between its end points, from the simulator's
  ``substructure.csv``), divided by the same fraction for the same structure turned about the lens centre by
  random angles (same distances from the centre, so the ring's own brightness is controlled for). The ratio of
  the means over images, with a bootstrap interval over images. About 1: the maps are not drawn to the
  substructure; well above 1: they are.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .data import CLASSES
from .util import DeepLenseError

METHODS = ("gradcam", "gradcam++", "integrated_gradients")
"""The saliency methods :func:`saliency` computes."""
RADIUS_PX = 5.0
"""Pixels around the true substructure counted as "near" by :func:`enrichment` (a quarter of the Einstein radius
at 0.05" per pixel; the PSF's FWHM is a few pixels)."""
IG_STEPS = 32


def target_layer(model, arch: str):
    """``(layer, reshape)``: the module whose output Grad-CAM weighs for ``arch`` (the last feature map before
    pooling) and the function turning that output into ``(B, C, h, w)`` (None where it already is one)."""
    import math

    if arch in ("resnet34", "resnet18", "resnet50", "resnet34_attn"):
        return model.layer4[-1], None
    if arch in ("efficientnet_b0", "efficientnet_b3", "convnext_tiny"):
        return model.features[-1], None
    if arch == "swin_t":  # (B, h, w, C)
        return model.features[-1], lambda t: t.permute(0, 3, 1, 2)
    if arch == "maxvit_t":
        return model.blocks[-1], None
    if arch == "vit_b_16":  # (B, 1 + h w, C) tokens after the last block's first norm; drop the class token

        def tokens(t):
            side = math.isqrt(t.shape[1] - 1)
            return t[:, 1:, :].reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)

        return model.encoder.layers[-1].ln_1, tokens
    if arch == "lensnet":
        return model.stages[-1], None
    if arch == "d4net":  # the maximum over the group: the last map, invariant (turned with the input)
        return model.pool, None
    raise DeepLenseError(f"explain: no saliency target layer for arch {arch!r}")


def _inverse(k: int) -> int:
    """The D4 element undoing :func:`~deeplense.transforms.d4_transform`'s ``k``: flips are their own inverse."""
    return k if k >= 4 else (4 - k) % 4


def _wrapped(model, config):
    """The network with the run's input transform in front: it takes the native crop ``(B, 1, c, c)`` in [0, 1],
    so gradients and maps come out on the pixels the image has."""
    import torch

    from .transforms import input_fn

    fn = input_fn(config)

    class WithInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(fn(x))

    return WithInput().eval()


def _maps_one_view(wrapped, layer, reshape, x, targets, method: str):
    """Non-negative maps ``(B, c, c)`` of ``method`` for the crops ``x`` and target classes ``targets``."""
    import torch

    if method == "integrated_gradients":
        from captum.attr import IntegratedGradients

        attr = IntegratedGradients(wrapped).attribute(x, baselines=torch.zeros_like(x),
                                                      target=[int(t) for t in targets], n_steps=IG_STEPS,
                                                      internal_batch_size=len(x) * 8)
        return attr.abs().sum(1).detach().cpu().numpy()
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = GradCAM if method == "gradcam" else GradCAMPlusPlus
    with cls(model=wrapped, target_layers=[layer], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def saliency(model, config, crops: np.ndarray, targets, *, method: str = "gradcam", tta: bool = False,
             native: int | None = None, batch_size: int = 16) -> np.ndarray:
    """Saliency maps ``(N, native, native)`` float64, each summing to 1 (0 outside the crop), of ``model`` (the
    run's network on the CPU or its device) for the crops ``(N, 1, c, c)`` in [0, 1] (:func:`native_crop`) and
    the classes ``targets`` ``(N,)``. ``native``: the side of the full image (default: the crop's; the crop is
    central, as :func:`~deeplense.transforms.native_crop` takes it)."""
    import torch

    from .transforms import d4_transform, tta_views

    if method not in METHODS:
        raise DeepLenseError(f"unknown saliency method {method!r} (choose from {', '.join(METHODS)})")
    device = next(model.parameters()).device
    wrapped = _wrapped(model, config)
    layer, reshape = target_layer(model, config.arch)
    views = tta_views(config, tta)
    c = crops.shape[-1]
    native = native or c
    o = (native - c) // 2
    out = np.zeros((len(crops), native, native))
    for s in range(0, len(crops), batch_size):
        x = torch.as_tensor(np.asarray(crops[s : s + batch_size]), dtype=torch.float32, device=device)
        t = np.asarray(targets[s : s + batch_size])
        acc = np.zeros((len(x), c, c))
        for k in views:  # each view's map, normalised, turned back onto the image's orientation
            m = _maps_one_view(wrapped, layer, reshape, d4_transform(x, k) if k else x, t, method)
            acc += _unit(d4_transform(torch.as_tensor(np.asarray(m, dtype=np.float64)), _inverse(k)).numpy())
        out[s : s + len(x), o : o + c, o : o + c] = acc / len(views)
    return out


def _unit(maps: np.ndarray) -> np.ndarray:
    """Each map clipped at 0 and divided by its total (a map of zeros becomes uniform: no preference)."""
    maps = np.clip(maps, 0, None)
    total = maps.sum(axis=(1, 2), keepdims=True)
    return np.divide(maps, total, out=np.full_like(maps, 1.0 / maps[0].size), where=total > 0)



# ----------------------------------------------------------------------------------------------- enrichment
def read_substructure(data: str | os.PathLike) -> dict:
    """``{relative path: (kind, (K, 2) array of column, row)}`` from ``DATA/substructure.csv``."""
    path = Path(data) / "substructure.csv"
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        out: dict = {}
        for r in rows:
            kind, points = out.get(r["path"], (r["kind"], []))
            points.append((float(r["column"]), float(r["row"])))
            out[r["path"]] = (kind, points)
    except FileNotFoundError:
        raise DeepLenseError(f"{path}: not found (only sets written by `python -m deeplense simulate` record where "
                             f"their substructure is; the real data cannot be checked this way)") from None
    except (OSError, KeyError, ValueError, csv.Error) as exc:
        raise DeepLenseError(f"{path}: unreadable ({exc})") from None
    return {p: (k, np.asarray(v, dtype=np.float64)) for p, (k, v) in out.items()}


def _distance(shape, kind: str, points: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the structure: the nearest point, or for ``vortex_end`` the segment between the
    two ends."""
    rows, cols = np.indices(shape, dtype=np.float64)
    if kind == "vortex_end":
        a, b = points[0], points[1]
        d = b - a
        t = np.clip(((cols - a[0]) * d[0] + (rows - a[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
        return np.hypot(cols - (a[0] + t * d[0]), rows - (a[1] + t * d[1]))
    return np.min([np.hypot(cols - x, rows - y) for x, y in points], axis=0)


def _turned(kind: str, points: np.ndarray, centre: float, rng: np.random.Generator) -> np.ndarray:
    """The structure turned about the lens centre by random angles: each subhalo its own, a vortex line whole."""
    rel = points - centre
    a = rng.uniform(0, 2 * np.pi, 1 if kind == "vortex_end" else len(points))
    a = np.broadcast_to(a, (len(points),))
    cos, sin = np.cos(a), np.sin(a)
    return np.c_[rel[:, 0] * cos - rel[:, 1] * sin, rel[:, 0] * sin + rel[:, 1] * cos] + centre


def near_fraction(smap: np.ndarray, kind: str, points: np.ndarray, radius: float = RADIUS_PX) -> float:
    """The fraction of the map's total within ``radius`` pixels of the structure."""
    total = float(smap.sum())
    return float(smap[_distance(smap.shape, kind, points) <= radius].sum() / total) if total > 0 else 0.0


def enrichment(maps: np.ndarray, structures: list, *, radius: float = RADIUS_PX, n_random: int = 16,
               n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """The saliency enrichment near the true substructure (module docstring) of the maps ``(N, H, W)`` and their
    ``structures`` (``(kind, points)`` per map; pixel coordinates, the lens at the grid's centre):
    ``{"ratio", "ci", "ideal_ratio", "near_true", "near_random", "n", "radius_px", "n_random"}``; ``ideal_ratio``:
    the ratio of maps spread evenly over the near region itself, the scale to read ``ratio`` against."""
    if len(maps) != len(structures) or len(maps) == 0:
        raise ValueError(f"expected one structure per map and at least one map, got {len(maps)} and "
                         f"{len(structures)}")
    rng = np.random.default_rng(seed)
    centre = (maps.shape[-1] - 1) / 2
    true = np.array([near_fraction(m, k, p, radius) for m, (k, p) in zip(maps, structures, strict=True)])
    rand = np.array([np.mean([near_fraction(m, k, _turned(k, p, centre, rng), radius) for _ in range(n_random)])
                     for m, (k, p) in zip(maps, structures, strict=True)])
    ratio = float(true.mean() / rand.mean()) if rand.mean() > 0 else float("nan")
    # the scale: the ratio of maps spread evenly over the near region itself (the most a map can reach, about;
    # many subhalos cover much of the disc, so their ideal is lower than a vortex line's)
    ideal = [(_distance(maps.shape[1:], k, p) <= radius).astype(np.float64) for k, p in structures]
    rng_ideal = np.random.default_rng(seed + 1)
    ideal_true = np.mean([near_fraction(m, k, p, radius) for m, (k, p) in zip(ideal, structures, strict=True)])
    ideal_rand = np.mean([near_fraction(m, k, _turned(k, p, centre, rng_ideal), radius)
                          for m, (k, p) in zip(ideal, structures, strict=True) for _ in range(4)])
    boot = []
    for _ in range(n_bootstrap if len(true) >= 2 else 0):  # one image: no interval (evaluate's "n/a")
        i = rng.integers(0, len(true), len(true))
        if rand[i].mean() > 0:
            boot.append(true[i].mean() / rand[i].mean())
    return {"ratio": ratio, "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else None,
            "ideal_ratio": float(ideal_true / ideal_rand) if ideal_rand > 0 else float("nan"),
            "near_true": float(true.mean()), "near_random": float(rand.mean()), "n": int(len(true)),
            "radius_px": float(radius), "n_random": int(n_random)}


# ----------------------------------------------------------------------------------------------- commands
def _model(checkpoint, device):
    from .checkpoint import config_of, load_checkpoint, model_from_checkpoint
    from .device import pick_device

    dev = pick_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    config = config_of(ckpt, checkpoint)
    return ckpt, config, model_from_checkpoint(ckpt, dev, checkpoint)


def output_names(files) -> list[str]:
    """A distinct output name per file: ``<folder>_<name>`` (``no_1``), with more of the path in front where two
    files would share one (``train_no_1`` and ``val_no_1``), and ``-2``, ``-3`` after names that still collide
    (``a_b/c`` against ``a/b_c``). Unique for any list of distinct files."""
    import os

    parts = [tuple(q for q in Path(os.path.abspath(f)).with_suffix("").parts if q not in ("/", "\\")) or ("x",)
             for f in files]
    depth = [min(2, len(p)) for p in parts]
    while True:
        names = ["_".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        grow = [i for g in groups.values() if len({parts[j] for j in g}) > 1 for i in g if depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    taken = set()
    for i, n in enumerate(out):  # a "-2" that is another file's own name
        while n in taken:
            n += "-x"
        taken.add(n)
        out[i] = n
    return out


def explain_files(checkpoint, paths: list[str], out, *, methods=METHODS, tta: bool = False, device: str | None = None,
                  allow_pickle: bool = False) -> list[Path]:
    """For each ``.npy`` file (or each under a folder): the image, each method's map over it (for the predicted
    class) and the predicted probabilities, as ``OUT/<name>.png|pdf``; the maps in ``OUT/saliency.npz``. Returns
    the files written."""
    from . import plots
    from .data import read_image
    from .engine import predict_proba
    from .evaluate import _expand
    from .transforms import native_crop
    from .util import atomic_path

    ckpt, config, model = _model(checkpoint, device)
    files, seen = [], set()
    for f in _expand(paths):  # each file once, in the order given
        if f.resolve() not in seen:
            seen.add(f.resolve())
            files.append(f)
    images = [read_image(f, allow_pickle=allow_pickle) for f in files]
    odd = next((i for i, im in enumerate(images) if im.shape != images[0].shape or im.shape[0] != im.shape[1]), None)
    if odd is not None:
        raise DeepLenseError(f"{files[odd]}: shape {images[odd].shape}; explain takes square images of one size "
                             f"({files[0]}: {images[0].shape})")
    trained = (ckpt.get("data") or {}).get("image_shape")
    if trained and tuple(trained) != images[0].shape:
        raise DeepLenseError(f"{files[0]}: a {images[0].shape[0]}x{images[0].shape[1]} image, but {checkpoint} was "
                             f"trained on {trained[0]}x{trained[1]} images")
    arr = np.stack(images)[:, None]
    crops = native_crop(arr, np.arange(len(arr)), config.crop)
    device = next(model.parameters()).device
    probs = predict_proba(model, crops, config, device, tta=tta)
    pred = probs.argmax(1)
    maps = {m: saliency(model, config, np.asarray(crops), pred, method=m, tta=tta, native=arr.shape[-1])
            for m in methods}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (f, name) in enumerate(zip(files, output_names(files), strict=True)):
        stem = out / name
        written += plots.saliency_panels(arr[i, 0], {m: maps[m][i] for m in methods}, probs[i],
                                         stem, title=f"{f.parent.name}/{f.name}: predicted {CLASSES[pred[i]]}"
                                                     f"{', TTA' if tta else ''}")
    with atomic_path(out / "saliency.npz", suffix=".npz") as tmp:
        np.savez(tmp, paths=np.array([str(f) for f in files]), probabilities=probs,
                 **{m.replace("+", "p"): maps[m].astype(np.float32) for m in methods})
    return [*written, out / "saliency.npz"]


def explain_evaluation(evaluation, out, *, per_class: int = 50, methods=METHODS, radius: float = RADIUS_PX,
                       device: str | None = None, n_bootstrap: int = 1000, draw: int = 4,
                       figures: str | os.PathLike | None = None) -> dict:
    """Saliency against the truth on the images an ``evaluate`` run scored (its folder: ``metrics.json`` and
    ``predictions.npz``; the checkpoint, data, split and TTA setting are read from there): the enrichment per class
    and method for up to ``per_class`` images per class (``sphere`` and ``vort``; the maps are for the true
    class), written to ``OUT/enrichment.json``; a figure of ``draw`` images per class with the true substructure
    marked, ``FIGURES/saliency_examples.png|pdf`` (``figures`` default ``out``)."""
    from .evaluate import evaluated_split
    from .plots import SALIENCY_EXAMPLES, draw_saliency_examples, save_saliency_examples
    from .transforms import native_crop
    from .util import versions, write_json_atomic

    ev = Path(evaluation)
    split = evaluated_split(ev, "the saliency maps")
    prov, labels, idx, images, source = (split.metrics["provenance"], split.labels, split.indices, split.images,
                                         split.split)
    data = prov["data"]["root"]
    truth = read_substructure(data)
    ckpt, config, model = _model(prov["checkpoint"], device)
    _check_evaluated_checkpoint(ev, prov, ckpt)
    tta = bool(prov.get("tta"))
    files = split.files
    result: dict = {"evaluation": str(ev.resolve()), "checkpoint": prov["checkpoint"], "data": str(data),
                    "split_description": prov.get("split_description"), "heldout_check": prov.get("heldout_check"),
                    "tta": tta, "arch": config.arch, "radius_px": radius, "per_class": {}, "versions": versions()}
    shown = {}
    for k, cls in enumerate(CLASSES):
        if cls == "no":
            continue
        chosen = idx[labels == k][:per_class]
        rel = [_relative(files[i], source) for i in chosen]
        missing = [r for r in rel if r not in truth]
        if missing:
            raise DeepLenseError(f"{Path(data) / 'substructure.csv'}: lists no substructure for {missing[0]} "
                                 f"(a set simulated before substructure.csv existed? simulate it again)")
        crops = np.asarray(native_crop(images, chosen, config.crop))
        structures = [truth[r] for r in rel]
        result["per_class"][cls] = {"n": int(len(chosen))}
        for m in methods:
            maps = saliency(model, config, crops, np.full(len(chosen), k), method=m, tta=tta,
                            native=images.shape[-1])
            result["per_class"][cls][m] = enrichment(maps, structures, radius=radius, n_bootstrap=n_bootstrap,
                                                     seed=config.seed)
            if m == methods[0]:
                shown[cls] = (np.asarray(images[chosen[:draw], 0]), maps[:draw], structures[:draw])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "enrichment.json", result)
    title = (f"{config.arch}{', TTA' if tta else ''}, maps for the true class, on "
             f"{prov.get('split_description', 'evaluated images')}; true substructure marked")
    save_saliency_examples(out / SALIENCY_EXAMPLES, shown, method=methods[0], radius=radius, title=title)
    draw_saliency_examples(out / SALIENCY_EXAMPLES, figures or out)
    return result


def _check_evaluated_checkpoint(evaluation: Path, prov: dict, ckpt: dict) -> None:
    """Refuse a checkpoint that is not the one ``evaluation`` scored (best.pt replaced since, e.g. by another run's):
    its maps would be another network's. Checked by the file's SHA-256 that ``evaluate`` records; an evaluation
    older than that record is checked by the epoch and the network."""
    from .util import file_sha256

    path = prov["checkpoint"]
    recorded = prov.get("checkpoint_sha256")
    if recorded is not None:
        same = recorded == file_sha256(path)
    else:
        same = ckpt.get("epoch") == prov.get("checkpoint_epoch") and (ckpt.get("config") or {}).get("arch") == \
            (prov.get("config") or {}).get("arch")
    if not same:
        raise DeepLenseError(f"{path}: not the checkpoint {evaluation} evaluated (replaced since?); evaluate it again "
                             f"before explaining it")


def _relative(file: str, source: str) -> str:
    """``val/sphere/3.npy`` (substructure.csv's path) of a file of the loaded split, whatever its listing holds."""
    parts = Path(file).parts
    return "/".join((source, *parts[-2:]))
