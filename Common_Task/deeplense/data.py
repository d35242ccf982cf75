"""The data layer: find a DeepLense dataset, load a split once, cache it, split it, and batch it.

Layout of the common-task dataset (``dataset.zip`` unpacks to it, sometimes inside a ``dataset/`` wrapper
and beside a ``__MACOSX/`` tree)::

    ROOT/{train,val}/{no,sphere,vort}/<integer>.npy      # train: 10,000 per class; val: 2,500 per class

Each file holds one float64 array ``(1, 150, 150)``, min-max normalised per image to [0, 1]. File names repeat
across classes and splits, so an image is identified by (split, class, name). Images come back as float32
``(N, 1, H, W)`` in [0, 1] and labels as int64 ``(N,)`` indexing :data:`CLASSES`, whose order is fixed here and
never read from the filesystem.

The model's input geometry lives here too (:func:`native_crop`, :func:`preprocess`, :func:`input_fn`): crop,
resize, [-1, 1], 3 channels.
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
            files = listed[s]
            first = firsts[s]
            h, w = first.shape
            paths["images"].parent.mkdir(parents=True, exist_ok=True)
            tmp_img = paths["images"].with_name(paths["images"].name + f".{os.getpid()}.tmp")
            staged.append([tmp_img, None, paths, None])
            images = np.lib.format.open_memmap(tmp_img, mode="w+", dtype=np.float32, shape=(len(files), 1, h, w))
            with open(tmp_img, "r+b") as fh:  # reserve the blocks now: a full disk is an error here, not a SIGBUS
                os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
            labels = np.fromiter((lab for _, lab in files), dtype=np.int64, count=len(files))
            bar = progress_bar(files, desc=f"caching {s}", unit="img", disable=not progress, leave=False)
            for i, (p, _lab) in enumerate(bar):
                name = _display(p, root)
                img = first if i == 0 else read_image(p, allow_pickle=allow_pickle, name=name)
                if img.shape != (h, w):
                    raise _odd_shape(files, i, img.shape, (h, w), root, allow_pickle)
                images[i, 0] = img
            images.flush()
            del images
            tmp_lab = paths["labels"].with_name(paths["labels"].name + f".{os.getpid()}.tmp.npy")
            np.save(tmp_lab, labels)
            staged[-1][1] = tmp_lab
            staged[-1][3] = {"format": CACHE_FORMAT, "root": str(root), "split": s, "n": len(rel),
                             "shape": [len(rel), 1, h, w], "classes": list(CLASSES), "fingerprint": fp,
                             "allow_pickle": allow_pickle, "files": rel}
        sizes = {**{s: tuple(out[s][0].shape[-2:]) for s in out},
                 **{m["split"]: tuple(m["shape"][-2:]) for *_, m in staged}}
        if len(set(sizes.values())) > 1:  # each split is consistent on its own: compare them
            (a, sa), (b, sb) = sorted(sizes.items())[:2]
            raise DeepLenseError(f"{root}: {a}/ holds {sa[0]}x{sa[1]} images but {b}/ holds {sb[0]}x{sb[1]}: one "
                                 f"dataset has one image size")
    except BaseException as exc:
        for tmp_img, tmp_lab, _, _ in staged:
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


def dataset_fingerprint(root: str | os.PathLike) -> str:
    """A short hash of file names, sizes and modification times of both splits (for provenance)."""
    root = find_root(root)
    return combine_fingerprints([_fingerprint(root, list_files(root, s))[1] for s in SPLITS])


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


# --------------------------------------------------------------------------------------------- split
def pixel_digest(images: np.ndarray, idx: np.ndarray) -> str:
    """A short hash of the pixels of ``images[idx]`` in that order: recorded for the held-out images at training,
    recomputed at evaluation, so renamed or rewritten files are caught even when the names match."""
    h = hashlib.sha256()
    for i in np.asarray(idx, dtype=np.int64):
        h.update(np.ascontiguousarray(images[i], dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


def check_disjoint(train: SplitInfo, val: SplitInfo, train_images: np.ndarray, val_images: np.ndarray) -> None:
    """Refuse a dataset whose ``val/`` is ``train/`` or shares images with it: the same folder (a symbolic link),
    the same files (hard or symbolic links: one inode, from the ``stat`` :func:`load_splits` already made) or the
    same pixels (copies). Any of these would put training images into the held-out test. The copies are found by
    one pixel row per image, confirmed on the whole image."""
    root = train.root
    a, b = (root / s for s in SPLITS)
    if a.resolve() == b.resolve():
        raise DeepLenseError(f"{b}: is the same folder as {a} (a link?): nothing would be held out of training")
    inodes = dict(zip(train.inodes, train.files, strict=True))
    for p, ino in zip(val.files, val.inodes, strict=True):
        twin = inodes.get(ino)
        if twin is not None:
            raise DeepLenseError(f"{_display(p, root)}: is the same file as {_display(twin, root)} (a hard or symbolic "
                                 f"link): val/ must not share images with train/")
    if train_images.shape[-2:] != val_images.shape[-2:] or not len(train_images) or not len(val_images):
        return
    row = train_images.shape[-2] // 2
    keys: dict[bytes, list[int]] = {}
    for i in range(len(train_images)):
        keys.setdefault(np.asarray(train_images[i, 0, row]).tobytes(), []).append(i)
    for j in range(len(val_images)):
        for i in keys.get(np.asarray(val_images[j, 0, row]).tobytes(), ()):
            if np.array_equal(train_images[i], val_images[j]):
                raise DeepLenseError(f"{_display(val.files[j], root)}: has the same pixels as "
                                     f"{_display(train.files[i], root)} (a copy): val/ must not share images "
                                     f"with train/")


def limit_per_class(labels: np.ndarray, idx: np.ndarray, n: int | None) -> np.ndarray:
    """The first ``n`` of ``idx`` per class (all of them when ``n`` is None): ``--limit-per-class``."""
    if n is None:
        return idx
    return np.sort(np.concatenate([idx[labels[idx] == c][:n] for c in range(len(CLASSES))]))


def split_holdout(labels: np.ndarray, fraction: float = 0.1, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cut the official ``val`` split into a model-selection part and a held-out test part.

    Each class gives ``round(fraction * n_class)`` images (half rounds up) to the test part. The draw
    depends only on the labels and the seed.

    Returns
    -------
    selection_idx, test_idx : sorted int64 arrays indexing ``labels``, disjoint, together covering all.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7]))
    test = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        k = int(np.floor(fraction * len(idx) + 0.5))
        test.append(idx[rng.permutation(len(idx))[:k]])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    return complement_of(test_idx, len(labels))


@dataclass(frozen=True)
class ProtocolSplit:
    """Which images train the model, which choose its checkpoint, which test it (indices, sorted int64).

    ``reference`` protocol: all of ``train`` trains; ``val`` minus a held-out part selects; the held-out part
    tests. ``clean`` protocol: ``train`` minus a held-out part trains; that part selects; all of ``val`` tests.
    """

    protocol: str
    train_idx: np.ndarray  # into train
    selection_split: str  # "val" (reference) or "train" (clean)
    selection_idx: np.ndarray  # into selection_split
    test_idx: np.ndarray | None  # into val; None: all of val (clean)

    def record(self) -> dict:
        """What checkpoints store, so that evaluation and resumption use exactly these images."""
        return {"protocol": self.protocol, "selection_split": self.selection_split,
                "selection_indices": self.selection_idx.tolist(),
                "heldout_test_indices": None if self.test_idx is None else self.test_idx.tolist()}

    @classmethod
    def from_record(cls, rec: dict, n_train: int, n_val: int | None) -> ProtocolSplit:
        """The split a checkpoint recorded, for a dataset of ``n_train`` / ``n_val`` images (checked)."""
        if rec.get("protocol", "reference") == "reference":
            sel, test = complement_of(rec["heldout_test_indices"], n_val)
            return cls("reference", np.arange(n_train, dtype=np.int64), "val", sel, test)
        train, sel = complement_of(rec["selection_indices"], n_train)
        return cls("clean", train, "train", sel, None)

    def describe(self, n_val: int) -> str:
        n_test = n_val if self.test_idx is None else len(self.test_idx)
        return (f"{self.protocol} protocol: {len(self.train_idx)} train images train the model, "
                f"{len(self.selection_idx)} images of {self.selection_split} choose the checkpoint, "
                f"{n_test} images of val test it")


def protocol_split(protocol: str, train_labels: np.ndarray, val_labels: np.ndarray | None, fraction: float = 0.1,
                   *, seed: int = 0) -> ProtocolSplit:
    """The split of a run: ``reference`` holds out ``fraction`` of ``val`` per class for the test; ``clean``
    holds out ``fraction`` of ``train`` per class for selection (``val_labels`` unused). Seeded, stratified
    (:func:`split_holdout`)."""
    if protocol == "reference":
        sel, test = split_holdout(val_labels, fraction, seed=seed)
        return ProtocolSplit("reference", np.arange(len(train_labels), dtype=np.int64), "val", sel, test)
    if protocol == "clean":
        train, sel = split_holdout(train_labels, fraction, seed=seed)
        return ProtocolSplit("clean", train, "train", sel, None)
    raise DeepLenseError(f"unknown protocol {protocol!r} (choose reference or clean)")


def complement_of(held_idx, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, held)`` of ``n`` images whose held-out part is ``held_idx`` (sorted, unique, in range: checked)."""
    held = np.asarray(held_idx, dtype=np.int64)
    if held.ndim != 1 or (held.size and (held.min() < 0 or held.max() >= n)) or np.any(np.diff(held) <= 0):
        raise DeepLenseError(f"held-out indices must be sorted, unique and within the {n} images of the split")
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held


