"""Snippet sampling for the snippet-level extractors (SlowFast, I3D, C3D): which kept frames each
network pass reads, and the spatial transforms, as the published feature sets were made.

The decode stage has already applied the rate rule (e.g. FFmpeg's fps filter at 30 or 24 fps,
`pipeline.media.sampling`); everything here is a pure function of the number of kept frames (plus the
source fps / duration where HERO uses them), so it is tested without video. Sources of each rule
are cited next to it (feature_protocols.md sections 2a-2e); docs/snippet_extractors.md has the tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.media.sampling import VideoInfo

if TYPE_CHECKING:  # imported where used: `vmr decode` reads this module without torch
    import torch


@dataclass(frozen=True)
class SnippetPlan:
    """Which kept frames each network pass reads, and which frames each output row covers.

    `snippets[i]` are positions into the frames the decode stage kept for the protocol; `rows[i]`
    is (k, 2): the first and last kept frame of each of the k output rows of pass i, from which
    the row's (start, end) seconds are read off the decode windows.
    """

    snippets: list[np.ndarray]
    rows: list[np.ndarray]
    info: dict = field(default_factory=dict)  # protocol name and numbers, for provenance

    @property
    def num_rows(self) -> int:
        return sum(len(r) for r in self.rows)

    def row_windows(self, windows: np.ndarray) -> np.ndarray:
        """(R, 2) seconds per output row, from the decode stage's per-frame (start, end) windows."""
        if not self.rows:
            return np.zeros((0, 2))
        r = np.minimum(np.concatenate(self.rows), len(windows) - 1)
        return np.stack([windows[r[:, 0], 0], windows[r[:, 1], 1]], axis=1)


# -- SlowFast: HERO_Video_Feature_Extractor (QVHighlights, Charades SF+C) --------------------------


def hero_fast_positions(source_fps: float, snippet_frames: int, target_fps: int = 30,
                        num_frames: int = 32, sampling_rate: int = 2) -> np.ndarray:
    """Positions of the 32 fast-pathway frames inside one snippet, HERO's way.

    The span is num_frames * sampling_rate * fps / target_fps with fps = floor(source avg fps),
    although the frames were already resampled to target_fps (HERO's quirk, kept on purpose):
    float32 linspace from 0 to span - 1, clamped to the snippet, truncated to int.
    """
    import torch

    fps = math.floor(source_fps)
    span = num_frames * sampling_rate * fps / target_fps
    pos = torch.linspace(0, span - 1, num_frames, device="cpu")  # float32, as HERO computes it
    return torch.clamp(pos, 0, snippet_frames - 1).long().numpy()


