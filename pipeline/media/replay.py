"""Frames for `vmr extract` without a frame store: replay decode's recorded plan.

`vmr decode` records, per video and protocol, which source frames to keep (source index, pts,
windows) and writes the frames themselves only for the protocols the `decode.store_frames` policy
keeps (pipeline/media/decode.py). For the others, `ReplaySource.load` returns a `VideoFrames` whose
`frames` is a `ReplayFrames`: a forward-only lazy array whose frames a worker process decodes with
the recorded reader (decord or PyAV), the same resize/crop code (`resize_crop`) and the same
selection, and streams through a bounded queue (`decode_pool.Stream`: per-frame timeout, kill). So
the features are byte-identical to those from stored frames, memory is bounded whatever the video
length, and nothing is written per frame.

Extractors index frames with increasing, overlapping index arrays (`LazySnippets`, slices for
frame-wise extractors) whose smallest index never decreases; `ReplayFrames` keeps the frames from the
smallest index of the latest request on (a small back-window) and reopens the stream should a request
go further back (counted in `rewinds`; correct, only slower).

A video that fails to replay (a decoder error, a crash, a timeout) yields zero frames from then on, so
that the fixed batch plan is kept for the other videos; the extract runner asks `failure(video_id)`
and reports the video instead of writing its features. A source file that changed since decode
(another sha256) is an error naming the file: its plan describes other frames.
"""

from __future__ import annotations

import collections
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import VmrError
from pipeline.media.decode_pool import Stream, TaskError
from pipeline.media.framestore import FrameStore, VideoFrames
from pipeline.media.sampling import SamplingProtocol

QUEUE_BYTES = 32 << 20  # decoded frames a worker may run ahead by, per video (at least QUEUE_MIN frames)
QUEUE_MIN = 4
# imported once by the fork server, not per worker (as decode_all does)
PRELOAD = ("pipeline.media.replay", "pipeline.media.decode", "av", "av.video.reformatter")


class SourceChanged(VmrError):
    """A video file differs from the one decode planned (or is gone)."""


@dataclass(frozen=True)
class ReplayTask:
    video_id: str
    path: str
    reader: str  # "pyav" | "decord": the reader decode chose for this video
    protocol: SamplingProtocol
    source_index: tuple[int, ...]  # per kept frame, in source order (repeats allowed)
    rotation: int


def replay_frames(task: ReplayTask):
    """Worker entry: the kept frames of one protocol, in order, as decode would write them."""
    import av.video.reformatter

    from pipeline.media.decode import DecodeError, resize_crop

    reformatter = av.video.reformatter.VideoReformatter()  # one per protocol and video, as in decode
    index = np.asarray(task.source_index, dtype=np.int64)
    j = 0
    for i, src in _decoded(task, np.unique(index)):
        image = resize_crop(src, task.protocol, task.rotation, reformatter)
        while j < len(index) and index[j] == i:  # a frame repeated in several slots
            yield image
            j += 1
    if j < len(index):
        raise DecodeError(f"frames from source index {int(index[j])} on could not be decoded")


def _decoded(task: ReplayTask, needed: np.ndarray):
    """(source index, frame) of the `needed` frames with the recorded reader. As in `decode_video`,
    decord's own failures fall back to PyAV, which is possible while no frame has left: decord
    decodes its first chunk (`decode.CHUNK` frames) before the first one does. A decord failure
    after that fails the video (its first frames are already in the model's batches)."""
    from pipeline.media.decode import DecodeError, DecordReader, PyAVReader

    path = Path(task.path)
    if task.reader == "decord":
        try:
            frames = DecordReader(path).frames(needed)
            first = next(frames, None)
        except DecodeError:
            pass  # PyAV below
        else:
            if first is not None:
                yield first
            yield from frames
            return
    # PyAV without holding the file's packets in memory (bounded whatever the file size)
    yield from PyAVReader(path, keep_packets=False).frames(needed)


