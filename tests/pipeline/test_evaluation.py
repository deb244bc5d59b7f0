"""Evaluation metrics: hand-checked small cases, and (below) the official-number reproductions."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import evaluate_moments, mean_iou, nms, recall_at_k, temporal_iou


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
