"""Cost of `Predictor.predict` on new videos against the work it cannot avoid.

    .venv/bin/python benchmarks/bench_predict.py [--seconds 60] [--folder 4] [--repeats 2] [--out FILE]

Setup (in a temporary directory, through the CLI): the synthetic dataset of profiles/tiny.yaml,
decoded, CLIP features (the synthetic-default recipe: ViT-B/32, random init, 1 frame/s), and an
MMN trained for one epoch. Then a synthetic video of `--seconds` seconds (320x240, 30 fps) that
the model never saw.

1. cold: `predict(video, [query])` with an empty cache (hash, decode in the worker pool, extract,
   merge, cache, model built on the features, forward) vs the sum of the parts it cannot skip on
   the same frames: `decode_video` in-process, the CLIP model alone (`preprocess` + `embed`, same
   batch size) on the decoded frames, and the MMN forward (`predict_step` on the collated batch).
   Target ratio <= 1.3.
2. warm: a second query on the same video (cached features, model kept). Target <= 0.5 s.
3. folder: `predict_many` over `--folder` videos with two queries each: decodes counted (target:
   one per video), then again (target: none).

Each timed side runs `--repeats` times and the best counts (the machine is shared); torch uses one
thread (OMP_NUM_THREADS=1) unless set otherwise. Prints the numbers and writes them as JSON;
docs/predict.md quotes them.
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

import yaml

REPO = Path(__file__).resolve().parents[1]


def vmr(root: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "-p", str(root / "params.yaml")], cwd=root,
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def train_project(root: Path) -> Path:
    """A tiny project trained through the CLI; returns the MMN checkpoint."""
    from pipeline.core.params import deep_merge

    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                        yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text()))
    params = deep_merge(params, {"models": ["mmn"], "model": {"mmn": {"epochs": 1}}, "trainer": {"device": "cpu"}})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (["synth"], ["decode"], ["extract", "--feature", "clip"], ["merge", "--feature", "clip"],
                ["train", "--model", "mmn"]):
        vmr(root, *cmd)
    return root / "runs" / "mmn" / "best.pt"


def long_video(path: Path, seconds: float, index: int = 1000) -> Path:
    from pipeline.media.synth import SynthConfig, plan_video, write_video

    cfg = SynthConfig(seed=7, min_duration=seconds, max_duration=seconds)
    write_video(plan_video(cfg, f"L{index}", "test", index), path)
    return path


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def unavoidable_parts(predictor, video: Path, query: str, repeats: int) -> dict[str, float]:
    """decode (in-process), the extractor model alone, and the grounding model's forward."""
    import numpy as np
    import torch

    from pipeline.core.atomic import write_json
    from pipeline.media.decode import DecodeTask, decode_video, decoder_code
    from pipeline.media.framestore import FrameStore
    from pipeline.predict.predictor import SPLIT
    from pipeline.text.annotations import Query

    (feature,) = predictor.recipe.features
    extractor, model, _ = predictor.cache._extractor(feature)
    protocol = extractor.protocol()
    store_dir = Path(tempfile.mkdtemp(prefix="bench-frames-"))
    try:
        task = DecodeTask("v", str(video), str(store_dir), (protocol,), backend=feature.decode_backend,
                          code=decoder_code())
        decode_s = best_of(repeats, lambda: decode_video(task))
        store = FrameStore(store_dir)
        write_json(store.record_path("v"), decode_video(task))
        frames = store.load("v", protocol.key, mmap=False).frames
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)

    def model_only() -> None:
        with torch.inference_mode():
            for start in range(0, len(frames), extractor.config.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(frames[start : start + extractor.config.batch_size]))
                extractor.embed(model, extractor.preprocess(x))

    extract_s = best_of(repeats, model_only)
    cached = predictor.cache.get([video])[0]
    asked = (Query(dataset="predict", split=SPLIT, video_id=cached.video_id, duration=cached.duration,
                   moments=((0.0, cached.duration),), sentence=query, qid=0),)
    data = predictor._context(cached, asked)
    net = predictor._network(cached, data)
    dataset = net.eval_data(SPLIT, data).primary
    batch = net.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        forward_s = best_of(repeats, lambda: net.predict_step(batch))
    return {"decode_s": decode_s, "extract_model_s": extract_s, "forward_s": forward_s,
            "frames": int(len(frames))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--folder", type=int, default=4, help="videos in the folder batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the trained project here (reused when present)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from pipeline.predict import Predictor

    root = args.work or Path(tempfile.mkdtemp(prefix="bench-predict-"))
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("cache-*"):
        shutil.rmtree(old)
    shutil.rmtree(root / "folder", ignore_errors=True)
    try:
        checkpoint = root / "runs" / "mmn" / "best.pt"
        if not checkpoint.is_file():
            print(f"training a tiny MMN in {root} ...", flush=True)
            checkpoint = train_project(root)
        video = long_video(root / "long.mp4", args.seconds)
        query = "the red circle moves to the left"

        colds = []
        for r in range(args.repeats):  # each with an empty cache and a new Predictor (the model is built too)
            p = Predictor.from_checkpoint(checkpoint, cache_dir=root / f"cache-{r}")
            t0 = time.perf_counter()
            p.predict(video, [query], top_k=5)
            colds.append(time.perf_counter() - t0)
            assert p.counters.decoded == 1
        cold = min(colds)
        warm = best_of(args.repeats + 1, lambda: p.predict(video, ["the blue square grows bigger"], top_k=5))
        assert p.counters.decoded == 1  # the warm calls decoded nothing
        parts = unavoidable_parts(p, video, query, args.repeats)
        floor = parts["decode_s"] + parts["extract_model_s"] + parts["forward_s"]

        folder = root / "folder"
        folder.mkdir()
        for i in range(args.folder):
            long_video(folder / f"f{i}.mp4", 8.0, index=2000 + i)
        batch = Predictor.from_checkpoint(checkpoint, cache_dir=root / "cache-folder")
        jobs = [(v, [query, "the blue square grows bigger"]) for v in sorted(folder.glob("*.mp4"))]
        batch.predict_many(jobs)
        first_decodes = batch.counters.decoded
        batch.predict_many(jobs)
        result = {
            "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
            "video_seconds": args.seconds, "frames_extracted": parts["frames"],
            "cold_predict_s": round(cold, 3), "decode_s": round(parts["decode_s"], 3),
            "extract_model_only_s": round(parts["extract_model_s"], 3), "model_forward_s": round(parts["forward_s"], 4),
            "unavoidable_s": round(floor, 3), "cold_ratio": round(cold / floor, 3), "target_cold_ratio": 1.3,
            "second_query_s": round(warm, 3), "target_second_query_s": 0.5,
            "folder_videos": args.folder, "folder_decodes_first_run": first_decodes,
            "folder_decodes_second_run": batch.counters.decoded - first_decodes,
        }
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
