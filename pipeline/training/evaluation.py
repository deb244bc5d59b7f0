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
    evaluate_multi_caption_retrieval(sim, caption_video) -> the same, several captions per video

Files: score_file(predictions, annotations, dataset, split, ...) is `vmr score`'s library side;
DATASETS holds each dataset's format, thresholds, NMS and length buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.core.errors import VmrError
from pipeline.text.annotations import load_split

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


# -- Moment-DETR / QVHighlights protocol (semantics of moment_detr's standalone_eval) -----------

# IoU thresholds 0.5:0.05:0.95, rounded to 2 decimals as the keys are ("0.5", "0.55", ...)
DETR_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
QVH_LENGTH_RANGES = {"short": (0.0, 10.0), "middle": (10.0, 30.0), "long": (30.0, 150.0), "full": (0.0, 150.0)}
TACOS_LENGTH_RANGES = {**{k: v for k, v in QVH_LENGTH_RANGES.items() if k != "full"},
                       "superlong": (150.0, 600.0), "full": (0.0, 600.0)}
SALIENCY_LEVELS = {"Fair": 2, "Good": 3, "VeryGood": 4}  # minimum annotator score of a positive clip


def _round2(x: float) -> float:
    """The official rounding: format to 2 decimals and parse back."""
    return float(f"{x:.2f}")


def _pad(rows: Sequence[Sequence[Sequence[float]]], width: int, fill: float = np.nan) -> tuple[np.ndarray, np.ndarray]:
    """Ragged list of windows -> (Q, K, width) array and a (Q, K) validity mask."""
    lengths = {len(r) for r in rows}
    if len(lengths) == 1 and 0 not in lengths:  # rectangular: one conversion, no loop
        try:
            arr = np.asarray(rows, dtype=np.float64)
        except ValueError:  # windows of different lengths: take the general path
            arr = None
        if arr is not None and arr.ndim == 3 and arr.shape[2] >= width:
            return arr[:, :, :width].copy(), np.ones(arr.shape[:2], dtype=bool)
    k = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(k, 1), width), fill, dtype=np.float64)
    valid = np.zeros((len(rows), max(k, 1)), dtype=bool)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = np.asarray(r, dtype=np.float64)[:, :width]
            valid[i, : len(r)] = True
    return out, valid


def _true_union_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU with the true union (len_a + len_b - inter), as Moment-DETR's mAP and GT choice use."""
    inter = np.clip(np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]), 0.0, None)
    union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def _r1_at(top1: np.ndarray, gts: np.ndarray, gt_valid: np.ndarray, thresholds: Sequence[float]) -> dict[str, float]:
    """R1@θ: IoU of the first predicted window with the GT window it overlaps best (first best wins)."""
    cross = _true_union_iou(top1[:, None, :], gts)  # (Q, G)
    cross = np.where(gt_valid, cross, -np.inf)
    best = np.argmax(np.where(np.isnan(cross), np.inf, cross), axis=1)  # numpy's argmax picks a nan first
    chosen = gts[np.arange(len(gts)), best]
    iou = temporal_iou(top1, chosen)
    return {str(t): _round2(float(np.mean(iou >= t)) * 100) for t in thresholds}


def _detection_ap(
    preds: np.ndarray, pred_valid: np.ndarray, gts: np.ndarray, gt_valid: np.ndarray, thresholds: Sequence[float],
    chunk: int = 8192,
) -> np.ndarray:
    """Per-query VOC-interpolated AP at each threshold, (Q, T), ActivityNet detection matching.

    preds (Q, P, 3) = (start, end, score) already limited to the first 10 of each query; a prediction,
    in descending score order (ties keep file order), takes the unmatched GT window of highest IoU
    (ties: the later window) if that IoU >= θ, else it is a false positive. Runs over chunks of
    queries so the working set stays in cache.
    """
    return np.concatenate([
        _detection_ap_chunk(preds[lo:lo + chunk], pred_valid[lo:lo + chunk], gts[lo:lo + chunk],
                            gt_valid[lo:lo + chunk], np.asarray(thresholds, dtype=np.float64))
        for lo in range(0, len(preds), chunk)
    ]) if len(preds) else np.zeros((0, len(thresholds)))