# --------------------------------------------------------------------------------------------- transforms
def native_crop(images: np.ndarray, idx: np.ndarray, crop: int | None):
    """Gather ``images[idx]`` into a contiguous float32 tensor ``(n, 1, h, w)``, centre-cropped to ``crop``.

    The crop commutes with the D4 augmentation (it is centred and square), so it is done once here, on the
    native pixels, before any resizing.
    """
    import torch

    if crop is not None and crop > images.shape[-1]:
        raise DeepLenseError(f"--crop {crop}: larger than the {images.shape[-2]}x{images.shape[-1]} px images")
    idx = np.asarray(idx)
    order = np.argsort(idx, kind="stable")  # memory-mapped reads in file order
    x = np.empty((len(idx), *images.shape[1:]), dtype=np.float32)
    x[order] = images[idx[order]]
    if crop is not None and crop < x.shape[-1]:
        o = (x.shape[-1] - crop) // 2
        x = np.ascontiguousarray(x[..., o : o + crop, o : o + crop])
    return torch.from_numpy(x)


def preprocess(x, image_size: int = 224, *, resize_then_crop: int | None = None, channels: int = 3):
    """Turn a batch of (already cropped) images into model input, on whatever device ``x`` lives.

    Parameters
    ----------
    x : float tensor ``(B, 1, H, W)`` in [0, 1]
    image_size : side of the output in pixels.
    resize_then_crop : if given, resize to this side and then crop the central ``image_size`` (the
        reference solution's Resize(256) + CenterCrop(224)).
    channels : 3 replicates the grey image (the ImageNet stem), 1 keeps it (a folded stem).

    Returns
    -------
    float tensor ``(B, channels, image_size, image_size)`` in [-1, 1].
    """
    import torch.nn.functional as F

    side = resize_then_crop or image_size
    fresh = False  # whether x is a new tensor we may modify in place (saves a 6 MB allocation per batch)
    if x.shape[-1] != side or x.shape[-2] != side:
        fresh = True
        # Antialiasing matters only when shrinking; when enlarging it gives the same pixels (to 1e-5),
        # three times slower.
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=side < x.shape[-1],
                          align_corners=False)
    if resize_then_crop:
        o = (side - image_size) // 2
        x = x[..., o : o + image_size, o : o + image_size]
    x = x.mul_(2.0).sub_(1.0) if fresh else x.mul(2.0).sub_(1.0)
    return x.expand(-1, channels, -1, -1) if channels != x.shape[1] else x


