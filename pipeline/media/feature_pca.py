"""PCA of a merged feature file (MRNet's TACoS input: C3D fc6 4096-d -> 500-d).

The official `preprocess/feat_pca.py` fits sklearn PCA(500) on the raw rows of *every* video
(train, val and test) and writes one dataset per video. Here the fit set is an argument: the
training videos by default (no test statistics leak into the features), every video as the
official option. The maths is sklearn's full-SVD PCA: centre on the fit rows' mean, project on the
top right-singular vectors, each signed so that its largest-magnitude entry is positive (sklearn's
`svd_flip` convention), computed here from the covariance matrix in chunks so 90k x 4096 rows never
sit in memory twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.core.atomic import atomic_path
from pipeline.core.params import Section
from pipeline.core.progress import track
from pipeline.media.features import FeatureFile


class VideoPCAConfig(Section):
    """A model's PCA-reduced input (MRNet on TACoS): `features/<source>.h5` -> the model's feature file."""

    source: str = "c3d"
    components: int = Field(500, ge=1)
    fit_on: Literal["train", "all"] = "train"  # "all": the official fit on every video of every split



def fit_pca(arrays: Iterable[np.ndarray], n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (D,), components (k, D), explained variance (k,)) of the rows of all `arrays`."""
    total, count, gram = None, 0, None
    for x in arrays:
        x = np.asarray(x, dtype=np.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        gram = x.T @ x if gram is None else gram + x.T @ x
        count += len(x)
    if count == 0:
        raise ValueError("PCA: no rows to fit on")
    if n_components > min(count, gram.shape[0]):
        raise ValueError(f"PCA: {n_components} components need at least as many rows and dims, "
                         f"got {count} rows x {gram.shape[0]} dims")
    mean = total / count
    cov = (gram - count * np.outer(mean, mean)) / max(count - 1, 1)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(eigval)[::-1][:n_components]
    components = eigvec[:, order].T
    signs = np.sign(components[np.arange(n_components), np.abs(components).argmax(1)])
    return mean, components * signs[:, None], eigval[order]


def apply_pca(x: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    return ((np.asarray(x, dtype=np.float64) - mean) @ components.T).astype(np.float32)


def pca_feature_file(
    source: str | os.PathLike, target: str | os.PathLike, fit_videos: Iterable[str] | None, n_components: int,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit on `fit_videos` (None: every video, the official choice) and write every video of `source`."""
    import h5py


    src = FeatureFile(source)
    with h5py.File(source, "r") as f:
        videos = sorted(f.keys())
    fit = videos if fit_videos is None else sorted(set(fit_videos) & set(videos))
    missing = [] if fit_videos is None else sorted(set(fit_videos) - set(videos))
    if missing:
        raise KeyError(f"{source}: no features for {len(missing)} fit videos, e.g. {missing[0]!r}")
    mean, components, variance = fit_pca((src[v] for v in track(fit, "fit PCA")), n_components)
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as out:
        for vid in track(videos, "apply PCA"):
            out.create_dataset(vid, data=apply_pca(src[vid], mean, components))
        if provenance is not None:
            out.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
    return {"fit_videos": len(fit), "videos": len(videos), "explained_variance": float(variance.sum())}
