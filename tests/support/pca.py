"""A toy MRNet-style PCA setup: three videos of 12-d C3D-like features, A and B train, C test."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pipeline.core.params import Params


def make_params(root: Path, **pca) -> Params:
    """Params of `model.mrnet.video_pca` over root/features/c3d.h5 (A and B: the fit set; C is shifted)."""
    rng = np.random.default_rng(0)
    (root / "features").mkdir(exist_ok=True)
    with h5py.File(root / "features" / "c3d.h5", "w") as f:
        for vid in ("A", "B", "C"):
            f.create_dataset(vid, data=rng.standard_normal((8, 12)).astype(np.float32) + (vid == "C") * 3)
    (root / "train.txt").write_text("A 0.0 2.0##x\nB 1.0 3.0##y\n")
    (root / "test.txt").write_text("C 0.0 2.0##z\n")
    (root / "len.csv").write_text("id,length\nA,8\nB,8\nC,8\n")
    model = {"feature": "c3d_pca4", "video_pca": {"source": "c3d", "components": 4, **pca}}
    return Params.model_validate({
        "dataset": {"name": "toy", "splits": {"train": str(root / "train.txt"), "test": str(root / "test.txt")},
                    "durations": [str(root / "len.csv")], "video_captions": None},
        "merge": {"out_dir": str(root / "features")},
        "model": {"mrnet": model},
    })
