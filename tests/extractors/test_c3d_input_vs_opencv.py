"""C3D's input under `vmr decode` + `vmr extract` equals Caffe's preprocessing, rendered by OpenCV itself.

facebook/C3D v1.0 reads a video with `cv::VideoCapture` (`ReadVideoToVolumeDatum`), resizes every
frame once with `cv::resize` to 171 x 128 (default bilinear), crops 112 at (8, 29) in the TEST phase
and subtracts the mean in float32. The oracle here is OpenCV (`cv2.VideoCapture` + `cv2.resize`, the
same calls, from opencv-python-headless) on the same files: frame sizes of three aspect ratios, both
decode backends, the default per-channel mean and a per-pixel mean cube in the Keras port's `.npy`
format. The network is stubbed: what is under test is its input.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from support.c3d_cli import decode_workspace, extract, record_network_inputs
from support.caffe import write_blob_proto
from support.videos import write_textured_video

FRAMES = 21  # clips16, stride 8, tail pad: clips at 0, 8, 16; frames past 20 repeat frame 20
SIZES = {"landscape": (320, 240), "wide": (640, 360), "portrait": (240, 320)}  # (width, height)
SPORT1M_CHANNEL_MEANS_BGR = np.array([90.25164677, 97.65700354, 101.40833461], np.float32)


def opencv_clips(path: Path, mean: np.ndarray) -> np.ndarray:
    """Caffe's data blobs of the clips at 0, 8, 16: (clips, 3, 16, 112, 112) float32, BGR."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.resize(bgr, (171, 128)))  # cv::resize's default: bilinear
    capture.release()
    assert len(frames) == FRAMES
    frames = np.stack(frames).astype(np.float32)  # (N, 128, 171, 3) BGR
    clips = []
    for start in (0, 8, 16):
        index = np.minimum(np.arange(start, start + 16), FRAMES - 1)
        clip = frames[index].transpose(3, 0, 1, 2)  # (c, l, h, w)
        clips.append(clip[:, :, 8:120, 29:141] - mean)
    return np.stack(clips)


@pytest.fixture(scope="module", params=["pyav", "decord"])
def workspace(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"c3dcv-{request.param}")
    (root / "videos").mkdir()
    for name, (width, height) in SIZES.items():
        write_textured_video(root / "videos" / f"{name}.mp4", width, height, FRAMES, fps=25)
    return decode_workspace(root, batch_size=3, backend=request.param, store_frames="none")


def network_inputs(root: Path, monkeypatch, npy: str, *sets: str) -> dict[str, np.ndarray]:
    """Per video, what `vmr extract --feature c3d` feeds the network (batches of 3 = one video's clips)."""
    seen = record_network_inputs(monkeypatch)
    result = extract(root, npy, *sets)
    assert result.exit_code == 0, result.output
    assert len(seen) == len(SIZES)  # one batch per video, videos in sorted order
    return dict(zip(sorted(SIZES), (x.numpy() for x in seen), strict=True))


def test_default_input_equals_opencv_resize_and_the_sport1m_channel_means(workspace, monkeypatch):
    got = network_inputs(workspace, monkeypatch, "npy-default")
    mean = SPORT1M_CHANNEL_MEANS_BGR.reshape(3, 1, 1, 1)
    for name in SIZES:
        want = opencv_clips(workspace / "videos" / f"{name}.mp4", mean)
        assert got[name].shape == want.shape == (3, 3, 16, 112, 112)
        assert np.array_equal(got[name], want), f"{name}: max |diff| {np.abs(got[name] - want).max()}"


def test_mean_cube_npy_gives_caffes_per_pixel_input_like_the_binaryproto(workspace, monkeypatch, tmp_path):
    # the Keras port's cube: (3, 16, 128, 171) BGR float64 holding float32 values
    cube = (np.random.default_rng(5).random((3, 16, 128, 171)) * 255).astype(np.float32).astype(np.float64)
    np.save(tmp_path / "train01_16_128_171_mean.npy", cube)
    blob = write_blob_proto(tmp_path / "sport1m_train16_128_mean.binaryproto", cube[None].astype(np.float32))
    from_npy = network_inputs(workspace, monkeypatch, "npy-cube",
                              f"extractors.c3d.mean_file={tmp_path / 'train01_16_128_171_mean.npy'}")
    from_blob = network_inputs(workspace, monkeypatch, "npy-blob", f"extractors.c3d.mean_file={blob}")
    mean = cube.astype(np.float32)[:, :, 8:120, 29:141]
    for name in SIZES:
        want = opencv_clips(workspace / "videos" / f"{name}.mp4", mean)
        assert np.array_equal(from_npy[name], want), name
        assert np.array_equal(from_blob[name], want), name
