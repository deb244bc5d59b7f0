"""Run one extractor over decoded frames: per-video (T, D) float32 .npy + timestamps sidecar.

The frames come from a `source` with the FrameStore reading interface (`read_record`, `video_ids`,
`load`; optionally `failure` and `close`): the frame store itself, or `replay.ReplaySource`, which decodes the recorded plan
of the protocols whose frames are not stored. A video whose frames fail to replay is reported in the
summary (`failed`) and skipped; the other videos' batches stay the same.

Batching is across videos, with FIXED batch boundaries: the units of the shard's videos (sorted ids)
form one stream cut every `batch_size` units (`plan_batches`); within a batch, each run of units of one
shape is one forward pass (`split_by_shape`). Results of a float model depend slightly on the batch a
row was computed in (BLAS blocking), so fixed boundaries are what makes a resumed run byte-identical to
an uninterrupted one: a batch is recomputed when it holds any unfinished video, and finished videos
keep their files. Output files per video (in `out_dir`):

    <vid>.npy    float32 (T, D)
    <vid>.json   {"video", "feature", "dim", "units", "windows": [[start, end], ...] seconds,
                  "frames": the source's sha256 + the decoder code that selected its frames,
                  "extractor": digest of (protocol, config, weights, code)}; written last, it marks
                  the video as done (resumed only when both still match).

Sharding: `shard_of` splits the sorted id list into n contiguous, disjoint parts; shards write
disjoint files into the same directory and the merge reads them as one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.core.atomic import remove_own_temporaries, write_json, write_npy
from pipeline.core.codedeps import import_closure, module_file
from pipeline.core.provenance import code_version
from pipeline.media.sampling import VideoInfo


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n); None -> torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n with integers, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def shard_of(ids: list[str], index: int, count: int) -> list[str]:
    """Contiguous block `index` of `count` over the sorted ids (sizes differ by at most one)."""
    ids = sorted(ids)
    start = (len(ids) * index) // count
    stop = (len(ids) * (index + 1)) // count
    return ids[start:stop]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def extractor_code(extractor_cls: type) -> str:
    """Digest of an extractor's code (its module's import closure); "" for a class outside the project."""
    module = extractor_cls.__module__
    return code_version(import_closure([module])) if module_file(module) else ""


def extractor_digest(description: dict, weights: str, code: str = "") -> str:
    """What makes a video's features: the extractor's description, its weights and its code."""
    blob = json.dumps({"extractor": description, "weights": weights, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the batch plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Units [start, stop) of one video; `video` is its position in the run's list of videos."""

    video: int
    start: int
    stop: int


def plan_batches(unit_counts: Iterable[int], batch_size: int) -> Iterator[list[Piece]]:
    """Cut the units of all videos, in order, into batches of `batch_size` units (the last may be short).

    The boundaries depend on the unit counts alone, not on which videos are finished: that is what makes
    a resumed run byte-identical. A video without units gets an empty piece where it stands, so every
    video has a last piece. `unit_counts` is read lazily, one video at a time, as batches fill up.
    """
    batch: list[Piece] = []
    fill = 0
    for video, count in enumerate(unit_counts):
        if count == 0:
            batch.append(Piece(video, 0, 0))
        start = 0
        while start < count:
            stop = min(count, start + batch_size - fill)
            batch.append(Piece(video, start, stop))
            fill += stop - start
            start = stop
            if fill == batch_size:
                yield batch
                batch, fill = [], 0
    if batch:
        yield batch


def split_by_shape(batch: list[Piece], unit_shapes: list[list[tuple]]) -> list[list[Piece]]:
    """The forward passes of one batch: runs of consecutive units of the same shape.

    `unit_shapes[i]` holds the shape of every unit of `batch[i]`. A piece is cut where the shape
    changes inside it (units of different shapes, e.g. LGI's I3D chunks); empty pieces join no pass.
    """
    passes: list[list[Piece]] = []
    shape = None  # of the units in passes[-1]
    for piece, shapes in zip(batch, unit_shapes, strict=True):
        start = piece.start
        for i, unit_shape in enumerate(shapes, start=piece.start):
            if unit_shape != shape:
                if i > start:  # the part of this piece before the new shape ends the current pass
                    passes[-1].append(Piece(piece.video, start, i))
                    start = i
                passes.append([])
                shape = unit_shape
        if piece.stop > start:
            passes[-1].append(Piece(piece.video, start, piece.stop))
    return passes


