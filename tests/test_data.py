from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deeplense.cli import main
from deeplense.data import (
    CLASSES,
    SPLITS,
    combine_fingerprints,
    find_root,
    list_files,
    load_split,
    load_splits,
)
from deeplense.testing import write_dataset
from deeplense.transforms import native_crop
from deeplense.util import DeepLenseError, cache_dir


def test_classes_fixed_order():
    assert CLASSES == ("no", "sphere", "vort")


def test_load_split_shapes_dtypes_and_range(tiny_dataset):
    images, labels = load_split(tiny_dataset, "train")
    assert images.shape == (12, 1, 150, 150) and images.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert images.min() == 0.0 and images.max() == 1.0
    ref = np.load(tiny_dataset / "train" / "sphere" / "1.npy")
    np.testing.assert_array_equal(images[4, 0], ref[0].astype(np.float32))
    val_images, val_labels = load_split(tiny_dataset, "val")
    assert val_images.shape == (30, 1, 150, 150) and np.bincount(val_labels).tolist() == [10, 10, 10]


@pytest.mark.parametrize("wrap", ["plain", "dataset", "dataset/dataset", "macosx"])
def test_find_root_from_any_wrapper(tmp_path, wrap):
    if wrap == "plain":
        data = write_dataset(tmp_path / "d", 2, 2)
        point = data
    elif wrap == "dataset":
        data = write_dataset(tmp_path / "dataset", 2, 2)
        point = tmp_path
    elif wrap == "dataset/dataset":
        data = write_dataset(tmp_path / "dataset" / "dataset", 2, 2)
        point = tmp_path / "dataset"
    else:  # an unzipped archive: dataset/ plus a __MACOSX/ tree with AppleDouble files of the same layout
        data = write_dataset(tmp_path / "dataset", 2, 2)
        for p in data.rglob("*.npy"):
            twin = tmp_path / "__MACOSX" / p.relative_to(tmp_path).parent / ("._" + p.name)
            twin.parent.mkdir(parents=True, exist_ok=True)
            twin.write_bytes(b"\x00\x05\x16\x07AppleDouble")
        point = tmp_path
    assert find_root(point) == data.resolve()
    images, _ = load_split(point, "val")
    assert images.shape[0] == 6


def test_ignores_appledouble_and_other_files_and_sorts_numerically(tmp_path):
    data = write_dataset(tmp_path / "d", 2, 12)
    cls_dir = data / "val" / "no"
    (cls_dir / "._3.npy").write_bytes(b"\x00\x05\x16\x07 not an array")
    (cls_dir / "notes.txt").write_text("hello")
    (cls_dir / ".DS_Store").write_bytes(b"junk")
    images, labels = load_split(data, "val")
    assert images.shape[0] == 36
    # numeric order: 1, 2, ..., 10, 11, 12 (not 1, 10, 11, 12, 2, ...)
    for pos, name in ((1, "2.npy"), (9, "10.npy"), (11, "12.npy")):
        np.testing.assert_array_equal(images[pos, 0], np.load(cls_dir / name)[0].astype(np.float32))


@pytest.mark.parametrize("variant", ["hw", "hw1", "float32"])
def test_accepts_shape_and_dtype_variants(tmp_path, variant):
    data = write_dataset(tmp_path / "d", 2, 2)
    for p in data.rglob("*.npy"):
        a = np.load(p)
        a = {"hw": a[0], "hw1": a[0][:, :, None], "float32": a.astype(np.float32)}[variant]
        np.save(p, a)
    images, _ = load_split(data, "train")
    assert images.shape == (6, 1, 150, 150) and images.dtype == np.float32


def _make_object_array(path: Path, img: np.ndarray, label: float = 1e-23) -> None:
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = img, label
    np.save(path, obj, allow_pickle=True)


def test_object_arrays_need_opt_in(tmp_path):
    data = write_dataset(tmp_path / "d", 2, 2)
    target = data / "train" / "vort" / "2.npy"
    img = np.load(target)[0]
    _make_object_array(target, img)
    with pytest.raises(DeepLenseError, match=r"train/vort/2\.npy.*allow-pickle"):
        load_split(data, "train")
    images, _ = load_split(data, "train", allow_pickle=True)
    np.testing.assert_array_equal(images[5, 0], img.astype(np.float32))


