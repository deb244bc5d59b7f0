"""Throughput of the snippet-level extractors: end to end vs the model alone, plus FLOPs per snippet.

End to end = what `vmr extract` does per batch after decode: gather the snippet's kept frames from a
memory-mapped frame-store array (`group`, incl. the per-snippet resize/crop of I3D; C3D's frames come resized), copy to
the device, `preprocess`, `embed`. Model alone = `embed` on the same, already preprocessed batch on
the device. The ratio (target >= 0.8) says how much the per-snippet data handling costs.

FLOPs are counted with torch.utils.flop_counter on meta tensors (no compute; 2 FLOPs per
multiply-add) and printed next to the published multiply-add figures.

    .venv/bin/python benchmarks/bench_snippet_extractors.py                      # CPU, all four
    .venv/bin/python benchmarks/bench_snippet_extractors.py --device cuda --dtype bf16 --channels-last

On CUDA, `--dtype bf16|fp16` runs under autocast and also reports the largest relative deviation
and the lowest cosine similarity of the features vs fp32 on the same input.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from extractors import EXTRACTORS
from extractors._base import VideoInfo
from pipeline.media.decode import output_shape

# kept-frame rate of each extractor's protocol; the frames' size is what decode writes for a 320 x 240 video
RATE = {"slowfast": 30.0, "i3d": 24.0, "i3d_r50": 30.0, "c3d": 29.97}
SOURCE_HEIGHT, SOURCE_WIDTH = 240, 320
# (input shapes of one snippet, published multiply-adds in G, source)
PUBLISHED = {
    "slowfast": ("8+32x224x224", 65.71 * (224 / 256) ** 2, "model_zoo 65.71 GMACs at 256^2, area-scaled"),
    "i3d": ("64x224x224", 108.0, "Quo Vadis ~108 GMACs (unverified)"),
    "i3d_r50": ("8x224x224", 37.53 * (224 / 256) ** 2, "model_zoo 37.53 GMACs at 256^2, area-scaled"),
    "c3d": ("16x112x112", 38.5, "commonly cited 38.5 GMACs"),
}


def flops_per_clip(name: str) -> float:
    ex = EXTRACTORS.get(name)(EXTRACTORS.get(name).Config(**({"protocol": "vslnet"} if name == "i3d" else {})))
    with torch.device("meta"):
        model = ex.build_model()
        frames = {"slowfast": 32, "i3d": 64, "i3d_r50": 8, "c3d": 16}[name]
        side = 112 if name == "c3d" else 224
        x = torch.empty(1, 3, frames, side, side)
        with FlopCounterMode(display=False) as counter:
            ex.embed(model, x)
    return counter.get_total_flops() / 1e9


def make_store(ex, seconds: float, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """A memory-mapped (N, H, W, 3) uint8 array like the frame store's, and its windows."""
    name, rate = ex.name, RATE[ex.name]
    h, w, _ = output_shape(SOURCE_HEIGHT, SOURCE_WIDTH, ex.protocol())
    n = int(round(seconds * rate))
    rng = np.random.default_rng(0)
    path = tmp / f"{name}.npy"
    np.save(path, rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8))
    k = np.arange(n, dtype=np.float64)
    return np.load(path, mmap_mode="r"), np.stack([k / rate, (k + 1) / rate], axis=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(name: str, args, tmp: Path) -> dict:
    cls = EXTRACTORS.get(name)
    config = {"batch_size": args.batch}
    if name == "i3d":
        config["protocol"] = "vslnet"  # fixed-size 24-frame windows; lgi passes are whole videos
    ex = cls(cls.Config(**config))
    device = torch.device(args.device)
    model = ex.build_model().eval().to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    frames, windows = make_store(ex, args.seconds, tmp)
    units, _ = ex.group(frames, windows, video=VideoInfo(name, RATE[name], args.seconds))
    n = min(len(units), args.snippets)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    autocast = dict(device_type=device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(**autocast):
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            return ex.embed(model, x)

    def end_to_end() -> None:
        for a in range(0, n, args.batch):
            x = torch.from_numpy(np.ascontiguousarray(units[a : min(n, a + args.batch)])).to(device)
            with torch.inference_mode():
                forward(ex.preprocess(x))
        sync(device)

    with torch.inference_mode():
        batch = ex.preprocess(torch.from_numpy(np.asarray(units[: args.batch])).to(device))

    def model_only() -> None:
        for a in range(0, n, args.batch):
            forward(batch[: min(n, a + args.batch) - a])
        sync(device)

    forward(batch)  # warm-up (cudnn autotune, allocator)
    sync(device)
    # interleaved repeats, best of each: on a shared machine both see the same load
    best = {"model": float("inf"), "end_to_end": float("inf")}
    for _ in range(args.repeats):
        for label, fn in (("model", model_only), ("end_to_end", end_to_end)):
            t0 = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - t0)
    timings = {label: n / seconds for label, seconds in best.items()}
    out = {
        "extractor": name, "device": str(device), "dtype": args.dtype, "channels_last": args.channels_last,
        "snippets": n, "batch": args.batch, "threads": torch.get_num_threads(),
        "clips_per_s_model": round(timings["model"], 3), "clips_per_s_end_to_end": round(timings["end_to_end"], 3),
        "ratio": round(timings["end_to_end"] / timings["model"], 3),
    }
    if dtype is not None and device.type == "cuda":
        with torch.inference_mode():
            ref = ex.embed(model, batch).float()
            low = forward(batch).float()
        cos = torch.nn.functional.cosine_similarity(ref, low, dim=-1).min().item()
        rel = ((ref - low).abs().max() / ref.abs().max()).item()
        out.update(min_cosine_vs_fp32=round(cos, 6), max_rel_dev_vs_fp32=round(rel, 6))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extractors", default="slowfast,i3d,i3d_r50,c3d")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--snippets", type=int, default=4, help="snippets timed per repeat")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of the synthetic video")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--skip-throughput", action="store_true", help="only count FLOPs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True

    results = []
    names = args.extractors.split(",")
    print(f"{'extractor':10} {'snippet input':14} {'GFLOP/snippet':>10} {'GMAC':>7} {'published GMAC':>15}  source")
    for name in names:
        g = flops_per_clip(name)
        shape, pub, source = PUBLISHED[name]
        print(f"{name:10} {shape:14} {g:10.2f} {g / 2:7.2f} {pub:15.2f}  {source}")
        results.append({"extractor": name, "gflops_per_clip": round(g, 2), "published_gmacs": round(pub, 2)})
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                r = bench(name, args, Path(tmp))
                print(json.dumps(r))
                results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
