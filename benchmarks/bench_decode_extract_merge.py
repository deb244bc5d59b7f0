"""Throughput of decode, extract and merge against the plain library doing the same work.

    .venv/bin/python benchmarks/bench_decode_extract_merge.py [--videos data/synth/videos] [--limit 16]

1. decode: source frames/s per core of `pipeline.media.decode.decode_all` (1 worker process, replaced every
   `--recycle-after` videos as `vmr decode` does: probe, timestamps + selected frames, resize/crop,
   .npy + record writes), for each backend, vs a plain single-threaded PyAV loop that decodes every
   frame of the same files. Target ratio >= 0.9. Wall-time and CPU-time ratios are both reported.
2. extract: CLIP ViT-B/32 (random init) end to end over the frame store (`extract_videos`: load,
   batch across videos, forward, write) vs the model alone on the same frames already in memory,
   with the same batch size. Target ratio >= 0.8.
3. merge: MB/s of `merge_to_hdf5` (with its checks) vs a plain h5py loop writing the same .npy files
   (seeded random (T, 2048) float32 files, T in 10..49). Target ratio >= 1.0.

Each side runs `--repeats` times alternately and the best time counts (the machine is shared).
Prints a table and writes the numbers as JSON (`--out`); docs/features.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def pyav_full_decode(paths: list[Path]) -> int:
    """The decoder's own speed: every frame of every file, one thread, no conversion to RGB."""
    import av

    frames = 0
    for p in paths:
        with av.open(str(p)) as c:
            stream = c.streams.video[0]
            stream.codec_context.thread_count = 1
            for _ in c.decode(stream):
                frames += 1
    return frames


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished (joined) child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def stop_fork_server() -> None:
    """Stop (and reap) multiprocessing's fork server, which `decode_all` starts its workers from.

    The workers are the server's children, not ours: their CPU time reaches RUSAGE_CHILDREN only once
    the server has exited and been reaped. Each timed run then also pays for a fresh server, as a
    `vmr decode` run does. (`_stop` is private CPython API, used by its own tests; 3.8-3.13.)
    """
    import multiprocessing.forkserver

    stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)
    if stop is None:
        print("warning: cannot stop the fork server: the decode workers' CPU time is not counted")
        return
    stop()


def bench_decode(
    videos: dict[str, Path], protocols, work: Path, repeats: int, backends: list[str], recycle_after: int
) -> dict:
    from pipeline.media.decode import decode_all
    from pipeline.media.framestore import FrameStore

    paths = list(videos.values())
    best = {name: float("inf") for name in ["pyav_full_decode", *backends]}
    # CPU seconds too (this process + its reaped worker processes): on a loaded shared machine wall
    # time also counts waiting for a core, CPU time only the work, which is what "per core" means.
    best_cpu = dict(best)
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), cpu_seconds()
        frames = pyav_full_decode(paths)
        best["pyav_full_decode"] = min(best["pyav_full_decode"], time.perf_counter() - t0)
        best_cpu["pyav_full_decode"] = min(best_cpu["pyav_full_decode"], cpu_seconds() - c0)
        for backend in backends:
            shutil.rmtree(work / "frames", ignore_errors=True)
            t0, c0 = time.perf_counter(), cpu_seconds()
            decode_all(videos, work / "frames", protocols, workers=1, timeout_s=600, recycle_after=recycle_after,
                       backend=backend)
            stop_fork_server()
            best[backend] = min(best[backend], time.perf_counter() - t0)
            best_cpu[backend] = min(best_cpu[backend], cpu_seconds() - c0)
    store = FrameStore(work / "frames")
    decoded = sum(store.read_record(v)["num_frames"] for v in videos)
    assert decoded == frames, f"vmr saw {decoded} frames, PyAV {frames}"
    seconds = sum(store.read_record(v)["duration"] for v in videos)
    stored = sum(f.stat().st_size for f in (work / "frames").rglob("*.npy"))
    out = {
        "videos": len(paths),
        "recycle_after": recycle_after,
        "source_frames": frames,
        "video_seconds": round(seconds, 2),
        "pyav_full_decode_fps_per_core": round(frames / best["pyav_full_decode"], 1),
        "store_bytes_per_video_second": round(stored / seconds),
    }
    for backend in backends:
        out[f"vmr_{backend}_fps_per_core"] = round(frames / best[backend], 1)
        out[f"vmr_{backend}_ratio"] = round(best["pyav_full_decode"] / best[backend], 3)
        out[f"vmr_{backend}_cpu_ratio"] = round(best_cpu["pyav_full_decode"] / best_cpu[backend], 3)
    return out


