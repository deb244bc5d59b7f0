"""Per-video feature files -> one HDF5 file per feature, the layout the grounding repos read.

- Inputs: `<vid>.npy` (T, D) (extra singleton axes such as LGI's (T, 1, 1, 1024) are squeezed, as
  MESM's npy2hdf5 does) and Moment-DETR/HERO-style `<vid>.npz` with key `features`. A `<vid>.json`
  sidecar from `vmr extract` adds the feature windows as the dataset attribute `windows`.
- Layouts: `flat` h5[vid] = (T, D) (MESM, 2D-TAN, MMN, CNM); `activitynet` h5[vid]["c3d_features"]
  (the ActivityNet challenge C3D file).
- Checks, each an error naming the video: NaN/Inf, wrong or inconsistent dim, empty array, a video
  present twice (a.npy and a.npz), unreadable file.
- The file is written under a temporary name and renamed when complete; provenance goes in the root
  attr `provenance` (JSON). Datasets are written in sorted id order without timestamps, so the bytes
  depend only on the inputs.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5d, h5p, h5s, h5t

from pipeline.core.atomic import atomic_path, remove_own_temporaries, write_bytes
from pipeline.core.errors import VmrError

FEATURE_SUFFIXES = (".npy", ".npz")


class MergeError(VmrError, ValueError):
    """Bad per-video input; the message names the file."""


@dataclass
class MergeSummary:
    videos: int
    dim: int
    total_rows: int
    bytes_in: int


def list_feature_files(src_dir: str | Path) -> dict[str, Path]:
    """video id -> file; a video present as both .npy and .npz is an error."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise MergeError(f"{src_dir}: feature directory not found")
    found: dict[str, Path] = {}
    for name in sorted(os.listdir(src_dir)):  # names, not Paths: sorting thousands of Paths is slow
        vid, suffix = os.path.splitext(name)
        if suffix not in FEATURE_SUFFIXES or name.startswith("."):
            continue
        if vid in found:
            raise MergeError(f"{src_dir}: duplicate video '{vid}': {found[vid].name} and {name}")
        found[vid] = src_dir / name
    return found


class SpaceBudget:
    """Refuses, before each write, a merge that cannot fit: HDF5 on a full disk does not fail cleanly
    (it raises from destructors and can crash the process). One `statvfs` at the start; the free space
    is measured again only when the running total of what is written would pass it. (Reading every
    input's header up front to sum the sizes cost as much as a third of the merge.)"""

    MARGIN = 1 << 20  # HDF5 metadata and attributes, generously
    PER_DATASET = 1024  # an object header and its attributes

    def __init__(self, out_path: str | Path):
        self.out_path = Path(out_path)
        self.parent = self.out_path.parent
        self.parent.mkdir(parents=True, exist_ok=True)
        self.left = self._free()

    def _free(self) -> int:
        return shutil.disk_usage(self.parent).free - self.MARGIN

    def take(self, nbytes: int, vid: str, written: int) -> None:
        nbytes += self.PER_DATASET
        if nbytes > self.left:
            self.left = self._free()  # space may have been freed meanwhile; what we wrote is already out of it
            if nbytes > self.left:
                raise MergeError(
                    f"{self.out_path}: out of disk space: video '{vid}' needs {nbytes / 2**20:.1f} MiB more after "
                    f"{written / 2**20:.1f} MiB written, but {self.parent} has {max(self.left, 0) / 2**20:.1f} MiB "
                    "free (nothing is kept)")
        self.left -= nbytes


def load_feature(path: Path) -> np.ndarray:
    """(T, D) array from a .npy or a .npz['features'] file."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "features" not in z.files:
                    raise MergeError(f"{path}: no 'features' array in the .npz (has {z.files})")
                arr = z["features"]
        else:
            arr = _load_npy(path)
    except MergeError:
        raise
    except Exception as e:
        raise MergeError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if arr.ndim > 2:  # (T, 1, 1, D) -> (T, D), keeping T even when it is 1
        arr = arr.reshape(arr.shape[0], -1) if all(s == 1 for s in arr.shape[1:-1]) else arr
    if arr.ndim != 2:
        raise MergeError(f"{path}: expected a (T, D) array, got shape {arr.shape}")
    return arr


def _load_npy(path: Path) -> np.ndarray:
    """`np.load(path)` for the plain .npy files `vmr extract` writes (format 1.0, C order, numeric), with
    each distinct header parsed once: numpy parses every header with `ast.literal_eval`, a third of
    the read time of a small feature file. Anything else goes to `np.load`."""
    with open(path, "rb") as f:
        start = f.read(10)
        if start[:8] != b"\x93NUMPY\x01\x00":
            return np.load(path, allow_pickle=False)
        header = f.read(int.from_bytes(start[8:10], "little"))
        parsed = _npy_header(header)
        if parsed is None:
            return np.load(path, allow_pickle=False)
        shape, dtype = parsed
        arr = np.fromfile(f, dtype=dtype, count=int(np.prod(shape)))
    if arr.size != int(np.prod(shape)):
        raise MergeError(f"{path}: truncated .npy ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of a .npy 1.0 header, or None when np.load should read the file."""
    try:
        d = ast.literal_eval(header.decode("latin1"))
        dtype = np.dtype(d["descr"])
    except Exception:
        return None
    if d.get("fortran_order") or dtype.hasobject or not isinstance(d.get("shape"), tuple):
        return None
    return tuple(d["shape"]), dtype


