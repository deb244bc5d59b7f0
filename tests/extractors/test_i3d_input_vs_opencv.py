"""piergiaj I3D's input under `vmr decode` + `vmr extract` equals its frame loader, run with OpenCV itself.

piergiaj/pytorch-i3d (`charades_dataset_full.py`, reused by LGI and VSLNet) reads each frame with cv2,
converts BGR to RGB, and only when the short side is under 226 calls
`cv2.resize(img, dsize=(0, 0), fx=sc, fy=sc)` with sc = 1 + (226 - short) / short; then (x / 255) * 2 - 1
and a centre crop of 224 at round((H - 224) / 2). The oracle makes those calls on the frames
`cv2.VideoCapture` reads from the same files (24 fps videos: the 24 fps fps-filter keeps every frame),
for upscaled landscape and portrait videos and one that is not resized, on both decode backends. The
network is stubbed: what is under test is its input.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from support.videos import write_textured_video
from typer.testing import CliRunner

from extractors.i3d import I3DExtractor
from pipeline.cli import app

FRAMES = 20
SIZES = {"small": (160, 120), "wide": (320, 180), "portrait": (136, 200), "large": (300, 240)}  # (width, height)


def piergiaj_input(path: Path) -> np.ndarray:
    """(3, T, 224, 224) float32, as piergiaj's loader and `video_to_tensor` build it."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        img = bgr[:, :, [2, 1, 0]]
        w, h, _ = img.shape  # (sic: piergiaj names the rows w); only min(w, h) is used
        if w < 226 or h < 226:
            d = 226.0 - min(w, h)
            sc = 1 + d / min(w, h)
            img = cv2.resize(img, dsize=(0, 0), fx=sc, fy=sc)
        frames.append((img / 255.0) * 2 - 1)
    capture.release()
    video = np.asarray(frames, dtype=np.float32)
    t, h, w, _ = video.shape
    i, j = int(np.round((h - 224) / 2.0)), int(np.round((w - 224) / 2.0))
    return video[:, i : i + 224, j : j + 224].transpose(3, 0, 1, 2)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_input_equals_piergiaj_loader_with_opencv(tmp_path, monkeypatch, backend):
    (tmp_path / "videos").mkdir()
    for name, (width, height) in SIZES.items():
        write_textured_video(tmp_path / "videos" / f"{name}.mp4", width, height, FRAMES, fps=24)
    params = {
        "features": ["i3d"],
        "dataset": {"video_dir": str(tmp_path / "videos")},
        "decode": {"out_dir": str(tmp_path / "frames"), "workers": 1, "backend": backend, "store_frames": "none"},
        "merge": {"npy_dir": str(tmp_path / "npy"), "out_dir": str(tmp_path / "features")},
        "extractors": {"i3d": {"protocol": "lgi"}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    seen: list[torch.Tensor] = []

    def record_input(self, model, x):
        seen.append(x.clone())
        return torch.zeros(len(x), math.ceil(x.shape[2] / 8) - 1, self.dim)  # piergiaj's row count

    monkeypatch.setattr(I3DExtractor, "embed", record_input)
    runner = CliRunner()
    for args in (["decode"], ["extract", "--feature", "i3d"]):
        result = runner.invoke(app, [*args, "--params", str(tmp_path / "params.yaml")])
        assert result.exit_code == 0, result.output
    assert len(seen) == len(SIZES)  # lgi: one whole-video pass per batch, videos in sorted order
    for name, x in zip(sorted(SIZES), seen, strict=True):
        want = piergiaj_input(tmp_path / "videos" / f"{name}.mp4")
        got = x[0].numpy()
        assert got.shape == want.shape == (3, FRAMES, 224, 224), name
        # the same 8-bit pixels (float32 vs float64 arithmetic differs in the last bit only)
        to_pixels = lambda v: np.rint((v.astype(np.float64) + 1) / 2 * 255).astype(np.int64)  # noqa: E731
        assert np.array_equal(to_pixels(got), to_pixels(want)), f"{name}: pixels differ"
        assert np.abs(got - want).max() < 1e-6, name
