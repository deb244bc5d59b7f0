"""`vmr decode` -> `vmr extract --feature <snippet-level extractor> --profile profiles/features_<name>.yaml`
on tiny synthetic videos made with PyAV at 25, 29.97, 30 and 60 fps (CPU, seeded random weights).

Expected row counts are worked out by hand from each protocol's rule (comments), not by calling
the sampling code under test. Spatial sizes are reduced with --set where the network allows it.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[2]
# name: (frame rate, frames). Durations 1.68 s, 1.3013 s, 0.8 s, 1.1 s.
VIDEOS = {
    "v25": (Fraction(25), 42),
    "v2997": (Fraction(30000, 1001), 39),
    "v30": (Fraction(30), 24),
    "v60": (Fraction(60), 66),
}
FEATURES = ["slowfast", "i3d", "i3d_r50", "c3d"]


def write_video(path: Path, rate: Fraction, frames: int, width: int = 128, height: int = 96) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "g": "12"}
        y, x = np.mgrid[0:height, 0:width]
        for i in range(frames):  # a moving gradient: every frame differs
            img = np.stack([(x * 2 + i * 5) % 256, (y * 2) % 256, np.full_like(x, (i * 37) % 256)], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def invoke(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"vmr {' '.join(args)} failed:\n{result.output}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clipx")
    (root / "videos").mkdir()
    for name, (rate, n) in VIDEOS.items():
        write_video(root / "videos" / f"{name}.mp4", rate, n)
    params = {
        "features": FEATURES,
        "dataset": {"video_dir": str(root / "videos")},
        "decode": {"out_dir": str(root / "frames"), "workers": 1,
                   "backend": "pyav"},
        "merge": {"npy_dir": str(root / "npy"), "out_dir": str(root / "features")},
        # test sizes: small crops where the network allows it (C3D's 112 is architectural)
        "extractors": {"slowfast": {"size": 64, "clip_len": 1}, "i3d": {"crop": 64},
                       "i3d_r50": {"size": 64}, "c3d": {"protocol": "clips16", "stride": 16, "tail": "drop"}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    invoke("decode", "--params", str(root / "params.yaml"))
    return root


def extract(root: Path, feature: str, *sets: str, npy: str = "npy") -> dict[str, np.ndarray]:
    args = ["extract", "--feature", feature, "--params", str(root / "params.yaml"),
            "--profile", str(REPO / "profiles" / f"features_{feature}.yaml")]
    # the profile carries the real protocol; the test keeps its own reduced sizes
    overrides = {
        "slowfast": ["extractors.slowfast.size=64", "extractors.slowfast.clip_len=1"],
        "i3d": ["extractors.i3d.crop=64"],
        "i3d_r50": ["extractors.i3d_r50.size=64"],
        "c3d": ["extractors.c3d.protocol=clips16", "extractors.c3d.stride=16", "extractors.c3d.tail=drop"],
    }[feature] + list(sets) + [f"merge.npy_dir={root / npy}", "features=" + json.dumps(FEATURES)]
    for s in overrides:
        args += ["--set", s]
    invoke(*args)
    out = root / npy / feature
    return {vid: np.load(out / f"{vid}.npy") for vid in VIDEOS}


def sidecar(root: Path, feature: str, vid: str) -> dict:
    return json.loads((root / "npy" / feature / f"{vid}.json").read_text())


def test_slowfast_rows_per_clip_and_merge(workspace):
    feats = extract(workspace, "slowfast")
    # 30 fps slots = round(D*30): 50, 39, 24, 33 -> whole seconds 2, 2, 1, 2; ceil(duration) 2, 2, 1, 2
    assert {v: f.shape for v, f in feats.items()} == {"v25": (2, 2304), "v2997": (2, 2304), "v30": (1, 2304), "v60": (2, 2304)}
    assert sidecar(workspace, "slowfast", "v25")["windows"] == [[0.0, 1.0], [1.0, 2.0]]
    assert all(np.isfinite(f).all() for f in feats.values())
    again = extract(workspace, "slowfast", npy="npy_again")  # a fresh run: byte-identical
    assert all(np.array_equal(feats[v], again[v]) for v in VIDEOS)
    invoke("merge", "--feature", "slowfast", "--params", str(workspace / "params.yaml"))
    with h5py.File(workspace / "features" / "slowfast.h5") as h5:  # MESM/Moment-DETR: h5[vid] = (T, 2304)
        assert h5["v60"].shape == (2, 2304) and np.allclose(h5["v60"][()], feats["v60"])
    prov = json.loads((workspace / "npy" / "slowfast" / "provenance.json").read_text())
    assert prov["weights"]["slowfast"] == "random"
    assert prov["extractor"]["config"]["clip_len"] == 1.0


@pytest.mark.parametrize("protocol, rows", [
    # 24 fps slots round(D*24) = 40, 31, 19, 26; lgi: ceil(T/8) - 1; vslnet: 2 per 24-frame window
    ("lgi", {"v25": 4, "v2997": 3, "v30": 2, "v60": 3}),
    ("vslnet", {"v25": 4, "v2997": 4, "v30": 2, "v60": 4}),
])
def test_i3d_protocols(workspace, protocol, rows):
    sets = [f"extractors.i3d.protocol={protocol}"]
    feats = extract(workspace, "i3d", *sets, npy=f"npy_{protocol}")
    assert {v: f.shape for v, f in feats.items()} == {v: (n, 1024) for v, n in rows.items()}


def test_i3d_r50_windows(workspace):
    feats = extract(workspace, "i3d_r50")
    assert {f.shape for f in feats.values()} == {(1, 2048)}  # every video < 64 frames at 30 fps


@pytest.mark.slow  # C3D is 77 GFLOP per 16x112x112 snippet: ~9 snippets here
def test_c3d_clips(workspace):
    feats = extract(workspace, "c3d")
    # native frames 42, 39, 24, 66; 16-frame snippets every 16, full snippets only: (N - 16) // 16 + 1
    assert {v: f.shape for v, f in feats.items()} == {"v25": (2, 4096), "v2997": (2, 4096), "v30": (1, 4096), "v60": (4, 4096)}
    assert all((f >= 0).all() for f in feats.values())  # fc6 is post-ReLU


def test_dense_frames_are_replayed_not_stored(workspace):
    """The default `decode.store_frames: sparse` writes no frame of these 24-30 fps protocols (only
    each video's plan): extract replays the plan from the videos. With every frame stored, the same
    features, byte for byte."""
    assert list((workspace / "frames").rglob("*.npy")) == []
    replayed = workspace / "npy_replayed" / "slowfast"
    extract(workspace, "slowfast", npy="npy_replayed")
    stored_frames = workspace / "frames_all"
    invoke("decode", "--params", str(workspace / "params.yaml"),
           "--set", f"decode.out_dir={stored_frames}", "--set", "decode.store_frames=all")
    assert len(list(stored_frames.rglob("*.npy"))) == len(VIDEOS) * 3  # slowfast = i3d_r50's protocol
    extract(workspace, "slowfast", f"decode.out_dir={stored_frames}", npy="npy_stored")
    stored = workspace / "npy_stored" / "slowfast"
    for vid in VIDEOS:
        for name in (f"{vid}.npy", f"{vid}.json"):
            assert (replayed / name).read_bytes() == (stored / name).read_bytes()
