"""Video features from the merged HDF5 files, with each seed's loading conventions as named options.

A merged file `features/<name>.h5` holds one (T, D) dataset per video id (`flat` layout), or a
group per video with a `c3d_features` dataset (`activitynet` layout, as the official ActivityNet
C3D file); `FeatureFile` reads both, and the row times merge recorded (`seconds_per_row`). The
conventions, composed in this order by `load_video`:

    truncate     keep the first N rows of every file (MESM on QVHighlights)
    l2norm       per-frame L2 normalisation (MMN/MRNet `F.normalize(dim=1)`, MESM `normalize_video`)
    concat       several files concatenated along channels after truncating to the shortest (MESM C+SF)
    standardize  (x - mean) / std per channel, with statistics from `feature_statistics` (an option
                 of this project for MESM, off in every published config)
    clips        resampling to exactly N clips by averaging bins `round(k / N * T)`, k = 0..N, bounds
                 clamped to T-1 (MMN `avgfeats`, CNM `max_num_frames`); short videos repeat rows.
                 Quirk kept: the last source row is only used by an otherwise empty last bin.
                 `edges_dtype` is the precision of k / N * T, which decides some exact halves (below).
    max_len      MESM's cap: the same resampling, only when T > max_len (MESM `sample_video_feat`)
    tef          MESM's temporal endpoint feature [i/L, (i+1)/L] appended to every row

Every function is numpy/torch on CPU and deterministic; `FeatureFile` opens its HDF5 lazily so
that each DataLoader worker gets its own handle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np

ACTIVITYNET_KEY = "c3d_features"


class FeatureFile:
    """Read-only access to one merged feature file: `ff[vid] -> (T, D) float32`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: feature file not found (run the merge stage)")
        self._h5: h5py.File | None = None

    def _file(self) -> h5py.File:
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return self._h5

    def __getitem__(self, vid: str) -> np.ndarray:
        if vid not in self._file():
            raise KeyError(f"{self.path}: no features for video '{vid}'")
        return np.asarray(self._dataset(vid)[()], dtype=np.float32)

    def __contains__(self, vid: str) -> bool:
        return vid in self._file()

    def video_ids(self) -> list[str]:
        return sorted(self._file())

    def _dataset(self, vid: str) -> h5py.Dataset:
        node = self._file()[vid]
        return node[ACTIVITYNET_KEY] if isinstance(node, h5py.Group) else node

    def dim(self) -> int:
        return int(self._dataset(next(iter(self._file()))).shape[-1])

    def seconds_per_row(self, sample: int = 64) -> float | None:
        """Seconds from one row to the next, from the row windows merge stores with each video.

        The `windows` attribute holds (start, end) seconds per row; a video's step is
        (last start - first start) / (T - 1) and the file's is the median over `sample` videos
        spread evenly over the sorted ids (reading every video's attribute takes seconds on large
        files), so a few odd videos (HERO's rate for clips under a second) do not move it. None when
        none of them has windows of two rows or more (files made by hand or merged without the
        extract sidecars).
        """
        vids = sorted(self._file())
        steps = []
        for vid in vids[:: max(1, len(vids) // sample)]:
            windows = self._dataset(vid).attrs.get("windows")
            if windows is not None and len(windows) > 1:
                steps.append((windows[-1, 0] - windows[0, 0]) / (len(windows) - 1))
        return float(np.median(steps)) if steps else None

    def __getstate__(self) -> dict:  # h5py handles do not cross process boundaries
        return {"path": self.path, "_h5": None}


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Per-row L2 normalisation, as torch.nn.functional.normalize(x, dim=1) (eps on the norm)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


# Every seed's bin edges are round-half-even(k / N * T), k = 0..N, clamped to T-1; they differ only in the
# precision of k / N * T, which decides the cases near an exact half (T=180, N=200, k=35: 31.5 in float32,
# rounded to 32; 31.499999999999996 in float64, rounded to 31). The two conventions disagree for 77 of
# T = 2..999 at N = 200, none at N = 32, 128, 256 or 512.
EDGES_DTYPES = (
    "float32",  # torch float32: MMN `avgfeats`, MRNet (MMN's utils), MESM `sample_video_feat`
    "float64",  # numpy float64: CNM `_sample_frame_features`
)


def bin_edges(num_src: int, num_out: int, edges_dtype: str = "float32") -> np.ndarray:
    """The N + 1 bin edges of `average_to_clips` (int64): bin k averages rows [edges[k], edges[k+1])."""
    if edges_dtype not in EDGES_DTYPES:
        raise ValueError(f"edges_dtype must be one of {sorted(EDGES_DTYPES)}, got {edges_dtype!r}")
    import torch  # here, not at the top: params validation reads this module's users without torch

    # torch in both precisions: IEEE division and product give numpy's float64 result bit for bit
    edges = torch.arange(0, num_out + 1, dtype=getattr(torch, edges_dtype)) / num_out * num_src
    return edges.round().long().clamp(max=num_src - 1).numpy()


def average_to_clips(x: np.ndarray, num_clips: int, edges_dtype: str = "float32") -> np.ndarray:
    """MMN `avgfeats` / CNM / MESM resampling: (T, D) -> (num_clips, D), bins clamped to T-1.

    `edges_dtype` is the seed's precision of the bin edges (`EDGES_DTYPES`): "float32" for MMN,
    MRNet and MESM, "float64" for CNM.
    """
    edges = bin_edges(len(x), num_clips, edges_dtype)
    out = np.empty((num_clips, x.shape[1]), dtype=np.float32)
    for k in range(num_clips):
        s, e = edges[k], edges[k + 1]
        out[k] = x[s:e].mean(axis=0) if s < e else x[s]
    return out


def cap_length(x: np.ndarray, max_len: int, edges_dtype: str = "float32") -> np.ndarray:
    """MESM `sample_video_feat`: `average_to_clips(x, max_len)` only when longer than max_len.

    MESM clamps the bin edges to T-1 here too (lntzm/MESM dataset/base.py:104), so the last row
    of a pooled video is left out of the last bin, as in `average_to_clips`.
    """
    return x if len(x) <= max_len else average_to_clips(x, max_len, edges_dtype)


def concat_truncated(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate along channels after truncating every array to the shortest length."""
    length = min(len(a) for a in arrays)
    return np.concatenate([a[:length] for a in arrays], axis=1)


def add_tef(x: np.ndarray) -> np.ndarray:
    """Append the temporal endpoint feature [i/L, (i+1)/L] (Moment-DETR / MESM `use_tef`)."""
    length = len(x)
    start = np.arange(length, dtype=np.float32) / length
    tef = np.stack([start, start + 1.0 / length], axis=1)
    return np.concatenate([x, tef], axis=1).astype(np.float32)


def load_video(
    files: Sequence[FeatureFile],
    vid: str,
    *,
    truncate: int | None = None,
    l2norm: bool = True,
    standardize: tuple[np.ndarray, np.ndarray] | None = None,
    num_clips: int | None = None,
    max_len: int | None = None,
    tef: bool = False,
    edges_dtype: str = "float32",
) -> np.ndarray:
    """One video's features with the named conventions (see the module docstring for the order).

    `standardize` is the (mean, std) pair of `feature_statistics`, over the concatenated channels;
    `edges_dtype` the precision of the `num_clips` / `max_len` bin edges (`EDGES_DTYPES`).
    """
    arrays = [f[vid] for f in files]
    if truncate is not None:
        arrays = [a[:truncate] for a in arrays]
    if l2norm:
        arrays = [l2_normalize(a) for a in arrays]
    x = arrays[0] if len(arrays) == 1 else concat_truncated(arrays)
    if standardize is not None:
        mean, std = standardize
        x = (x - mean) / std
    if num_clips is not None:
        x = average_to_clips(x, num_clips, edges_dtype)
    if max_len is not None:
        x = cap_length(x, max_len, edges_dtype)
    if tef:
        x = add_tef(x)
    return x


def feature_statistics(
    feature_file: FeatureFile | str | Path | Sequence[FeatureFile | str | Path],
    video_ids: Iterable[str],
    *,
    l2norm: bool = False,
    two_pass: bool = False,
    std_eps: float = 0.0,
    min_std: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (population) of every row of the given videos: (D,) float32 each.

    The rows are `load_video(files, vid, l2norm=l2norm)`: several files are truncated to the
    shortest and concatenated, as the model will see them. Videos are read once each in sorted id
    order and summed in float64. The callers' conventions differ in the last bits, so each is an
    option rather than one of them silently changing:

        two_pass   False: one pass of sums of x and x^2, std = sqrt(E[x^2] - mean^2) (CNM; GLSCL
                   uses the mean only). True: numpy's mean, then the mean squared deviation, over
                   all rows stacked in memory (MESM).
        std_eps    added to the std (CNM: 1e-6)
        min_std    lower bound of the std (MESM: 1e-6)
    """
    if isinstance(feature_file, (FeatureFile, str, Path)):
        feature_file = [feature_file]
    files = [f if isinstance(f, FeatureFile) else FeatureFile(f) for f in feature_file]
    vids = sorted(set(video_ids))
    if not vids:
        raise ValueError(f"{files[0].path}: no videos to compute feature statistics over")
    if two_pass:
        rows = np.concatenate([load_video(files, v, l2norm=l2norm) for v in vids])
        mean, std = rows.mean(0, dtype=np.float64), rows.std(0, dtype=np.float64)
    else:
        total, total_sq, count = 0.0, 0.0, 0
        for v in vids:
            x = load_video(files, v, l2norm=l2norm).astype(np.float64)
            total, total_sq, count = total + x.sum(0), total_sq + (x**2).sum(0), count + len(x)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.maximum(std + std_eps, min_std)
    return mean.astype(np.float32), std.astype(np.float32)