def check_feature(vid: str, path: Path, arr: np.ndarray, dim: int | None) -> None:
    if arr.shape[0] == 0:
        raise MergeError(f"{path}: video '{vid}' has an empty feature array {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise MergeError(f"{path}: video '{vid}' has dim {arr.shape[1]}, expected {dim}")
    if arr.dtype.kind != "f":
        raise MergeError(f"{path}: video '{vid}' has dtype {arr.dtype}, expected floats")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise MergeError(f"{path}: video '{vid}' has NaN/Inf values in {bad} of {arr.shape[0]} rows")


def merge_to_hdf5(
    src_dir: str | Path,
    out_path: str | Path,
    dtype: str = "float32",
    compression: str = "none",
    layout: str = "flat",
    dim: int | None = None,
    provenance: dict[str, Any] | None = None,
    progress=None,
) -> MergeSummary:
    """Merge every per-video file of `src_dir` into `out_path` (atomically); see the module docstring."""
    files = list_feature_files(src_dir)
    sidecars = {p.name for p in Path(src_dir).glob("*.json")}  # one listing, not a stat per video
    if not files:
        raise MergeError(f"{src_dir}: no .npy/.npz feature files")
    comp = None if compression == "none" else compression
    total_rows = bytes_in = 0
    remove_own_temporaries(out_path)  # a killed merge's half-written file
    space = SpaceBudget(out_path)
    with atomic_path(out_path) as tmp, _EarlyWriteback(tmp) as writeback:
        # track_times=False and a fixed id order keep the file's bytes a function of its contents
        with h5py.File(tmp, "w", track_order=False) as h5:
            for vid, path in files.items():
                arr = load_feature(path)
                check_feature(vid, path, arr, dim)
                dim = arr.shape[1]
                with np.errstate(over="ignore"):  # reported below, naming the video
                    data = arr.astype(dtype, copy=False)
                if data.dtype != arr.dtype and not np.isfinite(data).all():
                    raise MergeError(f"{path}: video '{vid}' overflows {dtype}")
                space.take(data.nbytes, vid, written=total_rows * data.itemsize * dim)
                target = h5 if layout == "flat" else h5.create_group(vid, track_order=False)
                name = vid if layout == "flat" else "c3d_features"
                if comp is None:
                    ds = _write_contiguous(target, name, data)
                else:
                    ds = target.create_dataset(name, data=data, compression=comp, track_times=False, chunks=True).id
                windows = _windows(path.parent / f"{vid}.json") if f"{vid}.json" in sidecars else None
                if windows is not None and len(windows) == len(arr):
                    h5py.Dataset(ds).attrs["windows"] = windows
                total_rows += arr.shape[0]
                bytes_in += path.stat().st_size
                writeback.wrote(data.nbytes)
                if progress:
                    progress()
            h5.attrs["layout"] = layout
            h5.attrs["dim"] = int(dim)
            h5.attrs["num_videos"] = len(files)
            if provenance is not None:
                h5.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
    return MergeSummary(len(files), int(dim), total_rows, bytes_in)


class _EarlyWriteback:
    """Starts the disk writes of what the merge wrote so far every `every` bytes, so that the fsync
    before the rename (`atomic_path`) finds little left to write: the disk works while the merge
    reads the next files, instead of after. posix_fadvise(DONTNEED) starts writeback of dirty pages
    without waiting (Linux); elsewhere this does nothing."""

    def __init__(self, path: Path, every: int = 8 << 20):
        self.path, self.every, self.pending, self.fd = path, every, 0, None

    def __enter__(self) -> _EarlyWriteback:
        if hasattr(os, "posix_fadvise"):
            self.fd = os.open(self.path, os.O_RDONLY)
        return self

    def wrote(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.fd is not None and self.pending >= self.every:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self.pending = 0

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


_NO_TIMES = h5p.create(h5p.DATASET_CREATE)
_NO_TIMES.set_obj_track_times(False)


def _write_contiguous(parent: h5py.Group, name: str, data: np.ndarray) -> h5d.DatasetID:
    """`parent.create_dataset(name, data=data, track_times=False)` in h5py's low-level calls: the same
    bytes, without the high-level call's per-dataset Python work (about a fifth of merging many small
    files, which made the merge slower than a plain h5py loop)."""
    dataset = h5d.create(parent.id, name.encode("utf-8"), h5t.py_create(data.dtype, logical=1),
                         h5s.create_simple(data.shape), dcpl=_NO_TIMES)
    dataset.write(h5s.ALL, h5s.ALL, np.ascontiguousarray(data))
    return dataset


def _windows(sidecar: Path) -> np.ndarray | None:
    try:
        w = json.loads(sidecar.read_text()).get("windows")
    except (OSError, json.JSONDecodeError):
        return None
    return None if w is None else np.asarray(w, dtype=np.float64).reshape(-1, 2)


def read_features(h5_path: str | Path, vid: str) -> np.ndarray:
    """(T, D) of one video from either layout."""
    with h5py.File(h5_path, "r") as h5:
        node = h5[vid]
        return node["c3d_features"][:] if isinstance(node, h5py.Group) else node[:]


def export_npz(h5_path: str | Path, out_dir: str | Path, dtype: str | None = None) -> int:
    """Write Moment-DETR-style `<vid>.npz` {"features": (T, D)} for every video of an HDF5 file.

    numpy's savez stamps the current time into the zip; entries here get a fixed date instead, so the
    exported files are reproducible byte for byte.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with h5py.File(h5_path, "r") as h5:
        for vid in sorted(h5.keys()):
            node = h5[vid]
            arr = node["c3d_features"][:] if isinstance(node, h5py.Group) else node[:]
            if dtype:
                arr = arr.astype(dtype)
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(zipfile.ZipInfo("features.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
            write_bytes(out_dir / f"{vid}.npz", out.getvalue())
        return len(h5.keys())
