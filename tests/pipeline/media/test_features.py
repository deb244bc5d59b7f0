"""Feature loading conventions: per-frame L2 norm, MMN avgfeats, MESM cap, concat-truncate, TEF, layouts,
standardisation and its statistics, the row times merge records."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.media.features import (
    FeatureFile,
    add_tef,
    average_to_clips,
    bin_edges,
    cap_length,
    concat_truncated,
    feature_statistics,
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


def test_cap_length_pools_only_long_videos_with_clamped_bins():
    x = np.arange(6, dtype=np.float32)[:, None]
    assert cap_length(x, 10) is x
    # edges round(i * 6 / 4) = 0, 2 (1.5), 3, 4 (4.5 -> half to even), 6, clamped to T-1 = 5 as MESM's
    # sample_video_feat does: the last bin is [4, 5), so the last row (5) is left out
    np.testing.assert_allclose(cap_length(x, 4)[:, 0], [0.5, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(cap_length(x, 4), average_to_clips(x, 4))


# The official bin-edge formulas, evaluated with the library calls each seed's code makes:
#   torch float32 -- MCG-NJU/MMN mmn/data/datasets/utils.py:53-54 (avgfeats), the same lines in
#                    xian-sh/MRNet ret/data/datasets/utils.py, lntzm/MESM dataset/base.py:103-104
#   numpy float64 -- minghangz/cnm datasets/base.py:26-28 (_sample_frame_features; clamps by masking)
def official_edges_torch_float32(num_src: int, num_out: int) -> np.ndarray:
    idxs = torch.arange(0, num_out + 1, 1.0) / num_out * num_src
    return idxs.round().long().clamp(max=num_src - 1).numpy()


def official_edges_numpy_float64(num_src: int, num_out: int) -> np.ndarray:
    idx = np.round(np.arange(0, num_out + 1) / num_out * num_src).astype(np.int64)
    idx[idx >= num_src] = num_src - 1
    return idx


# the seeds' clip counts in their published configs: MMN 32/256, MRNet 128/256/512, MESM's cap 75/194/600,
# CNM 200 (Charades and ActivityNet)
@pytest.mark.parametrize(("edges_dtype", "official", "clip_counts"), [
    ("float32", official_edges_torch_float32, (32, 75, 128, 194, 200, 256, 512, 600)),
    ("float64", official_edges_numpy_float64, (200, 32, 256)),
])
def test_bin_edges_equal_each_seeds_official_formula(edges_dtype, official, clip_counts):
    for n in clip_counts:
        for t in range(2, 1000):
            np.testing.assert_array_equal(bin_edges(t, n, edges_dtype), official(t, n), err_msg=f"T={t} N={n}")
    # and average_to_clips averages exactly those bins (a few lengths: the averaging loop is slow)
    x = np.random.default_rng(0).normal(size=(999, 3)).astype(np.float32)
    for t in (45, 180, 999):
        edges = official(t, clip_counts[0])
        expected = [x[s:e].mean(0) if s < e else x[s] for s, e in zip(edges[:-1], edges[1:], strict=True)]
        np.testing.assert_array_equal(average_to_clips(x[:t], clip_counts[0], edges_dtype), np.stack(expected))


def test_the_two_edge_precisions_differ_at_cnms_clip_count(tmp_path):
    # the reason the precision is an option: at N = 200 the conventions disagree for 77 of T = 2..999
    differ = [t for t in range(2, 1000) if not np.array_equal(official_edges_torch_float32(t, 200),
                                                              official_edges_numpy_float64(t, 200))]
    assert len(differ) == 77 and differ[:3] == [45, 50, 60]
    x = np.arange(180, dtype=np.float32)[:, None]
    # T = 180: edge 35 is 35/200*180, exactly 31.5 in float32 (-> 32) but 31.499999999999996 in float64
    # (-> 31), so bin 35 is the empty [32, 32) -> row 32, or [31, 32) -> row 31
    assert average_to_clips(x, 200)[35, 0] == 32.0 and average_to_clips(x, 200, "float64")[35, 0] == 31.0
    # load_video passes the option on to both resamplings (the precisions also differ at T=180, N=120)
    ff = write_h5(tmp_path / "f.h5", {"v": x})
    for option in ({"num_clips": 200}, {"max_len": 120}):
        got = load_video([ff], "v", l2norm=False, edges_dtype="float64", **option)
        np.testing.assert_array_equal(got, average_to_clips(x, next(iter(option.values())), "float64"))
        assert not np.array_equal(got, load_video([ff], "v", l2norm=False, **option))
    with pytest.raises(ValueError, match="edges_dtype must be one of"):
        average_to_clips(x, 200, "float16")


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


def write_h5(path, videos: dict[str, np.ndarray], windows: dict[str, np.ndarray] | None = None):
    with h5py.File(path, "w") as h5:
        for vid, x in videos.items():
            h5[vid] = x
            if windows and vid in windows:
                h5[vid].attrs["windows"] = windows[vid]
    return FeatureFile(path)


def test_feature_statistics_by_hand(tmp_path):
    ff = write_h5(tmp_path / "f.h5", {"a": np.array([[1.0, 10.0], [3.0, 10.0]], np.float32),
                                      "b": np.array([[5.0, 10.0]], np.float32),
                                      "c": np.array([[100.0, -5.0]], np.float32)})
    # rows of a and b: channel 0 = 1, 3, 5 (mean 3, population std sqrt(8/3)); channel 1 constant
    mean, std = feature_statistics(ff, ["b", "a", "a"])
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose(mean, [3.0, 10.0])
    np.testing.assert_allclose(std, [np.sqrt(8 / 3), 0.0], rtol=1e-6)
    # a zero std is protected by either convention: + eps (CNM) or a floor (MESM)
    assert feature_statistics(ff, ["a", "b"], std_eps=1e-6)[1][1] == np.float32(1e-6)
    assert feature_statistics(ff, ["a", "b"], two_pass=True, min_std=1e-6)[1][1] == np.float32(1e-6)
    np.testing.assert_allclose(feature_statistics(tmp_path / "f.h5", ["a", "b"], two_pass=True)[0], mean)
    with pytest.raises(ValueError, match="no videos"):
        feature_statistics(ff, [])


def test_feature_statistics_read_the_rows_the_model_sees(tmp_path):
    rng = np.random.default_rng(0)
    a = {v: rng.normal(size=(n, 3)).astype(np.float32) for v, n in (("x", 5), ("y", 7))}
    b = {v: rng.normal(size=(n + 1, 2)).astype(np.float32) for v, n in (("x", 5), ("y", 7))}
    files = [write_h5(tmp_path / "a.h5", a), write_h5(tmp_path / "b.h5", b)]
    rows = np.concatenate([load_video(files, v, l2norm=True) for v in ("x", "y")])
    assert rows.shape == (12, 5)  # b's extra row is cut, as when loading
    mean, std = feature_statistics(files, ["y", "x"], l2norm=True, two_pass=True)
    np.testing.assert_array_equal(mean, rows.mean(0, dtype=np.float64).astype(np.float32))
    np.testing.assert_array_equal(std, rows.std(0, dtype=np.float64).astype(np.float32))


def test_one_and_two_pass_statistics_differ_only_in_the_last_bits(tmp_path):
    # a large shared offset (random-init CLIP features) is where E[x^2] - mean^2 loses digits
    rng = np.random.default_rng(1)
    offset = rng.normal(size=64)
    ff = write_h5(tmp_path / "f.h5", {f"v{i}": (1e-3 * rng.normal(size=(50, 64)) + offset).astype(np.float32)
                                      for i in range(20)})
    vids = [f"v{i}" for i in range(20)]
    one, two = feature_statistics(ff, vids), feature_statistics(ff, vids, two_pass=True)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_allclose(one[1], two[1], rtol=1e-3)
    assert not np.array_equal(one[1], two[1])  # hence the option: each caller keeps its own numbers


def test_load_video_standardizes_after_concatenation_and_truncates_first(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
    files = [write_h5(tmp_path / "a.h5", {"v": x}), write_h5(tmp_path / "b.h5", {"v": y})]
    mean, std = np.arange(5, dtype=np.float32), np.full(5, 2.0, np.float32)
    plain = load_video(files, "v", l2norm=False)
    out = load_video(files, "v", l2norm=False, standardize=(mean, std))
    np.testing.assert_array_equal(out, (plain - mean) / std)
    # standardised before the pooling and the TEF, which stays [i/L, (i+1)/L]
    pooled = load_video(files, "v", l2norm=False, standardize=(mean, std), max_len=4, tef=True)
    np.testing.assert_allclose(pooled[:, :5], average_to_clips((plain - mean) / std, 4), rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 5], [0, 0.25, 0.5, 0.75])
    # truncate: the first rows of every file, before anything else (MESM on QVHighlights)
    np.testing.assert_array_equal(load_video(files, "v", l2norm=False, truncate=3), plain[:3])


def test_seconds_per_row_from_merged_windows(tmp_path):
    def windows(n, step, start=0.0):
        t = start + step * np.arange(n)
        return np.stack([t, t + step], axis=1)

    x = np.zeros((10, 2), np.float32)
    videos = {f"v{i}": x for i in range(5)} | {"one_row": x[:1]}
    # a short clip with another rate (HERO's rule under one second) does not move the median
    rows = {f"v{i}": windows(10, 2.0, start=0.5 * i) for i in range(4)} | {"v4": windows(10, 0.5)}
    rows["one_row"] = windows(1, 7.0)
    assert write_h5(tmp_path / "w.h5", videos, rows).seconds_per_row() == pytest.approx(2.0)
    assert write_h5(tmp_path / "plain.h5", videos).seconds_per_row() is None
    with h5py.File(tmp_path / "anet.h5", "w") as h5:
        ds = h5.create_group("v_1").create_dataset("c3d_features", data=x)
        ds.attrs["windows"] = windows(10, 16 / 30)
    assert FeatureFile(tmp_path / "anet.h5").seconds_per_row() == pytest.approx(16 / 30)