def _detection_ap_chunk(preds, pred_valid, gts, gt_valid, thr) -> np.ndarray:
    q, p = pred_valid.shape
    g = gts.shape[1]
    order = np.argsort(-np.where(pred_valid, preds[..., 2], -np.inf), axis=1, kind="stable")
    preds = np.take_along_axis(preds, order[..., None], axis=1)
    pred_valid = np.take_along_axis(pred_valid, order, axis=1)
    iou = _true_union_iou(preds[:, :, None, :2], gts[:, None, :, :])  # (Q, P, G)
    iou = np.where(gt_valid[:, None, :], iou, -np.inf)
    locked = np.zeros((q, len(thr), g), dtype=bool)
    tp = np.zeros((p, q, len(thr)), dtype=bool)  # prediction-major: each step writes a contiguous block
    fp = np.zeros((p, q, len(thr)), dtype=bool)
    gt_index = np.arange(g)
    for j in range(p):
        cand = (iou[:, j, None, :] >= thr[None, :, None]) & ~locked  # (Q, T, G)
        if g == 1:
            pick_mask = cand
        else:
            score = np.where(cand, iou[:, j, None, :], -np.inf)
            pick = g - 1 - np.argmax(score[..., ::-1], axis=-1)  # the last among equal best IoUs
            pick_mask = cand & (gt_index == pick[..., None])
        hit = cand.any(axis=-1) & pred_valid[:, j, None]
        locked |= pick_mask & hit[..., None]
        tp[j] = hit
        fp[j] = ~hit & pred_valid[:, j, None]
    tp_cum = np.cumsum(tp, axis=0, dtype=np.float64)
    seen = tp_cum + np.cumsum(fp, axis=0, dtype=np.float64)
    n_pos = gt_valid.sum(axis=1).astype(np.float64)[None, :, None]
    # 0/0 (no prediction yet, or a query without GT windows) counts as 0
    recall = np.divide(tp_cum, n_pos, out=np.zeros_like(tp_cum), where=n_pos > 0)
    precision = np.divide(tp_cum, seen, out=np.zeros_like(tp_cum), where=seen > 0)
    # VOC: precision envelope (max over higher recall), summed over the recall steps
    zeros = np.zeros((1, q, len(thr)))
    mprec = np.concatenate([zeros, precision, zeros], axis=0)
    mrec = np.concatenate([zeros, recall, zeros + 1.0], axis=0)
    mprec = np.maximum.accumulate(mprec[::-1], axis=0)[::-1]
    step = np.diff(mrec, axis=0)
    return np.sum(np.where(step != 0, step * mprec[1:], 0.0), axis=0)


def _moment_metrics(pred_windows, gt_windows, thresholds, max_pred) -> dict[str, dict[str, float]]:
    preds, pred_valid = _pad([w[:max_pred] for w in pred_windows], 3)
    gts, gt_valid = _pad(gt_windows, 2)
    ap = _detection_ap(preds, pred_valid, gts, gt_valid, thresholds)  # (Q, T)
    ap_t = ap.mean(axis=0)
    mean_ap = {str(t): _round2(100 * v) for t, v in zip(thresholds, ap_t, strict=True)}
    mean_ap["average"] = _round2(100 * float(np.mean(ap_t)))
    top1 = np.asarray([w[0][:2] for w in pred_windows], dtype=np.float64)
    return {"MR-mAP": mean_ap, "MR-R1": _r1_at(top1, gts, gt_valid, thresholds)}


