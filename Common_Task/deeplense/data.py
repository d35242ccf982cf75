"""The data layer: find a DeepLense dataset, read and validate its files, load a split once and cache it.

Layout of the common-task dataset (``dataset.zip`` unpacks to it, sometimes inside a ``dataset/`` wrapper
and beside a ``__MACOSX/`` tree)::

    ROOT/{train,val}/{no,sphere,vort}/<integer>.npy      # train: 10,000 per class; val: 2,500 per class

Each file holds one float64 array ``(1, 150, 150)``, min-max normalised per image to [0, 1]. File names repeat
across classes and splits, so an image is identified by (split, class, name). Images come back as float32
``(N, 1, H, W)`` in [0, 1] and labels as int64 ``(N,)`` indexing :data:`CLASSES`, whose order is fixed here and
never read from the filesystem.

Which images train, select and test is :mod:`deeplense.splits`; the model's input geometry and the augmentation
(crop, resize, [-1, 1], channels, D4) are :mod:`deeplense.transforms`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .util import DeepLenseError, cache_dir, progress_bar, sweep_stale_temps, write_json_atomic

CLASSES: tuple[str, ...] = ("no", "sphere", "vort")
"""Class names in label order: 0 = no substructure, 1 = CDM subhalos, 2 = vortex (axion-like DM)."""

CLASS_LABELS: dict[str, str] = {"no": "no substructure", "sphere": "subhalos", "vort": "vortex"}
"""Physics names for legends and tables."""

SPLITS: tuple[str, ...] = ("train", "val")
CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------- discovery
def _has_split(d: Path) -> bool:
    return any((d / s).is_dir() for s in SPLITS)


def find_root(path: str | os.PathLike) -> Path:
    """Resolve the folder that holds ``train/`` and ``val/``.

    Accepts that folder itself, a ``dataset/`` or ``dataset/dataset/`` wrapper above it, or an unzip
    folder with a ``__MACOSX/`` tree beside the data (that tree and hidden folders are skipped).
    The search goes at most three levels down, breadth first.
    """
    start = Path(path).expanduser()
    if not start.exists():
        if start.is_symlink():
            try:
                os.stat(start)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise DeepLenseError(f"{start}: a symbolic link loop") from None
            raise DeepLenseError(f"{start}: a symbolic link to {os.readlink(start)}, which does not exist")
        raise DeepLenseError(f"{start}: no such folder")
    if not start.is_dir():
        raise DeepLenseError(f"{start}: not a folder (point --data at the folder holding train/ and val/)")
    frontier = [start]
    for _depth in range(4):
        found = [d for d in frontier if _has_split(d)]
        if len(found) == 1:
            root = found[0]
            missing = [s for s in SPLITS if not (root / s).is_dir()]
            if missing:
                raise DeepLenseError(f"{root}: missing '{missing[0]}' folder (expected train/ and val/)")
            return root.resolve()
        if len(found) > 1:
            names = ", ".join(str(d) for d in found)
            raise DeepLenseError(f"{start}: several datasets found ({names}); point --data at one of them")
        nxt = []
        for d in frontier:
            nxt.extend(
                sorted(c for c in d.iterdir() if c.is_dir() and c.name != "__MACOSX" and not c.name.startswith("."))
            )
        frontier = nxt
    raise DeepLenseError(f"{start}: no dataset found (expected train/ and val/ folders with no/, sphere/, vort/)")


def _name_key(name: str) -> tuple[int, int, str]:
    stem = name[: -len(".npy")]
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def _numeric_key(p: Path) -> tuple[int, int, str]:
    return _name_key(p.name)


def list_files(root: Path, split: str) -> list[tuple[str, int]]:
    """All ``(path, label)`` of a split, classes in :data:`CLASSES` order, files sorted numerically.

    Paths are strings (``root/split/class/name``; building 37,500 ``Path`` objects costs half a second).
    AppleDouble ``._*.npy`` files and anything that is not a ``.npy`` file are ignored. Refused, naming the file:
    a ``.npy`` symbolic link to nothing, and a stray name (``1 copy.npy``) among ``<integer>.npy`` files.
    """
    if split not in SPLITS:
        raise DeepLenseError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DeepLenseError(f"{split_dir}: missing '{split}' folder")
    with os.scandir(split_dir) as it:
        extra = sorted(e.name for e in it if e.is_dir() and e.name not in CLASSES
                       and not e.name.startswith((".", "__")))
    if extra:
        raise DeepLenseError(f"{split_dir / extra[0]}: a folder that is none of the classes ({', '.join(CLASSES)}); "
                             f"its images would be left out without a word: move it out of the dataset")
    out: list[tuple[str, int]] = []
    for label, cls in enumerate(CLASSES):
        d = split_dir / cls
        if not d.is_dir():
            raise DeepLenseError(f"{d}: missing class folder '{cls}' (expected {', '.join(CLASSES)})")
        with os.scandir(d) as it:  # DirEntry.is_file() needs no extra system call on most filesystems
            entries = [e for e in it if e.name.endswith(".npy") and not e.name.startswith("._")]
        names = [e.name for e in entries if e.is_file()]
        dangling = sorted((e for e in entries if e.is_symlink() and not os.path.exists(e.path)),
                          key=lambda e: _name_key(e.name))
        if dangling:
            raise DeepLenseError(f"{dangling[0].path}: a symbolic link to {os.readlink(dangling[0].path)}, which does "
                                 f"not exist")
        if not names:
            raise DeepLenseError(f"{d}: class folder has no .npy files")
        stray = sorted(n for n in names if not n[:-4].isdigit())
        if stray and len(stray) < len(names):
            raise DeepLenseError(f"{d / stray[0]}: not named like the other files of its class (<integer>.npy): a "
                                 f"stray copy? Rename or remove it")
        ordered = sorted(names, key=_name_key)
        twins = [(a, b) for a, b in zip(ordered, ordered[1:], strict=False)
                 if a[:-4].isdigit() and b[:-4].isdigit() and int(a[:-4]) == int(b[:-4])]
        if twins:
            a, b = twins[0]
            raise DeepLenseError(f"{d / a}: the same number as {b} ({int(a[:-4])}): one image counted twice? Rename "
                                 f"or remove one")
        prefix = f"{d}{os.sep}"
        out.extend((prefix + name, label) for name in ordered)
    return out


# --------------------------------------------------------------------------------------------- one file
def _display(path: str, root: Path) -> str:
    """``dataset/val/vort/7.npy``: the path from the dataset folder's name on (names repeat across classes)."""
    parent = str(root.parent).rstrip(os.sep) + os.sep
    return path[len(parent):] if path.startswith(parent) else path