def test_cache_reopens_and_invalidates(tiny_dataset):
    info: dict = {}
    a = load_splits(tiny_dataset, ("train",), info=info)["train"][0]
    assert not info["train"].from_cache
    assert isinstance(a, np.memmap)
    info = {}
    b = load_splits(tiny_dataset, ("train",), info=info)["train"][0]
    assert info["train"].from_cache
    both: dict = {}
    load_splits(tiny_dataset, SPLITS, info=both)
    again: dict = {}
    load_splits(tiny_dataset, SPLITS, info=again)  # from the cache: the same fingerprints as when it was built
    assert not both["val"].from_cache and again["val"].from_cache
    assert combine_fingerprints([both[s].fingerprint for s in SPLITS]) == \
        combine_fingerprints([again[s].fingerprint for s in SPLITS])
    np.testing.assert_array_equal(a, b)
    # the cache lives in $DEEPLENSE_CACHE, never inside the dataset
    assert not any(p.name.endswith((".json", ".tmp")) for p in tiny_dataset.rglob("*"))
    assert any(cache_dir().glob("train-*.images.npy"))
    # change one file: the cache must notice and return the new content
    p = tiny_dataset / "train" / "no" / "3.npy"
    new = np.zeros((1, 150, 150))
    new[0, 0, 0] = 1.0
    np.save(p, new)
    os.utime(p, ns=(1, 1))
    info = {}
    c = load_splits(tiny_dataset, ("train",), info=info)["train"][0]
    assert not info["train"].from_cache
    assert c[2, 0, 0, 0] == 1.0 and c[2].sum() == 1.0
    # add a file: also invalidates
    shutil.copy(p, tiny_dataset / "train" / "no" / "5.npy")
    images, labels = load_split(tiny_dataset, "train")
    assert images.shape[0] == 13


def test_atomic_writes_get_normal_permissions(tmp_path):
    from deeplense.util import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------------ CLI
def test_inspect_prints_root_counts_shape_range(tiny_dataset, capsys):
    assert main(["inspect", "--data", str(tiny_dataset.parent)]) == 0
    out = capsys.readouterr().out
    assert f"dataset root: {tiny_dataset.resolve()}" in out
    assert "train: 12 images (no=4, sphere=4, vort=4); array (12, 1, 150, 150) float32; values [0, 1]" in out
    assert "val: 30 images (no=10, sphere=10, vort=10)" in out


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "deeplense", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("inspect", "simulate", "train", "evaluate", "predict", "report"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "deeplense", "inspect", "--help"], capture_output=True, text=True,
                         check=True)
    assert "--allow-pickle" in out.stdout


