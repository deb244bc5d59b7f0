"""MMN throughput: training samples/s (videos and queries) and evaluation queries/s.

    python benchmarks/bench_mmn.py [--config synthetic|charades] [--device cpu|cuda] [--threads N]

Inputs are random tensors of the configured shapes (features, 2-4 sentences of 12 tokens per video),
so no dataset is needed. A training step is the full trainer step: forward, both losses, backward,
clipping, AdamW. Evaluation is the score maps plus decoding (valid cells -> seconds -> NMS).
Results are documented in docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.common import moment_to_iou2d  # noqa: E402
from models.mmn import MMN  # noqa: E402
from pipeline.training.trainer import StepContext  # noqa: E402

CONFIGS = {
    # the synthetic default of params.yaml (model.mmn)
    "synthetic": dict(input_size=512, num_pre_clips=32, num_clips=16, pool_kernel=2, pooling_counts=[15],
                      feat_hidden=64, pred_hidden=64, pred_kernel=3, pred_layers=2, joint_size=64, text_dim=64,
                      text_layers=2, text_heads=2, text_ffn=128, vocab_size=500, batch_size=8, freeze_bert=0),
    # the official Charades-STA VGG config (profiles/mmn_charades_vgg.yaml), BERT trainable
    "charades": dict(input_size=4096, freeze_bert=0, batch_size=8),
}


def build(config: str, device: torch.device) -> MMN:
    tmp = Path(tempfile.mkdtemp())
    with h5py.File(tmp / "bench.h5", "w") as h5:
        h5["v"] = np.zeros((4, 8), np.float32)
    sentences = [SimpleNamespace(sentence=f"a person does thing number {i} in the room.") for i in range(200)]
    data = SimpleNamespace(feature_file=lambda name: tmp / f"{name}.h5", splits=["train"],
                           queries=lambda split: sentences)
    cfg = MMN.Config(**{**CONFIGS[config], "features": ["bench"]})
    torch.manual_seed(0)
    return MMN(cfg, data).to(device)


def batch_of(model: MMN, videos: int, device: torch.device, rng: np.random.Generator) -> dict:
    cfg = model.cfg
    sizes = rng.integers(2, 5, size=videos).tolist()
    n = sum(sizes)
    iou2d, moments = [], []
    for s in sizes:
        ends = np.sort(rng.uniform(0, 30, size=(s, 2)), axis=1)
        m = torch.tensor(ends, dtype=torch.float32)
        moments.append(m.to(device))
        iou2d.append(torch.stack([moment_to_iou2d(x, cfg.num_clips, 30.0) for x in m]).to(device))
    return {
        "feats": torch.randn(videos, cfg.num_pre_clips, cfg.input_size, device=device),
        "tokens": torch.randint(5, min(cfg.vocab_size, 400), (n, 12), device=device),
        "wordlens": torch.full((n,), 12, device=device),
        "num_sentences": sizes, "iou2d": iou2d, "moments": moments,
        "durations": [30.0] * videos, "qids": [list(range(s)) for s in sizes], "vids": ["v"] * videos,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="synthetic")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=None, help="videos per step (default: the config's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    model = build(args.config, device)
    videos = args.batch or model.cfg.batch_size
    opt = model.configure_optimizers().optimizers[0]
    ctx = StepContext(epoch=1, step=0, world_size=1, optimizer_step=lambda *a, **k: None)
    batches = [batch_of(model, videos, device, rng) for _ in range(args.steps + 2)]

    model.train()
    for i, b in enumerate(batches):
        if i == 2:  # two warm-up steps
            sync(device)
            start = time.perf_counter()
        opt.zero_grad()
        model.training_step(b, ctx)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    sync(device)
    train_s = time.perf_counter() - start
    queries = sum(sum(b["num_sentences"]) for b in batches[2:])

    model.eval()
    with torch.no_grad():
        model.predict_step(batches[0])
        sync(device)
        start = time.perf_counter()
        for b in batches[2:]:
            model.predict_step(b)
        sync(device)
    eval_s = time.perf_counter() - start

    params = sum(p.numel() for p in model.parameters())
    print(f"MMN {args.config} ({params / 1e6:.2f} M parameters) on {device} ({args.threads} threads), "
          f"batch {videos} videos / ~{queries // args.steps} queries")
    print(f"  train: {args.steps * videos / train_s:8.1f} videos/s  {queries / train_s:8.1f} queries/s")
    print(f"  eval : {args.steps * videos / eval_s:8.1f} videos/s  {queries / eval_s:8.1f} queries/s")


if __name__ == "__main__":
    main()
