"""Replaying decode's plan (no frame store) gives the bytes the frame store gave: the same units for
every protocol, both decode backends, and byte-identical features; memory stays in a small window;
interrupted runs resume; broken and changed videos are reported."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from support.videos import frame_image, write_video

from extractors import EXTRACTORS
from pipeline.media.decode import decode_all, list_videos
from pipeline.media.extract import extract_videos, video_units
from pipeline.media.framestore import FrameStore
from pipeline.media.replay import ReplayFrames, ReplaySource, SourceChanged


def _materialize(piece):
    """A piece's units read once, as `pass_input` reads them (a list of arrays stays a list)."""
    return piece if isinstance(piece, list) else np.asarray(piece)


# name -> reduced test config (sizes the networks allow); the protocols are the published ones
EXTRACTOR_CONFIGS = {
    "clip": {},
    "clip_every8": {"sampling": "every_n", "every_n": 8, "preprocess": "openai"},
    "vgg": {},
    "slowfast": {"size": 64, "clip_len": 1},
    "i3d": {"crop": 64},
    "i3d_vslnet": {"crop": 64, "protocol": "vslnet", "batch_size": 4},
    "i3d_r50": {"size": 64},
    "c3d": {},
    "c3d_tall64": {"protocol": "tall64"},
}


def make(name: str):
    base = name.split("_")[0] if name not in EXTRACTORS.names() else name
    cls = EXTRACTORS.get(base)
    return cls(cls.Config(**EXTRACTOR_CONFIGS[name], device="cpu"))