def _break(data: Path, kind: str) -> str:
    """Damage a valid dataset; return the text the error must contain."""
    if kind == "missing_val":
        shutil.rmtree(data / "val")
        return "missing 'val' folder"
    if kind == "missing_train":
        shutil.rmtree(data / "train")
        return "missing 'train' folder"
    if kind == "missing_class":
        shutil.rmtree(data / "val" / "sphere")
        return "val/sphere: missing class folder"
    if kind == "empty_class":
        for p in (data / "train" / "vort").glob("*.npy"):
            p.unlink()
        return "train/vort: class folder has no .npy files"
    if kind == "truncated":
        p = data / "val" / "vort" / "7.npy"
        p.write_bytes(p.read_bytes()[:1000])
        return "val/vort/7.npy: unreadable or truncated"
    if kind == "garbage":
        (data / "train" / "no" / "2.npy").write_bytes(b"this is not numpy")
        return "train/no/2.npy: unreadable"
    if kind == "wrong_shape":
        np.save(data / "val" / "sphere" / "3.npy", np.zeros((3, 150, 150)))
        return "val/sphere/3.npy: wrong shape (3, 150, 150)"
    if kind == "mixed_size":
        np.save(data / "val" / "sphere" / "3.npy", np.zeros((1, 64, 64)))
        return "val/sphere/3.npy: shape (64, 64) differs"
    if kind == "nan":
        a = np.load(data / "val" / "no" / "4.npy")
        a[0, 5, 5] = np.nan
        np.save(data / "val" / "no" / "4.npy", a)
        return "val/no/4.npy: contains NaN or infinite"
    if kind == "inf":
        a = np.load(data / "train" / "sphere" / "1.npy")
        a[0, 5, 5] = np.inf
        np.save(data / "train" / "sphere" / "1.npy", a)
        return "train/sphere/1.npy: contains NaN or infinite"
    if kind == "out_of_range":  # raw counts instead of min-max normalised values
        np.save(data / "train" / "vort" / "2.npy", np.arange(150 * 150, dtype=np.float64).reshape(1, 150, 150) % 256)
        return "train/vort/2.npy: pixel values span [0, 255], expected min-max normalised [0, 1]"
    if kind == "pickle":
        _make_object_array(data / "val" / "vort" / "9.npy", np.zeros((150, 150)))
        return "val/vort/9.npy: holds a pickled object array"
    raise AssertionError(kind)


