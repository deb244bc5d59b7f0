"""Feature parity: how close two sets of video features are, video by video (`vmr compare-features`).

Either side is a merged HDF5 file (`flat` or `activitynet` layout, read by `FeatureFile`) or a
folder of per-video `<vid>.npy` / `<vid>.npz['features']` files (the released Moment-DETR /
QVHighlights features), so ours can be held against a published file as it was downloaded.

Per video common to both sides, with A = ours (first) and B = the reference (second):

    offset    the shift s in [-max_offset, max_offset] that maximises the mean row cosine of
              A[i] against B[i + s] over the rows both have (released files often gain or lose a
              row at the start); ties go to the smallest |s|
    cosine    per-row cosine similarity at that offset: median, 5th percentile, mean
    rel_l2    ||A - B|| / ||B|| (Frobenius) over the same rows

Overall: the same statistics over the rows of every common video pooled (at each video's own
offset), and which offsets were chosen how often. Videos in only one side are listed. Everything
is computed in float64 on one video at a time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import VmrError
from pipeline.core.progress import track
from pipeline.media.features import FeatureFile
from pipeline.media.h5merge import list_feature_files, load_feature

HDF5_SUFFIXES = (".h5", ".hdf5")


class CompareError(VmrError, ValueError):
    """Features that cannot be compared; the message names both sides."""


class FeatureSource:
    """Read-only `vid -> (T, D) float64` over an HDF5 file or a folder of .npy/.npz files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self._files: dict[str, Path] | None = list_feature_files(self.path)
            self._h5 = None
            if not self._files:
                raise CompareError(f"{self.path}: no .npy/.npz feature files in this folder")
        elif self.path.is_file():
            if self.path.suffix.lower() not in HDF5_SUFFIXES:
                raise CompareError(f"{self.path}: expected an HDF5 file (.h5/.hdf5) or a folder of .npy/.npz files")
            self._files, self._h5 = None, FeatureFile(self.path)
        else:
            raise CompareError(f"{self.path}: no such file or folder")

    def video_ids(self) -> list[str]:
        return sorted(self._files) if self._files is not None else self._h5.video_ids()

    def __getitem__(self, vid: str) -> np.ndarray:
        x = load_feature(self._files[vid]) if self._files is not None else self._h5[vid]
        if x.ndim != 2 or len(x) == 0:
            raise CompareError(f"{self.path}: video '{vid}' has no (T, D) features (shape {x.shape})")
        return np.asarray(x, dtype=np.float64)


@dataclass
class VideoParity:
    vid: str
    rows_a: int
    rows_b: int
    offset: int
    rows_compared: int
    cosine_median: float
    cosine_p5: float
    cosine_mean: float
    rel_l2: float | None


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair; two all-zero rows agree (1), one all-zero row does not (0)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(na * nb > 0, dots / (na * nb), 0.0)
    return np.where(both_zero, 1.0, cos)


def overlap(a: np.ndarray, b: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows A[i] and B[i + offset] that both exist."""
    start = max(0, -offset)
    stop = min(len(a), len(b) - offset)
    if stop <= start:
        return a[:0], b[:0]
    return a[start:stop], b[start + offset : stop + offset]


def best_offset(a: np.ndarray, b: np.ndarray, max_offset: int) -> int:
    """The shift with the highest mean row cosine; the smallest |shift| wins ties (and float noise)."""
    best, best_score = 0, -np.inf
    for s in sorted(range(-max_offset, max_offset + 1), key=lambda s: (abs(s), s)):
        ra, rb = overlap(a, b, s)
        if len(ra) == 0:
            continue
        score = float(row_cosines(ra, rb).mean())
        if score > best_score + 1e-9:
            best, best_score = s, score
    return best


def _stats(cos: np.ndarray, diff_sq: float, ref_sq: float) -> dict[str, float | None]:
    return {"cosine_median": float(np.median(cos)), "cosine_p5": float(np.percentile(cos, 5)),
            "cosine_mean": float(cos.mean()), "rel_l2": _rel_l2(diff_sq, ref_sq)}


def _rel_l2(diff_sq: float, ref_sq: float) -> float | None:
    if ref_sq == 0:  # an all-zero reference: only an all-zero A matches it; no ratio otherwise
        return 0.0 if diff_sq == 0 else None
    return float(np.sqrt(diff_sq / ref_sq))


def compare_features(path_a: str | Path, path_b: str | Path, max_offset: int = 3) -> dict[str, Any]:
    """The parity report of A (ours) against B (the reference); see the module docstring."""
    if max_offset < 0:
        raise CompareError(f"max offset must be >= 0 (got {max_offset})")
    src_a, src_b = FeatureSource(path_a), FeatureSource(path_b)
    ids_a, ids_b = set(src_a.video_ids()), set(src_b.video_ids())
    common = sorted(ids_a & ids_b)
    if not common:
        raise CompareError(f"{path_a} and {path_b} have no video in common "
                           f"({len(ids_a)} and {len(ids_b)} videos)")
    videos, cosines, offsets = [], [], Counter()
    diff_sq = ref_sq = 0.0
    dim = None
    for vid in track(common, "compare features"):
        a, b = src_a[vid], src_b[vid]
        if a.shape[1] != b.shape[1]:
            raise CompareError(f"feature dims differ: {path_a} has dim {a.shape[1]}, {path_b} has dim "
                               f"{b.shape[1]} (video '{vid}')")
        dim = dim or int(a.shape[1])
        s = best_offset(a, b, max_offset)
        ra, rb = overlap(a, b, s)
        cos = row_cosines(ra, rb)
        d_sq, r_sq = float(((ra - rb) ** 2).sum()), float((rb**2).sum())
        videos.append(VideoParity(vid, len(a), len(b), s, len(ra), **_stats(cos, d_sq, r_sq)))
        cosines.append(cos)
        offsets[s] += 1
        diff_sq, ref_sq = diff_sq + d_sq, ref_sq + r_sq
    overall = {
        "videos_compared": len(videos),
        "dim": dim,
        "rows_a": sum(v.rows_a for v in videos),
        "rows_b": sum(v.rows_b for v in videos),
        "rows_compared": sum(v.rows_compared for v in videos),
        "videos_with_other_row_count": sum(v.rows_a != v.rows_b for v in videos),
        "offsets": {str(k): offsets[k] for k in sorted(offsets)},
        **_stats(np.concatenate(cosines), diff_sq, ref_sq),
    }
    return {
        "a": str(path_a), "b": str(path_b), "max_offset": max_offset,
        "offset_convention": "row i of a is compared with row i + offset of b",
        "rel_l2_convention": "||a - b|| / ||b|| over the compared rows",
        "overall": overall,
        "only_in_a": sorted(ids_a - ids_b),
        "only_in_b": sorted(ids_b - ids_a),
        "videos": {v.vid: {k: val for k, val in vars(v).items() if k != "vid"} for v in videos},
    }
