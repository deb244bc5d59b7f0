"""`vmr decode` -> `vmr extract` -> `vmr merge` through the CLI on tiny PyAV videos (CLIP + VGG profile)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.provenance import read_record

REPO = Path(__file__).resolve().parents[2]
from support.videos import write_video  # noqa: E402

runner = CliRunner()


def vmr(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, f"vmr {' '.join(args)} -> {result.exit_code}:\n{result.output}"
    return result


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "vidA.mp4", frames=45, width=96, height=64)  # 1.5 s
    write_video(tmp_path / "videos" / "vidB.mp4", frames=30, width=64, height=96)  # 1.0 s, portrait
    params = {
        "dataset": {"video_dir": str(tmp_path / "videos")},
        "decode": {"out_dir": str(tmp_path / "frames"), "workers": 1},
        "merge": {"npy_dir": str(tmp_path / "npy"), "out_dir": str(tmp_path / "features")},
        "features": ["clip"],
        "extractors": {"clip": {"batch_size": 4}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


@pytest.mark.slow
def test_clip_and_vgg_profile_end_to_end(workspace):
    p = ["--params", str(workspace / "params.yaml"), "--profile", str(REPO / "profiles" / "features_vgg.yaml"),
         "--set", "extractors.vgg.fps=4"]
    vmr("decode", *p)
    # clip_len 1: vidA round(1.5) = 2; vidB is 1.0 s < clip_len + 0.1, so HERO's rule samples at
    # 2 / int(1.0) = 2 fps -> 2. VGG at 4 fps: round(6.0) = 6 and 4.
    for feature, dim, counts in (("clip", 512, {"vidA": 2, "vidB": 2}), ("vgg", 4096, {"vidA": 6, "vidB": 4})):
        vmr("extract", "--feature", feature, *p)
        vmr("merge", "--feature", feature, *p)
        h5 = workspace / "features" / f"{feature}.h5"
        with h5py.File(h5, "r") as f:
            assert {k: f[k].shape for k in f} == {v: (n, dim) for v, n in counts.items()}
            assert all(np.isfinite(f[k][:]).all() for k in f)
        prov = read_record(h5)
        assert prov["stage"] == f"merge-{feature}" and prov["weights"] == {feature: "random"}
        assert prov["extractor"]["name"] == feature and prov["decoder"]["decord"] == "0.6.0"
    side = json.loads((workspace / "npy" / "clip" / "vidA.json").read_text())
    assert side["windows"] == [[0.0, 1.0], [1.0, 2.0]]


def test_decode_failure_share_sets_the_exit_code(workspace):
    (workspace / "videos" / "broken.mp4").write_bytes(b"\0" * 512)
    p = ["--params", str(workspace / "params.yaml")]
    result = vmr("decode", *p, code=1)
    assert "1/3 videos failed" in result.output
    vmr("decode", *p, "--set", "decode.max_failure_share=0.5")
    report = json.loads((workspace / "frames" / "failures.json").read_text())
    assert [f["video"] for f in report["failures"]] == ["broken"]
    # the measured durations of the decoded videos only: what annotations without durations use
    durations = json.loads((workspace / "frames" / "durations.json").read_text())
    assert durations == {"vidA": pytest.approx(1.5), "vidB": pytest.approx(1.0)}


def test_missing_inputs_are_clear_errors(workspace):
    p = ["--params", str(workspace / "params.yaml")]
    result = vmr("extract", "--feature", "clip", *p, code=2)
    assert "decode.out_dir" in result.output and "manifest.json" in result.output
    result = vmr("merge", "--feature", "clip", *p, code=2)
    assert "merge.npy_dir" in result.output
    (workspace / "frames").mkdir()
    (workspace / "frames" / "manifest.json").write_text('{"videos": {}}')
    result = vmr("extract", "--feature", "clip", "--shard", "3/2", *p, code=2)
    assert "--shard '3/2': need 0 <= i < n" in result.output


def test_merge_reads_the_records_of_a_sharded_extract(tmp_path):
    from stages.merge import _upstream_record

    for i in range(2):
        (tmp_path / f"shard-{i}-of-2.prov.json").write_text(
            json.dumps({"stage": "extract-clip", "weights": {"clip": "random"}, "shard": [i, 2]})
        )
    record = _upstream_record(tmp_path)
    assert record["stage"] == "extract-clip" and record["weights"] == {"clip": "random"}
    assert _upstream_record(tmp_path / "missing") == {}
