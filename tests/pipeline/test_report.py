"""`vmr report`: the metrics table reads every results/<model>/metrics.json, baselines included."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pipeline.cli import app


def test_report_tables_models_and_baselines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    for model, metrics in {
        "mmn": {"R@1,IoU@0.5": 25.0, "mIoU": 19.7, "epoch": 15,
                "random_baseline": {"R@1,IoU@0.5": 3.85, "mIoU": 12.4}},
        "glscl": {"t2v_R1": 31.25, "v2t_R1": 12.5, "random_baseline": {"t2v_R1": 12.5}},
    }.items():
        (tmp_path / "results" / model).mkdir(parents=True)
        (tmp_path / "results" / model / "metrics.json").write_text(json.dumps(metrics))
    result = CliRunner().invoke(app, ["report"], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("mmn", "mmn random_baseline", "glscl", "25.00", "3.85", "31.25", "R@1,IoU@0.5", "t2v_R1"):
        assert text in out, text
    assert "(not produced)" in out  # nothing but results/ exists here