# -- running the plan ------------------------------------------------------------------------------


def video_units(source, extractor, vid: str) -> tuple:
    """(units, windows) of one video: its frames from `source` grouped into the extractor's units.

    `source` is anything with the FrameStore reading interface (`read_record`, `load`, `video_ids`).
    Module-level and picklable: the local engine calls it in threads, the Ray engine in tasks."""
    vf = source.load(vid, extractor.protocol().key)
    record = source.read_record(vid) or {}
    info = VideoInfo(vid, fps=record.get("native_fps") or 0.0, duration=record.get("stream_duration"))
    return extractor.group(vf.frames, vf.windows, video=info)


def unit_shapes(units) -> list[tuple]:
    """The shape of every unit of a video (or of a slice of its units)."""
    if isinstance(units, list):  # units of different shapes (e.g. LGI's I3D chunks)
        return [np.shape(u) for u in units]
    return [np.shape(units)[1:]] * len(units)


def pass_input(parts: Iterable[tuple]) -> np.ndarray:
    """The input of one forward pass: the units [start, stop) of each (units, start, stop), stacked.

    Both engines build it with this function, so the model sees the same array."""
    return np.concatenate([_as_array(units[start:stop]) for units, start, stop in parts])


def forward(extractor, model, device: torch.device, units: np.ndarray) -> tuple[np.ndarray, float]:
    """One forward pass: (rows, seconds of model time)."""
    t0 = time.perf_counter()
    out = _forward(extractor, model, device, units)
    return out, time.perf_counter() - t0


@dataclass
class Loaded:
    """A video's units as an engine holds them (an array, a list of arrays, or handles to them in
    other processes), with what the driver needs to plan: every unit's shape and the windows."""

    units: object
    shapes: list[tuple]
    windows: np.ndarray


class LocalEngine:
    """Units loaded ahead in threads (np.load and group release the GIL for I/O and copies), so the
    model does not wait on the disk; each forward pass runs here when it is planned."""

    ahead = 4  # videos loaded ahead, counting the current one
    in_flight = 0  # planned batches that may wait for their forward passes: none

    def __init__(self, extractor, model: torch.nn.Module, device: torch.device, source):
        self.extractor, self.model, self.device, self.source = extractor, model, device, source
        self.threads = ThreadPoolExecutor(max_workers=2)

    def load(self, vid: str) -> Future:
        return self.threads.submit(video_units, self.source, self.extractor, vid)

    def loaded(self, handle: Future) -> Loaded:
        units, windows = handle.result()
        return Loaded(units, unit_shapes(units), windows)

    def forward(self, parts: list[tuple]) -> tuple[np.ndarray, float]:
        return forward(self.extractor, self.model, self.device, pass_input(parts))

    def result(self, handle: tuple[np.ndarray, float]) -> tuple[np.ndarray, float]:
        return handle

    def failure(self, vid: str) -> str | None:
        """Why the frames of a loaded video could not be read, if its source reports it."""
        return self.source.failure(vid) if hasattr(self.source, "failure") else None

    def close(self) -> None:
        self.threads.shutdown(cancel_futures=True)


@dataclass
class _Video:
    vid: str
    done: bool  # finished by an earlier run: its units run again only to fill a batch of other videos
    source_sha256: str | None  # the frames' identity (see the module docstring)
    unit_count: int | None  # known for finished videos (from the sidecar), else once loaded
    data: Loaded | None = None  # while needed
    rows: list = field(default_factory=list)  # feature rows computed so far (unfinished videos)