def input_fn(config):
    """A run's model-input transform (``config``: a :class:`~deeplense.config.TrainConfig`):
    ``(B, 1, h, w)`` in [0, 1], already cropped by :func:`native_crop` -> ``(B, C, S, S)`` in [-1, 1] with the
    arch's channels (3 for the ImageNet networks, 1 for ``lensnet``, which also takes ``h`` as it is)."""

    def fn(x):
        return preprocess(x, config.image_size, resize_then_crop=config.resize_then_crop,
                          channels=config.in_channels)

    return fn


def d4_transform(x, k: int):
    """Apply element ``k`` (0..7) of the dihedral group D4 to the last two axes of ``x``.

    ``k % 4`` quarter turns, preceded by a horizontal flip when ``k >= 4``. Exact: pixels are permuted.
    """
    import torch

    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def augmentation_draws(mode: str, n: int, generator=None):
    """The random choices of ``n`` augmentations, drawn up front (an epoch's worth at once, so that no step waits
    on the host): the D4 element ``k`` (int64, 0..7) per image, a flip flag per image for ``hflip``, None for
    ``none``."""
    import torch

    if mode == "none":
        return None
    if mode == "d4":
        return torch.randint(0, 8, (n,), generator=generator)
    if mode == "hflip":
        return torch.rand(n, generator=generator) < 0.5
    raise ValueError(f"unknown augmentation {mode!r}")


