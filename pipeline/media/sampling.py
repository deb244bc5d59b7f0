"""Frame selection rules of the published feature protocols, computed from frame timestamps.

Pure functions: given each decoded frame's start time (seconds from the FILE start, the origin FFmpeg's
filters use) and the video's end time, return which source frame fills each output slot and the time
window (start, end) the slot stands for. `SamplingProtocol` (below) documents the rules;
docs/features.md for where each one comes from.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Rule = Literal["fps_filter", "uniform", "every_n", "all"]


@dataclass(frozen=True)
class SamplingProtocol:
    """Which frames of a video an extractor consumes, and at what size.

    Rate rules (all computed from the decoder's per-frame timestamps, never from frame counts):
    - `fps_filter`: exactly what FFmpeg's `fps=rate` filter (round=near) outputs, as used by the HERO
      extractor (QVHighlights / Charades SF+C CLIP, SlowFast at 30 fps). Output slot k holds the LAST
      frame whose time t (from the file start) has round_half_up(t * rate) <= k, i.e. t < (k+0.5)/rate:
      the middle of the window [k/rate, (k+1)/rate). Count = round_half_up(end * rate) where end is the
      last frame's pts + duration (nothing added without one: FFmpeg 5.1); slots before the first
      kept slot repeat its frame, gaps repeat the previous frame (`fps_filter`). `hero_short_video` adds HERO's special case (0 < duration < 1/rate + 0.1 ->
      rate = 2 / max(int(duration), 1)).
    - `uniform`: slot k holds the first frame with t >= k/rate (start of the window);
      count = ceil(end * rate).
    - `every_n`: source frames 0, n, 2n, ... (CNM "every 8 frames", C3D units).
    - `all`: every decoded frame.

    Spatial: resize so the short side is `short_side` (0: keep), or to exactly `size` = (height,
    width) whatever the aspect ratio (Caffe C3D's 128 x 171), then centre-crop a `crop` x `crop` square
    (0: no crop), with `interpolation`; frames are stored uint8 RGB. `resizer` is the library that
    resizes, as the published protocol's own code did: `swscale` (FFmpeg's scaler: HERO's ffmpeg
    `scale` filter) or `opencv` (`cv2.resize`: Caffe C3D's `cv::resize` and the cv2-based ports).
    """

    rule: Rule = "fps_filter"
    rate: float = 1.0  # output frames per second (fps_filter, uniform)
    every_n: int = 1  # keep every n-th source frame (every_n)
    short_side: int = 224
    crop: int = 224
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    hero_short_video: bool = False
    size: tuple[int, int] | None = None  # (height, width); replaces short_side
    resizer: Literal["swscale", "opencv"] = "swscale"

    def __post_init__(self) -> None:
        if self.rule in ("fps_filter", "uniform") and not self.rate > 0:
            raise ValueError(f"sampling rule {self.rule} needs rate > 0, got {self.rate}")
        if self.rule == "every_n" and self.every_n < 1:
            raise ValueError(f"sampling rule every_n needs every_n >= 1, got {self.every_n}")
        if self.short_side < 0 or self.crop < 0:
            raise ValueError("short_side and crop must be >= 0")
        if self.size is not None:
            object.__setattr__(self, "size", tuple(self.size))  # a list from JSON: same protocol, same key
            if len(self.size) != 2 or min(self.size) < 1:
                raise ValueError(f"size must be (height, width) >= 1, got {self.size}")
            if self.short_side:
                raise ValueError("set either short_side or size, not both")
            if self.crop and self.crop > min(self.size):
                raise ValueError(f"crop {self.crop} does not fit in size {self.size}")

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        """A stable directory name for the frames of this protocol (readable prefix + digest)."""
        if self.rule in ("fps_filter", "uniform"):
            rate = f"{self.rate:g}"
        elif self.rule == "every_n":
            rate = str(self.every_n)
        else:
            rate = "1"
        fields = self.as_dict()
        for name, default in (("size", None), ("resizer", "swscale")):  # added later: older keys stay valid
            if fields[name] == default:
                del fields[name]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        side = f"{self.size[0]}x{self.size[1]}" if self.size else self.short_side
        return f"{self.rule}-{rate}-s{side}-c{self.crop}-{digest}"


# Frame times come from the decoder as floats (pts * time_base); the rules compare them with slot
# boundaries such as (k + 0.5) / rate. Rounding t * rate to this many decimals first makes a frame that
# sits exactly on a boundary (15/30 s at rate 1) land where FFmpeg's integer arithmetic puts it.
_DECIMALS = 6


def _scaled(t: np.ndarray | float, rate: float) -> np.ndarray:
    return np.round(np.asarray(t, dtype=np.float64) * rate, _DECIMALS)


def round_half_up(x: np.ndarray | float) -> np.ndarray:
    """FFmpeg's AV_ROUND_NEAR_INF for non-negative values: halves go up."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def fps_filter(starts: np.ndarray, end: float, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Emulate FFmpeg's `fps=rate` filter (round=near): (source index per slot, (N, 2) windows).

    Times are from the file start. Slot k holds the last frame with round_half_up(t * rate) <= k, i.e.
    t < (k + 0.5) / rate (the middle of the window [k/rate, (k+1)/rate)); gaps repeat the previous
    frame. The number of slots is N = round_half_up(end * rate). When the video starts after the file
    (audio first), the first slot that gets a frame is k0 = round_half_up(t0 * rate), and slots
    0..k0-1 repeat the frame kept for k0 (not the stream's first frame); if N <= k0 nothing is kept.
    Slots start at 0: frames before the file start (negative times) can only fill slot 0.
    This is FFmpeg 5.1's behaviour, checked against the binary in tests/pipeline/media/test_ffmpeg_oracle.py.
    """
    starts = np.asarray(starts, dtype=np.float64)
    if starts.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2))
    count = int(round_half_up(_scaled(end, rate)))
    slot_of_frame = round_half_up(_scaled(starts, rate))  # the first slot each frame may fill
    first_slot = max(int(slot_of_frame[0]), 0)  # a negative index below would wrap to the end
    if count <= first_slot:
        return np.zeros(0, np.int64), np.zeros((0, 2))
    # last frame whose slot_of_frame <= k (frames are in presentation order, so this is sorted)
    idx = np.searchsorted(slot_of_frame, np.arange(count), side="right") - 1
    idx[:first_slot] = idx[first_slot]
    return idx.astype(np.int64), _slot_windows(count, rate)


def uniform(starts: np.ndarray, end: float, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Slot k holds the first frame with t >= k / rate (start of its window); ceil(end * rate) slots."""
    starts = np.asarray(starts, dtype=np.float64)
    if starts.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 2))
    count = max(1, math.ceil(float(_scaled(end, rate))))
    scaled = _scaled(starts, rate)
    idx = np.searchsorted(scaled, np.arange(count), side="left")
    idx = np.clip(idx, 0, starts.size - 1)
    return idx.astype(np.int64), _slot_windows(count, rate)


