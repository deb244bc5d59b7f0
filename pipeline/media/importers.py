"""Published feature files read as they were released, into vmr's feature files (`vmr import-features`).

One small reader per layout (`LAYOUTS`), each yielding `(id, where, value)` one item at a time:

    npz_dir            <vid>.npz with one (T, D) array, `features` (HERO / Moment-DETR QVHighlights
                       clip_features/, slowfast_features/)
    npy_dir            <vid>.npy (T, D); singleton axes squeezed (LGI's i3d_finetuned (T, 1, 1, 1024))
    hdf5_flat          h5[vid] = (T, D) (MMN, MESM, CNM, 2D-TAN files)
    hdf5_activitynet   h5[vid][key] = (T, D), key `c3d_features` (the ActivityNet challenge C3D file)
    query_npz_dir      qid<qid>.npz with `last_hidden_state` (L, D) and `pooler_output` (D,)
                       (Moment-DETR clip_text_features/), keyed by qid

`where` names the file and key, so every error says where the bad array is. `PUBLISHED` holds what
../shared/reference/feature_protocols.md documents for the released files (layout, key, seconds from
one row to the next, the span of a row, dim); `resolve` merges it with what params spell out.
Rows get their times from these numbers: row k spans [k * stride, k * stride + window] seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.core.atomic import atomic_path, remove_own_temporaries
from pipeline.core.errors import VmrError

ACTIVITYNET_KEY = "c3d_features"
QUERY_KEYS = ("last_hidden_state", "pooler_output")


class FeatureImportError(VmrError, ValueError):
    """A published file that cannot be read as its layout says; the message names the file and key."""


# -- what the released files are (feature_protocols.md) --------------------------------------------


@dataclass(frozen=True)
class Published:
    layout: str
    dim: int
    seconds_per_row: float | None  # None: the release does not fix it (C3D every 8 frames at each video's fps)
    window_seconds: float | None = None  # None: the row spans seconds_per_row
    key: str | None = None
    note: str = ""


PUBLISHED: dict[str, Published] = {
    "qvhighlights_clip": Published("npz_dir", 512, 2.0, key="features",
                                   note="HERO CLIP ViT-B/32, one row per 2 s clip (Moment-DETR clip_features/)"),
    "qvhighlights_slowfast": Published("npz_dir", 2304, 2.0, key="features",
                                       note="HERO SlowFast R50, one row per 2 s clip (Moment-DETR slowfast_features/)"),
    "qvhighlights_clip_text": Published("query_npz_dir", 512, None,
                                        note="CLIP ViT-B/32 text, per query (Moment-DETR clip_text_features/)"),
    "charades_clip": Published("hdf5_flat", 512, 1.0, note="MESM charades/clip_image.hdf5: HERO CLIP every 1 s"),
    "charades_slowfast": Published("hdf5_flat", 2304, 1.0, note="MESM charades/slowfast.hdf5: HERO SlowFast every 1 s"),
    "charades_vgg": Published("hdf5_flat", 4096, 1 / 8,
                              note="Charades two-stream RGB fc7 at 8 fps (MMN/2D-TAN vgg_rgb_features.hdf5)"),
    "charades_vgg_umt": Published("hdf5_flat", 4096, 1 / 6,
                                  note="UMT's Charades VGG copy, 6 rows/s (MESM vgg.hdf5, clip_len 0.17)"),
    "charades_i3d": Published("hdf5_flat", 1024, 8 / 24, 16 / 24,
                              note="LGI I3D: one row per 8 frames at 24 fps, 16-frame span (CNM i3d_features.hdf5)"),
    "tacos_c3d": Published("hdf5_flat", 4096, 12 / 29.4, 64 / 29.4,
                           note="TALL C3D fc6, 64-frame windows every 12 frames at 29.4 fps (MMN tall_c3d_features.hdf5)"),
    "activitynet_c3d": Published("hdf5_activitynet", 500, None, key=ACTIVITYNET_KEY,
                                 note="ActivityNet 2016 C3D fc7 PCA-500, every 8 frames at each video's own fps"),
}


# -- readers, one per layout -----------------------------------------------------------------------

Item = tuple[str, str, Any]  # (id, "file: key ..." for messages, array or {name: array})


def _files(folder: Path, suffix: str) -> list[Path]:
    if not folder.is_dir():
        raise FeatureImportError(f"{folder}: this layout reads a folder of <id>{suffix} files, not a file")
    files = sorted(p for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith("."))
    if not files:
        raise FeatureImportError(f"{folder}: no {suffix} files")
    return files


def _npz_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [n for n in names if n not in z.files]
            if missing:
                raise FeatureImportError(f"{path}: no array '{missing[0]}' (the file has {sorted(z.files)})")
            return {n: z[n] for n in names}
    except FeatureImportError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FeatureImportError(f"{path}: unreadable .npz ({type(e).__name__}: {e})") from None


def read_npz_dir(path: Path, key: str) -> Iterator[Item]:
    for f in _files(path, ".npz"):
        yield f.stem, f"{f}: key '{key}'", _npz_arrays(f, (key,))[key]


def read_npy_dir(path: Path, key: str | None) -> Iterator[Item]:
    for f in _files(path, ".npy"):
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise FeatureImportError(f"{f}: unreadable .npy ({type(e).__name__}: {e})") from None
        yield f.stem, str(f), arr


def _open_hdf5(path: Path) -> h5py.File:
    if not path.is_file():
        raise FeatureImportError(f"{path}: this layout reads one HDF5 file, not a folder")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise FeatureImportError(f"{path}: not a readable HDF5 file ({e})") from None


def _read_dataset(node: h5py.Dataset, where: str) -> np.ndarray:
    try:
        return node[()]
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # truncated or damaged chunks
        raise FeatureImportError(f"{where}: unreadable ({type(e).__name__}: {e})") from None


def read_hdf5_flat(path: Path, key: str | None) -> Iterator[Item]:
    with _open_hdf5(path) as h5:
        if not len(h5):
            raise FeatureImportError(f"{path}: no videos in the file")
        for vid in sorted(h5.keys()):
            node, where = h5[vid], f"{path}: key '{vid}'"
            if isinstance(node, h5py.Group):
                raise FeatureImportError(f"{where}: a group (members {sorted(node.keys())}), not a (T, D) dataset; "
                                         "is the layout hdf5_activitynet?")
            yield vid, where, _read_dataset(node, where)


def read_hdf5_activitynet(path: Path, key: str) -> Iterator[Item]:
    with _open_hdf5(path) as h5:
        if not len(h5):
            raise FeatureImportError(f"{path}: no videos in the file")
        for vid in sorted(h5.keys()):
            node, where = h5[vid], f"{path}: key '{vid}/{key}'"
            if not isinstance(node, h5py.Group):
                raise FeatureImportError(f"{path}: key '{vid}': a dataset, not a group holding '{key}'; "
                                         "is the layout hdf5_flat?")
            if key not in node:
                raise FeatureImportError(f"{path}: key '{vid}': no '{key}' in the group (has {sorted(node.keys())})")
            yield vid, where, _read_dataset(node[key], where)


def read_query_npz_dir(path: Path, key: str | None) -> Iterator[Item]:
    for f in _files(path, ".npz"):
        yield f.stem.removeprefix("qid"), str(f), _npz_arrays(f, QUERY_KEYS)


@dataclass(frozen=True)
class Layout:
    read: Callable[[Path, Any], Iterator[Item]]
    per: str  # "video": a (T, D) array per video; "query": token and pooled features per query
    default_key: str | None = None


LAYOUTS: dict[str, Layout] = {
    "npz_dir": Layout(read_npz_dir, "video", "features"),
    "npy_dir": Layout(read_npy_dir, "video"),
    "hdf5_flat": Layout(read_hdf5_flat, "video"),
    "hdf5_activitynet": Layout(read_hdf5_activitynet, "video", ACTIVITYNET_KEY),
    "query_npz_dir": Layout(read_query_npz_dir, "query"),
}


# -- params + the published defaults -> one import spec --------------------------------------------


@dataclass(frozen=True)
class ImportSpec:
    """What to read and how to time its rows, after the published file's defaults are filled in."""

    name: str
    path: str
    layout: str
    key: str | None
    dim: int | None  # the published file's documented dim, checked when known
    seconds_per_row: float | None
    window_seconds: float | None
    published: str | None
    row_times_from: str  # where seconds_per_row came from: "params" or "published <name>"

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def resolve(name: str, cfg: Any) -> ImportSpec:
    """Fill `cfg` (an `imports.<name>` section) from `PUBLISHED[cfg.published]`; params win.

    Raises FeatureImportError naming the key when the layout leaves something undetermined."""
    at = f"imports.{name}"
    pub = PUBLISHED[cfg.published] if cfg.published else None
    layout = cfg.layout or (pub.layout if pub else None)
    if layout is None:
        raise FeatureImportError(f"key '{at}': give `layout` or `published` (one of {sorted(PUBLISHED)})")
    spec = LAYOUTS[layout]
    if spec.per == "query":
        if cfg.key is not None or cfg.seconds_per_row is not None or cfg.window_seconds is not None:
            raise FeatureImportError(f"key '{at}': layout {layout} holds per-query features "
                                     f"({' and '.join(QUERY_KEYS)}): key, seconds_per_row and window_seconds "
                                     "do not apply")
        return ImportSpec(name, cfg.path, layout, None, pub.dim if pub else None, None, None, cfg.published, "")
    if spec.default_key is None and cfg.key is not None:  # npy_dir, hdf5_flat
        raise FeatureImportError(f"key '{at}.key': layout {layout} holds one array per video: no key applies")
    # a published file's key only where its own layout is read (charades_i3d as LGI's npy folder: none)
    key = cfg.key or (pub.key if pub and pub.layout == layout else None) or spec.default_key
    if cfg.seconds_per_row is not None:
        stride, source = cfg.seconds_per_row, "params"
    elif pub is not None and pub.seconds_per_row is not None:
        stride, source = pub.seconds_per_row, f"published {cfg.published}"
    else:
        why = f" ({pub.note})" if pub is not None else ""
        raise FeatureImportError(
            f"key '{at}.seconds_per_row': not implied by the layout{why}; give the seconds from one feature "
            "row to the next (e.g. 0.2669 for C3D every 8 frames at 29.97 fps)")
    window = cfg.window_seconds or (pub.window_seconds if pub and cfg.seconds_per_row is None else None) or stride
    return ImportSpec(name, cfg.path, layout, key, pub.dim if pub else None, float(stride), float(window),
                      cfg.published, source)