def slow_positions(num_fast: int = 32, alpha: int = 4) -> np.ndarray:
    """Slow pathway = fast[linspace(0, T-1, T // alpha).long()] = [0,4,8,13,17,22,26,31] for T=32."""
    import torch

    return torch.linspace(0, num_fast - 1, num_fast // alpha, device="cpu").long().numpy()


def hero_slowfast_plan(num_frames: int, source_fps: float, duration: float | None,
                       clip_len: float = 2, target_fps: int = 30) -> SnippetPlan:
    """HERO SlowFast snippets over `num_frames` frames already resampled to 30 fps (fps filter):
    pad to whole seconds by repeating the last frame, to whole snippets by repeating the last
    *second*, keep ceil(duration / clip_len) snippets, and take 32 fast frames from each snippet's start.

    `duration` is the stream duration; None or <= 0 keeps every snippet (HERO without ffprobe duration).
    """
    snippet = Fraction(str(clip_len))
    snippet_frames = snippet * target_fps
    if snippet_frames.denominator != 1:
        raise ValueError(f"clip_len {clip_len} s is not a whole number of frames at {target_fps} fps")
    snippet_frames = int(snippet_frames)
    fast = hero_fast_positions(source_fps, snippet_frames, target_fps)
    info = {"protocol": "hero", "clip_len": float(snippet), "target_fps": target_fps,
            "source_fps_floor": math.floor(source_fps), "fast_positions": fast.tolist()}
    if num_frames == 0:
        return SnippetPlan([], [], info)
    seq = np.arange(num_frames)
    seq = np.concatenate([seq, np.repeat(seq[-1:], -num_frames % target_fps)])
    seconds = seq.reshape(-1, target_fps)
    # HERO pads the seconds to a multiple of clip_len's numerator ("3/2" -> 3 s), then views snippets
    seconds = np.concatenate([seconds, np.repeat(seconds[-1:], -len(seconds) % snippet.numerator, axis=0)])
    snippets = seconds.reshape(-1, snippet_frames)
    if duration is not None and duration > 0:
        snippets = snippets[: math.ceil(duration / float(snippet))]
    # row k covers its clip_len window [k, k+1) * clip_len (clamped to the kept frames)
    rows = [np.array([[k * snippet_frames, (k + 1) * snippet_frames - 1]]) for k in range(len(snippets))]
    return SnippetPlan([c[fast] for c in snippets], rows, info)


# -- I3D (Inception) protocols ---------------------------------------------------------------------


def lgi_chunks(num_frames: int, chunk: int = 1600) -> list[tuple[int, int]]:
    """piergiaj's `extract_features.py`: the whole video in one pass, or above `chunk` frames
    [start, end) chunks with 48 frames of context before and 56 after (frames 0 and T-1 unused then)."""
    if num_frames <= chunk:
        return [(0, num_frames)]
    return [
        (max(1, start - 48), min(num_frames - 1, start + chunk + 56))
        for start in range(1, num_frames - 56, chunk)
    ]


def vslnet_windows(num_frames: int, window: int = 24) -> list[tuple[int, int]]:
    """VSLNet `extract_charades.py`: [start, end) windows every `window` frames; end is capped at
    T - 1 (the last frame is never used) and a short last window is moved left to full length."""
    out = []
    for start in range(0, num_frames, window):
        end = min(num_frames - 1, start + window)
        if end - start < window:
            start = max(0, end - window)
        out.append((start, end))
    return out


def i3d_steps(num_frames: int) -> int:
    """Features one InceptionI3d pass gives: ceil(T/8) - 1 (Mixed_5c + AvgPool3d([2,7,7]))."""
    return math.ceil(num_frames / 8) - 1


def i3d_plan(num_frames: int, protocol: str = "lgi", window: int = 24, chunk: int = 1600) -> SnippetPlan:
    """I3D passes over the kept (24 fps) frames. Row j of a pass starting at s covers frames
    [s + 8j, s + 8j + 16): its temporal extent at the [2,7,7] pool."""
    if protocol == "lgi":
        spans = lgi_chunks(num_frames, chunk)
    elif protocol == "vslnet":
        spans = vslnet_windows(num_frames, window)
    else:
        raise ValueError(f"unknown I3D protocol {protocol!r}; expected 'lgi' or 'vslnet'")
    if not spans or any(e - s <= 8 for s, e in spans):
        raise ValueError(
            f"video too short for I3D ({protocol}): {num_frames} kept frames; every pass needs more than 8"
        )
    snippets, rows = [], []
    for s, e in spans:
        snippets.append(np.arange(s, e))
        j = np.arange(i3d_steps(e - s))
        rows.append(np.stack([s + 8 * j, np.minimum(s + 8 * j + 15, e - 1)], axis=1))
    info = {"protocol": protocol}
    info.update({"window": window} if protocol == "vslnet" else {"chunk": chunk})
    return SnippetPlan(snippets, rows, info)


def windows_plan(num_frames: int, num_samples: int = 8, sampling_rate: int = 8) -> SnippetPlan:
    """pytorchvideo 8x8 models: non-overlapping windows of num_samples*sampling_rate kept frames,
    `num_samples` frames every `sampling_rate`; the tail window repeats the last frame."""
    span = num_samples * sampling_rate
    starts = range(0, num_frames, span)
    snippets = [np.minimum(s + sampling_rate * np.arange(num_samples), num_frames - 1) for s in starts]
    rows = [np.array([[s, min(s + span, num_frames) - 1]]) for s in starts]
    info = {"protocol": "windows", "num_frames": num_samples, "sampling_rate": sampling_rate}
    return SnippetPlan(snippets, rows, info)


# -- C3D protocols ---------------------------------------------------------------------------------


def strided_snippets(num_frames: int, length: int = 16, stride: int = 8, tail: str = "pad") -> list[int]:
    """Start frames of `length`-frame snippets every `stride` frames.

    tail="drop": full snippets only, (N - length) // stride + 1 (video_features / ViGA);
    tail="pad": a snippet at every stride step, ceil(N / stride), frames past the end repeat the last
    frame (one feature per 8 frames, as in the ActivityNet C3D release).
    """
    if tail == "drop":
        return list(range(0, num_frames - length + 1, stride))
    if tail == "pad":
        return list(range(0, num_frames, stride))
    raise ValueError(f"tail must be 'drop' or 'pad', got {tail!r}")


def tall_windows(num_frames: int, window: int, stride: int, trim: int = 0) -> list[int]:
    """TALL sliding windows as read by 2D-TAN (64/12, trim 0) and VSLNet/MESM (128/25, trim 16):
    (N - trim - window) // stride + 1 windows, window i starting at frame i*stride (0-based)."""
    count = (num_frames - trim - window) // stride + 1
    return [i * stride for i in range(max(count, 0))]


C3D_PROTOCOLS = {
    # name: (window frames, stride frames, trim frames); None for plain 16-frame snippets
    "clips16": None,
    "tall64": (64, 12, 0),
    "tall128": (128, 25, 16),
}


def c3d_plan(num_frames: int, protocol: str = "clips16", stride: int = 8, tail: str = "pad") -> SnippetPlan:
    """C3D passes over native frames. A TALL window is one pass of 64/128 frames that the
    extractor splits into 16-frame units and averages (fc mean over units)."""
    if protocol not in C3D_PROTOCOLS:
        raise ValueError(f"unknown C3D protocol {protocol!r}; expected one of {sorted(C3D_PROTOCOLS)}")
    if C3D_PROTOCOLS[protocol] is None:
        length, starts = 16, strided_snippets(num_frames, 16, stride, tail)
        info = {"protocol": protocol, "snippet": 16, "stride": stride, "tail": tail}
    else:
        length, wstride, trim = C3D_PROTOCOLS[protocol]
        starts = tall_windows(num_frames, length, wstride, trim)
        info = {"protocol": protocol, "window": length, "stride": wstride, "trim": trim,
                "pooling": "mean over non-overlapping 16-frame units"}
    if not starts:
        raise ValueError(f"video too short for C3D protocol {protocol!r}: {num_frames} frames")
    last = num_frames - 1
    snippets = [np.minimum(s + np.arange(length), last) for s in starts]
    rows = [np.array([[s, min(s + length - 1, last)]]) for s in starts]
    return SnippetPlan(snippets, rows, info)


# -- per-video facts ---------------------------------------------------------------------------------


def video_info_from_record(record: dict):
    """`VideoInfo` from a decode record (`pipeline.media.decode`: native_fps, stream_duration)."""
    return VideoInfo(record["video"], float(record["native_fps"] or 0.0), record.get("stream_duration"))


def video_info_from_frames(frames: np.ndarray):
    """Fallback while the extract runner does not pass `group(..., video=)`: the kept frames are a
    memory map of <store>/<protocol key>/<vid>.npy, and the decode record is <store>/videos/<vid>.json.
    None when the frames are not such a memory map (then the caller must pass `video`)."""
    base = frames
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    filename = getattr(base, "filename", None)
    if not filename:
        return None
    path = Path(filename)
    record = path.parent.parent / "videos" / f"{path.stem}.json"
    if not record.is_file():
        return None
    return video_info_from_record(json.loads(record.read_text()))


# -- units ------------------------------------------------------------------------------------------


class LazySnippets:
    """Units (T, F, H, W, 3) uint8 gathered from the kept frames only when indexed.

    Looks like a read-only array (shape, dtype, len, int/slice/array indexing, np.asarray), so a
    long video's snippets are materialised batch by batch, not all at once (bounded memory).
    `transform` maps uint8 (F, h, w, 3) frames to uint8 (F, H, W, 3) (resize/crop per snippet).
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, frames: np.ndarray, index: list[np.ndarray] | np.ndarray, transform=None):
        self.frames, self.transform = frames, transform
        self.index = np.asarray(index, np.int64).reshape(len(index), -1)
        probe = self._snippet(0) if len(self.index) else np.zeros((self.index.shape[1], 1, 1, 3), np.uint8)
        self.shape = (len(self.index), *probe.shape)
        self.ndim = len(self.shape)

    def _snippet(self, i: int) -> np.ndarray:
        import torch

        snippet = np.asarray(self.frames[self.index[i]])
        if self.transform is not None:
            snippet = self.transform(torch.from_numpy(np.ascontiguousarray(snippet))).numpy()
        return snippet

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._snippet(int(key))
        picks = np.arange(len(self))[key]
        if not len(picks):
            return np.zeros((0, *self.shape[1:]), np.uint8)
        return np.stack([self._snippet(int(i)) for i in picks])

    def __iter__(self):
        return (self._snippet(i) for i in range(len(self)))

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out.astype(dtype) if dtype is not None else out


def make_units(frames: np.ndarray, snippets: list[np.ndarray], transform=None):
    """LazySnippets when every pass has the same length, else a list of arrays (e.g. LGI chunks)."""
    if len({len(c) for c in snippets}) <= 1:
        return LazySnippets(frames, snippets if snippets else np.zeros((0, 1), np.int64), transform)
    lazy = [LazySnippets(frames, [c], transform) for c in snippets]
    return [u[0] for u in lazy]


# -- spatial transforms (uint8 RGB frames (T, H, W, 3) in, float tensors out) ----------------------


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of uint8 (T, H, W, 3) frames, back to uint8 like an 8-bit decoder output.

    antialias=True approximates swscale's bilinear (which widens its filter when downscaling);
    for upscaling it equals plain bilinear (cv2's INTER_LINEAR)."""
    import torch

    if frames.shape[1:3] == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def short_side_resize_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """HERO: short side to `size` (the other side int()-truncated), centre crop at int((W-size)/2)."""
    h, w = frames.shape[1:3]
    H, W = (int(h * size / w), size) if h >= w else (size, int(w * size / h))
    frames = _resize(frames, H, W)
    y, x = int((H - size) / 2), int((W - size) / 2)
    return frames[:, y : y + size, x : x + size]


def i3d_resize_crop(frames: torch.Tensor, min_side: int = 226, crop: int = 224) -> torch.Tensor:
    """piergiaj/VSLNet: upscale only if the short side is below 226, with the call their frame loader
    makes (`cv2.resize(img, dsize=(0, 0), fx=sc, fy=sc)`, bilinear on 8-bit frames), then centre crop
    224 at round((H-224)/2) (numpy rounding)."""
    import cv2
    import torch

    h, w = frames.shape[1:3]
    if min(h, w) < min_side:
        scale = 1 + (min_side - min(h, w)) / min(h, w)
        cv2.setNumThreads(1)  # extract parallelises across batches; same pixels either way
        scaled = [cv2.resize(np.ascontiguousarray(f), dsize=(0, 0), fx=scale, fy=scale) for f in frames.numpy()]
        frames = torch.from_numpy(np.stack(scaled))
        h, w = frames.shape[1:3]
    y, x = int(np.round((h - crop) / 2)), int(np.round((w - crop) / 2))
    return frames[:, y : y + crop, x : x + crop]


def center_crop(frames: torch.Tensor, crop: int) -> torch.Tensor:
    """(T, H, W, C) -> (T, crop, crop, C) at int((size - crop) / 2), as decode crops (Caffe: integer halves)."""
    h, w = frames.shape[1:3]
    y, x = (h - crop) // 2, (w - crop) // 2
    return frames[:, y : y + crop, x : x + crop]


def to_snippet_tensor(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in 0..255."""
    return frames.permute(3, 0, 1, 2).float()
