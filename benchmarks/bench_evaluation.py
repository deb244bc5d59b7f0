"""Evaluation speed: 100k queries x 10 candidates (target: seconds, not minutes).

    .venv/bin/python benchmarks/bench_evaluation.py [--queries 100000] [--candidates 10]

Times, on random but realistic inputs (seeded): MMN-protocol R@{1,5} with NMS + mIoU, the
Moment-DETR metrics (mAP over 10 thresholds with matching, R1, length buckets), highlight HL-mAP /
HIT@1 (75 clips per query), and text-video retrieval on a 1000 x 1000 similarity matrix.
Figures are recorded in docs/data_and_evaluation.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.training.evaluation import evaluate_moment_detr, evaluate_moments, evaluate_retrieval


def timed(label: str, fn):
    """Wall and CPU seconds (CPU time is the fairer figure on a shared, overloaded machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    print(f"{label:<62s} wall {time.perf_counter() - wall:6.2f} s   cpu {time.process_time() - cpu:6.2f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--candidates", type=int, default=10)
    args = ap.parse_args()
    q, k = args.queries, args.candidates
    rng = np.random.default_rng(0)
    duration = 150.0
    gt_start = rng.uniform(0, 120, q)
    gt = np.stack([gt_start, gt_start + rng.uniform(2, 30, q)], axis=1)
    # candidates scattered around the GT so IoUs cover the whole range
    centre = (gt[:, :1] + gt[:, 1:]) / 2 + rng.normal(0, 10, (q, k))
    width = np.clip(rng.normal(15, 8, (q, k)), 1, None)
    moments = np.clip(np.stack([centre - width / 2, centre + width / 2], axis=-1), 0, duration)
    scores = rng.random((q, k))
    print(f"{q} queries x {k} candidates")

    timed("MMN protocol: NMS 0.5 + R@{1,5} x IoU{0.3,0.5,0.7} + mIoU",
          lambda: evaluate_moments(moments, scores, gt, ks=(1, 5), thresholds=(0.3, 0.5, 0.7), nms_threshold=0.5))
    timed("ranked, no NMS: R@{1,5} + mIoU",
          lambda: evaluate_moments(moments, scores, gt, ks=(1, 5), thresholds=(0.3, 0.5, 0.7)))

    windows = np.concatenate([moments, scores[..., None]], axis=-1).round(4).tolist()
    preds = [{"qid": i, "pred_relevant_windows": w} for i, w in enumerate(windows)]
    truth = [{"qid": i, "duration": duration, "relevant_windows": [g]} for i, g in enumerate(gt.tolist())]
    timed("Moment-DETR: mAP@0.5:0.95 + R1, 4 length buckets",
          lambda: evaluate_moment_detr(preds, truth))

    n_clips = 75
    for i, p in enumerate(preds):
        p["pred_saliency_scores"] = rng.random(n_clips).round(3).tolist()
        truth[i]["relevant_clip_ids"] = list(range(10, 20))
        truth[i]["saliency_scores"] = rng.integers(0, 5, (10, 3)).tolist()
    timed("Moment-DETR + highlights (HL-mAP, HIT@1, 75 clips, 3 levels)",
          lambda: evaluate_moment_detr(preds, truth))

    sim = rng.normal(size=(1000, 1000)).astype(np.float32)
    timed("retrieval 1000 x 1000, both directions", lambda: evaluate_retrieval(sim))


if __name__ == "__main__":
    main()
