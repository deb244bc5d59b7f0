"""`vmr compare-features` through the CLI: parity of feature files whose differences are known."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app

DIM = 16


def random_videos(seed: int = 0, n: int = 4, dim: int = DIM) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"vid{i}": rng.normal(size=(20 + i, dim)).astype(np.float32) for i in range(n)}


def write_h5(path, videos: dict[str, np.ndarray], layout: str = "flat"):
    with h5py.File(path, "w") as h5:
        for vid, x in videos.items():
            if layout == "activitynet":
                h5.create_group(vid).create_dataset("c3d_features", data=x)
            else:
                h5[vid] = x
    return path


def compare(tmp_path, a, b, *extra, columns: str = "80"):
    out = tmp_path / "parity.json"
    result = CliRunner().invoke(app, ["compare-features", str(a), str(b), "--out", str(out), *extra],
                                env={"COLUMNS": columns})
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_identical_files_agree_exactly(tmp_path):
    videos = random_videos()
    a = write_h5(tmp_path / "a.h5", videos)
    b = write_h5(tmp_path / "b.h5", videos, layout="activitynet")  # the other HDF5 layout
    result, report = compare(tmp_path, a, b)
    assert result.exit_code == 0, result.output
    o = report["overall"]
    assert o["videos_compared"] == 4 and o["dim"] == DIM and o["offsets"] == {"0": 4}
    assert o["cosine_median"] == pytest.approx(1.0) and o["cosine_p5"] == pytest.approx(1.0)
    assert o["rel_l2"] == 0.0
    assert o["rows_a"] == o["rows_b"] == o["rows_compared"] == sum(len(x) for x in videos.values())
    assert report["only_in_a"] == report["only_in_b"] == []
    for v in report["videos"].values():
        assert v["offset"] == 0 and v["rel_l2"] == 0.0 and v["cosine_median"] == pytest.approx(1.0)
    # printed off a TTY at 80 columns: every column name whole, no "…"
    for name in ("videos compared", "cosine median", "cosine 5th percentile", "relative L2", "rows A", "offset"):
        assert name in result.output, name
    assert "…" not in result.output


@pytest.mark.parametrize("shift", [1, -1, 2])
def test_a_row_shift_is_found_and_parity_measured_at_it(tmp_path, shift):
    videos = random_videos()
    extra = np.random.default_rng(9).normal(size=(abs(shift), DIM)).astype(np.float32)
    # shift > 0: the reference has extra rows at the start; shift < 0: it lacks our first rows
    shifted = {v: np.concatenate([extra, x]) if shift > 0 else x[-shift:] for v, x in videos.items()}
    result, report = compare(tmp_path, write_h5(tmp_path / "a.h5", videos), write_h5(tmp_path / "b.h5", shifted))
    assert result.exit_code == 0, result.output
    o = report["overall"]
    assert o["offsets"] == {str(shift): 4}
    assert o["cosine_p5"] == pytest.approx(1.0) and o["rel_l2"] == pytest.approx(0.0, abs=1e-7)
    assert o["videos_with_other_row_count"] == 4
    v = report["videos"]["vid0"]
    assert (v["rows_a"], v["rows_b"], v["rows_compared"]) == (20, 20 + shift, 20 - max(0, -shift))


def test_an_offset_outside_the_window_is_not_found(tmp_path):
    videos = random_videos()
    shifted = {v: x[2:] for v, x in videos.items()}
    result, report = compare(tmp_path, write_h5(tmp_path / "a.h5", videos), write_h5(tmp_path / "b.h5", shifted),
                             "--max-offset", "1")
    assert result.exit_code == 0, result.output
    assert report["max_offset"] == 1 and report["overall"]["cosine_median"] < 0.5  # unrelated rows


def test_noise_of_known_size_gives_that_relative_l2(tmp_path):
    ref = random_videos()
    rng = np.random.default_rng(1)
    ours = {}
    for vid, x in ref.items():
        noise = rng.normal(size=x.shape)
        ours[vid] = (x + 0.05 * np.linalg.norm(x) * noise / np.linalg.norm(noise)).astype(np.float32)
    result, report = compare(tmp_path, write_h5(tmp_path / "ours.h5", ours), write_h5(tmp_path / "ref.h5", ref))
    assert result.exit_code == 0, result.output
    assert report["overall"]["rel_l2"] == pytest.approx(0.05, rel=1e-4)
    for v in report["videos"].values():
        assert v["rel_l2"] == pytest.approx(0.05, rel=1e-4) and v["offset"] == 0
    # row cosine of x and x + noise with |noise| = 5% of |x| on average: just under 1
    assert 0.99 < report["overall"]["cosine_median"] < 1.0
    assert report["overall"]["cosine_p5"] <= report["overall"]["cosine_median"]


def test_row_count_mismatch_compares_the_common_rows(tmp_path):
    videos = random_videos()
    cut = dict(videos, vid1=videos["vid1"][:-3])  # the reference lost three rows at the end
    result, report = compare(tmp_path, write_h5(tmp_path / "a.h5", videos), write_h5(tmp_path / "b.h5", cut))
    assert result.exit_code == 0, result.output
    v = report["videos"]["vid1"]
    assert (v["rows_a"], v["rows_b"], v["rows_compared"], v["offset"]) == (21, 18, 18, 0)
    assert v["rel_l2"] == 0.0
    assert report["overall"]["videos_with_other_row_count"] == 1


def test_videos_in_only_one_file_are_listed(tmp_path):
    videos = random_videos()
    a = write_h5(tmp_path / "a.h5", {k: v for k, v in videos.items() if k != "vid0"} | {"extra_a": videos["vid0"]})
    b = write_h5(tmp_path / "b.h5", videos)
    result, report = compare(tmp_path, a, b)
    assert result.exit_code == 0, result.output
    assert report["only_in_a"] == ["extra_a"] and report["only_in_b"] == ["vid0"]
    assert report["overall"]["videos_compared"] == 3 and set(report["videos"]) == {"vid1", "vid2", "vid3"}
    assert "only in A (1): extra_a" in result.output and "only in B (1): vid0" in result.output


def test_different_dims_are_an_error_naming_both_files(tmp_path):
    a = write_h5(tmp_path / "a.h5", random_videos(dim=16))
    b = write_h5(tmp_path / "b.h5", random_videos(dim=8))
    result, report = compare(tmp_path, a, b)
    assert result.exit_code == 2 and report is None
    assert str(a) in result.output and str(b) in result.output
    assert "dim 16" in result.output and "dim 8" in result.output


def test_no_common_video_and_missing_input_are_errors(tmp_path):
    a = write_h5(tmp_path / "a.h5", random_videos())
    b = write_h5(tmp_path / "b.h5", {"other": random_videos()["vid0"]})
    result, report = compare(tmp_path, a, b)
    assert result.exit_code == 2 and "no video in common" in result.output and report is None
    result, _ = compare(tmp_path, a, tmp_path / "absent.h5")
    assert result.exit_code == 2 and "absent.h5" in result.output


def test_a_released_npz_folder_against_our_hdf5(tmp_path):
    """QVHighlights' release: one <vid>.npz per video with key `features`, stored as float16."""
    videos = random_videos()
    released = tmp_path / "clip_features"
    released.mkdir()
    for vid, x in videos.items():
        np.savez_compressed(released / f"{vid}.npz", features=x.astype(np.float16))
    np.save(released / "vid_npy.npy", videos["vid0"])  # .npy files are read too
    ours = write_h5(tmp_path / "clip.h5", videos | {"vid_npy": videos["vid0"]})
    result, report = compare(tmp_path, ours, released)
    assert result.exit_code == 0, result.output
    o = report["overall"]
    assert o["videos_compared"] == 5 and o["offsets"] == {"0": 5}
    assert report["videos"]["vid_npy"]["rel_l2"] == 0.0
    # float16 rounding: relative error about 2^-11 per element
    assert 0 < o["rel_l2"] < 1e-3 and o["cosine_p5"] > 0.9999
    # and the other way round: the folder as A
    result, report = compare(tmp_path, released, ours)
    assert result.exit_code == 0 and report["overall"]["videos_compared"] == 5


def test_an_npz_without_features_is_an_error_naming_it(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "vid0.npz", feats=random_videos()["vid0"])
    result, _ = compare(tmp_path, write_h5(tmp_path / "a.h5", random_videos()), folder)
    assert result.exit_code == 2 and "vid0.npz" in result.output and "features" in result.output
