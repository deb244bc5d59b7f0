"""Frame selection against the real thing: the `ffmpeg` binary's `fps` filter on the same files.

Every generated frame carries its own index (four grey bands, one base-16 digit each), so the frames
`ffmpeg -vf fps=fps=R` outputs name the source frames it kept. vmr's decode (both backends) must keep
exactly those. The corpus covers what once differed: CFR at the common rates, video starting after
the audio, a container start offset without audio (mp4s whose end 5.1 computes by different rules:
B-frames, codecs, time bases, fragments), VFR, containers without a last-frame duration (mkv, webm,
mpegts), short videos, rates on slot boundaries and long enough videos for float32 timestamps to fall
on the wrong side of a boundary. vmr follows FFmpeg 5.1 (Debian 12); the tests skip where no `ffmpeg`
is on PATH, and CI installs Debian's (with `ffprobe`, the oracle of the mp4 end rule).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.media.decode import DecodeError, DecodeTask, decode_video
from pipeline.media.ffmpeg51 import mov_last_duration
from pipeline.media.framestore import FrameStore
from pipeline.media.sampling import SamplingProtocol

FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")  # Debian's ffmpeg package brings it
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


LOSSLESS = {"libx264": {"qp": "0"}, "libvpx-vp9": {"lossless": "1"}, "libx265": {"x265-params": "lossless=1:log-level=0"},
            "mpeg4": {"qscale": "1"}}
BFRAMES = {"qp": "4", "bframes": "3"}  # libx264 with B-frames: composition offsets (a `ctts` box in mp4)


def make_video(path: Path, times: list[Fraction], *, audio_until: float | None = None, codec: str | None = None,
               options: dict | None = None, time_base: Fraction = TIME_BASE, mux_options: dict | None = None) -> Path:
    """Frames at `times` (seconds, exact), optionally after a silent audio track from 0 s. `time_base` is
    the encoder's (x264 writes it into the SPS timing: 1/180000 reads as 180000 fps); mp4 may store
    another (`mux_options`: the muxer's, e.g. `video_track_timescale`)."""
    import av

    fmt = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".ts": "mpegts"}[path.suffix]
    codec = codec or ("libvpx-vp9" if fmt == "webm" else "libx264")
    with av.open(str(path), "w", format=fmt, options=mux_options or {}) as out:
        if audio_until is not None:
            audio = out.add_stream("libopus" if fmt == "webm" else "aac", rate=48000 if fmt == "webm" else 16000)
        video = out.add_stream(codec, rate=30)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        video.time_base = time_base
        video.codec_context.time_base = time_base
        video.options = options or LOSSLESS[codec]
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
            assert (t / time_base).denominator == 1, f"{t} s is not a whole number of {time_base} ticks"
            frame.pts, frame.time_base = int(t / time_base), time_base
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
    # video starting 0.7 s into an mp4 (an empty edit), no audio: 5.1 ends it at the last frame's pts or
    # after one frame, depending on composition offsets, SPS timing and codec (pipeline/media/ffmpeg51.py)
    "offset_no_audio": (cfr(Fraction(30), 75, Fraction(7, 10)), {}, ".mp4"),
    "offset_sps30": (cfr(Fraction(30), 75, Fraction(7, 10)), {"time_base": Fraction(1, 30)}, ".mp4"),
    "offset_bframes": (cfr(Fraction(30), 75, Fraction(7, 10)), {"options": BFRAMES}, ".mp4"),
    "offset_bframes_sps30": (cfr(Fraction(30), 75, Fraction(7, 10)),
                             {"options": BFRAMES, "time_base": Fraction(1, 30)}, ".mp4"),
    "offset_hevc": (cfr(Fraction(30), 75, Fraction(7, 10)), {"codec": "libx265"}, ".mp4"),
    "offset_mpeg4": (cfr(Fraction(30), 75, Fraction(7, 10)), {"codec": "mpeg4", "time_base": Fraction(1, 60000)}, ".mp4"),
    "offset_fragmented": (cfr(Fraction(30), 75, Fraction(7, 10)), {"mux_options": {"movflags": "frag_keyframe+empty_moov"}}, ".mp4"),
    "offset_timescale30": (cfr(Fraction(30), 75, Fraction(7, 10)), {"mux_options": {"video_track_timescale": "30"}},
                           ".mp4"),  # a time base coarser than 1 ms: one tick
    "offset_vp9": (cfr(Fraction(30), 75, Fraction(7, 10)), {"codec": "libvpx-vp9"}, ".mp4"),
    "vfr_vp9": (_vfr(), {"codec": "libvpx-vp9"}, ".mp4"),  # parsed in full: 1 / r_frame_rate, not the stts's
    "bframes": (cfr(Fraction(30), 75), {"options": BFRAMES}, ".mp4"),  # ctts, SPS 180000 fps: ends at the last pts
    "late_audio_bframes_sps25": (cfr(Fraction(25), 60, Fraction(12, 25)),
                                 {"audio_until": 3.0, "options": BFRAMES, "time_base": Fraction(1, 25)}, ".mp4"),
    "vfr": (_vfr(), {}, ".mp4"),
    "mkv": (cfr(Fraction(30), 100), {}, ".mkv"),
    "mkv_late": (cfr(Fraction(24), 70, Fraction(3, 10)), {"audio_until": 3.5}, ".mkv"),
    "webm": (cfr(Fraction(25), 80), {}, ".webm"),
    "mpegts": (cfr(Fraction(30), 100), {}, ".ts"),
    "mpegts_late": (cfr(Fraction(30), 60, Fraction(7, 5)), {"audio_until": 3.5}, ".ts"),
    **{f"short{d}": (cfr(Fraction(30), int(d * 30)), {}, ".mp4") for d in (0.5, 1.0, 1.5, 2.1)},
    "long_30fps": (cfr(Fraction(30), 600), {}, ".mp4"),  # float32 slot errors began at ~8.8 s
    "cut_source": (cfr(Fraction(25), 150), {}, ".mp4"),  # one keyframe (x264's lossless mode: no B-frames)
    "edit_list_cut": ([], {}, ".mp4"),  # made from cut_source by CUTS
}
CUTS = {"edit_list_cut": "cut_source"}  # name -> the corpus file it is cut from with `-c copy`


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    assert FFMPEG, "VMR_REQUIRE_FFMPEG=1 but no ffmpeg on PATH"
    return corpus(tmp_path_factory.mktemp("oracle"))


