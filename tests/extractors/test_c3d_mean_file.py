"""C3D with Caffe's per-pixel mean volume (`extractors.c3d.mean_file`, a `.binaryproto`).

The oracle is Caffe's rule from facebook/C3D v1.0 (`video_data_layer.cpp`, TEST phase, the
feature-extraction prototxt: new_height 128, new_width 171, crop_size 112, no scale, no mirror),
rendered here in numpy: BGR uint8 frame -> float, minus the mean at the same (channel, frame, row,
col) index, the crop at rows (128 - 112) // 2 = 8 and columns (171 - 112) // 2 = 29. The mean file
is written byte by byte in the official layout (tests/support/caffe.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from support.c3d_cli import decode_workspace, extract, record_network_inputs
from support.caffe import write_blob_proto

from extractors import EXTRACTORS
from extractors.c3d import C3DExtractor
from pipeline.core.provenance import sha256_file
from pipeline.nets.caffe_blob import BlobProtoError

SPORT1M_SHAPE = (1, 3, 16, 128, 171)
ROW, COL = 8, 29  # Caffe TEST phase: h_off = (128 - 112) / 2, w_off = (171 - 112) / 2 (integer division)


def mean_volume(seed: int = 0) -> np.ndarray:
    """Known means with fractions and a different value at every pixel, frame and channel."""
    return (np.random.default_rng(seed).random(SPORT1M_SHAPE) * 255).astype(np.float32)


def caffe_input(frames_rgb: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Caffe's data blob for one 16-frame clip of 128x171 frames: (3, 16, 112, 112) float32."""
    bgr = frames_rgb[..., ::-1].transpose(3, 0, 1, 2).astype(np.float32)  # (c, l, h, w)
    return bgr[:, :, ROW : ROW + 112, COL : COL + 112] - mean[0, :, :, ROW : ROW + 112, COL : COL + 112]


def c3d(**config) -> C3DExtractor:
    return EXTRACTORS.get("c3d")(EXTRACTORS.get("c3d").Config(**config))


def test_preprocess_subtracts_the_cropped_volume_frame_by_frame(tmp_path):
    mean = mean_volume()
    path = write_blob_proto(tmp_path / "sport1m_train16_128_mean.binaryproto", mean)
    frames = np.random.default_rng(1).integers(0, 256, (2, 32, 128, 171, 3), dtype=np.uint8)
    units = torch.from_numpy(np.ascontiguousarray(frames[:, :, ROW : ROW + 112, COL : COL + 112]))
    x = c3d(protocol="tall64", mean_file=str(path)).preprocess(units).numpy()  # 32 frames: two 16-frame units
    assert x.shape == (2, 3, 32, 112, 112) and x.dtype == np.float32
    for b in range(2):
        for u in range(2):  # frame f of each unit uses mean frame f
            assert np.array_equal(x[b, :, 16 * u : 16 * u + 16], caffe_input(frames[b, 16 * u : 16 * u + 16], mean))
    # channel_order rgb: the file's BGR volume is turned around with the frames
    rgb = c3d(channel_order="rgb", mean_file=str(path)).preprocess(units[:1, :16]).numpy()
    assert np.array_equal(rgb[0, ::-1], caffe_input(frames[0, :16], mean))


def test_without_mean_file_the_channel_means_of_the_sport1m_volume_are_subtracted():
    # (B, G, R) means of sport1m_train16_128_mean over its 16 x 128 x 171 pixels (docs/snippet_extractors.md)
    channel_means = np.array([90.25164677, 97.65700354, 101.40833461], np.float32)
    px = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 1, 1, 1, 3)  # RGB
    assert c3d().preprocess(px).flatten().tolist() == (np.float32([30, 20, 10]) - channel_means).tolist()


def test_a_mean_volume_of_another_shape_is_refused(tmp_path):
    # facebook/C3D's other mean file, fb_train16_128_mean, is 128x128: not the Sports-1M model's input
    path = write_blob_proto(tmp_path / "fb_train16_128_mean.binaryproto", np.zeros((1, 3, 16, 128, 128), np.float32))
    with pytest.raises(BlobProtoError, match=r"fb_train16_128_mean.binaryproto: C3D mean volume must be .*"
                                             r"\(1, 3, 16, 128, 171\).* got \(1, 3, 16, 128, 128\)"):
        c3d(mean_file=str(path)).mean_volume()