def read_image(path: str | os.PathLike, *, allow_pickle: bool = False, name: str | None = None) -> np.ndarray:
    """Read one image file as float32 ``(H, W)``.

    Accepts arrays of shape ``(1, H, W)``, ``(H, W)`` or ``(H, W, 1)``, float32 or float64, and, only
    when ``allow_pickle`` is true, the object arrays ``[image, label]`` of the DeepLense Model I sets.
    Raises :class:`DeepLenseError` naming the file for anything else.
    """
    path = Path(path)
    name = name or str(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise DeepLenseError(f"{name}: unreadable file ({exc.strerror})") from None
    if magic != b"\x93NUMPY":
        raise DeepLenseError(f"{name}: unreadable, not a .npy file (no NumPy header)")
    try:
        arr = np.load(path, allow_pickle=allow_pickle)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise DeepLenseError(
                f"{name}: holds a pickled object array; loading pickles can run code, so pass "
                f"--allow-pickle (or allow_pickle in Python) only if you trust this file"
            ) from None
        raise DeepLenseError(f"{name}: unreadable or truncated .npy file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - truncated files raise EOFError, OSError, ...
        raise DeepLenseError(f"{name}: unreadable or truncated .npy file ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray):
        raise DeepLenseError(f"{name}: not a single array (.npz archives are not supported)")
    if arr.dtype == object:
        # Model I style [image, label]: the image is the first element.
        try:
            arr = np.asarray(arr.reshape(-1)[0] if arr.ndim else arr.item(), dtype=np.float64)
        except (TypeError, ValueError, IndexError):
            raise DeepLenseError(f"{name}: object array without a numeric image as its first element") from None
    if arr.dtype.kind not in "fiu":
        raise DeepLenseError(f"{name}: unsupported dtype {arr.dtype} (expected float32 or float64)")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise DeepLenseError(f"{name}: wrong shape {arr.shape} (expected (1,H,W), (H,W) or (H,W,1))")
    if not np.isfinite(arr).all():
        raise DeepLenseError(f"{name}: contains NaN or infinite pixels")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise DeepLenseError(f"{name}: pixel values span [{lo:.9g}, {hi:.9g}], expected min-max normalised [0, 1]")
    return np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- cache
def _fingerprint(root: Path, files: list[tuple[str, int]]) -> tuple[list[str], str, list[tuple[int, int]]]:
    """``(paths relative to root, fingerprint, (device, inode) per file)`` from one ``stat`` of each file."""
    h = hashlib.sha256()
    rel, inodes = [], []
    skip = len(str(root)) + 1
    for p, label in files:
        st = os.stat(p)
        r = p[skip:]  # relative to root
        rel.append(r)
        inodes.append((st.st_dev, st.st_ino))
        # ctime too: `cp -p`, `rsync -a` and `tar x` restore a changed file's size and mtime, never its ctime
        h.update(f"{r}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\n".encode())
    return rel, h.hexdigest(), inodes


def _cached(root: Path, split: str, files: list[tuple[str, int]], allow_pickle: bool):
    """``(rel, fingerprint, inodes, cache paths, the cache if it holds these files as they are now, else None)``."""
    rel, fp, inodes = _fingerprint(root, files)
    paths = _cache_paths(root, split, allow_pickle)
    return rel, fp, inodes, paths, _try_open_cache(paths, fp, len(rel))


def _cache_paths(root: Path, split: str, allow_pickle: bool) -> dict[str, Path]:
    key = hashlib.sha256(f"{root}\n{split}\n{int(allow_pickle)}\n{CACHE_FORMAT}".encode()).hexdigest()[:20]
    base = cache_dir() / f"{split}-{key}"
    return {"images": base.with_suffix(".images.npy"), "labels": base.with_suffix(".labels.npy"),
            "manifest": base.with_suffix(".json")}


def _try_open_cache(paths: dict[str, Path], fingerprint: str, n: int):
    try:
        manifest = json.loads(paths["manifest"].read_text())
        if manifest.get("fingerprint") != fingerprint or manifest.get("n") != n:
            return None
        images = np.load(paths["images"], mmap_mode="r")
        labels = np.load(paths["labels"])
    except (OSError, ValueError):
        return None
    if images.shape[0] != n or labels.shape != (n,) or images.dtype != np.float32:
        return None
    return images, labels.astype(np.int64, copy=False)


@dataclass(frozen=True)
class SplitInfo:
    """What :func:`load_splits` found for one split."""

    root: Path
    split: str
    fingerprint: str  # names, labels, sizes and modification times: decides whether the cache is current
    listing: str  # names and labels in loading order only: what split indices refer to (a copy keeps it)
    from_cache: bool
    files: tuple[str, ...] = ()  # the image files in loading order (what the rows of the arrays are)
    inodes: tuple[tuple[int, int], ...] = ()  # (device, inode) of each file: which files are the same file


def _stage_split(root: Path, s: str, rel, fp: str, files, first: np.ndarray, stage: list, allow_pickle: bool,
                 progress: bool) -> None:
    """Read every file of split ``s`` into temporary cache files, recorded in ``stage`` (``[images, labels, paths,
    manifest]``) as they are made; nothing is renamed here (:func:`load_splits` commits every split at once)."""
    paths = stage[2]
    h, w = first.shape
    paths["images"].parent.mkdir(parents=True, exist_ok=True)
    tmp_img = paths["images"].with_name(paths["images"].name + f".{os.getpid()}.tmp")
    stage[0] = tmp_img
    images = np.lib.format.open_memmap(tmp_img, mode="w+", dtype=np.float32, shape=(len(files), 1, h, w))
    with open(tmp_img, "r+b") as fh:  # reserve the blocks now: a full disk is an error here, not a SIGBUS
        os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
    labels = np.fromiter((lab for _, lab in files), dtype=np.int64, count=len(files))
    bar = progress_bar(files, desc=f"caching {s}", unit="img", disable=not progress, leave=False)
    for i, (p, _lab) in enumerate(bar):
        img = first if i == 0 else read_image(p, allow_pickle=allow_pickle, name=_display(p, root))
        if img.shape != (h, w):
            raise _odd_shape(files, i, img.shape, (h, w), root, allow_pickle)
        images[i, 0] = img
    images.flush()
    del images
    tmp_lab = paths["labels"].with_name(paths["labels"].name + f".{os.getpid()}.tmp.npy")
    np.save(tmp_lab, labels)
    stage[1] = tmp_lab
    stage[3] = {"format": CACHE_FORMAT, "root": str(root), "split": s, "n": len(rel), "shape": [len(rel), 1, h, w],
                "classes": list(CLASSES), "fingerprint": fp, "allow_pickle": allow_pickle, "files": rel}


def load_splits(
    root: str | os.PathLike,
    splits: tuple[str, ...] = SPLITS,
    *,
    allow_pickle: bool = False,
    progress: bool = True,
    info: dict | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load several splits, validating all of them before any cache file is written.

    Returns ``{split: (images, labels)}``; see :func:`load_split`. If ``info`` is a dict it receives a
    :class:`SplitInfo` per split.
    """
    root = find_root(root)
    listed = {s: list_files(root, s) for s in splits}  # structure errors first, before any reading
    out, to_build = {}, []
    for s in splits:
        rel, fp, inodes, paths, hit = _cached(root, s, listed[s], allow_pickle)
        if info is not None:
            info[s] = SplitInfo(root, s, fp, _listing(rel, listed[s]), hit is not None,
                                tuple(p for p, _ in listed[s]), tuple(inodes))
        if hit is not None:
            out[s] = hit
        else:
            to_build.append((s, rel, fp, paths))

    staged = []  # (tmp images, tmp labels, final paths, manifest) renamed only when every split is valid
    if to_build:
        sweep_stale_temps(cache_dir())  # what killed builds left behind
        firsts = {s: read_image(listed[s][0][0], allow_pickle=allow_pickle, name=_display(listed[s][0][0], root))
                  for s, *_ in to_build}
        _check_space(sum(len(listed[s]) * firsts[s].size * 4 for s in firsts))
    try:
        for s, rel, fp, paths in to_build:
            staged.append([None, None, paths, None])  # filled in as the files appear, so a failure removes them
            _stage_split(root, s, rel, fp, listed[s], firsts[s], staged[-1], allow_pickle, progress)
        sizes = {**{s: tuple(out[s][0].shape[-2:]) for s in out},
                 **{m["split"]: tuple(m["shape"][-2:]) for *_, m in staged}}
        if len(set(sizes.values())) > 1:  # each split is consistent on its own: compare them
            (a, sa), (b, sb) = sorted(sizes.items())[:2]
            raise DeepLenseError(f"{root}: {a}/ holds {sa[0]}x{sa[1]} images but {b}/ holds {sb[0]}x{sb[1]}: one "
                                 f"dataset has one image size")
    except BaseException as exc:
        for tmp_img, tmp_lab, _, _ in staged:
            if tmp_img:
                Path(tmp_img).unlink(missing_ok=True)
            if tmp_lab:
                Path(tmp_lab).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a read-only or vanished cache folder
            need = sum(len(listed[s]) * firsts[s].size * 4 for s in firsts) / 1e9
            raise DeepLenseError(f"{cache_dir()}: {exc.strerror or exc} while writing the dataset cache "
                                 f"({need:.2f} GB); nothing was left behind") from None
        raise
    for tmp_img, tmp_lab, paths, manifest in staged:
        paths["manifest"].unlink(missing_ok=True)  # the manifest is the commit marker: written last
        os.replace(tmp_img, paths["images"])
        os.replace(tmp_lab, paths["labels"])
        write_json_atomic(paths["manifest"], manifest)
        out[manifest["split"]] = _open_committed(paths, manifest)
    return {s: out[s] for s in splits}


def cache_state(root: str | os.PathLike, splits: tuple[str, ...] = SPLITS, *,
                allow_pickle: bool = False) -> dict[str, dict]:
    """Per split, without building anything: ``n`` files, whether the load cache holds them as they are now
    (``cached``) and the bytes a cache build would write (``bytes``, from the first image's size)."""
    root = find_root(root)
    out = {}
    for s in splits:
        files = list_files(root, s)
        if not files:
            raise DeepLenseError(f"{root / s}: no .npy images")
        *_, hit = _cached(root, s, files, allow_pickle)
        first = read_image(files[0][0], allow_pickle=allow_pickle, name=_display(files[0][0], root))
        out[s] = {"n": len(files), "cached": hit is not None, "bytes": len(files) * first.size * 4,
                  "shape": first.shape}
    return out


def _check_space(need_bytes: int) -> None:
    """Refuse to start a cache build that cannot fit on the cache's disk (a memory-mapped write into a full disk
    dies with SIGBUS, without a word)."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need_bytes * 1.02 + 2**20:
        raise DeepLenseError(f"{folder}: {free / 1e9:.2f} GB free, the dataset cache needs {need_bytes / 1e9:.2f} GB; "
                             f"free some space or point DEEPLENSE_CACHE at a larger disk")


def _odd_shape(files, i: int, shape, first_shape, root: Path, allow_pickle: bool) -> DeepLenseError:
    """The error for a split whose images differ in size, naming the odd file: file ``i`` (``shape``) or, when the
    other files agree with it, the first one (``first_shape``)."""
    others = [j for j in (i + 1, i + 2, 1) if j < len(files) and j not in (0, i)]
    votes = [read_image(files[j][0], allow_pickle=allow_pickle).shape for j in others[:2]]
    if votes and all(v == shape for v in votes):
        return DeepLenseError(f"{_display(files[0][0], root)}: shape {first_shape} differs from the rest of the "
                              f"split's {shape}")
    return DeepLenseError(f"{_display(files[i][0], root)}: shape {shape} differs from the split's {first_shape}")


def _open_committed(paths: dict[str, Path], manifest: dict):
    """Open a cache just committed. Another process building the same cache at the same moment (two jobs on one
    dataset) may be between its own renames, with the same content: wait for it rather than fail."""
    for _ in range(100):
        hit = _try_open_cache(paths, manifest["fingerprint"], manifest["n"])
        if hit is not None:
            return hit
        time.sleep(0.1)
    raise DeepLenseError(f"{paths['manifest']}: the cache kept changing while it was being opened (another process "
                         f"writing it?); run again")


def load_split(
    root: str | os.PathLike, split: str, *, allow_pickle: bool = False, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as ``(images, labels)``.

    Returns
    -------
    images : float32 array ``(N, 1, H, W)`` in [0, 1], memory-mapped from the on-disk cache
        (``$DEEPLENSE_CACHE``, default ``~/.cache/deeplense``); the first call builds the cache, later
        calls reopen it in about a second unless a file was added, removed, resized or touched.
    labels : int64 array ``(N,)`` indexing :data:`CLASSES`.
    """
    return load_splits(root, (split,), allow_pickle=allow_pickle, progress=progress)[split]


def _listing(rel: list[str], files: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for r, (_, label) in zip(rel, files, strict=True):
        h.update(f"{r}\t{label}\n".encode())
    return h.hexdigest()[:16]


def combine_fingerprints(split_fingerprints: list[str]) -> str:
    """The dataset fingerprint from the per-split ones (``SplitInfo.fingerprint``, in :data:`SPLITS` order)."""
    h = hashlib.sha256()
    for fp in split_fingerprints:
        h.update(fp.encode())
    return h.hexdigest()[:16]