# -- checks and writing ----------------------------------------------------------------------------


def _as_rows(arr: Any, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim > 2 and all(s == 1 for s in arr.shape[1:-1]):  # (T, 1, 1, D) -> (T, D)
        arr = arr.reshape(arr.shape[0], arr.shape[-1])
    if arr.ndim != 2:
        raise FeatureImportError(f"{where}: expected a (T, D) array, got shape {arr.shape}")
    return arr


def _check(arr: np.ndarray, where: str, dim: int | None, dim_from: str) -> None:
    if not np.issubdtype(arr.dtype, np.floating):
        raise FeatureImportError(f"{where}: dtype {arr.dtype}, expected floats")
    if arr.shape[0] == 0:
        raise FeatureImportError(f"{where}: no rows (shape {arr.shape})")
    if dim is not None and arr.shape[-1] != dim:
        raise FeatureImportError(f"{where}: dim {arr.shape[-1]}, expected {dim} ({dim_from})")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr.reshape(arr.shape[0], -1))).any(axis=1).sum())
        raise FeatureImportError(f"{where}: NaN/Inf in {bad} of {arr.shape[0]} rows")


def row_windows(rows: int, seconds_per_row: float, window_seconds: float) -> np.ndarray:
    """(rows, 2) float64 [start, end] seconds: row k spans [k * stride, k * stride + window]."""
    start = np.arange(rows, dtype=np.float64) * seconds_per_row
    return np.stack([start, start + window_seconds], axis=1)