# -- through `vmr decode` + `vmr extract` ----------------------------------------------------------


FRAMES = 27  # clips16, stride 8, tail pad: clips at 0, 8, 16, 24; the last two repeat frame 26


def write_textured_video(path: Path) -> None:
    """171x128 (the C3D frame size: no resize anywhere), yuv444p so the odd width is allowed."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 171, 128, "yuv444p"
        y, x = np.mgrid[0:128, 0:171]
        for i in range(FRAMES):
            img = np.stack([(x * 3 + i * 7) % 256, (y * 5 + x) % 256, (x * y + i * 31) % 256], -1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def decoded_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c3dmean")
    (root / "videos").mkdir()
    write_textured_video(root / "videos" / "clip.mp4")
    write_blob_proto(root / "sport1m_train16_128_mean.binaryproto", mean_volume(2))
    return decode_workspace(root, batch_size=4)


def test_vmr_extract_feeds_c3d_exactly_caffes_input(workspace, monkeypatch):
    """The inputs the network gets under `vmr extract` equal Caffe's, bit for bit (the network itself is
    stubbed: what is under test is its input)."""
    seen = record_network_inputs(monkeypatch)
    mean_file = workspace / "sport1m_train16_128_mean.binaryproto"
    digest = sha256_file(mean_file)
    result = extract(workspace, "npy", f"extractors.c3d.mean_file={mean_file}", f"extractors.c3d.mean_file_sha256={digest}")
    assert result.exit_code == 0, result.output

    got = torch.cat(seen).numpy()
    frames, mean = decoded_frames(workspace / "videos" / "clip.mp4"), mean_volume(2)
    assert len(frames) == FRAMES
    starts = [0, 8, 16, 24]
    assert got.shape == (len(starts), 3, 16, 112, 112)
    for row, s in enumerate(starts):
        clip = frames[np.minimum(s + np.arange(16), FRAMES - 1)]
        assert np.array_equal(got[row], caffe_input(clip, mean)), f"clip at frame {s}"
    prov = json.loads((workspace / "npy" / "c3d" / "provenance.json").read_text())
    assert prov["extractor"]["mean_file_sha256"] == digest


def test_vmr_extract_refuses_a_wrong_digest_or_a_damaged_mean_file(workspace, monkeypatch):
    monkeypatch.setattr(C3DExtractor, "embed", lambda self, model, x: torch.zeros(len(x), self.dim))
    mean_file = workspace / "sport1m_train16_128_mean.binaryproto"
    result = extract(workspace, "npy_digest", f"extractors.c3d.mean_file={mean_file}",
                     "extractors.c3d.mean_file_sha256=" + "ab" * 32)
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(error) == 1, result.output
    assert f"C3D mean file {mean_file}: sha256" in error[0] and "does not match the expected " + "ab" * 32 in error[0]

    damaged = workspace / "damaged_mean.binaryproto"
    damaged.write_bytes(mean_file.read_bytes()[:100_000])
    result = extract(workspace, "npy_damaged", f"extractors.c3d.mean_file={damaged}")
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(error) == 1, result.output
    assert str(damaged) in error[0] and "not a Caffe BlobProto" in error[0]
    result = extract(workspace, "npy_missing", f"extractors.c3d.mean_file={workspace / 'absent.binaryproto'}")
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(error) == 1 and "absent.binaryproto" in error[0], result.output
    for npy in ("npy_digest", "npy_damaged", "npy_missing"):  # nothing written for any
        assert not list((workspace / npy).rglob("*.npy"))


def test_a_bad_npy_mean_cube_is_refused_with_its_name(tmp_path):
    damaged = tmp_path / "train01_16_128_171_mean.npy"
    np.save(damaged, np.zeros((3, 16, 128, 171)))
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(BlobProtoError, match=r"train01_16_128_171_mean.npy: not a readable .npy mean cube"):
        c3d(mean_file=str(damaged)).mean_volume()
    other = tmp_path / "other_mean.npy"
    np.save(other, np.zeros((3, 16, 112, 112)))
    with pytest.raises(BlobProtoError, match=r"other_mean.npy: C3D mean volume must be .* got \(3, 16, 112, 112\)"):
        c3d(mean_file=str(other)).mean_volume()
