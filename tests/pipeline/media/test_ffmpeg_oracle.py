"""Frame selection against the real thing: the `ffmpeg` binary's `fps` filter on the same files.

Every generated frame carries its own index (four grey bands, one base-16 digit each), so the frames
`ffmpeg -vf fps=fps=R` outputs name the source frames it kept. vmr's decode (both backends) must keep
exactly those. The corpus covers what once differed: CFR at the common rates, video starting after
the audio, a container start offset without audio, VFR, containers without a last-frame duration
(mkv, webm, mpegts), short videos, rates on slot boundaries and long enough videos for float32
timestamps to fall on the wrong side of a boundary. vmr follows FFmpeg 5.1 (Debian 12); the tests
skip where no `ffmpeg` is on PATH, and CI installs Debian's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.media.decode import DecodeError, DecodeTask, decode_video
from pipeline.media.framestore import FrameStore
from pipeline.media.sampling import SamplingProtocol

FFMPEG = shutil.which("ffmpeg")
# CI installs Debian's ffmpeg and sets VMR_REQUIRE_FFMPEG=1: there its absence is a failure, not a skip
REQUIRED = os.environ.get("VMR_REQUIRE_FFMPEG") == "1"
pytestmark = pytest.mark.skipif(FFMPEG is None and not REQUIRED, reason="the ffmpeg binary (the oracle) is not on PATH")

W, H = 64, 32
RATES = (Fraction(1, 2), Fraction(1), Fraction(2, 3), Fraction(2), Fraction(3))
TIME_BASE = Fraction(1, 180000)  # every frame time below is exact in it (59.94 fps included)


def barcode(i: int) -> np.ndarray:
    img = np.empty((H, W, 3), np.uint8)
    for band in range(4):
        img[:, band * W // 4 : (band + 1) * W // 4] = 16 * ((i >> (4 * (3 - band))) & 15) + 8
    return img


def read_barcode(img: np.ndarray) -> int:
    digits = [int(round((img[4:-4, b * W // 4 + 3 : (b + 1) * W // 4 - 3].mean() - 8) / 16)) for b in range(4)]
    return sum(max(0, min(15, d)) << (4 * (3 - b)) for b, d in enumerate(digits))


def make_video(path: Path, times: list[Fraction], *, audio_until: float | None = None) -> Path:
    """Frames at `times` (seconds, exact), optionally after a silent audio track from 0 s."""
    import av

    fmt = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".ts": "mpegts"}[path.suffix]
    codec = "libvpx-vp9" if fmt == "webm" else "libx264"
    with av.open(str(path), "w", format=fmt) as out:
        if audio_until is not None:
            audio = out.add_stream("libopus" if fmt == "webm" else "aac", rate=48000 if fmt == "webm" else 16000)
        video = out.add_stream(codec, rate=30)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        video.time_base = TIME_BASE
        video.codec_context.time_base = TIME_BASE
        video.options = {"qp": "0"} if codec == "libx264" else {"lossless": "1"}
        if audio_until is not None:
            rate, size = audio.codec_context.sample_rate, 960 if fmt == "webm" else 1024
            silence = av.AudioFrame.from_ndarray(np.zeros((1, size), np.float32), format="fltp", layout="mono")
            silence.sample_rate = rate
            for k in range(int(audio_until * rate / size) + 1):
                silence.pts = k * size
                for packet in audio.encode(silence):
                    out.mux(packet)
            for packet in audio.encode():
                out.mux(packet)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(barcode(i), format="rgb24")
            frame.pts, frame.time_base = int(t / TIME_BASE), TIME_BASE
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
    return path


def ffmpeg_keeps(path: Path, rate: Fraction) -> list[int]:
    raw = subprocess.run([FFMPEG, "-v", "error", "-i", str(path), "-an", "-vf", f"fps=fps={rate}",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, H, W, 3)
    return [read_barcode(f) for f in frames]


def vmr_keeps(path: Path, store: Path, backend: str, rate: Fraction) -> list[int]:
    protocol = SamplingProtocol(rule="fps_filter", rate=float(rate), short_side=0, crop=0, hero_short_video=False)
    try:
        record = decode_video(DecodeTask(path.stem, str(path), str(store), (protocol,), backend))
    except DecodeError as e:  # "keeps no frame": ffmpeg's output must then be empty too
        if "keeps no frame" not in str(e):
            raise
        return []
    # the barcodes of the stored frames: the source frames kept, whatever the file discards before them
    frames = np.load(FrameStore(store).frames_path(protocol.key, path.stem))
    assert len(frames) == record["protocols"][protocol.key]["count"]
    return [read_barcode(f) for f in frames]


def cfr(fps: Fraction, n: int, start: Fraction = Fraction(0)) -> list[Fraction]:
    return [start + i / fps for i in range(n)]


# Where FFmpeg versions differ at the demuxer, vmr's decoders (PyAV's bundled FFmpeg, decord's) cannot
# agree with 5.1's binary; docs/features.md lists these cases. Strict: a fix makes the test fail.
VERSION_DIFFERENCES = {
    "offset_no_audio": "mp4 with an edit list: 5.1's mov demuxer gives the last frame no duration (one slot fewer)",
}


def cut_with_edit_list(src: Path, out: Path, start: float = 1.5, length: float = 3.0) -> Path:
    """`ffmpeg -ss START -c copy`: the cut begins at the keyframe before START and an edit list tells
    the decoder to discard the frames before it (their packets come out with negative times)."""
    subprocess.run([FFMPEG, "-v", "error", "-y", "-ss", str(start), "-i", str(src), "-t", str(length),
                    "-c", "copy", str(out)], check=True)
    return out


def corpus(root: Path) -> dict[str, Path]:
    made = {name: make_video(root / f"{name}{suffix}", times, **kw) for name, (times, kw, suffix) in CORPUS.items()
            if name not in CUTS}
    for name, source in CUTS.items():
        made[name] = cut_with_edit_list(made[source], root / f"{name}.mp4")
    return made


def _vfr() -> list[Fraction]:
    rng = np.random.default_rng(0)
    times = [Fraction(0)]
    for _ in range(89):
        times.append(times[-1] + Fraction(int(rng.choice([3000, 6000, 9000, 4500])), 180000))
    return times


CORPUS = {
    **{f"cfr{float(fps):g}": (cfr(fps, int(4 * fps) + 1), {}, ".mp4")
       for fps in (Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30), Fraction(50),
                   Fraction(60000, 1001), Fraction(60))},
    "late_audio_1.0s": (cfr(Fraction(30), 90, Fraction(1)), {"audio_until": 4.0}, ".mp4"),
    "late_audio_0.02s": (cfr(Fraction(30), 90, Fraction(1, 50)), {"audio_until": 3.5}, ".mp4"),
    "late_audio_0.5s": (cfr(Fraction(25), 60, Fraction(1, 2)), {"audio_until": 3.0}, ".mp4"),
    "offset_no_audio": (cfr(Fraction(30), 75, Fraction(7, 10)), {}, ".mp4"),
    "vfr": (_vfr(), {}, ".mp4"),
    "mkv": (cfr(Fraction(30), 100), {}, ".mkv"),
    "mkv_late": (cfr(Fraction(24), 70, Fraction(3, 10)), {"audio_until": 3.5}, ".mkv"),
    "webm": (cfr(Fraction(25), 80), {}, ".webm"),
    "mpegts": (cfr(Fraction(30), 100), {}, ".ts"),
    "mpegts_late": (cfr(Fraction(30), 60, Fraction(7, 5)), {"audio_until": 3.5}, ".ts"),
    **{f"short{d}": (cfr(Fraction(30), int(d * 30)), {}, ".mp4") for d in (0.5, 1.0, 1.5, 2.1)},
    "long_30fps": (cfr(Fraction(30), 600), {}, ".mp4"),  # float32 slot errors began at ~8.8 s
    "cut_source": (cfr(Fraction(25), 150), {}, ".mp4"),  # one keyframe, B-frames (x264's defaults)
    "edit_list_cut": ([], {}, ".mp4"),  # made from cut_source by CUTS
}
CUTS = {"edit_list_cut": "cut_source"}  # name -> the corpus file it is cut from with `-c copy`


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    assert FFMPEG, "VMR_REQUIRE_FFMPEG=1 but no ffmpeg on PATH"
    return corpus(tmp_path_factory.mktemp("oracle"))


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=VERSION_DIFFERENCES[n], strict=True)) if n in VERSION_DIFFERENCES
    else n for n in CORPUS])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_selection_equals_ffmpeg_fps_filter(videos, tmp_path, backend, name):
    mismatches = []
    for rate in RATES:
        expected, got = ffmpeg_keeps(videos[name], rate), vmr_keeps(videos[name], tmp_path, backend, rate)
        if got != expected:
            mismatches.append(f"r={rate}: ffmpeg {expected} ({len(expected)}), vmr {got} ({len(got)})")
    assert not mismatches, "\n".join(mismatches)


def test_the_barcode_survives_the_codecs(videos):
    assert ffmpeg_keeps(videos["long_30fps"], Fraction(30)) == list(range(600))
