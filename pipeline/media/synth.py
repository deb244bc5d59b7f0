"""The synthetic default dataset: real H.264 videos of shapes performing timed, captioned events.

Every video shows 1-3 shapes (circle, square, triangle; distinct colour+shape pairs) on a textured,
slightly noisy background. Each performs timed events one after another (move left/right/up/down,
grow, shrink, change colour, appear, disappear), never overlapping, so every caption ("the red
circle moves to the left") has exactly one ground-truth moment. A video-level caption (the event
captions joined with "then") serves text-video retrieval.

Everything is written in the real Charades-STA formats so the real parsers read it:
    videos/<vid>.mp4                      H.264 yuv420p, written with PyAV (libx264, 1 thread)
    annotations/charades_sta_{split}.txt  `VID start end##sentence` (seconds, one decimal)
    annotations/Charades_v1_{split}.csv   Charades columns; `length` = duration in seconds
    annotations/video_captions.json       {vid: video-level caption}
    manifest.json                         what was intended: fps, frames, duration, events
    glove.synthetic.<dim>d.txt            GloVe text format, seeded random vectors (NOT real GloVe)

Deterministic for a seed: same seed, same bytes (x264 runs single-threaded, without mbtree).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing
import shutil
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.core.progress import track

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
EVENT_KINDS = ("left", "right", "up", "down", "grow", "shrink", "recolour", "appear", "disappear")
CHARADES_COLUMNS = (
    "id", "subject", "scene", "quality", "relevance", "verified",
    "script", "objects", "descriptions", "actions", "length",
)
# Extra words so the synthetic GloVe vocabulary is not exactly the caption vocabulary.
FILLER_WORDS = ("a", "video", "where", "then", "and", "object", "shape", "person", "moves", "left")


@dataclass
class SynthConfig:
    seed: int = 0
    num_train: int = 64
    num_test: int = 16
    fps: float = 30.0
    width: int = 320
    height: int = 240
    min_duration: float = 10.0
    max_duration: float = 30.0
    min_events: int = 2
    max_events: int = 4
    glove_dim: int = 300


@dataclass
class Event:
    shape_index: int
    kind: str
    start: float  # seconds, one decimal (the annotation's resolution)
    end: float
    caption: str
    new_colour: str | None = None


@dataclass
class ShapeState:
    shape: str
    colour: str
    x: float  # centre, pixels
    y: float
    size: float  # radius-like half extent, pixels
    visible: bool


@dataclass
class VideoPlan:
    vid: str
    split: str
    fps: float
    num_frames: int
    width: int
    height: int
    shapes: list[ShapeState]
    events: list[Event] = field(default_factory=list)
    background_seed: int = 0

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    @property
    def video_caption(self) -> str:
        return " then ".join(e.caption for e in self.events)


# -- planning --------------------------------------------------------------------------------------


def video_ids(cfg: SynthConfig) -> list[tuple[str, str]]:
    """(vid, split) pairs; 5-character ids like Charades (`S0000`, ...)."""
    n = cfg.num_train + cfg.num_test
    return [(f"S{i:04d}", "train" if i < cfg.num_train else "test") for i in range(n)]


def plan_video(cfg: SynthConfig, vid: str, split: str, index: int) -> VideoPlan:
    rng = np.random.default_rng([cfg.seed, index])
    num_frames = int(round(rng.uniform(cfg.min_duration, cfg.max_duration) * cfg.fps))
    w, h = cfg.width, cfg.height
    n_shapes = int(rng.integers(1, 4))
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    chosen = rng.choice(len(pairs), size=n_shapes, replace=False)
    shapes = []
    for k, pair_idx in enumerate(chosen):
        shape, colour = pairs[pair_idx]
        # spread shapes horizontally so they rarely overlap
        x = (k + 0.5) * w / n_shapes + rng.uniform(-0.05, 0.05) * w
        y = rng.uniform(0.35, 0.65) * h
        shapes.append(ShapeState(shape, colour, x, y, rng.uniform(0.07, 0.10) * h, True))
    plan = VideoPlan(vid, split, cfg.fps, num_frames, w, h, shapes,
                     background_seed=int(rng.integers(2**31)))
    _plan_events(plan, cfg, rng)
    return plan


def _plan_events(plan: VideoPlan, cfg: SynthConfig, rng: np.random.Generator) -> None:
    n_events = int(rng.integers(cfg.min_events, cfg.max_events + 1))
    duration = plan.duration
    slot = (duration - 1.0) / n_events  # keep 0.5 s free at both ends
    state = [ShapeState(**asdict(s)) for s in plan.shapes]
    # A shape whose first event is "appear" starts invisible: decide that up front.
    for k in range(n_events):
        lo = 0.5 + k * slot
        length = float(rng.uniform(min(1.5, slot * 0.8), min(6.0, slot * 0.8)))
        start = round(float(rng.uniform(lo, lo + slot - length)), 1)
        end = round(min(start + length, lo + slot), 1)
        if end - start < 1.0:
            end = round(start + 1.0, 1)
        for _ in range(50):  # rejection-sample an event valid for the current state
            idx = int(rng.integers(len(state)))
            kind = EVENT_KINDS[int(rng.integers(len(EVENT_KINDS)))]
            event = _make_event(plan, state, idx, kind, start, end, rng, last=(k == n_events - 1))
            if event is not None:
                plan.events.append(event)
                break
        else:
            raise RuntimeError(f"{plan.vid}: could not plan event {k}")


def _make_event(plan, state, idx, kind, start, end, rng, last: bool) -> Event | None:
    s = state[idx]
    w, h = plan.width, plan.height
    step = 0.25 * w if kind in ("left", "right") else 0.22 * h
    name = f"the {s.colour} {s.shape}"
    if kind == "appear":
        # Only a shape with no earlier event may appear: it is then hidden from the video's start.
        if _used(plan, idx):
            return None
        plan.shapes[idx].visible = False
        s.visible = True
        return Event(idx, kind, start, end, f"{name} appears")
    if not s.visible:
        return None
    if kind == "disappear":
        if not last:  # a vanished shape can do nothing more: only the last event may hide one
            return None
        s.visible = False
        return Event(idx, kind, start, end, f"{name} disappears")
    if kind in ("left", "right"):
        nx = s.x - step if kind == "left" else s.x + step
        if not (s.size * 1.2 <= nx <= w - s.size * 1.2):
            return None
        s.x = nx
        return Event(idx, kind, start, end, f"{name} moves to the {kind}")
    if kind in ("up", "down"):
        ny = s.y - step if kind == "up" else s.y + step
        if not (s.size * 1.2 <= ny <= h - s.size * 1.2):
            return None
        s.y = ny
        return Event(idx, kind, start, end, f"{name} moves {kind}")
    if kind == "grow":
        if s.size * 1.6 > 0.2 * h:
            return None
        s.size *= 1.6
        return Event(idx, kind, start, end, f"{name} grows bigger")
    if kind == "shrink":
        if s.size / 1.6 < 0.04 * h:
            return None
        s.size /= 1.6
        return Event(idx, kind, start, end, f"{name} shrinks")
    if kind == "recolour":
        taken = {(o.shape, o.colour) for o in state}
        options = [c for c in COLOURS if (s.shape, c) not in taken]
        new = options[int(rng.integers(len(options)))]
        s.colour = new
        return Event(idx, kind, start, end, f"{name} turns {new}", new_colour=new)
    raise ValueError(kind)


def _used(plan: VideoPlan, idx: int) -> bool:
    return any(e.shape_index == idx for e in plan.events)


# -- rendering -------------------------------------------------------------------------------------


def shape_states_at(plan: VideoPlan, t: float) -> list[tuple[ShapeState, float, tuple[float, ...]]]:
    """State of every shape at time t: (state, opacity, rgb), interpolating running events."""
    out = []
    for idx, base in enumerate(plan.shapes):
        s = ShapeState(**asdict(base))
        rgb = np.array(COLOURS[s.colour], dtype=float)
        alpha = 1.0 if s.visible else 0.0
        for e in plan.events:
            if e.shape_index != idx or t < e.start:
                continue
            a = min(1.0, (t - e.start) / max(e.end - e.start, 1e-6))  # progress through the event
            step_x, step_y = 0.25 * plan.width, 0.22 * plan.height
            if e.kind == "left":
                s.x -= step_x * a
            elif e.kind == "right":
                s.x += step_x * a
            elif e.kind == "up":
                s.y -= step_y * a
            elif e.kind == "down":
                s.y += step_y * a
            elif e.kind == "grow":
                s.size *= 1.6**a
            elif e.kind == "shrink":
                s.size /= 1.6**a
            elif e.kind == "recolour":
                rgb = (1 - a) * rgb + a * np.array(COLOURS[e.new_colour], dtype=float)
                if a >= 1.0:
                    s.colour = e.new_colour
            elif e.kind == "appear":
                alpha = a
            elif e.kind == "disappear":
                alpha = 1.0 - a
        out.append((s, alpha, tuple(rgb)))
    return out


def _background(plan: VideoPlan) -> np.ndarray:
    rng = np.random.default_rng(plan.background_seed)
    fx, fy, phase = rng.uniform(0.02, 0.08), rng.uniform(0.02, 0.08), rng.uniform(0, 6.28)
    # Transcendentals from Python's scalar libm on 1-D tables: numpy's SIMD sin/cos may round the
    # last bit differently depending on buffer alignment, and the videos' bytes must not.
    xs, ys = range(plan.width), range(plan.height)
    sin_x = np.array([math.sin(fx * x + phase) for x in xs])
    cos_y = np.array([math.cos(fy * y) for y in ys])
    diag = np.array([math.sin(0.3 * d) for d in range(plan.width + plan.height)])
    yy, xx = np.mgrid[0 : plan.height, 0 : plan.width]
    texture = 0.5 + 0.25 * cos_y[:, None] * sin_x[None, :] + 0.1 * diag[xx + yy]
    tint = rng.uniform(60, 120, size=3)
    return np.clip(texture[..., None] * tint[None, None, :], 0, 255).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)  # float64: see _shape_mask
    return yy, xx


def _shape_mask(shape: str, x: float, y: float, r: float, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    if shape == "circle":
        # explicit products: numpy's float32 `** 2` rounded differently with buffer alignment,
        # which flipped edge pixels between runs
        dx, dy = xx - x, yy - y
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(xx - x) <= r) & (np.abs(yy - y) <= r)
    # upright triangle inside the square of half-size r
    rel_y = (yy - (y - r)) / (2 * r)  # 0 at apex, 1 at base
    return (rel_y >= 0) & (rel_y <= 1) & (np.abs(xx - x) <= rel_y * r)


def noise_bank(plan: VideoPlan, size: int = 8) -> np.ndarray:
    """A few frames of mild sensor noise, drawn once per video (drawing per frame dominated runtime)."""
    rng = np.random.default_rng(plan.background_seed + 1)
    return rng.normal(0, 4.0, size=(size, plan.height, plan.width, 3)).astype(np.float32)


def render_frame(plan: VideoPlan, index: int, background: np.ndarray, noise: np.ndarray) -> np.ndarray:
    t = index / plan.fps
    img = background.copy()
    yy, xx = _grid(plan.height, plan.width)
    for s, alpha, rgb in shape_states_at(plan, t):
        if alpha <= 0:
            continue
        m = _shape_mask(s.shape, s.x, s.y, s.size, xx, yy)
        img[m] = (1 - alpha) * img[m] + alpha * np.asarray(rgb, dtype=np.float32)
    img += noise[(index * 5) % len(noise)]  # cycle the bank in an order without short repeats
    return np.clip(img, 0, 255).astype(np.uint8)


def rgb_to_yuv420p(img: np.ndarray) -> np.ndarray:
    """BT.601 limited-range RGB -> planar YUV 4:2:0, as (H * 3/2, W) uint8 for PyAV.

    Done here rather than by swscale because swscale's SIMD paths depend on buffer alignment,
    which made the same frames encode to different bytes from run to run.
    """
    # float64 and explicit sums: numpy's SIMD reductions and float32 maths can round differently
    # depending on buffer alignment, and the bytes of the videos must not depend on that.
    rgb = img.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape

    def half(c: np.ndarray) -> np.ndarray:  # 2x2 box average = 4:2:0 subsampling
        return (c[0::2, 0::2] + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2]) / 4

    planes = [y.ravel(), half(cb).ravel(), half(cr).ravel()]
    out = np.concatenate(planes)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_video(plan: VideoPlan, path: Path) -> None:
    import av

    rate = Fraction(plan.fps).limit_denominator(1001)
    background = _background(plan)
    noise = noise_bank(plan)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = plan.width, plan.height, "yuv420p"
        # Bit-exact output across runs: one thread, and no macroblock-tree rate control (x264's mbtree
        # carries state that made about one video in 40 encode to other bytes from run to run).
        stream.options = {"crf": "20", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        for i in range(plan.num_frames):
            yuv = rgb_to_yuv420p(render_frame(plan, i, background, noise))
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# -- annotation files ------------------------------------------------------------------------------


def sta_lines(plans: list[VideoPlan]) -> str:
    return "".join(f"{p.vid} {e.start:.1f} {e.end:.1f}##{e.caption}.\n" for p in plans for e in p.events)


def charades_csv(plans: list[VideoPlan]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CHARADES_COLUMNS)
    for p in plans:
        objects = ";".join(sorted({s.shape for s in p.shapes}))
        writer.writerow([p.vid, "SYN", "Synthetic", 7, 7, "Yes", p.video_caption + ".",
                         objects, p.video_caption + ".", "", f"{p.duration:.2f}"])
    return buf.getvalue()


def glove_text(words: list[str], dim: int, seed: int) -> str:
    rng = np.random.default_rng([seed, 7])
    lines = []
    for w in words:
        vec = rng.normal(0, 0.4, size=dim)
        lines.append(w + " " + " ".join(f"{v:.5f}" for v in vec))
    return "\n".join(lines) + "\n"


def caption_words(plans: list[VideoPlan]) -> list[str]:
    words = {w.strip(".").lower() for p in plans for e in p.events for w in e.caption.split()}
    return sorted(words | set(FILLER_WORDS) | set(COLOURS) | set(SHAPES))


# -- the whole dataset -----------------------------------------------------------------------------


def _write_job(job: tuple[VideoPlan, Path]) -> None:
    write_video(*job)


def generate(cfg: SynthConfig, out_dir: str | Path, workers: int = 2) -> dict:
    """Write the dataset into `out_dir` (replaced atomically: built in a sibling temp dir)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "videos").mkdir(parents=True)
    (tmp / "annotations").mkdir()
    plans = [plan_video(cfg, vid, split, i) for i, (vid, split) in enumerate(video_ids(cfg))]
    # Videos are rendered in parallel, one fresh process each (both cores). The frames are bit-exact
    # from run to run; x264 inside PyAV is not always (it carried state from one encode to the next
    # in a process, and even fresh processes now and then produce other bytes), so the synth stage
    # is marked non-deterministic in dvc.yaml and the lineage check compares what follows it.
    ctx = multiprocessing.get_context("spawn")
    jobs = [(p, tmp / "videos" / f"{p.vid}.mp4") for p in plans]
    with ctx.Pool(processes=workers, maxtasksperchild=1) as pool:
        for _ in track(pool.imap_unordered(_write_job, jobs), "Rendering synthetic videos", total=len(jobs)):
            pass
    for split in ("train", "test"):
        part = [p for p in plans if p.split == split]
        (tmp / "annotations" / f"charades_sta_{split}.txt").write_text(sta_lines(part))
        (tmp / "annotations" / f"Charades_v1_{split}.csv").write_text(charades_csv(part))
    captions = {p.vid: p.video_caption for p in plans}
    (tmp / "annotations" / "video_captions.json").write_text(json.dumps(captions, indent=1, sort_keys=True) + "\n")
    manifest = {
        "config": asdict(cfg),
        "videos": {
            p.vid: {
                "split": p.split, "fps": p.fps, "num_frames": p.num_frames, "duration": p.duration,
                "width": p.width, "height": p.height,
                "events": [asdict(e) for e in p.events],
            }
            for p in plans
        },
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    (tmp / f"glove.synthetic.{cfg.glove_dim}d.txt").write_text(
        glove_text(caption_words(plans), cfg.glove_dim, cfg.seed)
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return manifest
