"""Tiny files in exactly the layouts of the released feature sets (feature_protocols.md), for the importer.

    qvh_video_npz   clip_features/<vid>.npz, slowfast_features/<vid>.npz: np.savez(features=float16 (T, D))
                    (HERO saves half precision by default)
    qvh_text_npz    clip_text_features/qid<qid>.npz: last_hidden_state (L, 512), pooler_output (512,)
    flat_hdf5       h5[vid] = (T, D), gzip (2D-TAN/MMN convert scripts; MESM's npy2hdf5 writes it plain)
    activitynet     h5[vid]["c3d_features"] = (T, 500), float64 (as h5py stores numpy's default)
    lgi_npy         i3d_finetuned/<vid>.npy of shape (T, 1, 1, 1024)

Each returns {id: the array written}, for comparing with what the import wrote.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def _rows(rng: np.random.Generator, length: int, dim: int, dtype: str) -> np.ndarray:
    return rng.normal(size=(length, dim)).astype(dtype)


def qvh_video_npz(folder: Path, vids: list[str], dim: int, lengths: list[int], dtype: str = "float16",
                  seed: int = 0) -> dict[str, np.ndarray]:
    rng, out = np.random.default_rng(seed), {}
    folder.mkdir(parents=True, exist_ok=True)
    for vid, length in zip(vids, lengths, strict=True):
        out[vid] = _rows(rng, length, dim, dtype)
        np.savez(folder / f"{vid}.npz", features=out[vid])
    return out


def qvh_text_npz(folder: Path, qids: list[int], lengths: list[int], dim: int = 512, seed: int = 0,
                 pooler_batch_axis: bool = False) -> dict[str, dict[str, np.ndarray]]:
    rng, out = np.random.default_rng(seed), {}
    folder.mkdir(parents=True, exist_ok=True)
    for qid, length in zip(qids, lengths, strict=True):
        hidden = _rows(rng, length, dim, "float32")
        pooled = rng.normal(size=(1, dim) if pooler_batch_axis else (dim,)).astype("float32")
        np.savez(folder / f"qid{qid}.npz", last_hidden_state=hidden, pooler_output=pooled)
        out[str(qid)] = {"last_hidden_state": hidden, "pooler_output": pooled.reshape(dim)}
    return out


def flat_hdf5(path: Path, arrays: dict[str, np.ndarray], compression: str | None = "gzip") -> dict[str, np.ndarray]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        for vid, arr in arrays.items():
            h5.create_dataset(vid, data=arr, compression=compression)
    return arrays


def activitynet(path: Path, vids: list[str], lengths: list[int], dim: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    rng, out = np.random.default_rng(seed), {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        for vid, length in zip(vids, lengths, strict=True):
            out[vid] = _rows(rng, length, dim, "float64")
            h5.create_group(vid).create_dataset("c3d_features", data=out[vid])
    return out


def lgi_npy(folder: Path, vids: list[str], lengths: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    rng, out = np.random.default_rng(seed), {}
    folder.mkdir(parents=True, exist_ok=True)
    for vid, length in zip(vids, lengths, strict=True):
        arr = _rows(rng, length, 1024, "float32")
        np.save(folder / f"{vid}.npy", arr.reshape(length, 1, 1, 1024))
        out[vid] = arr
    return out
