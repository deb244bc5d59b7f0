"""`vmr score` on our own and foreign prediction files; the synthetic dataset through the parser."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.media import synth
from pipeline.text.annotations import load_split


def test_score_qvhighlights_reference_file(reference_data, shared_annotations, tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, [
        "score", str(reference_data / "qvhighlights_eval" / "sample_val_preds.jsonl"),
        "--annotations", str(shared_annotations / "qvhighlights" / "highlight_val_release.jsonl"),
        "--dataset", "qvhighlights", "--split", "val", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "MR-full-mAP" in result.output and "35.65" in result.output
    expected = json.loads((reference_data / "qvhighlights_eval" / "sample_val_preds_metrics_raw.json").read_text())
    assert json.loads(out.read_text())["moment_detr"] == expected


def test_score_unlabelled_split_and_bad_dataset_are_clear_errors(shared_annotations, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"qid": 1, "pred_relevant_windows": [[0, 2, 1.0]]}) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(preds), "--annotations",
                                 str(shared_annotations / "qvhighlights" / "highlight_test_release.jsonl"),
                                 "--dataset", "qvhighlights"])
    assert result.exit_code == 2 and "no labels" in result.output
    result = runner.invoke(app, ["score", str(preds), "--annotations", str(preds), "--dataset", "nope"])
    assert result.exit_code == 2 and "unknown dataset" in result.output


def test_score_charades_predictions_with_nms(shared_annotations, tmp_path):
    d = shared_annotations / "charades_sta"
    gt = load_split(d / "charades_sta_test.txt", durations=[d / "Charades_v1_test.csv"], cleaning="mmn")
    rows = []
    for i, q in enumerate(gt):  # even queries: perfect top-1; odd: 5 copies of a far window, then the GT
        s, e = q.moment
        far = [[e + 50, e + 60, 0.9 - 0.1 * k] for k in range(5)]
        windows = [[s, e, 0.9], [s, e, 0.8]] if i % 2 == 0 else [*far, [s, e, 0.1]]
        rows.append(json.dumps({"qid": q.qid, "vid": q.video_id, "pred_relevant_windows": windows}))
    preds = tmp_path / "charades.jsonl"
    preds.write_text("\n".join(rows) + "\n")
    args = ["score", str(preds), "--annotations", str(d / "charades_sta_test.txt"), "--dataset", "charades_sta",
            "--durations", str(d / "Charades_v1_test.csv"), "--cleaning", "mmn"]
    runner = CliRunner()
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a.json")]).exit_code == 0
    plain = json.loads((tmp_path / "a.json").read_text())["recall"]
    assert runner.invoke(app, [*args, "--nms", "0.5", "--out", str(tmp_path / "b.json")]).exit_code == 0
    nms = json.loads((tmp_path / "b.json").read_text())["recall"]
    half = 100 * ((len(gt) + 1) // 2) / len(gt)
    assert plain["R@1,IoU@0.5"] == nms["R@1,IoU@0.5"] == half
    assert plain["R@5,IoU@0.5"] == half and nms["R@5,IoU@0.5"] == 100.0  # NMS lifts the GT into the top 5
    assert json.loads((tmp_path / "a.json").read_text())["moment_detr"]["brief"]["MR-full-R1@0.5"] == round(half, 2)


def test_score_retrieval_npz_reorders_columns(tmp_path):
    sim = np.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.7]], dtype=np.float32)
    path = tmp_path / "similarity.npz"
    np.savez(path, similarity=sim, text_vids=np.array(["b", "a", "c"]), video_vids=np.array(["a", "b", "c"]))
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["score", str(path), "--annotations", str(path), "--dataset", "msrvtt",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["t2v"]["R@1"] == 100.0 and metrics["v2t"]["R@1"] == 100.0


def test_synthetic_annotations_round_trip_through_charades_parser(tmp_path):
    cfg = synth.SynthConfig(seed=3, num_train=5, num_test=2)
    plans = [synth.plan_video(cfg, vid, split, i) for i, (vid, split) in enumerate(synth.video_ids(cfg))]
    for split in ("train", "test"):
        part = [p for p in plans if p.split == split]
        (tmp_path / f"sta_{split}.txt").write_text(synth.sta_lines(part))
        (tmp_path / f"Charades_v1_{split}.csv").write_text(synth.charades_csv(part))
        ann = load_split(tmp_path / f"sta_{split}.txt", dataset="synthetic", split=split,
                         durations=[tmp_path / f"Charades_v1_{split}.csv"], cleaning="mmn")
        expected = [(p.vid, round(p.duration, 2), (round(e.start, 1), round(e.end, 1)), e.caption + ".")
                    for p in part for e in p.events]
        assert [(q.video_id, q.duration, q.moment, q.sentence) for q in ann] == expected
        assert ann.report["cleaning"]["queries_dropped"] == 0