def _highlight_ap(y_pred: np.ndarray, valid: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of clip scores against binary labels: y_pred (N, W), valid (N, W), labels (N, L, W) -> (N, L).

    sklearn's precision-recall-curve semantics, as the official script uses it: tied scores form one
    threshold; precision is interpolated (max over lower thresholds); AP is the MEAN of it over the
    thresholds where recall grows. A label row that is all 0 scores 0, all 1 scores 1.
    """
    order = np.argsort(-np.where(valid, y_pred, -np.inf), axis=1, kind="stable")  # one sort for all labels
    s = np.take_along_axis(np.where(valid, y_pred, -np.inf), order, axis=1)[:, None, :]
    t = np.take_along_axis(np.where(valid[:, None, :], labels, 0.0), np.broadcast_to(order[:, None, :], labels.shape), axis=2)
    closes = np.ones(s.shape, dtype=bool)  # a threshold point closes each group of tied scores
    closes[..., :-1] = s[..., 1:] != s[..., :-1]
    closes &= np.isfinite(s)
    opens = np.ones(s.shape, dtype=bool)
    opens[..., 1:] = closes[..., :-1]
    tps = np.cumsum(t, axis=2)
    n = np.arange(1, s.shape[2] + 1, dtype=np.float64)
    interp = np.maximum.accumulate(np.where(closes, tps / n, -np.inf)[..., ::-1], axis=2)[..., ::-1]
    # tps before the current tie group (nondecreasing, so a running max forward-fills it)
    before_group = np.maximum.accumulate(np.where(opens, tps - t, 0.0), axis=2)
    counted = closes & (tps > before_group)  # recall grows at this threshold
    ap = np.sum(np.where(counted, interp, 0.0), axis=2) / np.maximum(counted.sum(axis=2), 1)
    n_pos, n_valid = tps[..., -1], valid.sum(axis=1)[:, None]
    constant = (n_pos == 0) | (n_pos == n_valid)
    return np.where(constant, (n_pos > 0).astype(np.float64), ap)


def _highlight_metrics(saliency_preds, gt_records, clip_length: float, chunk: int = 4096) -> dict[str, dict[str, float]]:
    """HL-mAP and HIT@1 at each saliency level (GT clips per query = int(duration / clip_length))."""
    n_clips = np.asarray([int(g["duration"] / clip_length) for g in gt_records])
    width = max(int(n_clips.max(initial=0)), 1)
    q = len(gt_records)
    scores = np.zeros((q, width, 3))  # annotator scores 0..4 of every clip
    for i, g in enumerate(gt_records):
        ids = np.asarray(g.get("relevant_clip_ids") or [], dtype=np.int64)
        if len(ids):
            scores[i, ids] = np.asarray(g["saliency_scores"], dtype=np.float64)
    valid = np.arange(width)[None, :] < n_clips[:, None]
    # predictions are cut or zero-padded to the GT clip count, as the official script does
    pred = np.zeros((q, width))
    hit_idx = np.zeros(q, dtype=np.int64)
    for i, p in enumerate(saliency_preds):
        p = np.asarray(p, dtype=np.float64)
        hit_idx[i] = int(np.argmax(p))  # over the raw prediction
        pred[i, : min(len(p), n_clips[i])] = p[: n_clips[i]]
    levels = np.asarray(list(SALIENCY_LEVELS.values()), dtype=np.float64)
    # labels (Q, level x annotator, W); the official HIT@1 reads clip argmax if it is a GT clip
    ap = np.zeros((q, len(levels) * 3))
    for lo in range(0, q, chunk):
        sl = slice(lo, lo + chunk)
        labels = (scores[sl, None, :, :] >= levels[None, :, None, None]).transpose(0, 1, 3, 2)
        ap[sl] = _highlight_ap(pred[sl], valid[sl], labels.reshape(len(labels), -1, width).astype(np.float64))
    inside = hit_idx < n_clips
    picked = scores[np.arange(q), np.minimum(hit_idx, width - 1)]  # (Q, 3 annotators)
    out = {}
    for li, (name, level) in enumerate(SALIENCY_LEVELS.items()):
        hit = np.where(inside[:, None], picked >= level, False).max(axis=1)
        out[f"HL-min-{name}"] = {"HL-mAP": _round2(100 * float(np.mean(ap[:, 3 * li: 3 * li + 3]))),
                                 "HL-Hit1": _round2(100 * float(np.mean(hit)))}
    return out


def evaluate_moment_detr(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]],
    *,
    thresholds: Sequence[float] = DETR_THRESHOLDS,
    length_ranges: Mapping[str, tuple[float, float]] = QVH_LENGTH_RANGES,
    max_pred_windows: int = 10,
    clip_length: float = 2.0,
    match_number: bool = True,
) -> dict[str, Any]:
    """Moment-DETR-style metrics of a submission, rounded like the official script.

    predictions: [{qid, pred_relevant_windows: [[s, e, score], ...] (file order = rank for R1),
    pred_saliency_scores?: [clip scores]}]; ground_truth: [{qid, duration, relevant_windows,
    relevant_clip_ids?, saliency_scores?}]. `length_ranges` buckets queries by GT window length
    (lo, hi]; the bucket named "full" keeps every query. Returns {"brief": {...}, bucket or HL level:
    {...}} with the official key names.
    """
    pred_by_qid = {p["qid"]: p for p in predictions}
    gt_by_qid = {g["qid"]: g for g in ground_truth}
    if match_number and set(pred_by_qid) != set(gt_by_qid):
        missing, extra = set(gt_by_qid) - set(pred_by_qid), set(pred_by_qid) - set(gt_by_qid)
        raise ValueError(f"prediction qids do not match the ground truth: {len(missing)} missing "
                         f"(e.g. {sorted(missing, key=str)[:3]}), {len(extra)} unknown (e.g. {sorted(extra, key=str)[:3]})")
    shared = set(pred_by_qid) & set(gt_by_qid)
    predictions = [p for p in predictions if p["qid"] in shared]
    ground_truth = [g for g in ground_truth if g["qid"] in shared]
    if not predictions:
        raise ValueError("no prediction matches a ground-truth qid")
    metrics: dict[str, Any] = {}
    brief: dict[str, float] = {}
    if "pred_relevant_windows" in predictions[0]:
        for name, (lo, hi) in length_ranges.items():
            if name == "full":  # every query, whatever its windows' lengths
                gts = {g["qid"]: g["relevant_windows"] for g in ground_truth}
            else:
                gts = {}
                for g in ground_truth:
                    kept = [w for w in g["relevant_windows"] if lo < w[1] - w[0] <= hi]
                    if kept:
                        gts[g["qid"]] = kept
            preds = [p for p in predictions if p["qid"] in gts]
            if not preds:
                continue
            metrics[name] = _moment_metrics([p["pred_relevant_windows"] for p in preds],
                                            [gts[p["qid"]] for p in preds], thresholds, max_pred_windows)
        mr = {}
        if "full" in metrics:
            full_ap = metrics["full"]["MR-mAP"]
            mr.update({"MR-full-mAP": full_ap["average"], "MR-full-mAP@0.5": full_ap.get("0.5"),
                       "MR-full-mAP@0.75": full_ap.get("0.75"),
                       "MR-full-R1@0.5": metrics["full"]["MR-R1"].get("0.5"),
                       "MR-full-R1@0.7": metrics["full"]["MR-R1"].get("0.7")})
        for name in length_ranges:
            if name != "full" and name in metrics:
                mr[f"MR-{name}-mAP"] = metrics[name]["MR-mAP"]["average"]
        brief.update(sorted((k, v) for k, v in mr.items() if v is not None))
    if "pred_saliency_scores" in predictions[0]:
        order = {g["qid"]: g for g in ground_truth}
        hl = _highlight_metrics([p["pred_saliency_scores"] for p in predictions],
                                [order[p["qid"]] for p in predictions], clip_length)
        metrics.update(hl)
        brief.update({f"{k}-{sub.split('-')[1]}": v for k, vals in hl.items() for sub, v in vals.items()})
    return {"brief": brief, **dict(sorted(metrics.items()))}


# -- text-video retrieval (CLIP4Clip `compute_metrics` semantics) -----------------------------


def retrieval_metrics(sim: np.ndarray, ks: Iterable[int] = (1, 5, 10, 50)) -> dict[str, float]:
    """R@k, MdR, MnR of a (queries x candidates) similarity matrix whose ground truth is the diagonal.

    Ties follow CLIP4Clip exactly: a row whose GT score is tied with e-1 others contributes e ranks
    (g, g+1, ..., g+e-1, g = number of strictly higher scores), so the denominator can exceed N; a
    row whose GT score is NaN contributes nothing; NaN candidates never outrank the GT.
    """
    x = np.asarray(sim)
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"expected a square similarity matrix (ground truth on the diagonal), got {x.shape}")
    neg, neg_diag = -x, -np.diag(x)[:, None]
    greater = (neg < neg_diag).sum(axis=1)  # strictly better candidates
    equal = ((neg - neg_diag) == 0).sum(axis=1)  # the GT and its ties (0 for a NaN GT)
    ranks = np.repeat(greater, equal) + (np.arange(equal.sum()) - np.repeat(np.cumsum(equal) - equal, equal))
    if len(ranks) == 0:
        raise ValueError("no row has a comparable ground-truth score (all NaN)")
    out = {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}
    out["MdR"] = float(np.median(ranks)) + 1
    out["MnR"] = float(np.mean(ranks)) + 1
    return out


def evaluate_retrieval(sim: np.ndarray) -> dict[str, dict[str, float]]:
    """Text-to-video on sim (texts x videos) and video-to-text on its transpose."""
    sim = np.asarray(sim)
    return {"t2v": retrieval_metrics(sim), "v2t": retrieval_metrics(sim.T)}



def evaluate_multi_caption_retrieval(sim: np.ndarray, caption_video: Sequence[int]) -> dict[str, dict[str, float]]:
    """Several captions per video (MSVD-style), CLIP4Clip's procedure.

    sim (captions x videos); caption_video[i] = the column of caption i's video. Text-to-video: each
    caption's rank of its own video; captions whose own score is NaN or +-inf are dropped; MdR is the
    LOWER middle value for an even count (torch.median). CLIP4Clip breaks ties arbitrarily (torch
    argsort); here a tie counts in the caption's favour (rank = number of strictly higher videos).
    Video-to-text: each video ranks the caption groups of all videos by their best caption
    (NaN -> -inf first), then `retrieval_metrics` (its tie rule) on that videos x videos matrix.
    """
    sim = np.asarray(sim, dtype=np.float64)
    cap = np.asarray(caption_video, dtype=np.int64)
    if sim.ndim != 2 or len(cap) != sim.shape[0] or cap.min(initial=0) < 0 or cap.max(initial=0) >= sim.shape[1]:
        raise ValueError(f"caption_video must give a column of sim {sim.shape} for each of its rows")
    own = sim[np.arange(len(cap)), cap]
    keep = np.isfinite(own)
    ranks = (sim[keep] > own[keep, None]).sum(axis=1)
    if len(ranks) == 0:
        raise ValueError("no caption has a finite score for its own video")
    t2v = {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in (1, 5, 10, 50)}
    t2v["MdR"] = float(np.sort(ranks)[(len(ranks) - 1) // 2]) + 1
    t2v["MnR"] = float(np.mean(ranks)) + 1
    best = np.full((sim.shape[1], sim.shape[1]), -np.inf)  # [caption group's video, query video]
    np.maximum.at(best, cap, np.nan_to_num(sim, nan=-np.inf, posinf=np.inf, neginf=-np.inf))
    return {"t2v": t2v, "v2t": retrieval_metrics(best.T)}

# -- scoring a predictions file (`vmr score`) ------------------------------------------------

# Per dataset: annotation format, R@n IoU thresholds, MMN's NMS threshold, Moment-DETR length buckets.
DATASETS: dict[str, dict[str, Any]] = {
    "qvhighlights": {"format": "qvhighlights", "thresholds": (0.3, 0.5, 0.7), "nms": None,
                     "ranges": QVH_LENGTH_RANGES},
    "charades_sta": {"format": "charades_sta", "thresholds": (0.3, 0.5, 0.7), "nms": 0.5,
                     "ranges": QVH_LENGTH_RANGES},
    "synthetic": {"format": "charades_sta", "thresholds": (0.3, 0.5, 0.7), "nms": 0.5,
                  "ranges": QVH_LENGTH_RANGES},
    "charades_cd": {"format": "grounding_json", "thresholds": (0.3, 0.5, 0.7), "nms": 0.5,
                    "ranges": QVH_LENGTH_RANGES},
    "charades_cg": {"format": "grounding_json", "thresholds": (0.3, 0.5, 0.7), "nms": 0.5,
                    "ranges": QVH_LENGTH_RANGES},
    "activitynet": {"format": "grounding_json", "thresholds": (0.3, 0.5, 0.7), "nms": 0.5,
                    "ranges": {**{k: v for k, v in QVH_LENGTH_RANGES.items() if k != "full"},
                               "superlong": (150.0, float("inf")), "full": (0.0, float("inf"))}},
    "tacos": {"format": "tacos_json", "thresholds": (0.1, 0.3, 0.5), "nms": 0.4, "ranges": TACOS_LENGTH_RANGES},
    "cpl": {"format": "cpl_json", "thresholds": (0.1, 0.3, 0.5, 0.7, 0.9), "nms": None, "ranges": QVH_LENGTH_RANGES},
    "msrvtt": {"format": "msrvtt_csv", "retrieval": True},
}


def read_jsonl(path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl_lines(path)]


def read_jsonl_lines(path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-empty line."""
    import json

    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise PredictionsError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
    return rows


class PredictionsError(VmrError, ValueError):
    """A malformed predictions file: the message names the file, the line and the qid."""


def check_moment_predictions(rows: Sequence[tuple[int, Mapping[str, Any]]], path) -> None:
    """Every line has a qid seen once and a non-empty list of finite [start, end, score] windows
    with start <= end: anything else would shift the metrics silently or crash the evaluator."""
    seen: dict[Any, int] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if not isinstance(row, Mapping) or "qid" not in row:
            raise PredictionsError(f"{where}: expected an object with 'qid' and 'pred_relevant_windows'")
        qid = row["qid"]
        where += f" (qid {qid})"
        if qid in seen:
            raise PredictionsError(f"{where}: qid repeated (first on line {seen[qid]})")
        seen[qid] = lineno
        windows = row.get("pred_relevant_windows")
        if not isinstance(windows, list) or not windows:
            raise PredictionsError(f"{where}: 'pred_relevant_windows' must be a non-empty list of [start, end, score]")
        for i, w in enumerate(windows):
            if not (isinstance(w, list) and len(w) == 3
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)):
                raise PredictionsError(f"{where}: window {i} {w!r} is not [start, end, score]")
            if not all(math.isfinite(x) for x in w):
                raise PredictionsError(f"{where}: window {i} {w!r} has a value that is not finite")
            if w[0] > w[1]:
                raise PredictionsError(f"{where}: window {i} {w!r} ends before it starts")


