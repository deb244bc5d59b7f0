"""Frames without a frame store (issue 20, part 1): disk, memory and throughput of replaying decode's
plan (`decode.store_frames: none`) against the frame store (`all`).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_stream.py [--out stream.json]
        [--parts disk,rss,throughput] [--seconds 10] [--lengths 10,60,240] [--repeats 2] [--backend pyav]

Videos are generated here: 320 x 240 H.264 (x264 defaults: B-frames) at 30 fps, a moving gradient.

1. disk: bytes per video-second that `vmr decode` writes (frames + records) for every extractor's
   default protocol, with the frames stored (before) and replayed (after), and decode's wall time.
2. rss: peak RSS of an extract process (`ru_maxrss`) for SlowFast's protocol (30 fps, 224 x 224, 2 s
   snippets of 32 frames) on videos of `--lengths` seconds, replayed and from the store (a video
   shorter than 16 s does not fill one batch of 8 snippets: smaller batch tensors). The model is a
   stand-in (mean colour -> linear) so that the data path is what is measured: decode workers,
   queue, back-window, grouping, batches of 8 units. Also the peak of the largest decoder worker process
   (with `--backend decord` it grows with the video: decord 0.6's own buffers, ~0.5 MB per frame up
   to ~1.2 GB here; the worker ends with its video).
3. throughput: end-to-end `extract_videos` (replayed frames) against the model alone on the same units
   already in memory (same batch size), for CLIP ViT-B/32 and SlowFast R50 (random init, CPU, one
   torch thread); the goal is >= 0.8. CLIP from the store too.

Each timed side runs `--repeats` times and the best time counts. The machine may be shared: say so
when quoting the numbers (docs/features.md does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FEATURES = ["clip", "vgg", "slowfast", "i3d", "i3d_r50", "c3d"]


def make_video(path: Path, seconds: float, width: int = 320, height: int = 240, fps: int = 30) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        y, x = np.mgrid[0:height, 0:width]
        for i in range(int(seconds * fps)):
            img = np.stack([(x + 3 * i) % 256, (y + i) % 256, np.full_like(x, (7 * i) % 256)], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def extractor(name: str, **config):
    from extractors import EXTRACTORS

    cls = EXTRACTORS.get(name)
    return cls(cls.Config(device="cpu", **config))


def folder_bytes(root: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in root.rglob(pattern) if f.is_file())


# -- 1. disk -------------------------------------------------------------------------------------------


def bench_disk(work: Path, seconds: float, backend: str) -> dict:
    from pipeline.media.decode import decode_all, list_videos

    vdir = work / "disk_videos"
    vdir.mkdir()
    for i in range(2):
        make_video(vdir / f"v{i}.mp4", seconds)
    videos = list_videos(vdir)
    total = 2 * seconds
    out = {"videos": f"2 x {seconds:g} s, 320x240, 30 fps H.264"}
    for name in FEATURES:
        proto = extractor(name).protocol()
        row = {"protocol": proto.key}
        for policy in ("all", "none"):
            store = work / f"store-{name}-{policy}"
            t0 = time.perf_counter()
            summary = decode_all(videos, store, [proto], workers=1, timeout_s=600, store_frames=policy,
                                 backend=backend)
            row[f"decode_s_{policy}"] = round(time.perf_counter() - t0, 2)
            assert not summary.failed, summary.failed
            row[f"bytes_per_video_s_{policy}"] = round(folder_bytes(store) / total)
            row[f"frame_bytes_per_video_s_{policy}"] = round(folder_bytes(store, "*.npy") / total)
            shutil.rmtree(store)
        out[name] = row
    return out


# -- 2. rss ----------------------------------------------------------------------------------------------


def standin(name: str):
    """The extractor's protocol, grouping and batch size, with a model that costs nothing."""
    import torch

    base = type(extractor(name))

    class StandIn(base):
        def build_model(self):
            torch.manual_seed(0)
            return torch.nn.Linear(3, self.dim)

        def preprocess(self, units):
            return units.float().flatten(1, -2).mean(1)  # (B, 3) mean colour

        def embed(self, model, x):
            return model(x)

    return StandIn(StandIn.Config(device="cpu"))