def bench_extract(work: Path, device: str, threads: int, batch_size: int, repeats: int, limit: int) -> dict:
    import torch

    from extractors.clip import ClipExtractor
    from pipeline.media.extract import extract_videos, resolve_device
    from pipeline.media.framestore import FrameStore

    if threads:
        torch.set_num_threads(threads)
    ex = ClipExtractor(ClipExtractor.Config(batch_size=batch_size, device=device))
    dev = resolve_device(device)
    model = ex.to_device(ex.build_model().eval(), dev)
    store = FrameStore(work / "frames")
    key = ex.protocol().key
    ids = store.video_ids(key)[: limit or None]
    frames = np.concatenate([np.asarray(store.load(v, key).frames) for v in ids])

    def model_only() -> None:
        with torch.inference_mode():
            for i in range(0, len(frames), batch_size):
                x = torch.from_numpy(frames[i : i + batch_size]).to(dev)
                with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                    ex.embed(model, ex.preprocess(x)).float().cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    model_only()  # warm-up (allocator, kernels)
    best_model = best_e2e = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model_only()
        best_model = min(best_model, time.perf_counter() - t0)
        shutil.rmtree(work / "npy", ignore_errors=True)
        t0 = time.perf_counter()
        extract_videos(ex, model, dev, store, ids, work / "npy", "random", ids)
        best_e2e = min(best_e2e, time.perf_counter() - t0)
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "videos": len(ids),
        "frames": int(len(frames)),
        "model_only_frames_per_s": round(len(frames) / best_model, 2),
        "end_to_end_frames_per_s": round(len(frames) / best_e2e, 2),
        "end_to_end_videos_per_s": round(len(ids) / best_e2e, 3),
        "ratio": round(best_model / best_e2e, 3),
    }


def bench_merge(work: Path, repeats: int, videos: int, dim: int) -> dict:
    import h5py

    from pipeline.media.h5merge import merge_to_hdf5

    # per-video (T, dim) float32 files, T like Charades at 1 feature/s (seeded, so runs compare)
    src = work / "merge_src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(videos):
        np.save(src / f"vid{i:05d}.npy", rng.standard_normal((int(rng.integers(10, 50)), dim), dtype=np.float32))
    files = sorted(src.glob("*.npy"))
    nbytes = sum(np.load(f, mmap_mode="r").nbytes for f in files)

    def plain(out: Path) -> None:
        with h5py.File(out, "w") as h5:
            for f in files:
                h5.create_dataset(f.stem, data=np.load(f))

    best_plain = best_ours = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain(work / "plain.h5")
        best_plain = min(best_plain, time.perf_counter() - t0)
        t0 = time.perf_counter()
        merge_to_hdf5(src, work / "ours.h5", provenance={"benchmark": True})
        best_ours = min(best_ours, time.perf_counter() - t0)
    mb = nbytes / 1e6
    return {
        "files": len(files),
        "megabytes": round(mb, 1),
        "h5py_loop_mb_per_s": round(mb / best_plain, 1),
        "vmr_merge_mb_per_s": round(mb / best_ours, 1),
        "ratio": round(best_plain / best_ours, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", default="data/synth/videos")
    ap.add_argument("--limit", type=int, default=0, help="decode the first N videos (sorted ids); 0 = all")
    ap.add_argument("--extract-videos", type=int, default=8, help="extract from the first N decoded videos")
    ap.add_argument("--backends", nargs="+", default=["decord", "pyav"], choices=["decord", "pyav"])
    ap.add_argument("--recycle-after", type=int, default=32, help="videos per decode worker (decode.recycle_after)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the model (0 = default)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--merge-videos", type=int, default=400)
    ap.add_argument("--merge-dim", type=int, default=2048)
    ap.add_argument("--skip", nargs="*", default=[], choices=["decode", "extract", "merge"])
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    from extractors.clip import ClipExtractor
    from pipeline.media.decode import decode_all, list_videos

    videos = {} if {"decode", "extract"} <= set(args.skip) else list_videos(args.videos)  # merge needs none
    if args.limit:
        videos = dict(list(videos.items())[: args.limit])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vmr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    protocols = [ClipExtractor().protocol()]
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "videos_dir": args.videos,
                     "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    if "decode" not in args.skip:
        results["decode"] = bench_decode(videos, protocols, work, args.repeats, args.backends, args.recycle_after)
    elif videos and not (work / "frames" / "manifest.json").exists():
        decode_all(videos, work / "frames", protocols, workers=2)
    if "extract" not in args.skip:
        results["extract"] = bench_extract(
            work, args.device, args.threads, args.batch_size, args.repeats, args.extract_videos
        )
    if "merge" not in args.skip:  # cheap: more repeats
        results["merge"] = bench_merge(work, max(args.repeats, 5), args.merge_videos, args.merge_dim)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    if "decode" in results:
        d = results["decode"]
        print(f"decode ratio vs plain PyAV full decode (target >= 0.9), {d['videos']} videos, best of {args.repeats}:")
        for backend in args.backends:
            print(f"  {backend:6s}  wall {d[f'vmr_{backend}_ratio']:.3f}  CPU {d[f'vmr_{backend}_cpu_ratio']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