class _Loader:
    """The units of each video, loaded on first use; the engine starts loading the next few
    unfinished videos ahead."""

    def __init__(self, videos: list[_Video], engine):
        self.videos, self.engine = videos, engine
        self.pending: dict[str, object] = {}  # vid -> the engine's handle of a load under way

    def unit_count(self, pos: int) -> int:
        """Units of video `pos` (loading it if unfinished); starts loading the videos after it."""
        for v in self.videos[pos : pos + self.engine.ahead]:
            if not v.done and v.vid not in self.pending and v.data is None:
                self.pending[v.vid] = self.engine.load(v.vid)
        v = self.videos[pos]
        if v.unit_count is None:
            self.get(v)
        return v.unit_count

    def get(self, v: _Video) -> Loaded:
        if v.data is None:
            handle = self.pending.pop(v.vid, None)
            v.data = self.engine.loaded(handle if handle is not None else self.engine.load(v.vid))
            v.unit_count = len(v.data.shapes)
        return v.data

    def shapes(self, p: Piece) -> list[tuple]:
        return self.get(self.videos[p.video]).shapes[p.start : p.stop]

    def part(self, p: Piece) -> tuple:
        return self.get(self.videos[p.video]).units, p.start, p.stop


def _as_array(piece) -> np.ndarray:
    """The units of a piece as one (n, ...) array (a piece of a forward pass has one unit shape)."""
    if isinstance(piece, list):
        return np.stack([np.asarray(u) for u in piece])
    return np.asarray(piece)


@dataclass
class ExtractSummary:
    videos: int
    computed: int
    skipped: int
    units: int  # model inputs run in this invocation (incl. recomputed ones of finished videos)
    seconds_model: float
    failed: dict[str, str] = field(default_factory=dict)  # video id -> why its frames could not be read


def extract_videos(
    extractor,
    model: torch.nn.Module,
    device: torch.device,
    store,
    video_ids: list[str],
    out_dir: str | Path,
    weights: str,
    all_video_ids: list[str] | None = None,
    progress=None,
) -> ExtractSummary:
    """Extract features of `video_ids` (one shard) into `out_dir` in this process (the local engine)."""
    engine = LocalEngine(extractor, model, device, store)
    try:
        return run_plan(engine, extractor, store, video_ids, out_dir, weights, all_video_ids, progress)
    finally:  # an interrupted run leaves no decoder worker behind (replayed frames)
        engine.close()
        if hasattr(store, "close"):
            store.close()


