"""Readers of the released feature layouts, on files generated in exactly those layouts (tests/support/published.py)."""

from __future__ import annotations

import typing

import h5py
import numpy as np
import pytest
from support import published

from pipeline.core.params import ImportParams
from pipeline.media.features import FeatureFile
from pipeline.media.importers import (
    LAYOUTS,
    PUBLISHED,
    FeatureImportError,
    import_video_features,
    read_published_queries,
    resolve,
    row_windows,
)


def spec(name="f", **cfg):
    return resolve(name, ImportParams(**cfg))


def imported(tmp_path, **cfg):
    out = tmp_path / "features" / "f.h5"
    summary = import_video_features(spec(**cfg), out)
    return FeatureFile(out), summary, out


def test_the_params_schema_names_every_layout_and_release():
    fields = ImportParams.model_fields
    layouts = set(typing.get_args(typing.get_args(fields["layout"].annotation)[0]))
    releases = set(typing.get_args(typing.get_args(fields["published"].annotation)[0]))
    assert layouts == set(LAYOUTS) and releases == set(PUBLISHED)
    assert {p.layout for p in PUBLISHED.values()} <= set(LAYOUTS)


@pytest.mark.parametrize("release,dim", [("qvhighlights_clip", 512), ("qvhighlights_slowfast", 2304)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_qvhighlights_npz_rows_are_2_s_clips(tmp_path, release, dim, dtype):
    src = published.qvh_video_npz(tmp_path / "pub", ["vidA_60.0_210.0", "vidB_0.0_150.0"], dim, [75, 3], dtype)
    ff, summary, out = imported(tmp_path, path=str(tmp_path / "pub"), published=release)
    assert (summary.items, summary.dim, summary.rows, summary.dtype) == (2, dim, 78, dtype)
    for vid, arr in src.items():
        np.testing.assert_array_equal(ff[vid], arr.astype(np.float32))
    with h5py.File(out) as h5:
        assert h5["vidA_60.0_210.0"].dtype == np.dtype(dtype)  # kept as released, never re-quantised
        np.testing.assert_array_equal(h5["vidB_0.0_150.0"].attrs["windows"], [[0, 2], [2, 4], [4, 6]])
    assert ff.seconds_per_row() == pytest.approx(2.0)


def test_flat_hdf5_gzip_as_mmn_and_mesm_release_it(tmp_path):
    rng = np.random.default_rng(1)
    src = published.flat_hdf5(tmp_path / "vgg_rgb_features.hdf5",
                              {v: rng.normal(size=(t, 4096)).astype("float32") for v, t in [("AO8RW", 9), ("3MSZA", 17)]})
    ff, summary, _ = imported(tmp_path, path=str(tmp_path / "vgg_rgb_features.hdf5"), published="charades_vgg")
    assert summary.items == 2 and ff.dim() == 4096
    for vid, arr in src.items():
        np.testing.assert_array_equal(ff[vid], arr)
    assert ff.seconds_per_row() == pytest.approx(1 / 8)


def test_activitynet_groups_need_the_row_time_and_keep_their_values(tmp_path):
    path = tmp_path / "sub_activitynet_v1-3.c3d.hdf5"
    src = published.activitynet(path, ["v_QOlSCBRmfWY", "v_ehGHCYKzyZ8"], [30, 12])
    with pytest.raises(FeatureImportError, match=r"imports\.f\.seconds_per_row.*every 8 frames"):
        spec(path=str(path), published="activitynet_c3d")
    ff, summary, _ = imported(tmp_path, path=str(path), published="activitynet_c3d", seconds_per_row=8 / 29.97)
    assert summary.dtype == "float64" and ff.dim() == 500
    for vid, arr in src.items():
        np.testing.assert_array_equal(ff[vid], arr.astype(np.float32))
    assert ff.seconds_per_row() == pytest.approx(8 / 29.97)
    # the generic layout reads it too, with the key named
    assert spec(path=str(path), layout="hdf5_activitynet", seconds_per_row=0.25).key == "c3d_features"


def test_lgi_npy_folder_is_squeezed_and_timed_as_the_release(tmp_path):
    src = published.lgi_npy(tmp_path / "i3d_finetuned", ["AO8RW", "Z9ZIY"], [5, 1])
    ff, summary, out = imported(tmp_path, path=str(tmp_path / "i3d_finetuned"), published="charades_i3d",
                                layout="npy_dir")
    assert summary.rows == 6 and ff.dim() == 1024
    for vid, arr in src.items():
        np.testing.assert_array_equal(ff[vid], arr)
    with h5py.File(out) as h5:  # one row per 8 frames at 24 fps, each spanning 16 frames
        np.testing.assert_allclose(h5["AO8RW"].attrs["windows"][:2], [[0, 2 / 3], [1 / 3, 1]])


def test_qvhighlights_text_features_are_read_per_qid(tmp_path):
    src = published.qvh_text_npz(tmp_path / "clip_text_features", [2579, 7, 10016], [12, 5, 31])
    qids, pooled, tokens = read_published_queries(spec(path=str(tmp_path / "clip_text_features"),
                                                       published="qvhighlights_clip_text"))
    assert qids == ["10016", "2579", "7"]  # file order (sorted names), keyed by qid
    for i, qid in enumerate(qids):
        np.testing.assert_array_equal(pooled[i], src[qid]["pooler_output"])
        np.testing.assert_array_equal(tokens[qid], src[qid]["last_hidden_state"])
    assert tokens["7"].shape == (5, 512)
    # pooler_output saved with its batch axis (1, 512) reads the same
    published.qvh_text_npz(tmp_path / "batched", [1], [4], pooler_batch_axis=True)
    assert read_published_queries(spec(path=str(tmp_path / "batched"), layout="query_npz_dir"))[1].shape == (1, 512)


def test_row_windows():
    np.testing.assert_allclose(row_windows(3, 0.5, 1.0), [[0, 1], [0.5, 1.5], [1, 2]])


@pytest.mark.parametrize("cfg,match", [
    (dict(layout="query_npz_dir", seconds_per_row=1.0), "do not apply"),
    (dict(layout="npy_dir", key="x", seconds_per_row=1.0), r"imports\.f\.key"),
    (dict(layout="hdf5_flat", key="x", seconds_per_row=1.0), r"imports\.f\.key.*no key applies"),
    (dict(layout="hdf5_flat"), r"imports\.f\.seconds_per_row"),
])
def test_settings_a_layout_cannot_use_are_refused(cfg, match):
    with pytest.raises(FeatureImportError, match=match):
        spec(path="x", **cfg)


# -- bad input: an error naming the file and key, and nothing written --------------------------------


def _no_output(tmp_path):
    folder = tmp_path / "features"
    return not folder.exists() or not any(folder.iterdir())


def test_a_video_with_a_wrong_dim_names_the_file_and_key(tmp_path):
    src = tmp_path / "clip_features"
    published.qvh_video_npz(src, ["a", "b"], 512, [4, 4])
    published.qvh_video_npz(src, ["c"], 511, [4], seed=1)
    with pytest.raises(FeatureImportError, match=r"clip_features/c\.npz: key 'features': dim 511, expected 512"):
        imported(tmp_path, path=str(src), published="qvhighlights_clip")
    assert _no_output(tmp_path)
    # without a documented dim the first video sets it
    rng = np.random.default_rng(0)
    path = published.flat_hdf5(tmp_path / "x.h5", {"a": rng.normal(size=(3, 8)), "b": rng.normal(size=(3, 9))})
    with pytest.raises(FeatureImportError, match=r"x\.h5: key 'b': dim 9, expected 8 \(as 'a' has\)"):
        imported(tmp_path, path=str(tmp_path / "x.h5"), layout="hdf5_flat", seconds_per_row=1.0)
    assert path and _no_output(tmp_path)


def test_wrong_layout_or_key_is_named(tmp_path):
    rng = np.random.default_rng(0)
    published.flat_hdf5(tmp_path / "flat.h5", {"a": rng.normal(size=(3, 8))})
    published.activitynet(tmp_path / "anet.h5", ["v_a"], [3])
    published.qvh_video_npz(tmp_path / "npz", ["a"], 512, [2])
    cases = [
        (dict(path=str(tmp_path / "flat.h5"), layout="hdf5_activitynet", seconds_per_row=1.0),
         r"flat\.h5: key 'a': a dataset, not a group .*hdf5_flat"),
        (dict(path=str(tmp_path / "anet.h5"), layout="hdf5_flat", seconds_per_row=1.0),
         r"anet\.h5: key 'v_a': a group .*hdf5_activitynet"),
        (dict(path=str(tmp_path / "anet.h5"), layout="hdf5_activitynet", key="c3d", seconds_per_row=1.0),
         r"anet\.h5: key 'v_a': no 'c3d' in the group \(has \['c3d_features'\]\)"),
        (dict(path=str(tmp_path / "npz"), layout="npz_dir", key="feats", seconds_per_row=2.0),
         r"npz/a\.npz: no array 'feats' \(the file has \['features'\]\)"),
        (dict(path=str(tmp_path / "npz"), layout="hdf5_flat", seconds_per_row=2.0), "one HDF5 file, not a folder"),
        (dict(path=str(tmp_path / "flat.h5"), layout="npz_dir", seconds_per_row=2.0), "a folder of <id>.npz files"),
        (dict(path=str(tmp_path / "npz"), layout="npy_dir", seconds_per_row=2.0), r"npz: no \.npy files"),
    ]
    for cfg, match in cases:
        with pytest.raises(FeatureImportError, match=match):
            imported(tmp_path, **cfg)
        assert _no_output(tmp_path)


def test_corrupt_files_and_bad_values_are_named(tmp_path):
    (tmp_path / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(FeatureImportError, match=r"bad\.h5: not a readable HDF5 file"):
        imported(tmp_path, path=str(tmp_path / "bad.h5"), published="charades_vgg")
    src = tmp_path / "clip_features"
    published.qvh_video_npz(src, ["a"], 512, [3])
    (src / "b.npz").write_bytes((src / "a.npz").read_bytes()[:100])  # truncated download
    with pytest.raises(FeatureImportError, match=r"clip_features/b\.npz: unreadable \.npz"):
        imported(tmp_path, path=str(src), published="qvhighlights_clip")
    (src / "b.npz").unlink()
    nan = np.ones((3, 512), np.float32)
    nan[1, 4] = np.nan
    np.savez(src / "b.npz", features=nan)
    with pytest.raises(FeatureImportError, match=r"b\.npz: key 'features': NaN/Inf in 1 of 3 rows"):
        imported(tmp_path, path=str(src), published="qvhighlights_clip")
    np.savez(src / "b.npz", features=np.ones((0, 512), np.float32))
    with pytest.raises(FeatureImportError, match=r"b\.npz: key 'features': no rows"):
        imported(tmp_path, path=str(src), published="qvhighlights_clip")
    np.savez(src / "b.npz", features=np.ones((3, 512), np.int64))
    with pytest.raises(FeatureImportError, match=r"b\.npz: key 'features': dtype int64, expected floats"):
        imported(tmp_path, path=str(src), published="qvhighlights_clip")
    assert _no_output(tmp_path)


def test_a_failed_import_keeps_the_previous_file(tmp_path):
    src = tmp_path / "clip_features"
    published.qvh_video_npz(src, ["a"], 512, [3])
    _, _, out = imported(tmp_path, path=str(src), published="qvhighlights_clip")
    before = out.read_bytes()
    published.qvh_video_npz(src, ["b"], 256, [3])
    with pytest.raises(FeatureImportError, match="dim 256"):
        imported(tmp_path, path=str(src), published="qvhighlights_clip")
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["f.h5"]


def test_text_features_with_mismatched_parts_are_named(tmp_path):
    src = tmp_path / "clip_text_features"
    published.qvh_text_npz(src, [1], [4])
    np.savez(src / "qid2.npz", last_hidden_state=np.ones((4, 512), np.float32), pooler_output=np.ones(256, np.float32))
    with pytest.raises(FeatureImportError, match=r"qid2\.npz: key 'pooler_output': dim 256, expected 512"):
        read_published_queries(spec(path=str(src), published="qvhighlights_clip_text"))
    np.savez(src / "qid2.npz", last_hidden_state=np.ones((4, 512), np.float32))
    with pytest.raises(FeatureImportError, match=r"qid2\.npz: no array 'pooler_output'"):
        read_published_queries(spec(path=str(src), published="qvhighlights_clip_text"))
