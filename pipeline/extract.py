"""Run one extractor over the frame store: per-video (T, D) float32 .npy + timestamps sidecar.

Batching is across videos, with FIXED batch boundaries: the units of the shard's videos (sorted ids)
form one stream cut every `batch_size` units. Results of a float model depend slightly on the batch a
row was computed in (BLAS blocking), so fixed boundaries are what makes a resumed run byte-identical to
an uninterrupted one: a batch is recomputed when it holds any unfinished video, and finished videos
keep their files. Output files per video (in `out_dir`):

    <vid>.npy    float32 (T, D)
    <vid>.json   {"video", "feature", "dim", "units", "windows": [[start, end], ...] seconds,
                  "source_sha256", "extractor": digest of (protocol, config, weights)}; written last,
                  it marks the video as done.

Sharding: `shard_of` splits the sorted id list into n contiguous, disjoint parts; shards write
disjoint files into the same directory and the merge reads them as one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import torch

from extractors._base import VideoInfo
from pipeline.atomic import TMP_PREFIX, write_json, write_npy
from pipeline.framestore import FrameStore


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


def extractor_digest(description: dict, weights: str) -> str:
    blob = json.dumps({"extractor": description, "weights": weights}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class _Video:
    vid: str
    done: bool
    units: int | None  # known for finished videos (from the sidecar), else after loading
    data: tuple | None = None  # (units array, windows) once loaded
    rows: list = field(default_factory=list)


@dataclass
class ExtractSummary:
    videos: int
    computed: int
    skipped: int
    units: int  # model inputs run in this invocation (incl. recomputed ones of finished videos)
    seconds_model: float


def extract_videos(
    extractor,
    model: torch.nn.Module,
    device: torch.device,
    store: FrameStore,
    video_ids: list[str],
    out_dir: str | Path,
    weights: str,
    all_video_ids: list[str] | None = None,
    progress=None,
) -> ExtractSummary:
    """Extract features of `video_ids` (one shard) into `out_dir`; see the module docstring."""
    import time

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_own_temporaries(out_dir, video_ids)  # never another shard's files in flight
    if all_video_ids is not None:
        _prune(out_dir, set(all_video_ids))
    key = extractor.protocol().key
    digest = extractor_digest(extractor.describe(), weights)
    batch_size = extractor.config.batch_size

    videos: list[_Video] = []
    for vid in video_ids:
        record = store.read_record(vid)
        source = record["sha256"] if record else None
        side = _read_sidecar(out_dir / f"{vid}.json")
        done = (
            side is not None
            and side.get("extractor") == digest
            and side.get("source_sha256") == source
            and (out_dir / f"{vid}.npy").is_file()
        )
        videos.append(_Video(vid, done, side["units"] if done else None))

    def load(v: _Video) -> tuple[object, np.ndarray]:
        vf = store.load(v.vid, key)
        record = store.read_record(v.vid) or {}
        info = VideoInfo(v.vid, fps=record.get("native_fps") or 0.0, duration=record.get("stream_duration"))
        units, windows = extractor.group(vf.frames, vf.windows, video=info)
        return units, windows

    # Prefetch frames of upcoming unfinished videos in a thread (np.load + group release the GIL
    # for I/O and copies), so the model does not wait on the disk.
    pool = ThreadPoolExecutor(max_workers=2)
    futures: OrderedDict[str, object] = OrderedDict()

    def schedule(upto: int) -> None:
        for v in videos[upto : upto + 4]:
            if not v.done and v.vid not in futures and v.data is None:
                futures[v.vid] = pool.submit(load, v)

    def ensure_loaded(v: _Video) -> None:
        if v.data is None:
            fut = futures.pop(v.vid, None)
            v.data = fut.result() if fut is not None else load(v)
            v.units = len(v.data[0])

    computed = units_run = 0
    model_seconds = 0.0

    def finish(v: _Video) -> None:
        nonlocal computed
        units, windows = v.data
        feats = np.concatenate(v.rows, axis=0) if v.rows else np.zeros((0, extractor.dim), np.float32)
        if len(feats) != len(windows):
            raise RuntimeError(
                f"{extractor.name}: video {v.vid}: {len(feats)} feature rows but {len(windows)} windows"
            )
        write_npy(out_dir / f"{v.vid}.npy", np.ascontiguousarray(feats, dtype=np.float32))
        write_json(
            out_dir / f"{v.vid}.json",
            {
                "video": v.vid,
                "feature": extractor.name,
                "dim": extractor.dim,
                "units": int(len(units)),
                "windows": np.round(windows, 6).tolist(),
                "source_sha256": (store.read_record(v.vid) or {}).get("sha256"),
                "extractor": digest,
            },
        )
        v.data, v.rows = None, []
        computed += 1
        if progress:
            progress()

    # The stream of (video position, unit slice) pieces, cut into fixed batches.
    def pieces() -> Iterator[tuple[int, int, int]]:
        for pos, v in enumerate(videos):
            schedule(pos)
            if v.units is None:
                ensure_loaded(v)
            start = 0
            while start < v.units:
                yield pos, start, v.units
                start = v.units  # whole video; batching below splits it
            if v.units == 0 and not v.done:
                yield pos, 0, 0  # an empty video still gets its (0, D) file

    batch: list[tuple[int, int, int]] = []  # (video position, start, stop)
    fill = 0

    def run_batch() -> None:
        nonlocal units_run, model_seconds
        if not batch or all(videos[p].done for p, _, _ in batch):
            return
        # units in stream order; runs of equal shape go through the model together
        units: list[np.ndarray] = []
        for p, a, b in batch:
            ensure_loaded(videos[p])
            piece = videos[p].data[0][a:b]
            if isinstance(piece, list):  # units of different shapes (e.g. LGI's I3D chunks)
                units.extend(np.asarray(u)[None] for u in piece)
            else:
                units.append(np.asarray(piece))
        rows_per_unit: list[np.ndarray] = []
        for run in _same_shape_runs(units):
            t0 = time.perf_counter()
            out = _forward(extractor, model, device, run)
            model_seconds += time.perf_counter() - t0
            units_run += len(run)
            rows_per_unit.extend(o.reshape(-1, o.shape[-1]) for o in out)
        offset = 0
        for p, a, b in batch:
            v = videos[p]
            mine = rows_per_unit[offset : offset + (b - a)]
            offset += b - a
            if v.done:
                continue
            v.rows.extend(mine)
            if b == v.units:
                finish(v)

    for pos, start, stop in pieces():
        v = videos[pos]
        if stop == 0:
            if not v.done:
                ensure_loaded(v)
                finish(v)
            continue
        a = start
        while a < stop:
            b = min(stop, a + batch_size - fill)
            batch.append((pos, a, b))
            fill += b - a
            a = b
            if fill == batch_size:
                run_batch()
                batch, fill = [], 0
        # release loaded data of finished videos that the current batch no longer needs
        for q in range(pos):
            if videos[q].done and videos[q].data is not None and all(p != q for p, _, _ in batch):
                videos[q].data = None
    run_batch()
    pool.shutdown(wait=True)
    skipped = sum(v.done for v in videos)
    return ExtractSummary(len(videos), computed, skipped, units_run, model_seconds)


def _same_shape_runs(chunks: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Concatenate consecutive (n, ...) chunks whose unit shapes agree."""
    run: list[np.ndarray] = []
    for c in chunks:
        if run and c.shape[1:] != run[0].shape[1:]:
            yield np.concatenate(run, axis=0)
            run = []
        if len(c):
            run.append(c)
    if run:
        yield np.concatenate(run, axis=0)


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
    """Leftovers of an interrupted run (`pipeline.atomic` names them .tmp-<file>.<random>)."""
    for vid in video_ids:
        for name in (f"{vid}.npy", f"{vid}.json"):
            for f in out_dir.glob(glob_escape(f"{TMP_PREFIX}{name}.") + "*"):
                f.unlink(missing_ok=True)


def _prune(out_dir: Path, keep: set[str]) -> None:
    """Remove per-video files of videos that are no longer in the frame store."""
    for f in list(out_dir.glob("*.npy")) + list(out_dir.glob("*.json")):
        if f.name.endswith(".prov.json") or f.name == "provenance.json":
            continue
        if f.stem not in keep:
            f.unlink()