class DescendantPeak:
    """Peak RSS (VmHWM) of every descendant process of this one (decoder workers are children of the
    fork server, itself our child), sampled from /proc every 0.1 s in a thread (Linux)."""

    def __init__(self):
        import threading

        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _descendants(root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        out, todo = [], [root]
        while todo:
            kids = children.get(todo.pop(), [])
            out += kids
            todo += kids
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for pid in self._descendants(os.getpid()):
                try:
                    text = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kib = max(self.peak_kib, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_kib / 1024, 1)


def rss_child(video: str, mode: str, work: str, backend: str) -> None:
    """One extract process (prints JSON): decode one video (frames stored or not), then extract it."""
    import torch

    from pipeline.media.decode import decode_all, list_videos
    from pipeline.media.extract import extract_videos
    from pipeline.media.framestore import FrameStore
    from pipeline.media.replay import ReplaySource

    torch.set_num_threads(1)
    ex = standin("slowfast")
    vdir = Path(video).parent
    decode_all(list_videos(vdir), Path(work) / "frames", [ex.protocol()], workers=1, timeout_s=600, backend=backend,
               store_frames="all" if mode == "store" else "none")
    store = FrameStore(Path(work) / "frames")
    source = store if mode == "store" else ReplaySource(store, vdir, timeout_s=600)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = store.video_ids()
    workers = DescendantPeak()
    summary = extract_videos(ex, ex.build_model().eval(), torch.device("cpu"), source, ids, Path(work) / "npy", "random")
    assert summary.computed == len(ids) and not summary.failed
    print(json.dumps({
        "rss_before_extract_mib": round(base / 1024, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_worker_rss_mib": workers.stop(),  # the largest decoder worker (and fork server)
        "frames_on_disk_mib": round(folder_bytes(Path(work) / "frames", "*.npy") / 2**20, 1),
    }))


def bench_rss(work: Path, lengths: list[float], backend: str) -> dict:
    out = {"feature": "slowfast protocol (30 fps, 224 x 224, 2 s snippets), stand-in model, batch 8",
           "backend": backend}
    for seconds in lengths:
        label = f"video_{seconds:g}s"
        vdir = work / f"rss_{label}"
        vdir.mkdir()
        video = make_video(vdir / "v.mp4", seconds)
        for mode in ("replay", "store"):
            run = work / f"rss_{label}_{mode}"
            res = subprocess.run([sys.executable, __file__, "--rss-child", str(video), mode, str(run), backend],
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if res.returncode:
                raise RuntimeError(res.stderr[-2000:])
            out[f"{label}_{mode}"] = json.loads(res.stdout.strip().splitlines()[-1])
            shutil.rmtree(run)
    return out


# -- 3. throughput -------------------------------------------------------------------------------------


def bench_throughput(work: Path, seconds: float, repeats: int, slowfast_seconds: float, backend: str) -> dict:
    import torch

    from pipeline.media.decode import decode_all, list_videos
    from pipeline.media.extract import _as_array, _materialize, extract_videos, video_units
    from pipeline.media.framestore import FrameStore
    from pipeline.media.replay import ReplaySource

    torch.set_num_threads(1)
    out = {"torch_threads": 1}
    for name, secs, stores in (("clip", seconds, ("none", "all")), ("slowfast", slowfast_seconds, ("none",))):
        vdir = work / f"tp_{name}"
        vdir.mkdir()
        for i in range(2):
            make_video(vdir / f"v{i}.mp4", secs)
        ex = extractor(name)
        torch.manual_seed(0)
        model = ex.build_model().eval()
        row = {"videos": f"2 x {secs:g} s", "batch_size": ex.config.batch_size}
        for policy in stores:
            store = FrameStore(work / f"tp_{name}_{policy}")
            decode_all(list_videos(vdir), store.root, [ex.protocol()], workers=1, timeout_s=600, store_frames=policy,
                       backend=backend)
            source = store if policy == "all" else ReplaySource(store, vdir, timeout_s=600)
            ids = store.video_ids()
            units = np.concatenate([_as_array(_materialize(video_units(source, ex, v)[0][:])) for v in ids])

            def model_only(units=units, ex=ex, model=model):
                step = ex.config.batch_size
                with torch.inference_mode():
                    for i in range(0, len(units), step):
                        ex.embed(model, ex.preprocess(torch.from_numpy(units[i : i + step])))

            best_model = best_e2e = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                model_only()
                best_model = min(best_model, time.perf_counter() - t0)
                shutil.rmtree(work / "npy", ignore_errors=True)
                t0 = time.perf_counter()
                extract_videos(ex, model, torch.device("cpu"), source, ids, work / "npy", "random", ids)
                best_e2e = min(best_e2e, time.perf_counter() - t0)
            row["units"] = int(len(units))
            row[f"model_only_units_per_s_{policy}"] = round(len(units) / best_model, 2)
            row[f"end_to_end_units_per_s_{policy}"] = round(len(units) / best_e2e, 2)
            row[f"ratio_{policy}"] = round(best_model / best_e2e, 3)
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="disk,rss,throughput")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the disk / CLIP videos")
    ap.add_argument("--lengths", default="10,60,240", help="video lengths (s) for the RSS part")
    ap.add_argument("--slowfast-seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backend", default="pyav", choices=["pyav", "decord"], help="decode.backend")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rss-child", nargs=4, metavar=("VIDEO", "MODE", "WORK", "BACKEND"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    parts = args.parts.split(",")
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "load_avg_1min": round(os.getloadavg()[0], 2)},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        work = Path(tmp)
        if "disk" in parts:
            result["disk"] = bench_disk(work, args.seconds, args.backend)
            print(json.dumps(result["disk"], indent=1), flush=True)
        if "rss" in parts:
            result["rss"] = bench_rss(work, [float(x) for x in args.lengths.split(",")], args.backend)
            print(json.dumps(result["rss"], indent=1), flush=True)
        if "throughput" in parts:
            result["throughput"] = bench_throughput(work, args.seconds, args.repeats, args.slowfast_seconds, args.backend)
            print(json.dumps(result["throughput"], indent=1), flush=True)
    result["machine"]["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