BAD = ["missing_val", "missing_train", "missing_class", "empty_class", "truncated", "garbage", "wrong_shape",
       "mixed_size", "nan", "inf", "out_of_range", "pickle"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_error_exit_2_nothing_written(tiny_dataset, kind):
    expected = _break(tiny_dataset, kind)
    before = sorted(p.relative_to(tiny_dataset) for p in tiny_dataset.rglob("*"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "deeplense", "inspect", "--data", str(tiny_dataset)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    # progress bars may precede it; the error itself is one line, the last one
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    assert expected in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    # nothing written: no cache files (inspect validates both splits first), dataset untouched
    assert not [p for p in cache_dir().rglob("*") if p.is_file()]
    assert sorted(p.relative_to(tiny_dataset) for p in tiny_dataset.rglob("*")) == before


def test_not_a_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", "--data", str(tmp_path / "empty")]) == 2
    assert "no dataset found" in capsys.readouterr().err
    assert main(["inspect", "--data", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- hostile but realistic
def test_dangling_link_and_stray_copy_are_named(tmp_path, capsys):
    data = write_dataset(tmp_path / "d", 2, 2)
    link = data / "train" / "no" / "3.npy"
    link.symlink_to(tmp_path / "gone.npy")
    assert main(["inspect", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "train/no/3.npy: a symbolic link to" in err and "does not exist" in err
    link.unlink()
    for p in (data / "val" / "vort").glob("*.npy"):  # every file of a class a dangling link: still named
        target = tmp_path / "elsewhere" / p.name
        p.unlink()
        p.symlink_to(target)
    assert main(["inspect", "--data", str(data)]) == 2
    assert "val/vort/1.npy: a symbolic link" in capsys.readouterr().err
    shutil.rmtree(data)
    data = write_dataset(tmp_path / "d", 2, 2)
    shutil.copy(data / "val" / "sphere" / "1.npy", data / "val" / "sphere" / "1 copy.npy")
    assert main(["inspect", "--data", str(data)]) == 2
    assert "val/sphere/1 copy.npy: not named like the other files" in capsys.readouterr().err


def test_odd_first_file_is_the_one_blamed(tmp_path, capsys):
    data = write_dataset(tmp_path / "d", 4, 2)
    np.save(data / "train" / "no" / "1.npy", np.zeros((1, 64, 64)))
    assert main(["inspect", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "train/no/1.npy: shape (64, 64) differs from the rest of the split's (150, 150)" in err


def test_splits_of_different_sizes_are_refused(tmp_path, capsys):
    data = write_dataset(tmp_path / "d", 2, 2)
    for p in (data / "val").rglob("*.npy"):
        np.save(p, np.load(p)[:, :100, :100])
    assert main(["inspect", "--data", str(data)]) == 2
    assert "train/ holds 150x150 images but val/ holds 100x100" in capsys.readouterr().err
    assert not [p for p in cache_dir().rglob("*") if p.is_file()]


def test_a_file_changed_with_size_and_mtime_preserved_is_noticed(tiny_dataset):
    a = load_split(tiny_dataset, "train", progress=False)[0]
    p = tiny_dataset / "train" / "sphere" / "2.npy"
    st = p.stat()
    changed = np.load(p)
    changed[0, :10, :10] = 0.5  # same dtype and shape: the same size
    np.save(p, changed)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p`, `rsync -a` or `tar x` would leave it
    assert p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
    info: dict = {}
    b = load_splits(tiny_dataset, ("train",), info=info, progress=False)["train"][0]
    assert not info["train"].from_cache
    np.testing.assert_array_equal(b[5, 0, :10, :10], 0.5)
    assert not np.array_equal(a[5], b[5])


def test_full_disk_is_one_line_and_leaves_nothing(tiny_dataset, monkeypatch, capsys):
    import collections

    import deeplense.data as data_mod

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))
    assert main(["inspect", "--data", str(tiny_dataset)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cache_dir()) in err[0] and "GB free, the dataset cache needs" in err[0]
    assert not [p for p in cache_dir().rglob("*") if p.is_file()]


def test_disk_filling_during_the_build_is_one_line_and_leaves_nothing(tiny_dataset, monkeypatch, capsys):
    """The space check passes, then another process fills the disk: the reservation fails with ENOSPC."""
    import errno

    import deeplense.data as data_mod

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_mod.os, "posix_fallocate", full)
    assert main(["inspect", "--data", str(tiny_dataset)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {cache_dir()}: No space left on device while writing"), err
    assert not [p for p in cache_dir().rglob("*") if p.is_file()]


def test_stale_temp_files_of_dead_writers_are_swept(tiny_dataset):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    cache_dir().mkdir(parents=True, exist_ok=True)
    stale = [cache_dir() / f"train-abc.images.npy.{pid}.tmp", cache_dir() / f".train-abc.json.{pid}.x1y2z3.tmp"]
    live = cache_dir() / f"train-def.images.npy.{os.getppid()}.tmp"  # a live process's: kept
    for p in (*stale, live):
        p.write_bytes(b"x" * 100)
    load_split(tiny_dataset, "train", progress=False)
    assert not any(p.exists() for p in stale) and live.exists()


def test_quiet_surprises_are_named(tmp_path):
    """An extra class folder, 01.npy beside 1.npy and a --crop larger than the images are each one named error,
    not a silent drop, a double count or an ignored setting (issue 22, item 8)."""
    import shutil

    from deeplense.testing import write_dataset
    from deeplense.util import DeepLenseError

    root = write_dataset(tmp_path / "d", n_train=3, n_val=2)
    (root / "train" / "lenses_extra").mkdir()
    shutil.copy(root / "train" / "no" / "1.npy", root / "train" / "lenses_extra" / "1.npy")
    with pytest.raises(DeepLenseError, match=r"train/lenses_extra: a folder that is none of the classes"):
        list_files(root, "train")
    shutil.rmtree(root / "train" / "lenses_extra")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not datasets' classes: ignored
    assert len(list_files(root, "train")) == 9
    shutil.copy(root / "val" / "vort" / "1.npy", root / "val" / "vort" / "01.npy")
    with pytest.raises(DeepLenseError, match=r"val/vort/01\.npy: the same number as 1\.npy"):
        list_files(root, "val")
    with pytest.raises(DeepLenseError, match=r"--crop 200: larger than the 150x150 px images"):
        native_crop(np.zeros((2, 1, 150, 150), np.float32), np.arange(2), 200)


def test_a_symlink_loop_is_named_as_one(tmp_path):
    from deeplense.data import find_root
    from deeplense.util import DeepLenseError

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(DeepLenseError, match="a symbolic link loop"):
        find_root(tmp_path / "a")
    (tmp_path / "c").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DeepLenseError, match="a symbolic link to .*nowhere, which does not exist"):
        find_root(tmp_path / "c")
