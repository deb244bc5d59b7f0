"""Atomic file writing: an output exists under its final name only once it is complete.

Everything is written to a temporary sibling (same directory, so `os.replace` is atomic on POSIX)
and renamed at the end; an exception or a SIGKILL leaves at most a `.tmp-*` file that no reader
mistakes for a finished artifact.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TMP_PREFIX = ".tmp-"
# A file name may have 255 bytes; mkstemp adds 8 random characters and the prefix adds its own, so
# the temporary's copy of the final name is cut to fit (a 250-byte video id must still decode).
_NAME_BYTES_IN_TEMPORARY = 200


def temporary_prefix(name: str) -> str:
    """`.tmp-<name>.` with `name` cut to a length whose temporary file name the OS accepts."""
    cut = name.encode("utf-8")[:_NAME_BYTES_IN_TEMPORARY].decode("utf-8", errors="ignore")
    return f"{TMP_PREFIX}{cut}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path.name), dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def remove_own_temporaries(path: str | os.PathLike) -> None:
    """Delete what an interrupted write of `path` left (`.tmp-<name>.*` beside it)."""
    path = Path(path)
    if path.parent.is_dir():
        for f in path.parent.glob(glob.escape(temporary_prefix(path.name)) + "*"):
            f.unlink(missing_ok=True)


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete `.tmp-*` leftovers of an interrupted run; returns how many were removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    stale = list(directory.rglob(TMP_PREFIX + "*"))
    for p in stale:
        if p.is_file():
            p.unlink()
    return len(stale)
