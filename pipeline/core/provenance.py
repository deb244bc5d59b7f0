"""Provenance: every artifact records what made it.

A record is a JSON object: the stage, the params it read, the sha256 of each input (files, or a
digest of a directory's files), the code version and, for anything touched by pretrained weights,
their sha256 or the string "random". It lives in a sidecar `<artifact>.prov.json` (or, for a
directory, `<dir>/provenance.json`), and HDF5 files also carry it in the `provenance` root attr.
`vmr lineage` follows `inputs` back to the raw files.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.core.atomic import write_json
from pipeline.core.codedeps import PACKAGES, REPO_ROOT
from pipeline.core.errors import ChecksumError
from pipeline.core.progress import log

SIDECAR_SUFFIX = ".prov.json"
DIR_RECORD = "provenance.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Digest of a directory: relative paths and contents of its files, in sorted order.

    Provenance sidecars are left out so that recording provenance does not change the digest.
    """
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        if p.name == DIR_RECORD or p.name.endswith(SIDECAR_SUFFIX) or p.name.startswith(".tmp-"):
            continue
        h.update(str(p.relative_to(root)).encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    return sha256_tree(path) if Path(path).is_dir() else sha256_file(path)


def code_version(code: tuple[str, ...] | list[str] = PACKAGES) -> str:
    """Package version plus a digest of the code a stage runs (git-independent, stable across clones).

    `code` lists files/directories relative to the repo root: a stage passes its derived code
    (`codedeps.stage_code`, as in its dvc.yaml deps), so that editing unrelated code changes neither
    the record nor the cache. A listed path that does not exist is an error, never an empty digest.
    """
    h = hashlib.sha256()
    for entry in sorted(code):
        base = REPO_ROOT / entry
        if not base.exists():
            raise FileNotFoundError(f"code_version: {entry} does not exist under {REPO_ROOT}")
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base]
        for p in files:
            h.update(str(p.relative_to(REPO_ROOT)).encode())
            h.update(p.read_bytes())
    return f"vmr-{__version__}+code.{h.hexdigest()[:12]}"


def weights_record(path: str | os.PathLike | None, expected_sha256: str | None = None,
                   kind: str = "weights file") -> str:
    """sha256 of a weights file (checked against `expected_sha256` when given), or "random".
    `kind` names the file in the error (e.g. "C3D mean file").

    Random init is loud: a line on stderr every time, and the string lands in the provenance.
    """
    if path is None:
        log("WARNING: no pretrained weights configured: using seeded random init (weights: random)")
        return "random"
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ChecksumError(
            f"{kind} {path}: sha256 {digest} does not match the expected {expected_sha256}"
        )
    return digest


def make_record(
    stage: str,
    params: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
    weights: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    code: tuple[str, ...] | list[str] = PACKAGES,
) -> dict[str, Any]:
    """Build a provenance record. `inputs` maps a role ("videos", "features") to a path.

    `code`: the files/directories the stage runs (as in its dvc.yaml deps), for `code_version`.
    """
    record: dict[str, Any] = {
        "stage": stage,
        "params": dict(params),
        "inputs": {
            role: {"path": _rel(p), "sha256": sha256_path(p)} for role, p in (inputs or {}).items()
        },
        "code_version": code_version(code),
        "weights": dict(weights or {}),
        "environment": {"python": sys.version.split()[0], "platform": platform.machine()},
    }
    if extra:
        record.update(extra)
    return record


def _rel(path: str | os.PathLike) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def record_path(artifact: str | os.PathLike) -> Path:
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact / DIR_RECORD
    return artifact.with_name(artifact.name + SIDECAR_SUFFIX)


def write_record(artifact: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    target = record_path(artifact)
    write_json(target, record)
    return target


def read_record(artifact: str | os.PathLike) -> dict[str, Any] | None:
    """The record of an artifact: its sidecar, or an HDF5 file's `provenance` attr; None if absent."""
    artifact = Path(artifact)
    sidecar = record_path(artifact)
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    if artifact.suffix in {".h5", ".hdf5"} and artifact.is_file():
        import h5py

        with h5py.File(artifact, "r") as f:
            if "provenance" in f.attrs:
                return json.loads(f.attrs["provenance"])
    return None


def timestamp() -> str:
    """Wall-clock time, only for human-facing logs: never put it in a cached artifact."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
