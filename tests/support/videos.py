"""Tiny test videos made with PyAV: every frame carries its own index, so tests can tell which
source frame the decoder kept (left half grey 16 * (i // 16) + 8, right half 16 * (i % 16) + 8:
luma steps of 16 survive H.264 and resizing; up to 256 frames)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def frame_image(i: int, width: int, height: int, marker: bool = False) -> np.ndarray:
    img = np.empty((height, width, 3), np.uint8)
    img[:, : width // 2] = 16 * ((i // 16) % 16) + 8
    img[:, width // 2 :] = 16 * (i % 16) + 8
    if marker:  # a white block in the top-left quarter, to see rotations
        img[: height // 2, : width // 2] = 255
    return img


def write_video(
    path: Path,
    frames: int = 30,
    fps: int | Fraction = 30,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    pts_ms: list[int] | None = None,
    rotation: int | None = None,
    marker: bool = False,
    pix_fmt: str = "yuv420p",
    audio: bool = False,
) -> Path:
    """Encode `frames` index-coded frames; `pts_ms` gives variable frame times in milliseconds;
    `audio` adds an AAC stream (a 440 Hz tone, as long as the video)."""
    with av.open(str(path), "w") as out:
        # with explicit times, a 1 ms codec time base keeps them exact (else they snap to 1/fps)
        stream = out.add_stream(codec, rate=1000 if pts_ms is not None else fps)
        sound = out.add_stream("aac", rate=AUDIO_RATE) if audio else None
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "12", "g": "10", "bf": "0"}  # no B-frames: pts as given
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height, marker), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if sound is not None:
            seconds = (pts_ms[-1] / 1000 if pts_ms is not None else frames / float(fps))
            _write_tone(out, sound, seconds)
    return path


def write_textured_video(path: Path, width: int, height: int, frames: int, fps: int) -> Path:
    """Gradients plus noise seeded by the frame size: a resize that is off by a rounding step shows."""
    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "16"}
        for i in range(frames):
            smooth = np.stack([(x * 255 // width + i * 9) % 256, y * 255 // height, (x + y + i * 13) % 256], -1)
            img = np.clip(smooth + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


AUDIO_RATE = 48000


def _write_tone(out, stream, seconds: float) -> None:
    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    block = 1024  # AAC's frame size
    for start in range(0, len(tone), block):
        chunk = tone[start:start + block][None]  # planar float: (channels, samples)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = AUDIO_RATE, start
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def index_of(frame: np.ndarray) -> int:
    """The source index a (possibly resized or cropped) frame carries."""
    w = frame.shape[1]
    high = float(np.median(frame[:, : w // 4]))
    low = float(np.median(frame[:, -(w // 4) :]))
    return 16 * int(round((high - 8) / 16)) + int(round((low - 8) / 16))