class ReplayFrames:
    """uint8 (N, H, W, 3) frames of one video, decoded on demand by a worker process (module docstring).

    Looks like a read-only array to `extractor.group` and `LazySnippets`: shape, dtype, len, and
    int / slice / index-array indexing (non-negative indices), np.asarray.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, task: ReplayTask, frame_shape: tuple[int, ...], timeout_s: float,
                 on_failure=None):
        self.task, self.timeout_s, self.on_failure = task, timeout_s, on_failure
        self.shape = (len(task.source_index), *frame_shape)
        self.failed: str | None = None
        self.rewinds = 0  # streams reopened for a request behind the back-window
        self.peak_window = 0  # most frames held at once (memory check in tests and benchmarks)
        self._lock = threading.Lock()  # group() may probe it in a loader thread
        self._stream: Stream | None = None
        self._start()

    def _start(self) -> None:
        if self._stream is not None:
            self._stream.close()
        frame_bytes = int(np.prod(self.shape[1:])) or 1
        self._stream = Stream(replay_frames, self.task, max(QUEUE_MIN, QUEUE_BYTES // frame_bytes),
                              self.timeout_s, PRELOAD)
        self._window: collections.deque = collections.deque()  # frames [lo, next)
        self._lo = self._next = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        positions = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        if positions.size == 0:
            return np.zeros((*positions.shape, *self.shape[1:]), np.uint8)
        if positions.min() < 0 or positions.max() >= len(self):
            raise IndexError(f"{self.task.video_id}: frame index out of range 0..{len(self) - 1}")
        with self._lock:
            lo, hi = int(positions.min()), int(positions.max())
            self._advance(lo, hi)
            self.peak_window = max(self.peak_window, len(self._window))
            held = list(self._window)
            return np.stack([held[p - lo] for p in positions.ravel()]).reshape(*positions.shape, *self.shape[1:])

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out

    def _advance(self, lo: int, hi: int) -> None:
        """Hold the frames [lo, hi] (and any pulled past hi before): drop those before lo, pull up to hi."""
        if lo < self._lo:  # behind the back-window: decode again from the start
            self.rewinds += 1
            self._start()
        while self._lo < lo and self._window:
            self._window.popleft()
            self._lo += 1
        while self._next <= hi:
            frame = self._pull()
            if self._next >= lo:
                self._window.append(frame)
            self._next += 1
        self._lo = lo  # the window holds [lo, next), next > hi

    def _pull(self) -> np.ndarray:
        if self.failed is None:
            try:
                return next(self._stream)
            except StopIteration:
                self._fail("the stream ended early")
            except TaskError as e:
                self._fail(str(e))
        return np.zeros(self.shape[1:], np.uint8)  # keeps the batch plan of the other videos

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self._stream.close()
        if self.on_failure is not None:
            self.on_failure(self.task.video_id, reason)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class ReplaySource:
    """The FrameStore reading interface (`read_record`, `video_ids`, `load`, `failure`) over a frame
    store whose frames may be absent: stored frames are read from the store (a cache), the others
    are replayed from the source videos: `videos` is the video folder (the record's file name in it)
    or a mapping id -> path."""

    def __init__(self, store: FrameStore | str | Path, videos: str | Path | dict[str, Path],
                 timeout_s: float = 120.0):
        self.store = store if isinstance(store, FrameStore) else FrameStore(store)
        self.videos = {vid: Path(p) for vid, p in videos.items()} if isinstance(videos, dict) else Path(videos)
        self.timeout_s = timeout_s
        self.root = self.store.root
        self._failures: dict[str, str] = {}
        self._open: weakref.WeakSet = weakref.WeakSet()  # ReplayFrames whose worker may still run

    def read_record(self, video_id: str) -> dict | None:
        return self.store.read_record(video_id)

    def video_ids(self, protocol_key: str | None = None) -> list[str]:
        return self.store.video_ids(protocol_key)

    def __getstate__(self) -> dict:  # picklable (another engine's workers): without live streams
        return {**self.__dict__, "_open": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _open=weakref.WeakSet())

    def close(self) -> None:
        """Stop every decoder worker still running (e.g. after an interrupted run)."""
        for frames in list(self._open):
            frames.close()

    def failure(self, video_id: str) -> str | None:
        """Why the frames of `video_id` could not be replayed (None: they could, so far)."""
        return self._failures.get(video_id)

    def _record_failure(self, video_id: str, reason: str) -> None:
        self._failures[video_id] = reason

    def load(self, video_id: str, protocol_key: str) -> VideoFrames:
        record = self.store.read_record(video_id)
        entry = (record or {}).get("protocols", {}).get(protocol_key)
        if record is None or record.get("status") != "ok" or entry is None:
            return self.store.load(video_id, protocol_key)  # its error says what is missing
        if entry.get("stored", True) and self.store.frames_path(protocol_key, video_id).is_file():
            return self.store.load(video_id, protocol_key)
        path = self._source(video_id, record)
        task = ReplayTask(video_id, str(path), record.get("reader") or record["decoder"].split()[0],
                          SamplingProtocol(**entry["protocol"]), tuple(entry["source_index"]),
                          int(record.get("rotation") or 0))
        self._failures.pop(video_id, None)
        frames = ReplayFrames(task, tuple(entry["frame_shape"]), self.timeout_s, self._record_failure)
        self._open.add(frames)
        return VideoFrames.from_entry(video_id, frames, entry)

    def _source(self, video_id: str, record: dict) -> Path:
        """The video file decode planned, unchanged (same sha256)."""
        from pipeline.media.decode import sha256_of

        path = self.videos.get(video_id) if isinstance(self.videos, dict) else self.videos / record["file"]
        if path is None or not path.is_file():
            raise SourceChanged(f"{path or record['file']}: the video of '{video_id}' that `vmr decode` planned "
                                "is gone; its frames are not stored, so extract needs it")
        digest = sha256_of(path)
        if digest != record["sha256"]:
            raise SourceChanged(f"{path}: the video changed since `vmr decode` planned its frames (sha256 "
                                f"{digest[:12]}..., decoded {record['sha256'][:12]}...): run `vmr decode` again")
        return path