@pytest.mark.parametrize("name", list(CORPUS))
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


# the cases where vmr applies one of its 5.1 rules, and the containers
THROUGH_THE_CLI = ["offset_no_audio", "offset_bframes", "offset_sps30", "edit_list_cut", "late_audio_1.0s",
                   "mkv_late", "mpegts_late", "webm", "vfr"]


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_vmr_decode_keeps_what_ffmpeg_keeps(videos, tmp_path, backend):
    """The same comparison through the command a user types: `vmr decode` for piergiaj's I3D, whose
    protocol stores native-size frames at `extractors.i3d.fps`."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    (tmp_path / "videos").mkdir()
    for name in THROUGH_THE_CLI:
        shutil.copy(videos[name], tmp_path / "videos" / videos[name].name)
    for rate in (Fraction(1), Fraction(3)):
        out = tmp_path / f"frames-{rate}"
        params = {"features": ["i3d"], "dataset": {"video_dir": str(tmp_path / "videos")},
                  "decode": {"out_dir": str(out), "workers": 1, "backend": backend, "store_frames": "all"},
                  "extractors": {"i3d": {"fps": float(rate)}}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        result = CliRunner().invoke(app, ["decode", "--params", str(tmp_path / "params.yaml")])
        assert result.exit_code == 0, result.output
        key = SamplingProtocol(rule="fps_filter", rate=float(rate), short_side=0, crop=0).key
        for name in THROUGH_THE_CLI:
            kept = [read_barcode(f) for f in FrameStore(out).load(videos[name].stem, key).frames]
            assert kept == ffmpeg_keeps(videos[name], rate), f"{name}, r={rate}"


@pytest.mark.skipif(FFPROBE is None and not REQUIRED, reason="ffprobe (the oracle) is not on PATH")
@pytest.mark.parametrize("name", [name for name, (_, _, suffix) in CORPUS.items() if suffix == ".mp4"])
def test_mp4_last_frame_duration_equals_ffprobe(videos, name):
    """Where an mp4 video ends: 5.1's duration for the last shown frame's packet (ffprobe's packets
    go through the same libavformat as the command line's), from vmr's reading of the boxes."""
    import av

    assert FFPROBE, "VMR_REQUIRE_FFMPEG=1 but no ffprobe on PATH"
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts,duration",
                          "-of", "json", str(videos[name])], capture_output=True, check=True, text=True).stdout
    last = max((p for p in json.loads(out)["packets"] if "pts" in p), key=lambda p: int(p["pts"]))
    expected = int(last.get("duration", 0))  # absent: N/A, no duration
    with av.open(str(videos[name])) as container:
        stream = container.streams.video[0]
        last_dts = [p.dts for p in container.demux(stream) if p.size > 0 and p.dts is not None][-1]
        assert mov_last_duration(videos[name], stream, last_dts) == expected