def _check_space(source: Path, out_path: Path) -> None:
    """HDF5 on a full disk does not fail cleanly (see h5merge), so refuse up front. The output holds
    the same arrays in their own dtype; twice the source's bytes covers a compressed source."""
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    needed = 2 * sum(p.stat().st_size for p in files) + (1 << 20)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_path.parent).free
    if free < needed:
        raise FeatureImportError(f"{out_path}: the import needs about {needed / 2**20:.1f} MiB, "
                                 f"but {out_path.parent} has {free / 2**20:.1f} MiB free")


@dataclass
class ImportSummary:
    items: int
    dim: int
    rows: int
    dtype: str


def import_video_features(spec: ImportSpec, out_path: str | Path, compression: str = "none",
                          provenance: dict[str, Any] | None = None, progress=None) -> ImportSummary:
    """Read `spec.path` in its layout into the flat vmr file `out_path`, with row windows; atomic."""
    out_path = Path(out_path)
    layout = LAYOUTS[spec.layout]
    assert layout.per == "video", spec.layout
    remove_own_temporaries(out_path)
    _check_space(Path(spec.path), out_path)
    comp = None if compression == "none" else compression
    dim, dim_from, rows, dtypes = spec.dim, f"the documented dim of {spec.published}", 0, set()
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w", track_order=False) as h5:
        with contextlib.closing(layout.read(Path(spec.path), spec.key)) as items:
            for vid, where, value in items:
                arr = _as_rows(value, where)
                _check(arr, where, dim, dim_from)
                if dim is None:
                    dim, dim_from = arr.shape[1], f"as '{vid}' has"
                ds = h5.create_dataset(vid, data=arr, compression=comp, chunks=True if comp else None,
                                       track_times=False)
                ds.attrs["windows"] = row_windows(len(arr), spec.seconds_per_row, spec.window_seconds)
                rows += len(arr)
                dtypes.add(str(arr.dtype))
                if progress:
                    progress()
        h5.attrs["layout"] = "flat"
        h5.attrs["dim"] = int(dim)
        h5.attrs["num_videos"] = len(h5)
        if provenance is not None:
            h5.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
        count = len(h5)
    return ImportSummary(count, int(dim), rows, ",".join(sorted(dtypes)))


