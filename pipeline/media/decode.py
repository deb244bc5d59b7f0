"""Decode every raw video once into the frame store (see pipeline/media/framestore.py for the layout).

Per video (in a worker process):
1. probe the container with PyAV: codec, file/stream start times, rotation, stream duration (the
   `pyav` backend does this in the same open and demux pass that reads the timestamps);
2. read every frame's timestamp (decord: `get_frame_timestamp`, relative to the video stream's start,
   shifted to the FILE start, which is the time origin of FFmpeg's fps filter);
3. apply each requested `SamplingProtocol` rule to the timestamps (pipeline/media/sampling.py);
4. decode only the union of the selected frames (sorted, in chunks; the `pyav` backend also lets the
   decoder drop the non-reference frames it does not keep), resize the short side and centre crop
   with swscale (PyAV `reformat`: bilinear like HERO's ffmpeg `scale`, or bicubic), and write one
   uint8 array per protocol;
5. write the per-video record last, as the "done" marker.

Videos run in worker processes (pipeline/media/decode_pool.py) with a per-video timeout and worker
recycling: decord 0.6 leaks memory per reader and can deadlock holding the GIL (dmlc/decord#373).
decord also mis-shapes frames of rotated videos (its transpose filter yields an (H, W, 4)-shaped buffer
and `get_batch` raises), so files with a display rotation are decoded with PyAV (same libavcodec
family) and rotated with numpy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_path, remove_stale_temporaries, write_json
from pipeline.core.codedeps import import_closure
from pipeline.core.provenance import code_version
from pipeline.media import replay
from pipeline.media.decode_pool import TaskError, first_line, run_pool
from pipeline.media.ffmpeg51 import first_packet_start, is_mov, mov_last_duration, shown
from pipeline.media.framestore import FAILURES, MANIFEST, RECORDS_DIR, FrameStore, durations_path
from pipeline.media.sampling import select

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv")
# Codecs the decord 0.6 wheel cannot decode (it bundles FFmpeg 4.1 without dav1d/libaom).
UNSUPPORTED_CODECS = {"av1": "the decord 0.6 wheel (FFmpeg 4.1) has no AV1 decoder; re-encode to H.264"}
CHUNK = 64  # frames per decord get_batch call (bounds memory on long videos)
KEEP_PACKETS_MAX_BYTES = 256 << 20  # PyAV backend: files up to this size are demuxed once, held in memory
# PyAV backend: codecs whose decoder, told to skip non-reference frames (AVDISCARD_NONREF), skips only
# frames that no other frame refers to. Not HEVC: its "sub-layer non-reference" pictures may be
# referenced from higher temporal sub-layers (e.g. high-frame-rate phone videos).
SKIP_NONREF_CODECS = {"h264", "mpeg1video", "mpeg2video", "mpeg4", "vp8", "vp9"}
_PROTOCOL_DIR = re.compile(r"^(fps_filter|uniform|every_n|all)-.+-[0-9a-f]{8}$")  # SamplingProtocol.key
_DECIMALS = 6  # timestamps are stored rounded to 1 us: stable JSON, far below any frame interval
ZERO_FRAMES = "zero frames: the video stream holds no decodable frame"


class DecodeError(TaskError):
    """A video that cannot be decoded; the message is the reason in the failures report."""


# The longest video id whose derived file names (<id>.json, <id>.npy) fit the 255-byte name limit.
MAX_ID_BYTES = 250


def list_videos(video_dir: str | Path) -> dict[str, Path]:
    """video id (file stem) -> path, sorted; two files with the same stem are an error. Entries
    that look like videos but cannot be decoded are left out: `unusable_videos` says why."""
    video_dir = Path(video_dir)
    found: dict[str, Path] = {}
    rejected = unusable_videos(video_dir)
    for p in sorted(video_dir.iterdir()):
        if not p.is_file() or p.suffix.lower() not in VIDEO_EXTENSIONS or p.name.startswith("."):
            continue
        if p.name in rejected:
            continue
        if p.stem in found:
            raise ValueError(f"{video_dir}: two videos with the id '{p.stem}': {found[p.stem].name}, {p.name}")
        found[p.stem] = p
    return dict(sorted(found.items()))


def unusable_videos(video_dir: str | Path) -> dict[str, str]:
    """File name -> reason, for entries with a video extension that decode cannot take: directories,
    broken symlinks and symlink loops, other non-files, and ids too long for the files derived from
    them. Decode reports them in failures.json instead of ignoring them silently."""
    out: dict[str, str] = {}
    for p in sorted(Path(video_dir).iterdir()):
        if p.suffix.lower() not in VIDEO_EXTENSIONS or p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():
            out[p.name] = "a broken symlink or a symlink loop"
        elif p.is_dir():
            out[p.name] = "a directory, not a video file"
        elif not p.is_file():
            out[p.name] = "not a regular file"
        elif len(p.stem.encode("utf-8")) > MAX_ID_BYTES:
            out[p.name] = (f"the video id has {len(p.stem.encode('utf-8'))} bytes; files named after it "
                           f"would pass the 255-byte limit (at most {MAX_ID_BYTES})")
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -- probing and reading ----------------------------------------------------------------------------


def _open_video(path: Path) -> tuple[Any, Any]:
    """(container, first video stream) opened with PyAV; DecodeError with the reason otherwise."""
    import av

    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:  # strerror: the reason without the (machine-specific) path
        raise DecodeError(f"unreadable container: {e.strerror or e}") from None
    except OSError as e:
        raise DecodeError(f"cannot open: {e}") from None
    if not container.streams.video:
        container.close()
        raise DecodeError("no video stream")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1  # parallelism is across videos (one thread: same pixels)
    return container, stream


def _stream_facts(container: Any, stream: Any) -> dict[str, Any]:
    """Codec, size, start offset of the video stream from the file start, rate and durations."""
    import av

    tb = float(stream.time_base) if stream.time_base else 0.0
    file_start = container.start_time / 1e6 if container.start_time is not None else 0.0
    stream_start = stream.start_time * tb if stream.start_time is not None else file_start
    if len(container.streams) > 1:
        file_start = min(file_start, first_packet_start(container.name))
    if container.format.flags & av.format.Flags.ts_discont.value and stream_start > file_start:
        # FFmpeg 5.1's command line re-anchors a file with timestamp discontinuities (MPEG-TS/PS) at the
        # earliest start of the streams it reads ("Correcting start time"); vmr reads only the video
        file_start = stream_start
    return {
        "codec": stream.codec_context.codec.canonical_name,  # "av1", not the decoder ("libdav1d")
        "width": stream.codec_context.width,
        "height": stream.codec_context.height,
        "rotation": 0,  # set from the first decoded frame (the display matrix is exposed there)
        "avg_fps": float(stream.average_rate) if stream.average_rate else None,
        # HERO's ffprobe-based duration is -1 without nb_frames (mkv/webm/ts): None here
        "stream_duration": stream.duration * tb if stream.duration and stream.frames else None,
        "nb_frames": stream.frames,
        "start_offset": round(stream_start - file_start, _DECIMALS),
    }


def _rotation(frame: Any) -> int:
    return int(getattr(frame, "rotation", 0) or 0) % 360


def probe(path: Path) -> dict[str, Any]:
    """Container facts from PyAV for the decord backend: `_stream_facts` plus the display rotation."""
    import av

    container, stream = _open_video(path)
    with container:
        info = _stream_facts(container, stream)
        try:  # the display matrix is exposed on decoded frames
            frame = next(container.decode(stream), None)
        except av.error.FFmpegError:
            frame = False  # decode problems are reported by the decoder below
        if frame is None:  # decord would fail with a cryptic filter-graph error
            raise DecodeError(ZERO_FRAMES)
        info["rotation"] = _rotation(frame) if frame else 0
        return info


def _frame_times(pts: list[int], durations: list[int], start: int, tb: float) -> tuple[np.ndarray, np.ndarray]:
    """(integer pts, (N, 2) [start, stop) seconds from the stream start) in presentation order, from
    the demuxed packets. Times come from the exact integer pts: slot boundaries must not move by
    float32 rounding (decord's own timestamps are float32)."""
    order = np.argsort(pts, kind="stable")
    sorted_pts = np.asarray(pts, dtype=np.int64)[order]
    dur = np.asarray(durations, dtype=np.float64)[order] * tb
    starts = (sorted_pts - start) * tb
    # a packet without a duration ends where the next frame starts (the last one: zero length)
    next_starts = np.append(starts[1:], starts[-1:])
    stops = np.where(dur > 0, starts + dur, next_starts)
    return sorted_pts, np.stack([starts, stops], axis=1)


def _as_ffmpeg51(container: Any, stream: Any, pts: list[int], durations: list, last_dts: int | None) -> list:
    """The packet durations, with the last shown frame's as FFmpeg 5.1 gives it in mp4/mov files
    (pipeline/media/ffmpeg51.py); other containers keep the demuxer's."""
    if not pts or last_dts is None or not is_mov(container):
        return durations
    last = mov_last_duration(container.name, stream, last_dts)
    if last is None:
        return durations
    durations = list(durations)
    durations[int(np.argmax(pts))] = last
    return durations


def demux_timestamps(path: Path) -> tuple[np.ndarray, int]:
    """(times, discarded): the times of the first video stream's shown frames from its packets alone
    (no decoding, `_frame_times`), and how many frames an edit list discards."""
    import av

    container, stream = _open_video(path)
    with container:
        pts, durations, discarded, last_dts = [], [], 0, None
        try:
            for packet in container.demux(stream):
                if packet.size > 0 and packet.dts is not None:
                    last_dts = packet.dts
                if shown(packet):
                    pts.append(packet.pts)
                    durations.append(packet.duration or 0)
                elif packet.pts is not None and packet.size > 0:
                    discarded += 1
        except av.error.FFmpegError as e:
            raise DecodeError(f"PyAV cannot read packets: {first_line(e)}") from None
        if not pts:
            return np.zeros((0, 2)), discarded
        durations = _as_ffmpeg51(container, stream, pts, durations, last_dts)
        return _frame_times(pts, durations, stream.start_time or 0, float(stream.time_base))[1], discarded


class DecordReader:
    """Selected frames through decord; their times from the container's exact pts (PyAV demux)."""

    name = "decord"

    def __init__(self, path: Path):
        import decord

        self.version = f"decord {decord.__version__}"
        try:
            self.vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises DECORDError / RuntimeError with C++ context
            raise DecodeError(f"decord cannot open: {first_line(e)}") from None
        self._ts, discarded = demux_timestamps(path)
        if discarded:
            # decord 0.6 indexes the discarded frames too, but its decoder drops them: near the start,
            # index i returns shown frame i; after a seek to a later keyframe, frame i of all. No
            # mapping holds for both, so such files are decoded with PyAV (decode_video falls back).
            raise DecodeError(f"decord cannot index the {discarded} frames an edit list discards")
        self.num_frames = len(self.vr)
        if len(self._ts) != self.num_frames:  # decord's index and the packets disagree: trust neither
            raise DecodeError(f"decord sees {self.num_frames} frames, the container's packets {len(self._ts)}")

    def timestamps(self) -> np.ndarray:
        return self._ts

    def frames(self, indices: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(indices), CHUNK):
            chunk = [int(i) for i in indices[start : start + CHUNK]]
            try:
                batch = self.vr.get_batch(chunk).asnumpy()
            except Exception as e:
                raise DecodeError(f"decord failed on frames {chunk[0]}..{chunk[-1]}: {first_line(e)}") from None
            yield from zip(chunk, batch, strict=True)
        self.close()

    def close(self) -> None:
        self.vr.seek(0)  # stops decord's background decoding (dmlc/decord#157)


class _KeptFrameSkipped(Exception):
    """A kept frame did not come out of a decoder told to skip the frames nobody needs."""


class PyAVReader:
    """Container facts, timestamps and the selected frames from one PyAV open and demux.

    Used for `backend: pyav`, and for rotated videos with either backend (decord mis-shapes them).
    The demuxed packets give the timestamps; they are kept (compressed: at most the file size) so that
    `frames()` decodes them from this same container, except for files above KEEP_PACKETS_MAX_BYTES
    or with `keep_packets=False` (extract's replay: memory bounded whatever the file size), which
    `frames()` demuxes again. The demux pass also decodes up to the first
    frame: its display rotation is `info["rotation"]`, and a stream without one has zero frames.
    """

    name = "pyav"

    def __init__(self, path: Path, keep_packets: bool = True):
        import av

        self.version = f"pyav {av.__version__} (FFmpeg {av.library_versions['libavcodec']})"
        self.path = path
        self._container, stream = _open_video(path)
        self._resume: tuple[list, list] | None = None  # (packets not yet decoded, frames not yet yielded)
        pts, durations = [], []
        try:
            self.info = _stream_facts(self._container, stream)
            tb = float(stream.time_base)
            start = stream.start_time or 0
            indexed = stream.frames  # nb_frames from the container's index (0: unknown)
            keep = keep_packets and path.stat().st_size <= KEEP_PACKETS_MAX_BYTES
            frames = 0  # packets of frames, shown or not (as counted in nb_frames)
            packets, first, fed = [], None, 0  # first: decoded frames of the first packet that gave any
            last_dts = None  # of the last packet in decode order
            for packet in self._container.demux(stream):  # the last packet is the decoder flush
                if keep:
                    packets.append(packet)
                if first is None:
                    fed += 1
                    try:
                        first = packet.decode() or None
                    except av.error.FFmpegError:
                        first = False  # decode problems are reported by frames()
                if packet.pts is not None and packet.size > 0:
                    frames += 1
                if packet.size > 0 and packet.dts is not None:
                    last_dts = packet.dts
                if shown(packet):
                    pts.append(packet.pts)
                    durations.append(packet.duration or 0)
            durations = _as_ffmpeg51(self._container, stream, pts, durations, last_dts)
        except Exception as e:
            self.close()
            raise DecodeError(f"PyAV cannot read packets: {first_line(e)}") from None
        if first is None:
            self.close()
            raise DecodeError(ZERO_FRAMES)
        if indexed and frames < indexed:  # the demuxer stops quietly at the end of a cut file
            self.close()
            raise DecodeError(f"truncated file: {frames} of the {indexed} indexed frames are present")
        self.info["rotation"] = _rotation(first[0]) if first else 0
        if keep and first:  # frames() goes on decoding from here
            self._resume = (packets[fed:], first)
        else:
            self.close()
        self._pts, self._ts = _frame_times(pts, durations, start, tb)
        self.num_frames = len(self._ts)

    def timestamps(self) -> np.ndarray:
        return self._ts

    def close(self) -> None:
        self._resume = None
        if self._container is not None:
            self._container.close()
            self._container = None

    def frames(self, indices: np.ndarray) -> Iterator[tuple[int, Any]]:
        """Yields (index, av.VideoFrame) in presentation order: converted to RGB later, at the target
        size, in one swscale pass from the decoder's YUV (what HERO's ffmpeg `scale` filter does).

        The decoder skips the non-reference frames that are not kept (`skip_frame` NONREF, per
        packet): no other frame is predicted from them, so the kept frames' pixels are the same, and
        with B-frames (x264's default) about half the frames need no decoding. Should a kept frame not
        come out that way (a packet holding several frames, frames out of order), the video is
        decoded again from the start without skipping.
        """
        import av

        wanted = {int(self._pts[i]): int(i) for i in indices}
        try:
            try:
                yield from self._decode(wanted, skip_unneeded=self.info["codec"] in SKIP_NONREF_CODECS)
            except _KeptFrameSkipped:
                yield from self._decode(wanted, skip_unneeded=False)
        except av.error.FFmpegError as e:
            raise DecodeError(f"PyAV decode error: {first_line(e)}") from None
        finally:
            self.close()
        if wanted:
            raise DecodeError(f"{len(wanted)} selected frames could not be decoded (truncated file?)")

    @staticmethod
    def _skip_level(packet: Any, wanted: dict[int, int]) -> str:
        """The decoder may drop the frame of this packet if it is not kept and no frame refers to it."""
        return "DEFAULT" if packet.pts is None or packet.pts in wanted else "NONREF"

    def _decode(self, wanted: dict[int, int], skip_unneeded: bool) -> Iterator[tuple[int, Any]]:
        """Yield and pop the `wanted` (pts -> index) frames, decoding on from where the constructor
        stopped, or from a fresh open of the file."""
        if not wanted:
            return
        if self._resume is not None:
            (packets, ready), self._resume = self._resume, None
        else:
            self.close()
            self._container, stream = _open_video(self.path)
            packets, ready = self._container.demux(stream), []
        codec = self._container.streams.video[0].codec_context

        def decoded() -> Iterator[Any]:
            yield from ready
            for packet in packets:  # what container.decode() does
                if skip_unneeded:
                    codec.skip_frame = self._skip_level(packet, wanted)
                yield from packet.decode()

        pending, j = sorted(wanted), 0  # frames leave the decoder in presentation order
        for frame in decoded():
            if frame.pts is None:
                continue
            i = wanted.pop(frame.pts, None)
            if i is not None:
                yield i, frame
                if not wanted:
                    return
            elif skip_unneeded:
                while pending[j] not in wanted:
                    j += 1
                if frame.pts > pending[j]:
                    raise _KeptFrameSkipped
        if wanted and skip_unneeded:
            raise _KeptFrameSkipped


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """HERO's rule: the short side becomes `short_side`, the long side int(long * short_side / short)."""
    if not short_side:
        return height, width
    if height >= width:
        return int(height * short_side / width), short_side
    return short_side, int(width * short_side / height)


def target_size(height: int, width: int, proto) -> tuple[int, int]:
    """(H, W) an upright height x width frame is resized to, before the crop."""
    return tuple(proto.size) if proto.size else scaled_size(height, width, proto.short_side)


def output_shape(height: int, width: int, proto) -> tuple[int, int, int]:
    """(H, W, 3) of the stored frames for a video whose upright frames are height x width."""
    h, w = target_size(height, width, proto)
    if proto.crop:
        if h < proto.crop or w < proto.crop:
            raise DecodeError(f"frame {w}x{h} is smaller than the {proto.crop}x{proto.crop} crop")
        return proto.crop, proto.crop, 3
    return h, w, 3


def resize_crop(src: Any, proto, rotation: int = 0, reformatter: Any = None) -> np.ndarray:
    """One frame in a protocol's size: uint8 RGB (H, W, 3), upright.

    `src` is an upright RGB array (decord) or an `av.VideoFrame` in storage orientation with a display
    rotation (counter-clockwise degrees). Resizing is the protocol's `resizer` with its interpolation:
    swscale (PyAV `reformat`), or OpenCV's `cv2.resize` from the native-size RGB frame (what a
    `cv2.VideoCapture` reader gets: the same YUV -> RGB conversion, tested). The crop is centred at
    int((size - crop) / 2) as HERO does (and Caffe's (size - crop) / 2 in integers). Pass one
    `av.video.reformatter.VideoReformatter` per protocol for all frames of a video: it keeps its swscale
    context (same pixels), where `frame.reformat` builds a new one per frame (about half the cost).
    One swscale thread: parallelism is across videos, like the decoder's (same pixels either way).
    """
    import av

    k = (rotation // 90) % 4
    if proto.resizer == "opencv":
        img = src.to_ndarray(format="rgb24") if isinstance(src, av.VideoFrame) else src
        if k and isinstance(src, av.VideoFrame):
            img = np.rot90(img, k)
        h, w = target_size(img.shape[0], img.shape[1], proto)
        if (h, w) != img.shape[:2]:
            img = opencv_resize(img, h, w, proto.interpolation)
    elif isinstance(src, av.VideoFrame):
        reformatter = reformatter or av.video.reformatter.VideoReformatter()
        upright_h, upright_w = (src.width, src.height) if k % 2 else (src.height, src.width)
        h, w = target_size(upright_h, upright_w, proto)
        sw, sh = (h, w) if k % 2 else (w, h)  # target in storage orientation
        if (sw, sh) != (src.width, src.height):
            src = reformatter.reformat(src, width=sw, height=sh, format="rgb24",
                                       interpolation=proto.interpolation.upper(), threads=1)
        img = src.to_ndarray(format="rgb24")
        if k:
            img = np.rot90(img, k)
    else:
        reformatter = reformatter or av.video.reformatter.VideoReformatter()
        img = src
        h, w = target_size(img.shape[0], img.shape[1], proto)
        if (h, w) != img.shape[:2]:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            img = reformatter.reformat(frame, width=w, height=h, interpolation=proto.interpolation.upper(), threads=1)
            img = img.to_ndarray(format="rgb24")
    if proto.crop:
        if h < proto.crop or w < proto.crop:
            raise DecodeError(f"frame {w}x{h} is smaller than the {proto.crop}x{proto.crop} crop")
        y, x = int((h - proto.crop) / 2), int((w - proto.crop) / 2)
        img = img[y : y + proto.crop, x : x + proto.crop]
    return np.ascontiguousarray(img)


def opencv_resize(img: np.ndarray, height: int, width: int, interpolation: str = "bilinear") -> np.ndarray:
    """`cv2.resize` of a uint8 (H, W, 3) frame: OpenCV's fixed-point bilinear (or bicubic), per channel,
    so RGB and BGR give the same pixels. One OpenCV thread: parallelism is across videos."""
    import cv2

    cv2.setNumThreads(1)
    flag = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[interpolation]
    return cv2.resize(np.ascontiguousarray(img), (width, height), interpolation=flag)


# -- one video -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeTask:
    video_id: str
    path: str
    store_root: str
    protocols: tuple  # SamplingProtocol, ...
    backend: str = "decord"  # "decord" (PyAV for rotated files) or "pyav"
    fallback_reason: str | None = None  # why this PyAV task retries a decord one (recorded)
    code: str | None = None  # `decoder_code()`, recorded: a record of other code is not resumed
    # keys of the protocols whose frames are written (None: all); extract replays the others' plans
    stored: tuple | None = None


def run_task(task: DecodeTask) -> str:
    """Worker entry: skip a finished video, else decode it and write its record (the done marker) last.

    Hashing, the skip check and the record write happen here, in the worker, so that the parent
    never keeps a worker waiting."""
    store = FrameStore(task.store_root)
    source_sha256 = sha256_of(Path(task.path))
    if is_complete(store, task.video_id, source_sha256, {p.key for p in task.protocols}, task.code,
                   None if task.stored is None else set(task.stored)):
        return "skipped"
    record = {**decode_video(task, source_sha256), "code": task.code}
    if task.fallback_reason:
        record["fallback"] = f"pyav after decord: {task.fallback_reason}"
    write_json(store.record_path(task.video_id), record)
    return "decoded"


def decode_video(task: DecodeTask, source_sha256: str | None = None) -> dict[str, Any]:
    """Decode one video for every protocol; returns its record (status ok). Raises DecodeError."""

    path = Path(task.path)
    keep = task.stored is None or bool(task.stored)  # the packets serve only to decode frames here
    if task.backend == "pyav":  # one open: facts, timestamps and frames
        reader = PyAVReader(path, keep_packets=keep)
        return _decode_with(task, reader, reader.info, source_sha256)
    info = probe(path)
    if info["codec"] in UNSUPPORTED_CODECS:
        raise DecodeError(f"unsupported codec '{info['codec']}': {UNSUPPORTED_CODECS[info['codec']]}")
    if info["rotation"]:  # decord mis-shapes rotated videos
        return _decode_with(task, PyAVReader(path, keep_packets=keep), info, source_sha256)
    try:
        return _decode_with(task, DecordReader(path), info, source_sha256)
    except DecodeError as e:  # decord's own failures: the video may still be fine for FFmpeg
        try:
            reader = PyAVReader(path, keep_packets=keep)
            return {**_decode_with(task, reader, reader.info, source_sha256), "fallback": f"pyav after decord: {e}"}
        except DecodeError as pyav_error:
            raise DecodeError(f"{pyav_error} (PyAV, after decord: {e})") from None


def _decode_with(task: DecodeTask, reader: DecordReader | PyAVReader, info: dict[str, Any],
                 source_sha256: str | None) -> dict[str, Any]:
    """Select every protocol's frames, decode, resize and write those of the stored protocols with
    `reader`; the video's record (with the plan of every protocol)."""
    path = Path(task.path)
    ts = reader.timestamps()
    if len(ts) == 0:
        raise DecodeError("zero frames")
    starts = ts[:, 0] + info["start_offset"]
    stops = ts[:, 1] + info["start_offset"]
    # FFmpeg's end time: last pts + last frame's duration; FFmpeg 5.1 adds nothing when the container
    # does not give one (mkv, webm, mpegts), while 9.0 adds 1/avg fps: vmr follows 5.1 (docs/features.md)
    end = float(max(stops[-1], starts[-1]))

    selections = {}
    for proto in task.protocols:
        idx, windows, rate = select(proto, starts, stops, end, info["stream_duration"])
        if len(idx) == 0:  # ffmpeg's fps filter outputs nothing for it either (e.g. a 1-frame video)
            raise DecodeError(f"protocol {proto.key} keeps no frame of this {end:.3f} s video "
                              f"({len(starts)} frame(s)): too short to give a feature")
        selections[proto.key] = (proto, idx, windows, rate)
    stored = [key for key in selections if task.stored is None or key in task.stored]
    upright = (info["width"], info["height"]) if info["rotation"] % 180 else (info["height"], info["width"])
    frame_shapes = {key: output_shape(*upright, proto) for key, (proto, *_) in selections.items()}
    if stored:
        _write_frames(task, reader, {key: selections[key] for key in stored}, frame_shapes, info["rotation"])
    else:
        reader.close()  # nothing to decode: the plan alone is the record (extract replays it)

    protocols: dict[str, Any] = {}

    for key, (proto, idx, windows, rate) in selections.items():
        protocols[key] = {
            "protocol": proto.as_dict(),
            "rate": rate,
            "count": int(len(idx)),
            "frame_shape": list(frame_shapes[key]),
            "stored": key in stored,  # else `vmr extract` decodes the plan again (pipeline/media/replay.py)
            "source_index": idx.tolist(),
            "pts": np.round(starts[idx], _DECIMALS).tolist(),
            "windows": np.round(windows, _DECIMALS).tolist(),
        }
    return {
        "video": task.video_id,
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": source_sha256 or sha256_of(path),
        "status": "ok",
        "reader": reader.name,  # what decodes the frames, here and when extract replays the plan
        "decoder": reader.version,
        "codec": info["codec"],
        "width": info["width"],
        "height": info["height"],
        "rotation": info["rotation"],
        "native_fps": info["avg_fps"],
        "num_frames": int(len(ts)),
        "duration": round(end, _DECIMALS),
        "stream_duration": None if info["stream_duration"] is None else round(info["stream_duration"], _DECIMALS),
        "start_offset": info["start_offset"],
        "protocols": protocols,
    }


def _write_frames(task: DecodeTask, reader: DecordReader | PyAVReader, selections: dict, frame_shapes: dict,
                  rotation: int) -> None:
    """Decode the union of the selected frames once, in order; each decoded frame is resized for every
    protocol slot that uses it and appended to that protocol's .npy (slots are in source order), so
    memory holds one source frame at a time whatever the video length."""
    import av.video.reformatter

    store = FrameStore(task.store_root)
    needed = np.unique(np.concatenate([s[1] for s in selections.values()]))
    slots: dict[int, list[tuple[str, int]]] = {}
    for key, (_, idx, _, _) in selections.items():
        for j, i in enumerate(idx.tolist()):
            slots.setdefault(i, []).append((key, j))
    with contextlib.ExitStack() as stack:
        writers = {}
        for key, (_, idx, _, _) in selections.items():
            tmp = stack.enter_context(atomic_path(store.frames_path(key, task.video_id)))
            writers[key] = stack.enter_context(_NpyWriter(tmp, (len(idx), *frame_shapes[key])))
        reformatters = {key: av.video.reformatter.VideoReformatter() for key in selections}
        seen = set()
        for i, src in reader.frames(needed):
            seen.add(i)
            done: dict[str, np.ndarray] = {}
            for key, j in slots[i]:
                if key not in done:
                    done[key] = resize_crop(src, selections[key][0], rotation, reformatters[key])
                writers[key].write(j, done[key])
        missing = [int(i) for i in needed if int(i) not in seen]
        if missing:
            raise DecodeError(f"frames {missing[:5]} could not be decoded")


class _NpyWriter:
    """Writes a uint8 .npy row by row, in order (same bytes as np.save of the whole array)."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.path, self.shape, self.rows = path, shape, 0
        self.fh = open(path, "wb")
        header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self.fh, header)

    def write(self, row: int, image: np.ndarray) -> None:
        if row != self.rows or image.shape != self.shape[1:]:
            raise RuntimeError(f"{self.path}: row {row} {image.shape}, expected row {self.rows} {self.shape[1:]}")
        self.fh.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
        self.rows += 1

    def __enter__(self) -> _NpyWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.fh.close()
        if exc_type is None and self.rows != self.shape[0]:
            raise RuntimeError(f"{self.path}: wrote {self.rows} of {self.shape[0]} frames")


# -- the whole store -------------------------------------------------------------------------------

# The densest rate whose frames `store_frames: sparse` keeps on disk: CLIP's 1 frame/s (147 KiB per
# video-second at 224 x 224). Denser protocols (SlowFast/I3D at 24-30 fps: 3.4-4.3 MiB/s, VGG at
# 8 fps, C3D's every frame) are replayed by extract instead (docs/features.md has the measurements).
SPARSE_MAX_RATE = 1.0
STORE_POLICIES = ("none", "sparse", "all")


def is_sparse(proto) -> bool:
    """At most SPARSE_MAX_RATE kept frames per second (every_n and all keep a share of the native rate)."""
    return proto.rule in ("fps_filter", "uniform") and proto.rate <= SPARSE_MAX_RATE


def stored_keys(protocols: list, store_frames: str | set[str]) -> set[str]:
    """Keys of the protocols whose frames decode writes: a policy name of STORE_POLICIES, or the keys."""
    if not isinstance(store_frames, str):
        return set(store_frames)
    if store_frames not in STORE_POLICIES:
        raise ValueError(f"store_frames {store_frames!r}: expected one of {STORE_POLICIES}")
    return {p.key for p in protocols if store_frames == "all" or (store_frames == "sparse" and is_sparse(p))}



@dataclass
class DecodeSummary:
    total: int
    decoded: int  # decoded in this run
    skipped: int  # already complete from an earlier run
    failed: dict[str, str]  # video id -> reason

    @property
    def failure_share(self) -> float:
        return len(self.failed) / self.total if self.total else 0.0


def decoder_code() -> str:
    """Digest of the code that selects, decodes and writes (or replays) a video's frames. A video
    decoded by other code is decoded again: DVC re-runs decode when its code changes, and the frame
    store it keeps between runs (persist) must not answer with frames of the old rules; extract's
    outputs record it too (replayed frames are made by this code: hence decode imports `replay`, which
    also makes the decode stage depend on it)."""
    return code_version(import_closure([__name__, replay.__name__]))


def is_complete(store: FrameStore, video_id: str, source_sha256: str, keys: set[str], code: str | None = None,
                stored: set[str] | None = None) -> bool:
    """A finished video: record ok, same source bytes, same decoder code, a plan for every requested
    protocol, and frames for those of `stored` (default: all of `keys`)."""
    stored = keys if stored is None else stored & keys
    rec = store.read_record(video_id)
    return (
        rec is not None
        and rec.get("status") == "ok"
        and rec.get("sha256") == source_sha256
        and rec.get("code") == code
        and keys <= set(rec.get("protocols", {}))
        and all(rec["protocols"][k].get("stored", True) == (k in stored) for k in keys)
        and all(store.frames_path(k, video_id).is_file() for k in stored)
    )


def decode_all(
    videos: dict[str, Path],
    store_root: str | Path,
    protocols: list,
    workers: int = 2,
    timeout_s: float = 120.0,
    recycle_after: int = 32,
    backend: str = "decord",
    on_result: Callable[[str, str], None] | None = None,
    unusable: dict[str, str] | None = None,
    store_frames: str | set[str] = "all",
) -> DecodeSummary:
    """Decode `videos` (id -> path) for `protocols` into the store, resuming finished videos.
    `unusable` (file name -> reason, from `unusable_videos`) is listed among the failures.
    `store_frames` says which protocols' frames are written (`stored_keys`); every protocol's plan is
    recorded either way."""
    store = FrameStore(store_root)
    protocols = list({p.key: p for p in protocols}.values())  # equal protocols share frames
    stored = stored_keys(protocols, store_frames)
    code = decoder_code()
    tasks = [DecodeTask(vid, str(path), str(store_root), tuple(protocols), backend, code=code,
                        stored=tuple(sorted(stored)))
             for vid, path in videos.items()]
    failed: dict[str, str] = {}
    decoded = skipped = 0
    # imported once by the fork server, not per worker: run_task's module and the decoders it uses
    preload = ("pipeline.media.decode", "av", "av.video.reformatter") + (("decord",) if backend == "decord" else ())
    # decord can deadlock or crash in C++ (its in-process errors fall back to PyAV in the worker):
    # such videos get one more try with PyAV, recorded in their record
    retry: list[tuple[DecodeTask, str]] = []
    for res in run_pool(run_task, tasks, workers, timeout_s, recycle_after, preload):
        vid = res.task.video_id
        if res.status == "ok":
            decoded += res.value == "decoded"
            skipped += res.value == "skipped"
        elif res.task.backend == "decord" and res.value.startswith(("timed out", "worker crashed")):
            retry.append((dataclasses.replace(res.task, backend="pyav", fallback_reason=res.value), res.value))
            continue
        else:
            failed[vid] = res.value
            _write_failure(store, res.task, res.value)
        if on_result:
            on_result(vid, res.status)
    if retry:
        for res in run_pool(run_task, [task for task, _ in retry], workers, timeout_s, recycle_after, preload):
            vid = res.task.video_id
            if res.status == "ok":
                decoded += 1
            else:
                failed[vid] = f"{res.value} (with PyAV, after decord: {res.task.fallback_reason})"
                _write_failure(store, res.task, failed[vid])
            if on_result:
                on_result(vid, res.status)
    _prune(store, videos, stored, set(failed))
    unusable = unusable or {}
    _write_reports(store, videos, unusable)
    failed |= {Path(name).stem: reason for name, reason in unusable.items()}
    return DecodeSummary(total=len(videos) + len(unusable), decoded=decoded, skipped=skipped, failed=failed)


def _write_failure(store: FrameStore, task: DecodeTask, reason: str) -> None:
    write_json(store.record_path(task.video_id), {"video": task.video_id, "file": Path(task.path).name,
                                                   "status": "failed", "reason": reason, "protocols": {}})


def _prune(store: FrameStore, videos: dict[str, Path], keys: set[str], failed: set[str]) -> None:
    """Delete what a fresh run would not write: other videos, frames of other or unstored protocols
    (`keys` are the stored ones), frames of failures.

    With DVC `persist: true` the store survives between runs, so without this a re-run after a params
    change would not be byte-identical to a clean run.
    """
    remove_stale_temporaries(store.root)
    if not store.root.is_dir():
        return
    for sub in sorted(store.root.iterdir()):
        if not sub.is_dir():
            continue
        if sub.name == RECORDS_DIR:
            for rec in sub.glob("*.json"):
                if rec.stem not in videos:
                    rec.unlink()
        elif sub.name not in keys:
            if _PROTOCOL_DIR.match(sub.name):  # only ever delete what decode itself wrote
                shutil.rmtree(sub)
        else:
            for f in sub.glob("*.npy"):
                if f.stem not in videos or f.stem in failed:
                    f.unlink()


def _write_reports(store: FrameStore, videos: dict[str, Path], unusable: dict[str, str]) -> None:
    """manifest.json, failures.json and durations.json from the per-video records and the unusable entries,
    sorted (deterministic)."""
    manifest, failures = {}, []
    for vid in videos:
        rec = store.read_record(vid)
        if rec is None:
            continue
        summary = {k: v for k, v in rec.items() if k != "protocols"}
        summary["protocols"] = {
            key: {k: v for k, v in entry.items() if k not in ("source_index", "pts", "windows")}
            for key, entry in rec.get("protocols", {}).items()
        }
        manifest[vid] = summary
        if rec["status"] != "ok":
            failures.append({"video": vid, "file": rec["file"], "reason": rec["reason"]})
    failures += [{"video": Path(name).stem, "file": name, "reason": reason} for name, reason in unusable.items()]
    failures.sort(key=lambda f: f["video"])
    write_json(store.root / MANIFEST, {"videos": manifest})
    write_json(durations_path(store.root),
               {vid: rec["duration"] for vid, rec in sorted(manifest.items()) if rec["status"] == "ok"})
    write_json(
        store.root / FAILURES,
        {"total": len(videos) + len(unusable), "failed": len(failures), "failures": failures},
    )