def augment(x, mode: str, generator=None, draws=None):
    """Random training augmentation of a batch ``(B, C, H, W)``.

    ``mode``: ``"d4"`` applies one of the 8 flips/rotations per image, ``"hflip"`` flips half the images
    horizontally (the reference solution), ``"none"`` returns ``x`` unchanged. ``draws``: the choices from
    :func:`augmentation_draws` on ``x``'s device (drawn from ``generator`` here when not given). Exact (pixels are
    permuted). On an accelerator it is free of host synchronisation (every symmetry is computed and the drawn one
    kept per image); on the CPU, where nothing waits, each symmetry is applied only to the images that drew it
    (about 2x faster there: ``data_pipeline`` in benchmarks/README.md). Both give the same pixels.
    """
    import torch

    if mode == "none":
        return x
    if draws is None:
        draws = augmentation_draws(mode, x.shape[0], generator).to(x.device)
    if mode == "hflip":
        return torch.where(draws.view(-1, 1, 1, 1), torch.flip(x, dims=(-1,)), x)
    if mode != "d4":
        raise ValueError(f"unknown augmentation {mode!r}")
    return _d4_by_group(x, draws) if x.device.type == "cpu" else _d4_by_select(x, draws)


def _d4_by_select(x, draws):
    """D4 without host synchronisation: all 8 symmetries of the batch, the drawn one kept per image."""
    import torch

    out = x
    for k in range(1, 8):
        out = torch.where((draws == k).view(-1, 1, 1, 1), d4_transform(x, k), out)
    return out


def _d4_by_group(x, draws):
    """D4 with one transform per symmetry drawn, on the images that drew it (reads the draws on the host)."""
    import torch

    out = torch.empty_like(x)
    for k in range(8):
        idx = torch.nonzero(draws == k).flatten()
        if len(idx):
            out[idx] = d4_transform(x[idx], k) if k else x[idx]
    return out
