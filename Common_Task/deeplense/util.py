"""Small shared helpers: the user-error type, atomic writes and provenance."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


class DeepLenseError(Exception):
    """A user mistake (bad input file, missing folder, wrong checkpoint).

    The CLI prints its message on one line and exits with status 2, without a traceback.
    The message always names the offending file or folder.
    """


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    Readers never see a half-written file: either the old file (or none) or the complete new one. Only regular files
    are replaced so: a symbolic link is followed (the file it points to is replaced, the link stays), and anything
    else that exists at ``final`` (a FIFO, ``/dev/null``, ``/dev/stdout``, a socket) is written directly, never
    replaced by a regular file.
    """
    final = Path(final)
    if final.is_symlink():
        final = Path(os.path.realpath(final))
    if final.exists() and not final.is_file() and not final.is_dir():
        yield final  # a special file: write into it
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    # the process id in the name lets sweep_stale_temps() tell a dead writer's leftovers from a live one's file;
    # the name is cut so that a legal long file name still leaves room for the temporary one's
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name[:80]}.{os.getpid()}.", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the result the mode a plain open() would (0666 minus the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


TEMP_NAME = re.compile(r"\.(\d+)\.(?:[A-Za-z0-9_]+\.)?tmp(?:\.|$)")
"""Temporary files of this package: ``.NAME.PID.RANDOM.tmp[.ext]`` (atomic_path) or ``NAME.PID.tmp[.ext]``."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike, *, all_of_them: bool = False) -> list[Path]:
    """Remove the temporary files a killed writer left in ``folder`` (not below it): those whose process is gone,
    or every one with ``all_of_them`` (a folder only this process writes, such as a resumed run). Returns them."""
    removed = []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return removed
    for e in entries:
        m = TEMP_NAME.search(e.name)
        if m and e.is_file(follow_symlinks=False) and (all_of_them or not _alive(int(m.group(1)))) and \
                int(m.group(1)) != os.getpid():
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "a training run") -> Iterator[None]:
    """Hold ``folder/.lock`` exclusively while the block runs (an OS lock, ``flock``, on a file naming the owner's
    pid): a second ``train`` or ``evaluate`` on the same folder stops with one line instead of interleaving its
    files with the first one's. A killed owner's lock is released by the OS, so a stale one is simply taken over.
    (``flock`` is per host: two nodes of a cluster writing one folder on NFS are not kept apart.)"""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise DeepLenseError(f"{folder}: in use by process {owner}; wait for it to finish or use another "
                                 f"folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} ({what})\n".encode(), 0)
        yield  # the file stays (removing it would let a process that opened it meanwhile lock a dead inode)
    finally:
        os.close(fd)  # releases the lock


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_section(path: str | os.PathLike, start: str, end: str, body: str) -> None:
    """Replace the text between the marker lines ``start`` and ``end`` of ``path`` (a README) with ``body``.

    The markers stay, so the next run finds them again; the file is rewritten atomically.
    """
    path = Path(path)
    text = path.read_text()
    if start not in text or end not in text:
        raise DeepLenseError(f"{path}: no {start} ... {end} section to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text_atomic(path, f"{head}{start}\n{body}\n{end}{tail}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (a run's ``history.jsonl``); an empty list if there is no file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


REPO = Path(__file__).resolve().parents[2]
"""The repository root (README.md, images/, the notebook's folder), for an editable install or a checkout."""


def git_commit() -> str:
    """The checkout's short commit, with ``+uncommitted changes`` when tracked files differ; ``unknown`` outside git."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    """``CPU: <model name> (<n> cores)``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    """Versions of Python and the packages that determine results, as plain strings."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("numpy", "torch", "torchvision", "sklearn", "lenstronomy", "deeplense"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except Exception:  # noqa: BLE001 - a missing optional package is simply not recorded
                continue
        out[name] = str(getattr(mod, "__version__", "unknown"))
    return out


def cache_dir() -> Path:
    """Where derived data lives: ``$DEEPLENSE_CACHE``, default ``~/.cache/deeplense``."""
    env = os.environ.get("DEEPLENSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deeplense"


def progress_bar(iterable=None, *, disable: bool = False, **kwargs):
    """A tqdm progress bar. Off when ``$TQDM_DISABLE`` is set; when stderr is not a terminal (a notebook
    being executed, a log file) it redraws at most every 30 s so stored outputs stay small."""
    from tqdm import tqdm

    disable = disable or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    if not getattr(sys.stderr, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, disable=disable, **kwargs)
