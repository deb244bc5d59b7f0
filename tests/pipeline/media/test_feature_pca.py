"""PCA of merged features (MRNet TACoS): sklearn's full-SVD PCA maths, train-only vs all-split fits."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline.media.feature_pca import apply_pca, fit_pca, pca_feature_file


def test_fit_pca_equals_svd_of_centred_rows():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((n, 12)) @ rng.standard_normal((12, 12)) for n in (7, 9, 5)]
    x = np.concatenate(chunks)
    mean, comps, var = fit_pca(chunks, 4)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    vt = vt[:4] * np.sign(vt[:4][np.arange(4), np.abs(vt[:4]).argmax(1)])[:, None]  # sklearn svd_flip
    np.testing.assert_allclose(comps, vt, atol=1e-8)
    np.testing.assert_allclose(var, s[:4] ** 2 / (len(x) - 1), rtol=1e-8)
    np.testing.assert_allclose(apply_pca(x, mean, comps), (x - x.mean(0)) @ vt.T, atol=1e-4)
    with pytest.raises(ValueError, match="components"):
        fit_pca(chunks[:1], 8)


def test_pca_feature_file_train_only_and_official_all(tmp_path):
    rng = np.random.default_rng(1)
    with h5py.File(tmp_path / "c3d.h5", "w") as f:
        for i in range(4):
            f.create_dataset(f"v{i}", data=rng.standard_normal((6 + i, 10)).astype(np.float32) + i)
    info = pca_feature_file(tmp_path / "c3d.h5", tmp_path / "train.h5", ["v0", "v1"], 3)
    assert info == {"fit_videos": 2, "videos": 4, "explained_variance": pytest.approx(info["explained_variance"])}
    pca_feature_file(tmp_path / "c3d.h5", tmp_path / "all.h5", None, 3)
    with h5py.File(tmp_path / "train.h5") as a, h5py.File(tmp_path / "all.h5") as b:
        assert sorted(a) == sorted(b) == ["v0", "v1", "v2", "v3"]
        assert a["v3"].shape == (9, 3) and a["v3"].dtype == np.float32
        assert not np.allclose(a["v2"][:], b["v2"][:])  # the fit set matters
    with pytest.raises(KeyError, match="nope"):
        pca_feature_file(tmp_path / "c3d.h5", tmp_path / "x.h5", ["nope"], 3)
