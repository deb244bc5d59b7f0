"""Whole processes, side by side with v-iashin/video_features: CLIP ViT-B/32 features at 1 fps.

Both tools get the same videos and the same weights (a seeded random CLIP ViT-B/32 saved in OpenAI's
format: a state dict of fp16 tensors with both towers, which video_features' vendored `clip.load`
reads as `model_name=custom`) and run on the CPU with the same threads. Timed: the wall time of the
processes a user starts, from nothing to features on disk.
    vmr:            `vmr decode` + `vmr extract --feature clip` (weights set in a params file)
    video_features: `python main.py feature_type=clip model_name=custom extraction_fps=1 ...`
Workloads: `short`: 4 videos of 15-16 s (62 frames at 1 fps); `long`: one 10-minute video. Runs
alternate (vmr, video_features, vmr, ...) and the best of `--repeats` counts for each side; every
run starts from empty output folders (both tools skip videos already done).

Set-up, once (video_features in its own virtual environment; nothing of it goes into vmr's):
    git clone https://github.com/v-iashin/video_features /tmp/video_features
    python3 -m venv /tmp/vf-venv
    /tmp/vf-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 omegaconf tqdm ftfy regex \
        opencv-python-headless
Run (from the repository root; ffmpeg on PATH, which both tools use):
    .venv/bin/python benchmarks/bench_video_features.py --video-features /tmp/video_features \
        --python /tmp/vf-venv/bin/python [--workloads short long] [--repeats 3] [--threads 2] [--out r.json]
The checkpoint is written to <video-features>/models/clip/checkpoints/CLIP-custom.pth, the one path
its `custom` model reads. Prints a table and writes the numbers as JSON; docs/features.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's vmr, whatever is installed
WORKLOADS = {  # name -> durations (s) of the generated videos
    "short": [15.0, 15.0, 16.0, 16.0],  # 62 frames at 1 fps
    "long": [600.0],  # 10 minutes
}


def make_videos(folder: Path, durations: list[float]) -> list[Path]:
    """H.264 640x360 30 fps test-pattern videos (ffmpeg's testsrc2: moving, so frames differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seconds in enumerate(durations):
        path = folder / f"video{i}.mp4"
        if not path.exists():
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                            f"testsrc2=size=640x360:rate=30:duration={seconds}", "-c:v", "libx264",
                            "-pix_fmt", "yuv420p", str(path)], check=True)
        paths.append(path)
    return paths


def make_checkpoint(path: Path) -> None:
    """A seeded random whole CLIP ViT-B/32 in OpenAI's layout and dtype (fp16 state dict)."""
    import torch

    from pipeline.nets.clip import clip_vit_b_32

    torch.manual_seed(0)
    state = clip_vit_b_32().state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)


def run_vmr(videos: Path, work: Path, weights: Path, env: dict) -> tuple[float, dict]:
    for d in ("frames", "npy"):
        shutil.rmtree(work / d, ignore_errors=True)
    params = work / "params.yaml"
    params.write_text(json.dumps({  # JSON is YAML
        "dataset": {"video_dir": str(videos)},
        "decode": {"out_dir": str(work / "frames")},
        "merge": {"npy_dir": str(work / "npy")},
        "features": ["clip"],
        "extractors": {"clip": {"weights": str(weights), "device": "cpu", "preprocess": "openai"}},
    }))
    steps = {}
    start = time.perf_counter()
    for name, args in (("decode", ["decode"]), ("extract", ["extract", "--feature", "clip"])):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--params", str(params)],
                       cwd=REPO, env=env, check=True, capture_output=True)
        steps[name] = round(time.perf_counter() - t0, 2)
    return time.perf_counter() - start, steps


def run_video_features(vf_dir: Path, python: str, videos: list[Path], work: Path, env: dict) -> float:
    for d in ("vf_out", "vf_tmp"):
        shutil.rmtree(work / d, ignore_errors=True)
    cmd = [python, "main.py", "feature_type=clip", "model_name=custom", "device=cpu", "extraction_fps=1",
           "on_extraction=save_numpy", f"output_path={work / 'vf_out'}", f"tmp_path={work / 'vf_tmp'}",
           f"video_paths=[{','.join(str(v) for v in videos)}]"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=vf_dir, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def rows(folder: Path, pattern: str) -> int:
    return sum(len(np.load(p)) for p in folder.rglob(pattern))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video-features", required=True, type=Path, help="a checkout of v-iashin/video_features")
    ap.add_argument("--python", required=True, help="the Python of video_features' virtual environment")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of both tools' processes")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vmr-vs-vf-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "ViT-B-32.pt"
    if not weights.exists():
        make_checkpoint(weights)
    vf_weights = args.video_features / "models" / "clip" / "checkpoints" / "CLIP-custom.pth"
    vf_weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, vf_weights)

    threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | threads
    vmr_env = base | {"PYTHONPATH": str(REPO), "VMR_NO_PROGRESS": "1"}
    vf_env = base  # no PYTHONPATH: vmr's `models` package would hide video_features' own

    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "threads": args.threads,
                     "repeats": args.repeats, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    for name in args.workloads:
        wl = work / name
        videos = make_videos(wl / "videos", WORKLOADS[name])
        vmr_times, vf_times, vmr_steps = [], [], []
        for _ in range(args.repeats):
            seconds, steps = run_vmr(wl / "videos", wl, weights, vmr_env)
            vmr_times.append(round(seconds, 2))
            vmr_steps.append(steps)
            vf_times.append(round(run_video_features(args.video_features, args.python, videos, wl, vf_env), 2))
        best_vmr, best_vf = min(vmr_times), min(vf_times)
        results[name] = {
            "videos": len(videos), "video_seconds": sum(WORKLOADS[name]),
            "vmr_rows": rows(wl / "npy" / "clip", "*.npy"), "video_features_rows": rows(wl / "vf_out", "*_clip.npy"),
            "vmr_seconds": vmr_times, "vmr_steps": vmr_steps, "video_features_seconds": vf_times,
            "best_vmr_s": best_vmr, "best_video_features_s": best_vf,
            "speedup": round(best_vf / best_vmr, 3),  # > 1: vmr is faster
        }
        print(f"{name}: vmr {best_vmr:.1f} s, video_features {best_vf:.1f} s -> vmr {best_vf / best_vmr:.2f}x "
              f"(rows: vmr {results[name]['vmr_rows']}, video_features {results[name]['video_features_rows']})",
              flush=True)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
