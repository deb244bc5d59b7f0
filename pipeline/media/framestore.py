"""The on-disk frame store that `vmr decode` writes and `vmr extract` reads.

Layout under the store root (default `work/frames/`):

    <protocol.key>/<video_id>.npy   uint8 (N, H, W, 3) RGB: the kept frames of one video, resized and
                                    cropped as the protocol says (224 x 224 for CLIP/VGG); only for
                                    the protocols `decode.store_frames` keeps: extract replays the
                                    others' plans from the videos (pipeline/media/replay.py)
    videos/<video_id>.json          per-video record, written LAST (it is the "done" marker): source
                                    digest, codec, native fps, frame count, duration, rotation, status /
                                    failure reason, the reader (pyav | decord) and, per protocol, the
                                    source index, pts and time window (start, end) of every kept
                                    frame, its frame shape and whether its frames are stored
    manifest.json                   every video's record without the per-frame lists, sorted by id
    failures.json                   the videos that failed, each with its reason
    durations.json                  {video id: duration in seconds} of the decoded videos, sorted: the
                                    durations of annotations that come without them (`dataset.durations`
                                    empty); its own small file, so that only a changed duration re-runs
                                    the stages that read it
    provenance.json                 how the store was made

Raw uint8 .npy keeps decode -> extract lossless and lets extract memory-map frames; at 224 x 224 RGB a
kept frame is 150,528 bytes, i.e. 147 KiB per video-second at CLIP's default 1 frame/s, but 4.3 MiB
per video-second at SlowFast's 30 fps: hence the store is a cache, and dense protocols replay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import VmrError

RECORDS_DIR = "videos"
MANIFEST = "manifest.json"
FAILURES = "failures.json"
DURATIONS = "durations.json"


class NoDecodeRecords(VmrError):
    """The frame store has no durations file: the videos were not decoded yet."""


def durations_path(root: str | Path) -> Path:
    return Path(root) / DURATIONS


def read_durations(root: str | Path) -> dict[str, float]:
    """{video id: seconds} as decode measured them (FFmpeg's end time: last pts + last frame's duration)."""
    path = durations_path(root)
    if not path.is_file():
        raise NoDecodeRecords(f"{path}: no decode records of the videos' durations (run `vmr decode` first)")
    return {vid: float(seconds) for vid, seconds in json.loads(path.read_text()).items()}


def decoded_durations(dataset, root: str | Path) -> dict[str, float] | None:
    """The durations `dataset` (a DatasetParams section) takes from decode's records in the store at
    `root`, or None when its annotations come with their own (`dataset.durations`)."""
    return read_durations(root) if dataset.durations_from_decode else None


@dataclass(frozen=True)
class VideoFrames:
    video_id: str
    frames: np.ndarray  # uint8 (N, H, W, 3)
    pts: np.ndarray  # (N,) float64 seconds: source frame time (from the file start)
    windows: np.ndarray  # (N, 2) float64 seconds: the window each kept frame stands for
    source_index: np.ndarray  # (N,) int64: index of the frame among the decoded frames

    @classmethod
    def from_entry(cls, video_id: str, frames: np.ndarray, entry: dict) -> VideoFrames:
        """`frames` with the times a record's protocol entry lists for them."""
        return cls(
            video_id=video_id,
            frames=frames,
            pts=np.asarray(entry["pts"], dtype=np.float64),
            windows=np.asarray(entry["windows"], dtype=np.float64).reshape(-1, 2),
            source_index=np.asarray(entry["source_index"], dtype=np.int64),
        )


class FrameStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def frames_path(self, protocol_key: str, video_id: str) -> Path:
        return self.root / protocol_key / f"{video_id}.npy"

    def record_path(self, video_id: str) -> Path:
        return self.root / RECORDS_DIR / f"{video_id}.json"

    def read_record(self, video_id: str) -> dict | None:
        path = self.record_path(video_id)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged record counts as "not done"

    def failure(self, video_id: str) -> str | None:
        """Stored frames never fail to replay (the reading interface of `replay.ReplaySource`)."""
        return None

    def manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no decode manifest (run `vmr decode` first)")
        return json.loads(path.read_text())

    def video_ids(self, protocol_key: str | None = None) -> list[str]:
        """Ids of the successfully decoded videos (having frames for `protocol_key`), sorted."""
        videos = self.manifest()["videos"]
        return sorted(
            vid
            for vid, rec in videos.items()
            if rec["status"] == "ok" and (protocol_key is None or protocol_key in rec["protocols"])
        )

    def load(self, video_id: str, protocol_key: str, mmap: bool = True) -> VideoFrames:
        record = self.read_record(video_id)
        if record is None or record.get("status") != "ok":
            raise FileNotFoundError(f"{self.record_path(video_id)}: video not decoded")
        if protocol_key not in record["protocols"]:
            raise KeyError(
                f"{self.record_path(video_id)}: no frames for protocol {protocol_key} "
                f"(decoded for {sorted(record['protocols'])}); re-run `vmr decode` with this feature enabled"
            )
        entry = record["protocols"][protocol_key]
        if not entry.get("stored", True):
            raise FileNotFoundError(
                f"{self.frames_path(protocol_key, video_id)}: frames of protocol {protocol_key} are not stored "
                "(decode.store_frames); read them through pipeline.media.replay.ReplaySource"
            )
        frames = np.load(self.frames_path(protocol_key, video_id), mmap_mode="r" if mmap else None)
        if frames.shape[0] != len(entry["pts"]):
            raise ValueError(
                f"{self.frames_path(protocol_key, video_id)}: {frames.shape[0]} frames but the record "
                f"lists {len(entry['pts'])}"
            )
        return VideoFrames.from_entry(video_id, frames, entry)
