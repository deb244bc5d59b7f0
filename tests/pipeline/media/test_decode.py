"""Decode: frame selection on real encoded videos, rotation, VFR, bad inputs, resume (the worker pool:
test_decode_pool.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from support.videos import frame_image, index_of, write_video  # noqa: E402

import pipeline.media.decode as decode_mod
from pipeline.media.decode import decode_all, list_videos
from pipeline.media.framestore import FrameStore
from pipeline.media.sampling import SamplingProtocol

REPO = Path(__file__).resolve().parents[3]
CLIP1 = SamplingProtocol(rule="fps_filter", rate=1.0, short_side=224, crop=224)  # Charades clip_len 1
CLIP2 = SamplingProtocol(rule="fps_filter", rate=0.5, short_side=224, crop=224)  # QVH clip_len 2
SMALL = dict(short_side=32, crop=32)
# Not a video. Fixed bytes: about 1 in 200 random ones demux as a container with no video stream.
GARBAGE = np.random.default_rng(0).bytes(4096)


def decode(tmp_path: Path, protocols, **kw):
    videos = list_videos(tmp_path / "videos")
    summary = decode_all(videos, tmp_path / "frames", protocols, workers=kw.pop("workers", 1), **kw)
    return summary, FrameStore(tmp_path / "frames")


@pytest.fixture
def vdir(tmp_path: Path) -> Path:
    (tmp_path / "videos").mkdir()
    return tmp_path / "videos"


def test_fps_filter_keeps_mid_window_frames_of_a_real_video(tmp_path, vdir):
    # 95 frames at 30 fps: 3.1667 s. rate 1: round(3.17) = 3 slots, slot k = last frame with
    # t < k + 0.5 -> frames 14, 44, 74. rate 0.5: round(1.58) = 2 slots, t < 1 and t < 3 -> 29, 89.
    write_video(vdir / "a.mp4", frames=95)
    summary, store = decode(tmp_path, [CLIP1, CLIP2])
    assert summary.decoded == 1 and not summary.failed
    one, two = store.load("a", CLIP1.key), store.load("a", CLIP2.key)
    assert one.source_index.tolist() == [14, 44, 74]
    assert [index_of(f) for f in one.frames] == [14, 44, 74]
    assert one.frames.shape == (3, 224, 224, 3) and one.frames.dtype == np.uint8
    assert one.windows.tolist() == [[0, 1], [1, 2], [2, 3]]
    assert np.allclose(one.pts, [14 / 30, 44 / 30, 74 / 30], atol=1e-6)
    assert two.source_index.tolist() == [29, 89]
    assert [index_of(f) for f in two.frames] == [29, 89]
    rec = store.read_record("a")
    assert rec["num_frames"] == 95 and rec["native_fps"] == 30 and rec["codec"] == "h264"
    assert rec["duration"] == pytest.approx(95 / 30, abs=1e-6)
    assert rec["decoder"].startswith("decord")


def test_every_n_and_uniform_rules(tmp_path, vdir):
    write_video(vdir / "a.mp4", frames=40)
    every8 = SamplingProtocol(rule="every_n", every_n=8, **SMALL)
    uniform = SamplingProtocol(rule="uniform", rate=2.0, **SMALL)
    _, store = decode(tmp_path, [every8, uniform])
    e = store.load("a", every8.key)
    assert e.source_index.tolist() == [0, 8, 16, 24, 32]
    assert [index_of(f) for f in e.frames] == [0, 8, 16, 24, 32]
    assert e.windows[1].tolist() == pytest.approx([8 / 30, 16 / 30], abs=1e-6)
    u = store.load("a", uniform.key)  # first frame at or after k / 2 s; ceil(1.333 * 2) = 3 slots
    assert u.source_index.tolist() == [0, 15, 30]


def test_variable_frame_rate_selection_uses_real_timestamps(tmp_path, vdir):
    pts = [0, 100, 250, 900, 1000, 1600, 2300]  # ms; the last frame lasts 1 ms -> end 2.301 s
    write_video(vdir / "vfr.mp4", frames=7, pts_ms=pts)
    half = SamplingProtocol(rule="fps_filter", rate=2.0, **SMALL)
    _, store = decode(tmp_path, [half])
    v = store.load("vfr", half.key)
    # round(2.301 * 2) = 5 slots; slot k keeps the last frame with t < (k + 0.5) / 2:
    # t < 0.25 -> frame 1 (0.25 itself is excluded), t < 0.75 -> 2, t < 1.25 -> 4, t < 1.75 -> 5,
    # t < 2.25 -> 5 again (the gap repeats the previous frame)
    assert v.source_index.tolist() == [1, 2, 4, 5, 5]
    assert [index_of(f) for f in v.frames] == [1, 2, 4, 5, 5]
    assert np.allclose(v.pts, [0.1, 0.25, 1.0, 1.6, 1.6], atol=1e-6)


def test_rotated_video_is_decoded_upright(tmp_path, vdir):
    # stored 64x48 landscape with a white block top-left; display rotation 90 (counter-clockwise)
    write_video(vdir / "rot.mp4", frames=10, width=64, height=48, rotation=90, marker=True)
    raw = SamplingProtocol(rule="every_n", every_n=5, short_side=0, crop=0)
    _, store = decode(tmp_path, [raw])
    rec = store.read_record("rot")
    assert rec["status"] == "ok" and rec["rotation"] == 90 and rec["decoder"].startswith("pyav")
    f = store.load("rot", raw.key).frames
    assert f.shape == (2, 64, 48, 3)  # portrait after rotation
    # rotating the top-left block 90 degrees counter-clockwise puts it bottom-left
    assert f[0, -5:, :5].mean() > 200 and f[0, :5, :5].mean() < 200


def test_hero_short_video_rule(tmp_path, vdir):
    # 62 frames at 30 fps = 2.067 s < clip_len 2 + 0.1: HERO uses fps = 2 / int(2.067) = 1 -> 2 frames,
    # where the plain fps filter at 0.5 gives round(1.03) = 1.
    write_video(vdir / "short.mp4", frames=62)
    hero = SamplingProtocol(rule="fps_filter", rate=0.5, hero_short_video=True, **SMALL)
    plain = SamplingProtocol(rule="fps_filter", rate=0.5, **SMALL)
    _, store = decode(tmp_path, [hero, plain])
    assert store.load("short", hero.key).source_index.tolist() == [14, 44]
    assert store.load("short", plain.key).source_index.tolist() == [29]


def mux_silence(out, audio, num_frames: int) -> None:
    """Encode and mux `num_frames` frames of 1024 silent mono samples into the 16 kHz `audio` stream."""
    import av

    silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    silence.sample_rate = 16000
    for i in range(num_frames):
        silence.pts = i * 1024
        for packet in audio.encode(silence):
            out.mux(packet)
    for packet in audio.encode():
        out.mux(packet)


def _zero_frame_mkv(path: Path) -> None:
    """A Matroska file whose video track has no frames (only audio packets were written)."""
    import av

    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        mux_silence(out, out.add_stream("aac", rate=16000), 5)


def test_bad_inputs_are_reported_and_skipped(tmp_path, vdir):
    write_video(vdir / "good.mp4", frames=30)
    (vdir / "garbage.mp4").write_bytes(GARBAGE)
    (vdir / "text.mkv").write_text("this is not a video\n")
    data = (write_video(tmp_path / "full.mp4", frames=60)).read_bytes()
    (vdir / "truncated.mp4").write_bytes(data[: len(data) // 2])
    _zero_frame_mkv(vdir / "empty.mkv")
    write_video(vdir / "av1.mp4", frames=5, codec="libsvtav1", width=64, height=64)
    (vdir / "notes.txt").write_text("ignored: not a video extension")

    summary, store = decode(tmp_path, [SamplingProtocol(rule="fps_filter", rate=1.0, **SMALL)])
    assert summary.total == 6 and summary.decoded == 1
    report = json.loads((tmp_path / "frames" / "failures.json").read_text())
    reasons = {f["video"]: f["reason"] for f in report["failures"]}
    assert set(reasons) == {"garbage", "text", "truncated", "empty", "av1"}
    assert report == {"total": 6, "failed": 5, "failures": report["failures"]}
    assert "unsupported codec 'av1'" in reasons["av1"]
    assert reasons["empty"].startswith("zero frames")
    for vid in ("garbage", "text", "truncated"):
        assert "unreadable" in reasons[vid] or "cannot" in reasons[vid], reasons[vid]
    manifest = json.loads((tmp_path / "frames" / "manifest.json").read_text())["videos"]
    assert manifest["good"]["status"] == "ok" and manifest["av1"]["status"] == "failed"
    assert store.video_ids() == ["good"]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_then_rerun_is_byte_identical(tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    for i in range(10):
        write_video(vids / f"v{i}.mp4", frames=45 + 7 * i, width=96, height=64)
    params = tmp_path / "params.yaml"
    out = tmp_path / "frames"  # both runs write here (the provenance records out_dir)
    params.write_text(f"dataset: {{video_dir: {vids}}}\ndecode: {{out_dir: {out}, workers: 1}}\nfeatures: [clip]\n")
    cmd = [sys.executable, "-m", "pipeline.cli", "decode", "--params", str(params)]
    env = dict(os.environ, VMR_NO_PROGRESS="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    clean = _tree_bytes(out)
    shutil.rmtree(out)

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    records = out / "videos"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(records.glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its decode workers, mid-run
    proc.wait()
    done_before = len(list(records.glob("*.json")))
    assert 2 <= done_before < 10, "the kill should land mid-run"
    result = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    assert f"{done_before} already done" in result.stderr
    assert _tree_bytes(out) == clean


def _cut_faststart_mp4(path: Path, frames: int = 90) -> None:
    """An mp4 with its index at the front (faststart), cut at 60%: the index lists frames that are gone."""
    import av

    full = path.with_suffix(".full")
    with av.open(str(full), "w", format="mp4", options={"movflags": "faststart"}) as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            for packet in s.encode(av.VideoFrame.from_ndarray(frame_image(i, 64, 48), format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * 0.6)])


@pytest.mark.parametrize("backend, also", [("decord", "(PyAV, after decord: decord cannot open"), ("pyav", "")])
def test_file_cut_after_its_index_fails_with_a_reason(tmp_path, vdir, backend, also):
    # decord's failures are retried with PyAV; the reason names both
    _cut_faststart_mp4(vdir / "cut.mp4")
    summary, _ = decode(tmp_path, [SamplingProtocol(rule="fps_filter", rate=1.0, **SMALL)], backend=backend)
    assert list(summary.failed) == ["cut"], summary.failed
    assert summary.failed["cut"].startswith("truncated file: ") and also in summary.failed["cut"], summary.failed


def test_pyav_backend_decodes_what_decord_cannot(tmp_path, vdir):
    write_video(vdir / "av1.mp4", frames=40, codec="libsvtav1", width=64, height=64)
    write_video(vdir / "h264.mp4", frames=40)
    proto = SamplingProtocol(rule="fps_filter", rate=1.0, **SMALL)
    summary, store = decode(tmp_path, [proto], backend="pyav")
    assert summary.decoded == 2 and not summary.failed
    assert store.read_record("av1")["codec"] == "av1" and store.read_record("av1")["decoder"].startswith("pyav")
    assert store.load("h264", proto.key).source_index.tolist() == [14]  # round(1.33) = 1 slot: t < 0.5
    assert [index_of(f) for f in store.load("h264", proto.key).frames] == [14]


def test_time_origin_is_the_file_start_not_the_video_start(tmp_path, vdir):
    """Audio from 0 s, video from 0.5 s (45 frames at 30 fps): FFmpeg's fps filter counts from the file
    start, so the first slot with a frame is k0 = round(0.5) = 1 (it keeps t < 1.5: frame 29) and slot 0
    repeats that kept frame, not the stream's first (tests/pipeline/media/test_ffmpeg_oracle.py checks
    the rule against the ffmpeg binary). The last packet has no duration: FFmpeg 5.1 adds none."""
    import av

    with av.open(str(vdir / "late.mp4"), "w") as out:
        audio = out.add_stream("aac", rate=16000)
        video = out.add_stream("libx264", rate=1000)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.time_base = Fraction(1, 1000)
        video.options = {"g": "10", "bf": "0"}
        mux_silence(out, audio, 40)
        for i in range(45):
            frame = av.VideoFrame.from_ndarray(frame_image(i, 64, 48), format="rgb24")
            frame.pts, frame.time_base = 500 + round(i * 1000 / 30), Fraction(1, 1000)
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
    proto = SamplingProtocol(rule="fps_filter", rate=1.0, **SMALL)
    _, store = decode(tmp_path, [proto])
    rec = store.read_record("late")
    assert rec["start_offset"] == 0.5 and rec["duration"] == pytest.approx(0.5 + 44 / 30, abs=2e-3)
    v = store.load("late", proto.key)
    assert v.source_index.tolist() == [29, 29]  # frame 30 sits at 0.5 + 1.0 = 1.5: not < 1.5
    assert v.pts.tolist() == pytest.approx([1.467, 1.467], abs=1e-3)
    assert [index_of(f) for f in v.frames] == [29, 29]


def test_pyav_reader_large_file_path_gives_the_same_frames(tmp_path, vdir, monkeypatch):
    """Files above KEEP_PACKETS_MAX_BYTES are demuxed again instead of held in memory: same output."""
    write_video(vdir / "v.mp4", frames=45, width=80, height=60, rotation=90)
    protos = (SamplingProtocol(rule="fps_filter", rate=3.0, **SMALL), SamplingProtocol(rule="all", **SMALL))
    outputs = []
    for cap in (decode_mod.KEEP_PACKETS_MAX_BYTES, 0):
        monkeypatch.setattr(decode_mod, "KEEP_PACKETS_MAX_BYTES", cap)
        root = tmp_path / f"store-{cap}"
        assert decode_mod.run_task(decode_mod.DecodeTask("v", str(vdir / "v.mp4"), str(root), protos, "pyav")) == "decoded"
        outputs.append([(root / p.key / "v.npy").read_bytes() for p in protos] + [(root / "videos" / "v.json").read_text()])
    assert outputs[0] == outputs[1]
    assert len(np.load(tmp_path / f"store-0/{protos[1].key}/v.npy")) == 45


def _bframe_video(path: Path, frames: int = 90) -> Path:
    """Index-coded frames with x264 B-frames (b-pyramid): about a quarter are non-reference frames."""
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"crf": "12", "g": "60", "bf": "3"}
        for i in range(frames):
            for packet in s.encode(av.VideoFrame.from_ndarray(frame_image(i, 64, 48), format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


def test_pyav_backend_skipping_unkept_frames_keeps_the_pixels(tmp_path, vdir):
    """The PyAV backend lets the decoder drop non-reference frames it does not keep: the kept frames
    are the ones a full decode of every frame gives, byte for byte."""
    import av

    path = _bframe_video(vdir / "b.mp4")
    with av.open(str(path)) as c:  # the file really has frames the decoder can drop
        c.streams.video[0].codec_context.skip_frame = "NONREF"
        assert sum(1 for _ in c.decode(video=0)) < 80
    protos = (
        SamplingProtocol(rule="fps_filter", rate=7.0, **SMALL),
        SamplingProtocol(rule="every_n", every_n=4, **SMALL),
    )
    task = decode_mod.DecodeTask("b", str(path), str(tmp_path / "store"), protos, "pyav")
    assert decode_mod.run_task(task) == "decoded"
    with av.open(str(path)) as c:
        c.streams.video[0].codec_context.thread_count = 1
        every = list(c.decode(video=0))  # presentation order
    store = FrameStore(tmp_path / "store")
    for proto in protos:
        kept = store.load("b", proto.key)
        assert len(kept.source_index) > 5
        expected = [decode_mod.resize_crop(every[i], proto) for i in kept.source_index]
        assert np.array_equal(kept.frames, np.stack(expected))
        assert [index_of(f) for f in kept.frames] == kept.source_index.tolist()


def test_pyav_backend_decodes_again_when_a_kept_frame_was_skipped(tmp_path, vdir, monkeypatch):
    """Should a kept frame not come out of the skipping decoder (simulated: every packet may be
    dropped, so kept non-reference frames are lost), the reader decodes the video again without
    skipping: same bytes as the normal run."""
    path = _bframe_video(vdir / "b.mp4", frames=45)
    protos = (SamplingProtocol(rule="every_n", every_n=2, **SMALL),)
    passes: list[bool] = []
    decode = decode_mod.PyAVReader._decode

    def logged(self, wanted, skip_unneeded):
        passes.append(skip_unneeded)
        return decode(self, wanted, skip_unneeded)

    monkeypatch.setattr(decode_mod.PyAVReader, "_decode", logged)
    outputs = []
    for drop_kept in (False, True):
        if drop_kept:
            monkeypatch.setattr(decode_mod.PyAVReader, "_skip_level", staticmethod(lambda packet, wanted: "NONREF"))
        root = tmp_path / str(drop_kept)
        assert decode_mod.run_task(decode_mod.DecodeTask("b", str(path), str(root), protos, "pyav")) == "decoded"
        outputs.append([(root / protos[0].key / "b.npy").read_bytes(), (root / "videos" / "b.json").read_text()])
    assert passes == [True, True, False]  # the normal run skips; the lossy one falls back
    assert outputs[0] == outputs[1]


def test_pyav_backend_reports_bad_inputs_from_its_single_open(tmp_path, vdir):
    """The PyAV backend probes inside its reader (one open): same reasons as the decord backend's probe."""
    write_video(vdir / "good.mp4", frames=30)
    (vdir / "garbage.mp4").write_bytes(GARBAGE)
    data = (write_video(tmp_path / "full.mp4", frames=60)).read_bytes()
    (vdir / "truncated.mp4").write_bytes(data[: len(data) // 2])
    _zero_frame_mkv(vdir / "empty.mkv")
    summary, store = decode(tmp_path, [SamplingProtocol(rule="fps_filter", rate=1.0, **SMALL)], backend="pyav")
    assert summary.decoded == 1 and store.video_ids() == ["good"]
    assert summary.failed["empty"].startswith("zero frames")
    assert summary.failed["garbage"].startswith("unreadable container")
    assert summary.failed["truncated"].startswith("unreadable container")


def test_a_video_decoded_by_other_code_is_decoded_again(tmp_path, vdir):
    """The frame store persists between DVC runs: a record of other decoder code (other selection
    rules) must not be resumed as done, or the lineage would name code that did not make the frames."""
    import json

    write_video(vdir / "a.mp4", frames=45)
    write_video(vdir / "b.mp4", frames=45)
    proto = SamplingProtocol(rule="fps_filter", rate=1.0, **SMALL)
    first, store = decode(tmp_path, [proto])
    assert first.decoded == 2 and store.read_record("a")["code"].startswith("vmr-")
    again, _ = decode(tmp_path, [proto])
    assert (again.decoded, again.skipped) == (0, 2)  # resumed: same bytes, same code
    record = store.record_path("a")
    record.write_text(json.dumps({**json.loads(record.read_text()), "code": "vmr-0+code.older"}))
    redo, _ = decode(tmp_path, [proto])
    assert (redo.decoded, redo.skipped) == (1, 1)


def _edit_list_cut(source: Path, out: Path, start: float = 1.0, length: float = 1.5) -> Path:
    """`ffmpeg -ss START -c copy`: the cut begins at the keyframe before START (frame 0 here) and an
    edit list tells the decoder to discard the frames before START (negative times in the packets)."""
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", str(start), "-i", str(source), "-t", str(length),
                    "-c", "copy", str(out)], check=True)
    return out


@pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None, reason="needs ffmpeg and ffprobe")
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_edit_list_cut_keeps_only_the_shown_frames(tmp_path, vdir, backend):
    """A `-c copy` cut holds 30 frames (1 s at 30 fps) its edit list discards. Every rule counts only
    the shown frames (source frames 30, 31, ...), which start at 0 s, and the duration is the shown
    part's. decord indexes the discarded frames but its decoder drops them, so decord hands such
    files to PyAV (recorded as a fallback)."""
    import av

    source = _bframe_video(tmp_path / "source.mp4")
    path = _edit_list_cut(source, vdir / "cut.mp4")
    with av.open(str(path)) as c:  # the file really starts with discarded frames
        assert sum(p.is_discard for p in c.demux(video=0) if p.size) == 30
    with av.open(str(path)) as c:
        shown = [index_of(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    assert shown[:45] == list(range(30, 75))  # (the end of a -c copy cut may lack a B-frame)
    every8 = SamplingProtocol(rule="every_n", every_n=8, **SMALL)
    every = SamplingProtocol(rule="all", **SMALL)
    clip = SamplingProtocol(rule="fps_filter", rate=1.0, **SMALL)
    summary, store = decode(tmp_path, [every8, every, clip], backend=backend)
    assert not summary.failed
    rec = store.read_record("cut")
    assert rec["num_frames"] == len(shown)
    e = store.load("cut", every8.key)
    assert e.source_index.tolist() == list(range(0, len(shown), 8))
    assert [index_of(f) for f in e.frames] == shown[::8]
    a = store.load("cut", every.key)
    assert [index_of(f) for f in a.frames] == shown
    assert a.pts[0] == 0 and a.windows.min() >= 0
    c = store.load("cut", clip.key)  # fps=1: slot k holds the last frame with t < k + 0.5
    assert [index_of(f) for f in c.frames] == [shown[14], shown[44]]
    probed = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=duration",
                             "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    durations = json.loads((tmp_path / "frames" / "durations.json").read_text())
    assert durations["cut"] == rec["duration"] == pytest.approx(float(probed), abs=1 / 30 + 1e-6)
    assert ("fallback" in rec) == (backend == "decord") and rec["decoder"].startswith("pyav")
