"""`vmr report`: the metrics table reads every results/<model>/metrics.json, baselines included."""

from __future__ import annotations

import json

import pytest
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


def _write_all_headline_metrics(root):
    from pipeline.report import HEADLINE

    grounding = {c: 10.0 + i for i, c in enumerate(HEADLINE) if not c.startswith(("t2v", "v2t"))}
    retrieval = {c: 20.0 + i for i, c in enumerate(HEADLINE) if c.startswith(("t2v", "v2t"))}
    for model, metrics in {"mmn": grounding | {"random_baseline": grounding},
                           "glscl": retrieval | {"random_baseline": retrieval}}.items():
        (root / model).mkdir(parents=True)
        (root / model / "metrics.json").write_text(json.dumps(metrics))
    return HEADLINE


@pytest.mark.parametrize("columns", [None, "80"])
def test_report_off_a_terminal_prints_whole_column_names(tmp_path, monkeypatch, columns):
    """`make repro | tee log`: no TTY, so rich would squeeze the table into 80 columns ("R@1…")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COLUMNS", raising=False)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    headline = _write_all_headline_metrics(tmp_path / "results")
    result = CliRunner().invoke(app, ["report"], env={"COLUMNS": columns} if columns else {})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    header = next(line for line in result.output.splitlines() if "R@1,IoU@0.3" in line)
    for name in ("model", *headline):
        assert f" {name} " in header, name  # whole, on one header line
    assert "mmn random_baseline" in result.output and "glscl random_baseline" in result.output


def test_report_takes_a_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "profile.yaml").write_text("evaluate:\n  out_dir: elsewhere\n")
    _write_all_headline_metrics(tmp_path / "elsewhere")
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 0 and "No evaluated model yet" in result.output
    result = CliRunner().invoke(app, ["report", "--profile", "profile.yaml"])
    assert result.exit_code == 0, result.output
    assert "elsewhere/<model>/metrics.json" in result.output and "mmn random_baseline" in result.output