def _ground_truth(annotations, dataset: str, split: str, fmt: str, durations, cleaning: str) -> list[dict[str, Any]]:
    """Moment-DETR style GT records from any supported annotation file."""

    if fmt == "qvhighlights":
        gt = read_jsonl(annotations)
        if gt and "relevant_windows" not in gt[0]:
            raise ValueError(f"{annotations}: this split has no labels (QVHighlights test is scored on CodaLab)")
        return gt
    ann = load_split(annotations, fmt, dataset=dataset, split=split, durations=durations, cleaning=cleaning)
    return [{"qid": q.qid, "vid": q.video_id, "duration": q.duration, "relevant_windows": [list(m) for m in q.moments]}
            for q in ann]


def score_moment_predictions(
    predictions: Sequence[Mapping[str, Any]], ground_truth: Sequence[Mapping[str, Any]], dataset: str,
    nms_threshold: float | None = None, ks: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Moment-DETR metrics, plus (single-moment datasets) MMN-style R@k,IoU@θ and mIoU."""
    conv = DATASETS[dataset]
    out: dict[str, Any] = {"moment_detr": evaluate_moment_detr(predictions, ground_truth, length_ranges=conv["ranges"])}
    if all(len(g["relevant_windows"]) == 1 for g in ground_truth):
        gt_by_qid = {g["qid"]: g["relevant_windows"][0] for g in ground_truth}
        windows, _ = _pad([p["pred_relevant_windows"] for p in predictions], 3, fill=0.0)
        scores = np.where(_pad([p["pred_relevant_windows"] for p in predictions], 3)[1], windows[..., 2], -np.inf)
        gt = np.asarray([gt_by_qid[p["qid"]] for p in predictions], dtype=np.float64)
        out["recall"] = evaluate_moments(windows[..., :2], scores, gt, ks=ks, thresholds=conv["thresholds"],
                                         nms_threshold=nms_threshold)
    return out


def _similarity_file(path) -> np.ndarray:
    """A (texts x videos) similarity matrix with its ground truth on the diagonal: .npy, or .npz
    with `similarity` (+ `text_vids`/`video_vids`, then columns are reordered to the texts' videos)."""
    from pathlib import Path

    if Path(path).suffix == ".npy":
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as z:
        if "similarity" not in z:
            raise ValueError(f"{path}: expected an array named 'similarity' (got {list(z.keys())})")
        sim = z["similarity"]
        if "text_vids" in z and "video_vids" in z:
            col = {v: i for i, v in enumerate(z["video_vids"].tolist())}
            texts = z["text_vids"].tolist()
            if len(set(texts)) != len(texts) or set(texts) != set(col):
                raise ValueError(f"{path}: texts and videos are not one-to-one (multi-caption scoring is not supported)")
            sim = sim[:, [col[v] for v in texts]]
    return sim


def score_file(
    predictions_path, annotations_path, dataset: str, split: str = "test", *,
    format: str | None = None, durations: Sequence[str] = (), cleaning: str = "none",
    nms_threshold: float | None = None,
) -> dict[str, Any]:
    """Score a predictions file (ours or another repository's) against an annotation file."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    conv = DATASETS[dataset]
    if conv.get("retrieval"):
        return evaluate_retrieval(_similarity_file(predictions_path))
    rows = read_jsonl_lines(predictions_path)
    if not rows:
        raise PredictionsError(f"{predictions_path}: no predictions (expected Moment-DETR jsonl lines)")
    check_moment_predictions(rows, predictions_path)
    preds = [row for _, row in rows]
    gt = _ground_truth(annotations_path, dataset, split, format or conv["format"], durations, cleaning)
    known = {g["qid"] for g in gt}
    for lineno, row in rows:
        if row["qid"] not in known:
            raise PredictionsError(f"{predictions_path}:{lineno} (qid {row['qid']}): no such query in "
                                   f"{annotations_path} ({split}, cleaning {cleaning})")
    return score_moment_predictions(preds, gt, dataset, nms_threshold)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1}} -> {"a/b": 1}, for tables."""
    flat: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, f"{prefix}{k}/"))
        else:
            flat[f"{prefix}{k}"] = v
    return flat
