"""Atomic file writing and the project's text formats (TSV, JSON), in one place.

Every file the app writes goes through :func:`atomic_path` or :func:`atomic_directory`: it is
written beside its final name and renamed into place, so a reader (or a rerun after a kill)
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


#: Partial files and folders carry their writer (host and process), so a later run can tell
#: a dead writer's leftovers from a parallel job's work in progress.
_PARTIAL = re.compile(r"^\..+\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.partial")
#: Leftovers of another host (whose processes cannot be asked) are removed after a day.
STALE_AFTER_S = 24 * 3600


def writer_tag() -> str:
    """``<host>.<pid>.<random>``: who writes a partial file or staging folder."""
    host = socket.gethostname().split(".")[0].replace(".", "-") or "host"
    return f"{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _partial_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that keeps its extension (writers pick formats by it)."""
    suffixes = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return path.with_name(f".{path.name}.{writer_tag()}.partial{suffixes}")


def is_stale(name: str, mtime: float) -> bool:
    """Whether a partial file or staging entry called ``name`` was left by a dead writer: a
    process of this host that no longer runs, or anyone's a day ago."""
    match = _PARTIAL.match(name) or re.match(r"^(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}$",
                                              name)
    if match is None:
        return False
    if time.time() - mtime > STALE_AFTER_S:
        return True
    if match["host"] != socket.gethostname().split(".")[0]:
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_partials(root: Path, skip: Sequence[Path] = ()) -> list[Path]:
    """Remove what killed writers left under ``root`` (not under ``skip``): partial files,
    staging folders. A SIGKILL runs no ``finally``; this is the clean-up it could not do."""
    removed = []
    skipped = {Path(p).resolve() for p in skip}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if (here / d).resolve() not in skipped]
        for name in [*files, *dirs]:
            path = here / name
            try:
                stale = is_stale(name, path.lstat().st_mtime)
            except FileNotFoundError:
                continue
            if stale:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    dirs[:] = [d for d in dirs if d != name]
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_name(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder; on success it takes the place of ``path`` (an existing
    folder is swapped out and removed), on error it is removed.

    ``os.mkdir`` gives the staging folder the permissions the umask allows, as any folder the
    user makes (``mkdtemp``'s 0700 would hide a saved model from the rest of the lab).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{writer_tag()}.partial")
    staging.mkdir()
    try:
        yield staging
        if path.exists():
            retired = path.with_name(f".{path.name}.{writer_tag()}.partial")
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as partial:
        partial.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], content: Any) -> Path:
    """Strict JSON (no NaN: :func:`json_ready` turns non-finite numbers into null), indented."""
    text = json.dumps(json_ready(content), indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def json_ready(value: Any) -> Any:
    """A JSON-ready copy: numpy scalars and arrays become Python numbers and lists, paths
    strings, NaN and infinity null (e.g. the PSNR of identical images is infinite)."""
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalar or array, without importing numpy here
        return json_ready(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def tsv_cell(value: Any) -> str:
    """One TSV cell: ``n/a`` for missing values (BIDS), 6 significant digits for floats."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_tsv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
) -> Path:
    """A BIDS-style TSV: ``columns`` (default: every key, in first-seen order), one row each."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    lines = ["\t".join(columns)]
    lines += ["\t".join(tsv_cell(row.get(column)) for column in columns) for row in rows]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def file_locks(paths: Sequence[Path],
               on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Hold exclusive POSIX locks on ``paths`` (created when missing), taken in sorted order
    so that two jobs wanting overlapping sets cannot deadlock; ``on_wait(path)`` is called
    before blocking on one another job holds. ``lockf`` locks also hold across hosts on NFS
    with a lock daemon; they go when the process dies, even by SIGKILL."""
    import fcntl

    handles = []
    try:
        for path in sorted({Path(p) for p in paths}):
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 (closed in finally)
            handles.append(handle)
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if on_wait is not None:
                    on_wait(path)
                fcntl.lockf(handle, fcntl.LOCK_EX)
        yield
    finally:
        for handle in reversed(handles):
            handle.close()
