"""Evaluation metrics: hand-checked small cases, and (below) the official-number reproductions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.evaluation import evaluate_moments, mean_iou, nms, recall_at_k, temporal_iou


def test_temporal_iou_uses_max_min_union():
    assert temporal_iou([0, 10], [5, 15]) == pytest.approx(5 / 15)
    assert temporal_iou([0, 2], [4, 6]) == 0.0  # disjoint
    assert temporal_iou([3, 3], [3, 3]) == 0.0  # empty union -> 0, not nan
    assert temporal_iou(np.zeros((4, 3, 2)), np.zeros((4, 1, 2))).shape == (4, 3)


def test_nms_strict_greater_and_order():
    moments = np.array([[[0, 10], [0, 10.0], [1, 11], [20, 30], [0, 5]]])
    scores = np.array([[0.9, 0.1, 0.8, 0.7, 0.6]])
    # [1,11] vs [0,10]: IoU 9/11 > 0.5 suppressed; [0,5] vs [0,10]: IoU exactly 0.5 is kept (strict >)
    kept, valid = nms(moments, scores, 0.5)
    assert valid[0].tolist() == [True, True, True, False, False]
    assert kept[0, :3].tolist() == [[0, 10], [20, 30], [0, 5]]


def test_recall_and_miou_by_hand():
    gt = np.array([[0, 10.0], [0, 10.0]])
    ranked = np.array([[[0, 10], [50, 60]], [[40, 50], [0, 6]]], dtype=float)
    r = recall_at_k(ranked, gt, ks=(1, 2), thresholds=(0.5, 0.7))
    assert r == {"R@1,IoU@0.5": 50.0, "R@1,IoU@0.7": 50.0, "R@2,IoU@0.5": 100.0, "R@2,IoU@0.7": 50.0}
    assert mean_iou(ranked[:, 0], gt) == pytest.approx(50.0)


def test_evaluate_moments_with_nms_never_counts_suppressed():
    gt = np.array([[20, 30.0]])
    moments = np.array([[[0, 10], [0, 9], [20, 30]]], dtype=float)
    scores = np.array([[0.9, 0.8, 0.1]])
    assert evaluate_moments(moments, scores, gt, ks=(1, 2), thresholds=(0.5,))["R@2,IoU@0.5"] == 0.0
    m = evaluate_moments(moments, scores, gt, ks=(1, 2), thresholds=(0.5,), nms_threshold=0.5)
    assert m["R@2,IoU@0.5"] == 100.0 and m["R@1,IoU@0.5"] == 0.0 and m["mIoU"] == 0.0


# -- Moment-DETR / QVHighlights ---------------------------------------------------------------

import json  # noqa: E402

from pipeline.training.evaluation import evaluate_moment_detr, evaluate_retrieval, retrieval_metrics  # noqa: E402


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_qvhighlights_reference_metrics_reproduced_exactly(reference_data, shared_annotations):
    ref_dir = reference_data / "qvhighlights_eval"
    preds = _jsonl(ref_dir / "sample_val_preds.jsonl")
    gt = _jsonl(shared_annotations / "qvhighlights" / "highlight_val_release.jsonl")
    ours = evaluate_moment_detr(preds, gt)
    expected = json.loads((ref_dir / "sample_val_preds_metrics_raw.json").read_text())
    assert ours == expected  # every number, same rounding
    assert list(ours) == list(expected) and list(ours["brief"]) == list(expected["brief"])  # same key order


def test_moment_detr_by_hand():
    gt = [{"qid": 1, "duration": 150, "relevant_windows": [[0, 10], [20, 30]]}]
    # ranked by score: [20,30] (tp), [0,10] (tp) ; [40,50] first in file but lowest score (fp)
    preds = [{"qid": 1, "pred_relevant_windows": [[40, 50, 0.1], [20, 30, 0.9], [0, 10, 0.5]]}]
    m = evaluate_moment_detr(preds, gt, length_ranges={"full": (0, 150)})
    assert m["full"]["MR-mAP"]["0.5"] == 100.0  # both GTs found before the false positive
    assert m["full"]["MR-R1"]["0.5"] == 0.0  # R1 reads the first window in file order
    preds[0]["pred_relevant_windows"] = [[0, 10, 0.9], [1, 10, 0.8], [50, 60, 0.7], [20, 30, 0.6]]
    m = evaluate_moment_detr(preds, gt, length_ranges={"full": (0, 150)})
    # tp, fp (GT already taken), fp, tp -> precision 1, 1/2, 1/3, 2/4 ; VOC AP = 0.5*1 + 0.5*0.5
    assert m["full"]["MR-mAP"]["0.5"] == 75.0


def test_moment_detr_rejects_mismatched_qids():
    with pytest.raises(ValueError, match="1 missing"):
        evaluate_moment_detr([{"qid": 1, "pred_relevant_windows": [[0, 1, 1]]}],
                             [{"qid": 1, "relevant_windows": [[0, 1]]}, {"qid": 2, "relevant_windows": [[0, 1]]}])


def _reference_hl_ap(y, scores):
    """Loop version of sklearn's precision-recall-curve AP as the official script uses it."""
    if len(set(y)) == 1:
        return float(y[0])
    points = []  # (precision, recall) at each distinct threshold, highest first
    for t in sorted(set(scores), reverse=True):
        sel = scores >= t
        points.append((y[sel].sum() / sel.sum(), y[sel].sum() / y.sum()))
    aps, prev_recall = [], 0.0
    for i, (_, r) in enumerate(points):
        if r > prev_recall:  # recall grew: interpolated precision = best at this or a lower threshold
            aps.append(max(pp for pp, _ in points[i:]))
        prev_recall = r
    return float(np.mean(aps))