def read_published_queries(spec: ImportSpec, progress=None) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(qids, pooled (n, D), {qid: token features (L, D)}) of a per-query layout, checked."""
    layout = LAYOUTS[spec.layout]
    assert layout.per == "query", spec.layout
    dim, dim_from = spec.dim, f"the documented dim of {spec.published}"
    qids, pooled, tokens = [], [], {}
    with contextlib.closing(layout.read(Path(spec.path), None)) as items:
        for qid, file, arrays in items:
            hidden = _as_rows(arrays["last_hidden_state"], f"{file}: key 'last_hidden_state'")
            _check(hidden, f"{file}: key 'last_hidden_state'", dim, dim_from)
            if dim is None:
                dim, dim_from = hidden.shape[1], f"as query '{qid}' has"
            pool, pool_where = np.asarray(arrays["pooler_output"]), f"{file}: key 'pooler_output'"
            if pool.ndim == 2 and pool.shape[0] == 1:  # saved with its batch axis
                pool = pool[0]
            if pool.ndim != 1:
                raise FeatureImportError(f"{pool_where}: expected a (D,) vector, got shape {pool.shape}")
            _check(pool[None], pool_where, hidden.shape[1], "as its last_hidden_state")
            qids.append(qid)
            pooled.append(pool)
            tokens[qid] = hidden
            if progress:
                progress()
    return qids, np.stack(pooled), tokens
