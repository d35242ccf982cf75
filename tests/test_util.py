"""deeplense.util: atomic writes, stale temporary files, the folder lock, README sections, small readers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deeplense.util import (
    TEMP_NAME,
    DeepLenseError,
    atomic_path,
    cache_dir,
    file_sha256,
    folder_lock,
    progress_bar,
    read_jsonl,
    replace_section,
    sweep_stale_temps,
    write_json_atomic,
)


def test_atomic_path_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            m = TEMP_NAME.search(tmp.name)  # a name sweep_stale_temps recognises, with this process's id
            assert m and int(m.group(1)) == os.getpid() and tmp.parent == final.parent
            raise RuntimeError("killed mid-write")
    assert final.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_path(final) as tmp:
        tmp.write_text("new")
    umask = os.umask(0)
    os.umask(umask)
    assert final.read_text() == "new" and (final.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_follows_a_link_and_writes_into_special_files(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json_atomic(link, {"a": 1})
    assert link.is_symlink() and target.read_text() == '{\n  "a": 1\n}\n'
    with atomic_path(os.devnull) as p:  # never replaced by a regular file
        assert p == Path(os.devnull)


def test_sweep_removes_only_temporaries_of_dead_writers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {f".a.npy.{dead.pid}.x1.tmp": True,  # a killed writer's: removed
             f".b.npy.{os.getpid()}.x2.tmp": False,  # this process's own: kept
             ".c.npy.1.x3.tmp": False,  # a live process's (init): kept
             "d.npy": False}  # not a temporary file
    for name in names:
        (tmp_path / name).write_text("x")
    removed = sweep_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [n for n, gone in names.items() if gone]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, gone in names.items() if not gone)
    assert sweep_stale_temps(tmp_path / "missing") == []
    assert [p.name for p in sweep_stale_temps(tmp_path, all_of_them=True)] == [".c.npy.1.x3.tmp"]


def test_folder_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    with folder_lock(tmp_path / "run"):
        with pytest.raises(DeepLenseError, match=f"in use by process {os.getpid()}"):
            with folder_lock(tmp_path / "run"):
                pass
    with folder_lock(tmp_path / "run"):  # released on the way out
        pass


def test_replace_section_keeps_the_markers_and_names_a_file_without_them(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- x:start -->\nold\n<!-- x:end -->\ntail\n")
    replace_section(readme, "<!-- x:start -->", "<!-- x:end -->", "new 1\nnew 2")
    assert readme.read_text() == "head\n<!-- x:start -->\nnew 1\nnew 2\n<!-- x:end -->\ntail\n"
    with pytest.raises(DeepLenseError, match=f"{readme}: no <!-- y:start -->"):
        replace_section(readme, "<!-- y:start -->", "<!-- y:end -->", "z")


def test_small_readers(tmp_path, monkeypatch):
    blob = os.urandom((1 << 20) + 17)  # more than one read block
    (tmp_path / "blob").write_bytes(blob)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(blob).hexdigest()
    (tmp_path / "h.jsonl").write_text('{"epoch": 1}\n\n{"epoch": 2}\n')
    assert read_jsonl(tmp_path / "h.jsonl") == [{"epoch": 1}, {"epoch": 2}]
    assert read_jsonl(tmp_path / "none.jsonl") == []
    monkeypatch.setenv("DEEPLENSE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(range(3)).disable