def test_highlight_ap_and_hit1_by_reference_loop():
    rng = np.random.default_rng(0)
    gts, preds, expected, hits = [], [], [], []
    for qid in range(40):
        n = int(rng.integers(3, 20))
        raw = rng.integers(0, 5, size=(n, 3))
        scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
        gts.append({"qid": qid, "duration": 2 * n, "relevant_windows": [[0, 2]],
                    "relevant_clip_ids": list(range(n)), "saliency_scores": raw.tolist()})
        preds.append({"qid": qid, "pred_saliency_scores": scores.tolist()})
        binary = (raw >= 3).astype(float)
        expected.append([_reference_hl_ap(binary[:, a], scores) for a in range(3)])
        hits.append(binary[int(np.argmax(scores))].max())
    m = evaluate_moment_detr(preds, gts)
    assert m["HL-min-Good"]["HL-mAP"] == round(100 * float(np.mean(expected)), 2)
    assert m["HL-min-Good"]["HL-Hit1"] == round(100 * float(np.mean(hits)), 2)


# -- text-video retrieval ---------------------------------------------------------------------


def test_retrieval_tie_semantics_of_clip4clip():
    x = np.array([[0.9, 0.9, 0.1], [0.2, 0.8, 0.3], [0.1, 0.5, 0.4]])
    m = retrieval_metrics(x)
    assert (m["R@1"], m["MdR"], m["MnR"]) == (50.0, 1.5, 1.5)  # ranks [0, 1, 0, 1]


def test_retrieval_nan_diagonal_row_dropped_and_directions():
    x = np.array([[np.nan, 0.1, 0.2], [0.0, 1.0, np.nan], [0.3, 0.2, 0.1]])
    t2v = retrieval_metrics(x)
    assert t2v["R@1"] == 50.0 and t2v["MnR"] == 2.0  # ranks [0, 2] from rows 1 and 2
    both = evaluate_retrieval(np.eye(4))
    assert both["t2v"]["R@1"] == both["v2t"]["R@1"] == 100.0 and both["v2t"]["MdR"] == 1.0


def test_multi_caption_retrieval():
    from pipeline.training.evaluation import evaluate_multi_caption_retrieval

    # captions 0,1 -> video 0 ; caption 2 -> video 1 ; caption 3 -> video 2
    sim = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.3], [0.2, 0.8, 0.1], [0.7, 0.6, 0.4]])
    m = evaluate_multi_caption_retrieval(sim, [0, 0, 1, 2])
    # own-video ranks: 0, 2, 0, 2 -> R@1 50, lower median of (1, 1, 3, 3) = 1, MnR 2
    assert (m["t2v"]["R@1"], m["t2v"]["MdR"], m["t2v"]["MnR"]) == (50.0, 1.0, 2.0)
    # video v ranks caption groups by their best caption: groups = [max(c0,c1), c2, c3]
    best = np.array([[0.9, 0.5, 0.3], [0.2, 0.8, 0.1], [0.7, 0.6, 0.4]])
    assert m["v2t"] == retrieval_metrics(best.T)
    with pytest.raises(ValueError, match="caption_video"):
        evaluate_multi_caption_retrieval(sim, [0, 0, 3, 1])
