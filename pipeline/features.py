"""Video features from the merged HDF5 files, with each seed's loading conventions as named options.

A merged file `features/<name>.h5` holds one (T, D) dataset per video id (`flat` layout), or a
group per video with a `c3d_features` dataset (`activitynet` layout, as the official ActivityNet
C3D file); `FeatureFile` reads both. The conventions, composed in this order by `load_video`:

    l2norm    per-frame L2 normalisation (MMN/MRNet `F.normalize(dim=1)`, MESM `normalize_video`)
    concat    several files concatenated along channels after truncating to the shortest (MESM C+SF)
    clips     resampling to exactly N clips by averaging bins `round(linspace(0, T, N+1))`, bounds
              clamped to T-1 (MMN `avgfeats`, CNM `max_num_frames`); short videos repeat rows.
              Quirk kept: the last source row is only used by an otherwise empty last bin.
    max_len   MESM's cap: only when T > max_len, average bins `round(i*T/max_len)` (no clamp)
    tef       MESM's temporal endpoint feature [i/L, (i+1)/L] appended to every row

Every function is numpy/torch on CPU and deterministic; `FeatureFile` opens its HDF5 lazily so
that each DataLoader worker gets its own handle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

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
        f = self._file()
        if vid not in f:
            raise KeyError(f"{self.path}: no features for video '{vid}'")
        node = f[vid]
        if isinstance(node, h5py.Group):
            node = node[ACTIVITYNET_KEY]
        return np.asarray(node[()], dtype=np.float32)

    def __contains__(self, vid: str) -> bool:
        return vid in self._file()

    def dim(self) -> int:
        f = self._file()
        first = next(iter(f))
        node = f[first]
        return int((node[ACTIVITYNET_KEY] if isinstance(node, h5py.Group) else node).shape[-1])

    def __getstate__(self) -> dict:  # h5py handles do not cross process boundaries
        return {"path": self.path, "_h5": None}


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Per-row L2 normalisation, as torch.nn.functional.normalize(x, dim=1) (eps on the norm)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def _bin_edges(num_src: int, num_out: int, clamp: bool) -> np.ndarray:
    # float32 arithmetic and round-half-even, exactly as torch.arange(...)/N*T then .round()
    edges = torch.arange(0, num_out + 1, 1.0) / num_out * num_src
    edges = edges.round().long()
    if clamp:
        edges = edges.clamp(max=num_src - 1)
    return edges.numpy()


def average_to_clips(x: np.ndarray, num_clips: int) -> np.ndarray:
    """MMN `avgfeats` / CNM resampling: (T, D) -> (num_clips, D), bins clamped to T-1."""
    edges = _bin_edges(len(x), num_clips, clamp=True)
    out = np.empty((num_clips, x.shape[1]), dtype=np.float32)
    for k in range(num_clips):
        s, e = edges[k], edges[k + 1]
        out[k] = x[s:e].mean(axis=0) if s < e else x[s]
    return out


def cap_length(x: np.ndarray, max_len: int) -> np.ndarray:
    """MESM `sample_video_feat`: average-pool to exactly max_len only when longer than it."""
    if len(x) <= max_len:
        return x
    edges = _bin_edges(len(x), max_len, clamp=False)
    out = np.empty((max_len, x.shape[1]), dtype=np.float32)
    for k in range(max_len):
        s, e = edges[k], edges[k + 1]
        out[k] = x[s:e].mean(axis=0) if s < e else x[min(s, len(x) - 1)]
    return out


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
    l2norm: bool = True,
    num_clips: int | None = None,
    max_len: int | None = None,
    tef: bool = False,
) -> np.ndarray:
    """One video's features with the named conventions (see the module docstring for the order)."""
    arrays = [f[vid] for f in files]
    if l2norm:
        arrays = [l2_normalize(a) for a in arrays]
    x = arrays[0] if len(arrays) == 1 else concat_truncated(arrays)
    if num_clips is not None:
        x = average_to_clips(x, num_clips)
    if max_len is not None:
        x = cap_length(x, max_len)
    if tef:
        x = add_tef(x)
    return x