def run_plan(
    engine,
    extractor,
    store,
    video_ids: list[str],
    out_dir: str | Path,
    weights: str,
    all_video_ids: list[str] | None = None,
    progress=None,
) -> ExtractSummary:
    """Run the batch plan of `video_ids` on `engine` (LocalEngine, or the Ray engine) and write the
    per-video files here; see the module docstring. `engine` loads units (`load`/`loaded`) and runs
    forward passes (`forward`/`result`); up to `engine.in_flight` planned batches wait for theirs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_own_temporaries(out_dir, video_ids)  # never another shard's files in flight
    if all_video_ids is not None:
        _prune(out_dir, set(all_video_ids))
    # its code too: DVC re-runs extract when the code changes, and a kept (persist) output of the
    # old code must not be resumed as done
    digest = extractor_digest(extractor.describe(), weights, extractor_code(type(extractor)))

    videos: list[_Video] = []
    for vid in video_ids:
        record = store.read_record(vid)
        # the frames' identity: the source bytes and the decoder code that selected them
        source = f"{record['sha256']}+{record.get('code')}" if record else None
        side = _read_sidecar(out_dir / f"{vid}.json")
        done = (
            side is not None
            and side.get("extractor") == digest
            and side.get("frames") == source
            and (out_dir / f"{vid}.npy").is_file()
        )
        videos.append(_Video(vid, done, source, side["units"] if done else None))

    computed = units_run = 0
    model_seconds = 0.0
    failed: dict[str, str] = {}

    def finish(batch: list[Piece], passes: list[tuple[list[Piece], object]]) -> None:
        """Collect the rows of a batch's forward passes, then write the videos it completes."""
        nonlocal computed, model_seconds
        for forward_pass, handle in passes:
            out, seconds = engine.result(handle)
            model_seconds += seconds
            cuts = np.cumsum([p.stop - p.start for p in forward_pass])[:-1]
            for p, part in zip(forward_pass, np.split(out, cuts), strict=True):
                if not videos[p.video].done:  # each unit gives (k, D) rows
                    videos[p.video].rows.extend(o.reshape(-1, o.shape[-1]) for o in part)
        for p in batch:
            v = videos[p.video]
            if p.stop != v.unit_count:
                continue
            # its last piece has run: the video is complete, unless its frames failed to be read
            # (a source that reports failures instead of raising keeps the plan of the others)
            reason = engine.failure(v.vid) if v.data is not None else None
            if reason is not None and not v.done:
                failed[v.vid] = reason
            elif not v.done:
                _write_video(out_dir, extractor, digest, v)
                computed += 1
            if progress and not v.done:
                progress()
            v.data, v.rows = None, []

    loader = _Loader(videos, engine)
    counts = (loader.unit_count(pos) for pos in range(len(videos)))
    waiting: deque[tuple[list[Piece], list]] = deque()  # planned batches, oldest first
    for batch in plan_batches(counts, extractor.config.batch_size):
        passes = []
        # a batch with any unfinished video runs whole (the same batches, the same numbers); the
        # rows of its finished videos are dropped
        if any(p.stop > p.start and not videos[p.video].done for p in batch):
            shapes = [loader.shapes(p) for p in batch]
            for forward_pass in split_by_shape(batch, shapes):
                passes.append((forward_pass, engine.forward([loader.part(p) for p in forward_pass])))
                units_run += sum(p.stop - p.start for p in forward_pass)
        waiting.append((batch, passes))
        while len(waiting) > engine.in_flight:
            finish(*waiting.popleft())
    while waiting:
        finish(*waiting.popleft())
    skipped = sum(v.done for v in videos)
    return ExtractSummary(len(videos), computed, skipped, units_run, model_seconds, failed)


def _write_video(out_dir: Path, extractor, digest: str, v: _Video) -> None:
    """<vid>.npy, then the sidecar that marks it done."""
    windows = v.data.windows
    feats = np.concatenate(v.rows, axis=0) if v.rows else np.zeros((0, extractor.dim), np.float32)
    if len(feats) != len(windows):
        raise RuntimeError(f"{extractor.name}: video {v.vid}: {len(feats)} feature rows but {len(windows)} windows")
    write_npy(out_dir / f"{v.vid}.npy", np.ascontiguousarray(feats, dtype=np.float32))
    write_json(
        out_dir / f"{v.vid}.json",
        {
            "video": v.vid,
            "feature": extractor.name,
            "dim": extractor.dim,
            "units": int(v.unit_count),
            "windows": np.round(windows, 6).tolist(),
            "frames": v.source_sha256,
            "extractor": digest,
        },
    )


def _forward(extractor, model, device: torch.device, units: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(units))
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    with torch.inference_mode():
        autocast = device.type == "cuda" and extractor.config.amp
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=autocast):
            y = extractor.embed(model, extractor.preprocess(x))
    return y.float().cpu().numpy()


def _read_sidecar(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _remove_own_temporaries(out_dir: Path, video_ids: list[str]) -> None:
    """Leftovers of an interrupted run (`pipeline.core.atomic` names them .tmp-<file>.<random>)."""
    for vid in video_ids:
        for name in (f"{vid}.npy", f"{vid}.json"):
            remove_own_temporaries(out_dir / name)


def _prune(out_dir: Path, keep: set[str]) -> None:
    """Remove per-video files of videos that are no longer in the frame store."""
    for f in list(out_dir.glob("*.npy")) + list(out_dir.glob("*.json")):
        if f.name.endswith(".prov.json") or f.name == "provenance.json":
            continue
        if f.stem not in keep:
            f.unlink()
