"""Feature loading conventions: per-frame L2 norm, MMN avgfeats, MESM cap, concat-truncate, TEF, layouts."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.features import (
    FeatureFile,
    add_tef,
    average_to_clips,
    cap_length,
    concat_truncated,
    l2_normalize,
    load_video,
)


def test_l2_normalize_matches_torch_normalize():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    x[2] = 0.0  # a zero row stays zero (eps), as F.normalize
    np.testing.assert_allclose(l2_normalize(x), F.normalize(torch.from_numpy(x), dim=1).numpy(), rtol=1e-6)


def test_average_to_clips_bins_by_hand():
    x = np.arange(10, dtype=np.float32)[:, None]  # T = 10 rows valued 0..9
    # 4 bins: edges round(0, 2.5, 5, 7.5, 10) = 0, 2, 5, 8, 10 -> clamped to 9: [0,2) [2,5) [5,8) [8,9)
    np.testing.assert_allclose(average_to_clips(x, 4)[:, 0], [0.5, 3.0, 6.0, 8.0])
    # the quirk: the last row (9) is never averaged in
    assert 9.0 not in average_to_clips(x, 4)
    # upsampling: 3 rows to 6 clips, edges 0,0(.5->0),1,2(1.5->2),2,2(2.5->2),3->2: empty bins copy row s
    np.testing.assert_allclose(average_to_clips(np.arange(3, dtype=np.float32)[:, None], 6)[:, 0],
                               [0.0, 0.0, 1.0, 2.0, 2.0, 2.0])


def test_cap_length_pools_only_long_videos():
    x = np.arange(6, dtype=np.float32)[:, None]
    assert cap_length(x, 10) is x
    # edges round(i * 6 / 4) = 0, 2 (1.5), 3, 4 (4.5 -> half to even), 6
    np.testing.assert_allclose(cap_length(x, 4)[:, 0], [0.5, 2.0, 3.0, 4.5])


def test_concat_truncates_to_the_shortest_and_tef_marks_positions():
    a, b = np.ones((5, 2), np.float32), np.zeros((4, 3), np.float32)
    assert concat_truncated([a, b]).shape == (4, 5)
    tef = add_tef(np.zeros((4, 1), np.float32))
    np.testing.assert_allclose(tef[:, 1:], [[0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1.0]])


def test_feature_file_reads_flat_and_activitynet_layouts(tmp_path):
    rng = np.random.default_rng(0)
    flat, anet = rng.normal(size=(7, 4)), rng.normal(size=(9, 4))
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5["v1"] = flat
        h5.create_group("v_2")["c3d_features"] = anet
    ff = FeatureFile(tmp_path / "f.h5")
    np.testing.assert_allclose(ff["v1"], flat.astype(np.float32))
    np.testing.assert_allclose(ff["v_2"], anet.astype(np.float32))
    assert ff.dim() == 4 and "v1" in ff
    with pytest.raises(KeyError, match="no features for video 'nope'"):
        ff["nope"]
    with pytest.raises(FileNotFoundError, match="merge"):
        FeatureFile(tmp_path / "missing.h5")
    # composed: normalise each file, truncate-concatenate, resample, TEF
    out = load_video([ff, ff], "v1", l2norm=True, num_clips=3, tef=True)
    assert out.shape == (3, 4 + 4 + 2)
    expected = average_to_clips(l2_normalize(flat.astype(np.float32)), 3)
    np.testing.assert_allclose(out[:, :4], expected, rtol=1e-6)
