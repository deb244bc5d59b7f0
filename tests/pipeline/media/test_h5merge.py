"""npy/npz -> HDF5 merge: layouts, dtypes, compression, checks, atomicity, export, and a MESM-style reader."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pipeline.core.provenance import read_record
from pipeline.media.h5merge import MergeError, export_npz, merge_to_hdf5, read_features

RNG = np.random.default_rng(0)


def make_dir(tmp_path, arrays: dict, name="npy"):
    d = tmp_path / name
    d.mkdir()
    for vid, arr in arrays.items():
        if vid.endswith(".npz"):
            np.savez(d / vid, features=arr)
        else:
            np.save(d / f"{vid}.npy", arr)
    return d


def test_flat_merge_of_npy_and_npz(tmp_path):
    a, b = RNG.standard_normal((5, 8)).astype(np.float32), RNG.standard_normal((3, 8)).astype(np.float16)
    lgi = RNG.standard_normal((4, 1, 1, 8)).astype(np.float32)  # LGI's I3D shape, squeezed like MESM
    src = make_dir(tmp_path, {"AO8RW": a, "j7rJstUseKg_360.0_510.0.npz": b, "lgi": lgi})
    (src / "AO8RW.json").write_text(json.dumps({"windows": [[i, i + 1] for i in range(5)]}))
    (src / "provenance.json").write_text("{}")  # not a feature file
    out = tmp_path / "f.h5"
    summary = merge_to_hdf5(src, out, dim=8, provenance={"stage": "merge@x", "weights": {"x": "random"}})
    assert (summary.videos, summary.dim, summary.total_rows) == (3, 8, 12)
    with h5py.File(out, "r") as h5:
        assert sorted(h5.keys()) == ["AO8RW", "j7rJstUseKg_360.0_510.0", "lgi"]
        assert h5["AO8RW"].dtype == np.float32 and h5["AO8RW"].compression is None
        np.testing.assert_array_equal(h5["AO8RW"][:], a)
        np.testing.assert_array_equal(h5["j7rJstUseKg_360.0_510.0"][:], b.astype(np.float32))
        np.testing.assert_array_equal(h5["lgi"][:], lgi.reshape(4, 8))
        assert h5["AO8RW"].attrs["windows"].tolist()[1] == [1, 2]
        assert h5.attrs["layout"] == "flat" and h5.attrs["dim"] == 8
    assert read_record(out)["weights"] == {"x": "random"}


def test_activitynet_layout_float16_and_compression(tmp_path):
    a = RNG.standard_normal((6, 500)).astype(np.float32)
    src = make_dir(tmp_path, {"v_abc": a})
    for comp in ("gzip", "lzf"):
        out = tmp_path / f"{comp}.h5"
        merge_to_hdf5(src, out, dtype="float16", compression=comp, layout="activitynet")
        with h5py.File(out, "r") as h5:
            ds = h5["v_abc"]["c3d_features"]
            assert ds.dtype == np.float16 and ds.compression == comp
        np.testing.assert_allclose(read_features(out, "v_abc"), a, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"a": np.array([[0.0, np.nan]], np.float32)}, "video 'a' has NaN/Inf values in 1 of 1 rows"),
        ({"a": np.ones((2, 3), np.float32)}, "video 'a' has dim 3, expected 4"),
        ({"a": np.ones((0, 4), np.float32)}, "video 'a' has an empty feature array"),
        ({"a": np.ones((2, 4), np.float32), "b": np.ones((2, 5), np.float32)}, "video 'b' has dim 5, expected 4"),
        ({"a": np.full((1, 4), 1e6, np.float32)}, "video 'a' overflows float16"),
    ],
)
def test_bad_inputs_name_the_video_and_leave_no_file(tmp_path, arrays, message):
    src = make_dir(tmp_path, arrays)
    out = tmp_path / "f.h5"
    out.write_bytes(b"previous complete file")
    dim = 4 if "dim 3" in message else None
    dtype = "float16" if "float16" in message else "float32"
    with pytest.raises(MergeError, match=message):
        merge_to_hdf5(src, out, dim=dim, dtype=dtype)
    assert out.read_bytes() == b"previous complete file"  # the old file survives a failed merge
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_duplicates_and_npz_without_features(tmp_path):
    src = make_dir(tmp_path, {"a": np.ones((2, 4), np.float32), "a.npz": np.ones((2, 4), np.float32)})
    with pytest.raises(MergeError, match="duplicate video 'a': a.npy and a.npz"):
        merge_to_hdf5(src, tmp_path / "f.h5")
    d = tmp_path / "z"
    d.mkdir()
    np.savez(d / "v.npz", feats=np.ones((2, 4)))
    with pytest.raises(MergeError, match=r"v.npz: no 'features' array"):
        merge_to_hdf5(d, tmp_path / "g.h5")


def test_merge_is_byte_deterministic_and_exports_npz(tmp_path):
    arrays = {f"v{i}": RNG.standard_normal((i + 2, 16)).astype(np.float32) for i in range(4)}
    src = make_dir(tmp_path, arrays)
    merge_to_hdf5(src, tmp_path / "a.h5", compression="gzip", provenance={"k": 1})
    merge_to_hdf5(src, tmp_path / "b.h5", compression="gzip", provenance={"k": 1})
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    assert export_npz(tmp_path / "a.h5", tmp_path / "npz1", dtype="float16") == 4
    export_npz(tmp_path / "a.h5", tmp_path / "npz2", dtype="float16")
    for vid, arr in arrays.items():
        f1, f2 = tmp_path / "npz1" / f"{vid}.npz", tmp_path / "npz2" / f"{vid}.npz"
        assert f1.read_bytes() == f2.read_bytes()
        with np.load(f1) as z:  # what Moment-DETR's loader does
            np.testing.assert_allclose(z["features"].astype(np.float32), arr, rtol=1e-3, atol=1e-3)


# -- a reader written the way MESM's dataset reads its feature files (mesm_cnm.md A6) ----------------


def mesm_video_features(h5_files, vid: str, max_video_l: int) -> np.ndarray:
    """h5[vid][:] as float32, L2-normalised per frame, files truncated to the shortest and concatenated,
    average-pooled to max_video_l with bin edges round(i*T/max_l) when longer, then TEF [i/L, (i+1)/L]."""
    feats = []
    for h5 in h5_files:
        x = h5[vid][:].astype(np.float32)
        feats.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    length = min(len(f) for f in feats)
    v = np.concatenate([f[:length] for f in feats], axis=1)
    if len(v) > max_video_l:
        edges = np.round(np.arange(max_video_l + 1) * len(v) / max_video_l).astype(int)
        v = np.stack([v[s : max(e, s + 1)].mean(0) for s, e in zip(edges[:-1], edges[1:], strict=True)])
    n = len(v)
    tef = np.stack([np.arange(n) / n, (np.arange(n) + 1) / n], axis=1).astype(np.float32)
    return np.concatenate([v, tef], axis=1)


def test_merged_files_open_in_a_mesm_style_reader(tmp_path):
    clip = {"AO8RW": RNG.standard_normal((31, 512)).astype(np.float32)}
    slowfast = {"AO8RW": RNG.standard_normal((32, 2304)).astype(np.float32)}  # one longer, as in the release
    merge_to_hdf5(make_dir(tmp_path, clip, "clip"), tmp_path / "clip_image.hdf5", dim=512)
    merge_to_hdf5(make_dir(tmp_path, slowfast, "sf"), tmp_path / "slowfast.hdf5", dim=2304)
    with h5py.File(tmp_path / "clip_image.hdf5", "r") as a, h5py.File(tmp_path / "slowfast.hdf5", "r") as b:
        v = mesm_video_features([a, b], "AO8RW", max_video_l=194)
        assert v.shape == (31, 512 + 2304 + 2)  # C+SF: 2816-d + TEF
        np.testing.assert_allclose(np.linalg.norm(v[:, :512], axis=1), 1, rtol=1e-5)
        pooled = mesm_video_features([a, b], "AO8RW", max_video_l=10)
        assert pooled.shape == (10, 2818)


def test_uncompressed_datasets_are_the_bytes_h5py_create_dataset_writes(tmp_path):
    """The merge writes uncompressed datasets with h5py's low-level calls (faster); the file is the one
    the high-level `create_dataset(track_times=False)` writes, byte for byte."""
    src = tmp_path / "npy"
    src.mkdir()
    rng = np.random.default_rng(0)
    arrays = {f"v{i}": rng.standard_normal((5 + i, 8)).astype(np.float32) for i in range(4)}
    for vid, arr in arrays.items():
        np.save(src / f"{vid}.npy", arr)
    (src / "v1.json").write_text(json.dumps({"windows": [[i, i + 1] for i in range(6)]}))
    merge_to_hdf5(src, tmp_path / "ours.h5", provenance={"stage": "t"})
    with h5py.File(tmp_path / "ref.h5", "w", track_order=False) as h5:
        for vid, arr in arrays.items():
            ds = h5.create_dataset(vid, data=arr, track_times=False)
            if vid == "v1":
                ds.attrs["windows"] = np.asarray([[i, i + 1] for i in range(6)], dtype=np.float64)
        h5.attrs["layout"], h5.attrs["dim"], h5.attrs["num_videos"] = "flat", 8, 4
        h5.attrs["provenance"] = json.dumps({"stage": "t"}, sort_keys=True)
    assert (tmp_path / "ours.h5").read_bytes() == (tmp_path / "ref.h5").read_bytes()


def test_out_of_disk_space_stops_before_the_write_and_leaves_nothing(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    src = tmp_path / "npy"
    src.mkdir()
    for i in range(3):
        np.save(src / f"v{i}.npy", np.ones((1000, 64), np.float32))  # 256 KB each
    usage = namedtuple("usage", "total used free")
    out = tmp_path / "out"
    out.mkdir()

    def disk_usage(path):  # a disk with room for two of the three videos: what is written uses it up
        written = sum(f.stat().st_size for f in out.iterdir())
        return usage(1 << 30, written, (1 << 20) + 600_000 - written)

    monkeypatch.setattr(shutil_module, "disk_usage", disk_usage)
    with pytest.raises(MergeError, match=r"out\.h5: out of disk space: video 'v2'"):
        merge_to_hdf5(src, tmp_path / "out" / "out.h5")
    assert list((tmp_path / "out").iterdir()) == []