def every_n(starts: np.ndarray, stops: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Source frames 0, n, 2n, ...; window = from that frame's start to the end of the n-th frame after."""
    starts = np.asarray(starts, dtype=np.float64)
    stops = np.asarray(stops, dtype=np.float64)
    idx = np.arange(0, starts.size, n, dtype=np.int64)
    last = np.minimum(idx + n, starts.size) - 1
    return idx, np.stack([starts[idx], stops[last]], axis=1) if idx.size else np.zeros((0, 2))


def every_frame(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = np.asarray(starts, dtype=np.float64)
    return np.arange(starts.size, dtype=np.int64), np.stack([starts, np.asarray(stops, np.float64)], 1)


def hero_rate(rate: float, stream_duration: float | None) -> float:
    """HERO's CLIP loader: for 0 < duration < 1/rate + 0.1 it uses fps = 2 / max(int(duration), 1).

    `stream_duration` is what ffprobe reports for the video stream, or None when HERO would have set
    it to -1 (no nb_frames in the container: mkv, webm, mpegts), which disables the special case.
    """
    if stream_duration is not None and 0 < stream_duration < 1.0 / rate + 0.1:
        return 2.0 / max(int(stream_duration), 1)
    return rate


def _slot_windows(count: int, rate: float) -> np.ndarray:
    k = np.arange(count, dtype=np.float64)
    return np.stack([k / rate, (k + 1) / rate], axis=1)


def select(
    protocol,
    starts: np.ndarray,
    stops: np.ndarray,
    end: float,
    stream_duration: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Apply a `SamplingProtocol`'s rule: (source frame index per kept frame, windows, effective rate)."""
    if protocol.rule == "fps_filter":
        rate = hero_rate(protocol.rate, stream_duration) if protocol.hero_short_video else protocol.rate
        idx, win = fps_filter(starts, end, rate)
        return idx, win, rate
    if protocol.rule == "uniform":
        idx, win = uniform(starts, end, protocol.rate)
        return idx, win, protocol.rate
    if protocol.rule == "every_n":
        idx, win = every_n(starts, stops, protocol.every_n)
        return idx, win, None
    if protocol.rule == "all":
        idx, win = every_frame(starts, stops)
        return idx, win, None
    raise ValueError(f"unknown sampling rule {protocol.rule!r}")


@dataclass(frozen=True)
class VideoInfo:
    """Facts about one source video (from its decode record) that some `group` rules need.

    HERO's SlowFast sampling uses floor(native fps) and ceil(stream duration / clip_len); the
    extract stage passes this as `group(..., video=...)`.
    """

    video_id: str
    fps: float  # the video stream's average frame rate
    duration: float | None = None  # stream duration in seconds (ffprobe's); None when unknown
