"""Evaluation shared by every model: moment retrieval, highlight detection, text-video retrieval.

Everything is vectorised over queries (numpy), so 100k queries x 10 candidates take seconds.
Percentages are in [0, 100]. Moments are (start, end) in seconds (or any common unit).

API (stable)
------------
Moment retrieval, MMN / MRNet / CNM convention
    temporal_iou(a, b) -> IoU of broadcastable (..., 2) arrays; union = max(end) - min(start)
        (the definition MMN, MESM and Moment-DETR use; equal to the true union when they overlap).
    nms(moments (Q, K, 2), scores (Q, K), threshold, top_k=None) -> (moments, valid)
        MMN's greedy NMS per query: sort by score, drop any later candidate whose IoU with a kept one
        is > threshold (strict); returns the kept candidates in score order, padded, with a mask.
    recall_at_k(ranked (Q, K, 2), gt (Q, 2), ks=(1, 5), thresholds=(0.5, 0.7), valid=None)
        -> {"R@1,IoU@0.5": %, ...}: a hit if any of the first k (valid) candidates has IoU >= θ.
    mean_iou(top1 (Q, 2), gt (Q, 2)) -> % mean IoU.
    evaluate_moments(moments (Q, K, 2), scores (Q, K) | None, gt (Q, 2), *, ks, thresholds,
                     nms_threshold=None) -> {"R@n,IoU@θ": %, "mIoU": %}   (the whole MMN protocol;
        scores None means the candidates are already ranked)
    MOMENT_THRESHOLDS: the θ of each dataset convention.

Moment-DETR / MESM / QVHighlights (standalone_eval semantics, our own code)
    evaluate_moment_detr(predictions, ground_truth, ...) -> the official metrics dict
        predictions: [{qid, pred_relevant_windows: [[s, e, score], ...], pred_saliency_scores?}]
        ground_truth: [{qid, duration, relevant_windows, relevant_clip_ids?, saliency_scores?}]
        R1@θ, mAP@θ (VOC-interpolated, <= 10 predictions, θ in 0.5:0.05:0.95) for the length buckets
        short (0, 10], middle (10, 30], long (30, 150] and full, HL-mAP / HIT@1 at Fair/Good/VeryGood,
        rounded to 2 decimals exactly as the official script, with its "brief" summary.

Text-video retrieval (CLIP4Clip `compute_metrics` semantics, incl. its tie rule)
    retrieval_metrics(sim (Nq, Nc)) -> {"R@1", "R@5", "R@10", "R@50", "MdR", "MnR"}
    evaluate_retrieval(sim) -> {"t2v": ..., "v2t": ...}
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# θ per dataset convention (MMN / MRNet notes; CNM reports mIoU besides).
MOMENT_THRESHOLDS = {
    "charades_mmn": (0.5, 0.7),
    "charades": (0.3, 0.5, 0.7),
    "activitynet": (0.3, 0.5, 0.7),
    "tacos": (0.1, 0.3, 0.5),
    "cnm": (0.1, 0.3, 0.5, 0.7, 0.9),
}
# NMS thresholds MMN uses per dataset.
NMS_THRESHOLDS = {"charades": 0.5, "activitynet": 0.5, "tacos": 0.4}


# -- moment retrieval (MMN protocol) ----------------------------------------------------------


def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (..., 2) windows, broadcast. union = max(end) - min(start); 0 where it is 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    inter = np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0])
    union = np.maximum(a[..., 1], b[..., 1]) - np.minimum(a[..., 0], b[..., 0])
    inter = np.clip(inter, 0.0, None)
    return np.divide(inter, union, out=np.zeros(np.broadcast(inter, union).shape), where=union > 0)


def nms(
    moments: np.ndarray, scores: np.ndarray, threshold: float, top_k: int | None = None, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS per query (MMN's variant: suppress when IoU > threshold).

    moments (Q, K, 2), scores (Q, K). Returns (kept (Q, top_k, 2), valid (Q, top_k) bool): kept
    candidates in descending score order, left-aligned; rows with fewer survivors are padded
    (valid False). The loop runs over the K candidate positions, vectorised over queries, in chunks
    of queries so the (chunk, K, K) IoU matrix stays small.
    """
    moments = np.asarray(moments, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    q, k = scores.shape
    top_k = k if top_k is None else min(top_k, k)
    out = np.zeros((q, top_k, 2))
    valid = np.zeros((q, top_k), dtype=bool)
    for lo in range(0, q, chunk):
        s = scores[lo:lo + chunk]
        order = np.argsort(-s, axis=1, kind="stable")  # ties keep candidate order
        m = np.take_along_axis(moments[lo:lo + chunk], order[..., None], axis=1)
        iou = temporal_iou(m[:, :, None, :], m[:, None, :, :])  # (c, K, K)
        keep = np.ones(s.shape, dtype=bool)
        for i in range(k - 1):
            # a kept candidate i suppresses every later one that overlaps it too much
            keep[:, i + 1:] &= ~(keep[:, i:i + 1] & (iou[:, i, i + 1:] > threshold))
        rank = np.cumsum(keep, axis=1) - 1  # position among the survivors
        sel = keep & (rank < top_k)
        rows, cols = np.nonzero(sel)
        out[lo + rows, rank[rows, cols]] = m[rows, cols]
        valid[lo + rows, rank[rows, cols]] = True
    return out, valid


def recall_at_k(
    ranked: np.ndarray,
    gt: np.ndarray,
    ks: Sequence[int] = (1, 5),
    thresholds: Sequence[float] = (0.5, 0.7),
    valid: np.ndarray | None = None,
) -> dict[str, float]:
    """R@k,IoU@θ in %: a query is a hit if one of its first k valid candidates has IoU >= θ."""
    ranked = np.asarray(ranked, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    iou = temporal_iou(ranked, gt[:, None, :])  # (Q, K)
    if valid is not None:
        iou = np.where(valid, iou, -1.0)
    out = {}
    for k in ks:
        best = iou[:, :k].max(axis=1)
        for t in thresholds:
            out[f"R@{k},IoU@{t}"] = float(100.0 * np.mean(best >= t))
    return out


def mean_iou(top1: np.ndarray, gt: np.ndarray) -> float:
    """Mean IoU (%) of one prediction per query against its ground truth."""
    return float(100.0 * np.mean(temporal_iou(np.asarray(top1), np.asarray(gt))))


def evaluate_moments(
    moments: np.ndarray,
    scores: np.ndarray | None,
    gt: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5),
    thresholds: Sequence[float] = (0.5, 0.7),
    nms_threshold: float | None = None,
) -> dict[str, float]:
    """MMN/MRNet protocol: (optional) NMS, then R@k,IoU@θ and mIoU of the top-1 moment.

    moments (Q, K, 2); scores (Q, K) or None when the candidates are already ranked (then NMS
    keeps their order). Without NMS the candidates are ranked by score.
    """
    moments = np.asarray(moments, dtype=np.float64)
    if moments.ndim == 2:  # one prediction per query
        moments = moments[:, None, :]
    gt = np.asarray(gt, dtype=np.float64)
    if len(moments) != len(gt):
        raise ValueError(f"{len(moments)} predictions but {len(gt)} ground-truth moments")
    if scores is None:
        # already ranked: descending pseudo-scores keep the order through a stable sort
        scores = np.broadcast_to(-np.arange(moments.shape[1], dtype=np.float64), moments.shape[:2])
    scores = np.asarray(scores, dtype=np.float64)
    if nms_threshold is not None:
        ranked, valid = nms(moments, scores, nms_threshold, top_k=max(ks))
    else:
        order = np.argsort(-scores, axis=1, kind="stable")[:, : max(ks)]
        ranked = np.take_along_axis(moments, order[..., None], axis=1)
        valid = None
    metrics = recall_at_k(ranked, gt, ks, thresholds, valid)
    metrics["mIoU"] = mean_iou(ranked[:, 0], gt)
    return metrics
