"""Stage feature_pca: train-only fit by default, the official all-video fit as an option."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from support.pca import make_params

from pipeline.core.params import Params, ParamsError
from pipeline.core.provenance import read_record
from stages import feature_pca as stage


def test_train_fit_and_all_fit(tmp_path):
    stage.run(make_params(tmp_path), source="params.yaml", model="mrnet")
    out = tmp_path / "features" / "c3d_pca4.h5"
    with h5py.File(out) as f:
        train_fit = {k: f[k][:] for k in f}
    assert sorted(train_fit) == ["A", "B", "C"] and train_fit["C"].shape == (8, 4)
    assert read_record(out)["params"]["model.mrnet.video_pca"]["fit_on"] == "train"
    # centred on the training rows: their mean projection is ~0, the shifted test video's is not
    assert np.allclose(np.concatenate([train_fit["A"], train_fit["B"]]).mean(0), 0, atol=1e-5)
    stage.run(make_params(tmp_path, fit_on="all"), source="params.yaml", model="mrnet")
    with h5py.File(out) as f:
        assert not np.allclose(f["A"][:], train_fit["A"])


def test_needs_a_pca_section(tmp_path):
    with pytest.raises(ParamsError, match="--model mrnet: the model reads no PCA-reduced features"):
        stage.run(make_params_without_pca(tmp_path), source="params.yaml", model="mrnet")


def make_params_without_pca(root) -> Params:
    params = make_params(root)
    model = {"mrnet": {"feature": "c3d_pca4"}}
    return params.model_copy(update={"model": model})