def write_bframes_video(path: Path, frames: int, rate: Fraction) -> Path:
    """x264 defaults (B-frames, pts reordered): the PyAV reader's skipping of unneeded frames."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 80, 48, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_image(i, 80, 48), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replay_videos")
    write_video(root / "a30.mp4", frames=75, fps=30)  # 2.5 s
    write_video(root / "b25.mp4", frames=70, fps=25, width=48, height=64)  # portrait
    write_video(root / "rot.mp4", frames=66, fps=24, rotation=90, marker=True)  # PyAV under decord too
    write_bframes_video(root / "bfr.mp4", 70, Fraction(30000, 1001))
    return root


@pytest.fixture(scope="module", params=["pyav", "decord"])
def stores(request, videos, tmp_path_factory) -> tuple[FrameStore, ReplaySource, str]:
    """The same videos decoded for every protocol: frames stored, and plans only."""
    root = tmp_path_factory.mktemp(f"replay_{request.param}")
    protocols = [make(name).protocol() for name in EXTRACTOR_CONFIGS]
    for policy in ("all", "none"):
        summary = decode_all(list_videos(videos), root / policy, protocols, workers=2, backend=request.param,
                             store_frames=policy)
        assert not summary.failed
    return FrameStore(root / "all"), ReplaySource(root / "none", videos), request.param


def test_plans_only_store_holds_no_frames_but_the_same_plan(stores):
    stored, replay, backend = stores
    assert list(replay.root.rglob("*.npy")) == []
    for vid in stored.video_ids():
        a, b = stored.read_record(vid), replay.read_record(vid)
        assert a["sha256"] == b["sha256"]
        # decord mis-sizes portrait frames: decode falls back to PyAV when it decodes them, the
        # replay worker when it does (before any frame leaves)
        assert a["reader"] == b["reader"] or ("decord failed" in a["fallback"] and b["reader"] == "decord")
        for key, entry in a["protocols"].items():
            assert entry["stored"] and not b["protocols"][key]["stored"]
            assert {**entry, "stored": False} == b["protocols"][key]


@pytest.mark.parametrize("name", list(EXTRACTOR_CONFIGS))
def test_replayed_units_equal_the_stored_ones(stores, name):
    stored, replay, backend = stores
    ex = make(name)
    for vid in stored.video_ids():
        units_a, windows_a = video_units(stored, ex, vid)
        units_b, windows_b = video_units(replay, ex, vid)
        np.testing.assert_array_equal(windows_a, windows_b)
        assert len(units_a) == len(units_b)
        # read as the runner reads: in pieces, forward
        for start in range(0, len(units_a), 3):
            a, b = _materialize(units_a[start : start + 3]), _materialize(units_b[start : start + 3])
            if isinstance(a, list):
                assert len(a) == len(b) and all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
            else:
                assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape and a.tobytes() == b.tobytes()
        frames = replay.load(vid, ex.protocol().key).frames
        assert isinstance(frames, ReplayFrames)
        assert replay.failure(vid) is None


def _extract(ex, source, ids, out: Path, **kw):
    torch.manual_seed(ex.config.seed)
    model = ex.build_model().eval()
    return extract_videos(ex, model, torch.device("cpu"), source, ids, out, "random", ids, **kw)


def tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", ["clip", "slowfast", "i3d", "i3d_r50"])
def test_features_are_byte_identical(stores, name, tmp_path):
    stored, replay, backend = stores
    if backend == "decord" and name != "slowfast":
        pytest.skip("decord: equal units for every protocol above; features once (slowfast) to keep it quick")
    ex = make(name)
    ids = stored.video_ids(ex.protocol().key)
    a = _extract(ex, stored, ids, tmp_path / "stored")
    b = _extract(ex, replay, ids, tmp_path / "replayed")
    assert a.computed == b.computed == len(ids) and not b.failed
    assert tree(tmp_path / "stored") == tree(tmp_path / "replayed")


def test_window_stays_small_and_forward_only(stores):
    """The frames held at once are those of one request (a snippet), never the video."""
    _, replay, _ = stores
    ex = make("c3d")  # 16-frame snippets every 8 frames: overlapping requests
    units, _ = video_units(replay, ex, "a30")
    for start in range(0, len(units), 2):
        _materialize(units[start : start + 2])
    frames = units.frames
    assert frames.rewinds == 0 and frames.peak_window <= 16
    assert frames[np.array([3, 1, 2])].shape[0] == 3 and frames.rewinds == 1  # behind the window: reopened


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_byte_identical(stores, tmp_path):
    _, replay, _ = stores
    ex = make("slowfast")
    ids = replay.video_ids(ex.protocol().key)
    _extract(ex, replay, ids, tmp_path / "clean")
    written = []

    def stop_after_first():
        written.append(1)
        raise _Interrupt

    with pytest.raises(_Interrupt):
        _extract(ex, replay, ids, tmp_path / "resumed", progress=stop_after_first)
    done = sorted(p.stem for p in (tmp_path / "resumed").glob("*.json"))
    assert len(done) == 1
    summary = _extract(ex, replay, ids, tmp_path / "resumed")
    assert summary.skipped == 1 and summary.computed == len(ids) - 1
    assert tree(tmp_path / "resumed") == tree(tmp_path / "clean")
    assert multiprocessing.active_children() == [], "decoder workers left running"


def test_broken_and_changed_videos(tmp_path):
    vdir = tmp_path / "videos"
    vdir.mkdir()
    for name in ("a", "b", "c"):
        write_video(vdir / f"{name}.mp4", frames=45, fps=30)
    # b: packets intact, their payload garbage: the demuxer (decode's plan) reads it, the decoder fails
    data = bytearray((vdir / "b.mp4").read_bytes())
    mdat, moov = data.find(b"mdat"), data.find(b"moov")
    data[mdat + 8 : moov - 8] = b"\xff" * (moov - 8 - mdat - 8)
    (vdir / "b.mp4").write_bytes(bytes(data))
    ex = make("slowfast")
    summary = decode_all(list_videos(vdir), tmp_path / "frames", [ex.protocol()], workers=1, store_frames="none")
    assert not summary.failed  # nothing decoded yet
    source = ReplaySource(tmp_path / "frames", vdir, timeout_s=30)
    ids = source.video_ids()
    result = _extract(ex, source, ids, tmp_path / "out")
    assert sorted(result.failed) == ["b"] and "decode error" in result.failed["b"]
    assert result.computed == 2 and sorted(p.stem for p in (tmp_path / "out").glob("*.npy")) == ["a", "c"]
    # a and c are what a run without b gives (b's units were zeros, the batches the same)
    clean = tmp_path / "clean"
    shutil.copytree(vdir, clean)
    write_video(clean / "b.mp4", frames=45, fps=30)
    decode_all(list_videos(clean), tmp_path / "frames_clean", [ex.protocol()], workers=1, store_frames="all")
    _extract(ex, FrameStore(tmp_path / "frames_clean"), ids, tmp_path / "out_clean")
    for vid in ("a", "c"):
        assert (tmp_path / "out" / f"{vid}.npy").read_bytes() == (tmp_path / "out_clean" / f"{vid}.npy").read_bytes()

    # a video changed after decode: its plan describes other frames
    write_video(vdir / "c.mp4", frames=46, fps=30)
    (tmp_path / "out" / "c.json").unlink()
    with pytest.raises(SourceChanged, match=r"c\.mp4: the video changed since `vmr decode`"):
        _extract(ex, source, ids, tmp_path / "out")
    record = json.loads((tmp_path / "frames" / "videos" / "a.json").read_text())
    assert record["protocols"][ex.protocol().key]["stored"] is False


def test_source_pickles_for_other_engines(stores):
    """Another engine (Ray) ships the source to its workers and calls `video_units` there."""
    import pickle

    stored, replay, _ = stores
    copy = pickle.loads(pickle.dumps(replay))
    ex = make("clip")
    a, _ = video_units(stored, ex, "a30")
    b, _ = video_units(copy, ex, "a30")
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    copy.close()


def test_store_is_a_cache(stores, videos, tmp_path):
    """Stored frames are read from the store; a frame file that is gone is replayed from the video;
    a video that is gone too is an error naming it."""
    stored, _, _ = stores
    ex = make("slowfast")
    key = ex.protocol().key
    expected = np.asarray(video_units(stored, ex, "bfr")[0])
    copy = tmp_path / "store"
    shutil.copytree(stored.root, copy)
    source = ReplaySource(copy, videos)
    assert not isinstance(source.load("bfr", key).frames, ReplayFrames)
    (copy / key / "bfr.npy").unlink()
    assert isinstance(source.load("bfr", key).frames, ReplayFrames)
    assert np.asarray(video_units(source, ex, "bfr")[0]).tobytes() == expected.tobytes()
    with pytest.raises(SourceChanged, match=r"elsewhere/bfr\.mp4: the video of 'bfr' that `vmr decode` planned is gone"):
        ReplaySource(copy, tmp_path / "elsewhere").load("bfr", key)
    source.close()
