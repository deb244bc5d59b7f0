"""Stages train-mmn and evaluate-mmn through the CLI on a tiny dataset: outputs, provenance, errors."""

from __future__ import annotations

import json

from support.toy import write_toy_params  # noqa: E402
from typer.testing import CliRunner

from pipeline.cli import app  # noqa: E402
from pipeline.core.provenance import read_record  # noqa: E402


def test_train_then_evaluate_writes_predictions_metrics_and_provenance(tmp_path):
    params = write_toy_params(tmp_path, select_split="test")
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--model", "mmn", "-p", str(params)])
    assert result.exit_code == 0, result.output
    best = tmp_path / "runs" / "mmn" / "best.pt"
    record = read_record(best)
    assert record["weights"] == {"text_encoder": "random"}
    assert record["selected_on"] == "test" and record["selected_on_evaluated_split"] is True
    assert "features.toy" in record["inputs"]
    assert (tmp_path / "runs" / "mmn" / "live" / "metrics.json").is_file()

    result = runner.invoke(app, ["evaluate", "--model", "mmn", "-p", str(params)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results" / "mmn"
    lines = [json.loads(line) for line in (out / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all({"qid", "vid", "pred_relevant_windows"} <= set(p) for p in lines)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"R@1,IoU@0.5", "mIoU", "random_baseline", "epoch"} <= set(metrics)
    assert set(metrics["random_baseline"]) == set(metrics) - {"random_baseline", "epoch"}
    assert read_record(out / "metrics.json")["split"] == "test"
    # evaluation is deterministic
    before = (out / "predictions" / "predictions.jsonl").read_bytes()
    assert runner.invoke(app, ["evaluate", "--model", "mmn", "-p", str(params)]).exit_code == 0
    assert (out / "predictions" / "predictions.jsonl").read_bytes() == before


def test_a_finished_run_is_reused_only_for_the_same_inputs(tmp_path):
    """Checkpoints persist across DVC runs; new features must train afresh, not resume the old run."""
    import h5py
    import torch

    params = write_toy_params(tmp_path)
    runner = CliRunner()
    best = tmp_path / "runs" / "mmn" / "best.pt"
    assert runner.invoke(app, ["train", "--model", "mmn", "-p", str(params)]).exit_code == 0
    def weights() -> dict:
        return {k: v for k, v in torch.load(best, weights_only=False)["model"].items() if torch.is_tensor(v)}

    first = weights()
    assert first
    first_record = read_record(best)

    # same inputs: the finished run is picked up again, nothing retrains
    result = runner.invoke(app, ["train", "--model", "mmn", "-p", str(params)])
    assert result.exit_code == 0 and "training afresh" not in result.output
    assert all(torch.equal(first[k], v) for k, v in weights().items())

    # other feature values under the same file name and params: train afresh on them
    # (a new file replacing the old one, as merge writes it: the first run may still hold it open)
    path = tmp_path / "data" / "features" / "toy.h5"
    with h5py.File(path, "r") as old, h5py.File(path.with_suffix(".new"), "w") as new:
        for vid in old:
            new[vid] = old[vid][()] * 2.0 + 1.0
    path.with_suffix(".new").replace(path)
    result = runner.invoke(app, ["train", "--model", "mmn", "-p", str(params)])
    assert result.exit_code == 0, result.output
    assert "different config or code" in result.output and "training afresh" in result.output
    second = weights()
    assert any(not torch.equal(first[k], v) for k, v in second.items())
    assert read_record(best)["inputs"]["features.toy"]["sha256"] != first_record["inputs"]["features.toy"]["sha256"]


def test_missing_features_fail_before_any_work_naming_the_key(tmp_path):
    params = write_toy_params(tmp_path)
    (tmp_path / "data" / "features" / "toy.h5").unlink()
    result = CliRunner().invoke(app, ["train", "--model", "mmn", "-p", str(params)])
    assert result.exit_code == 2
    assert "features.toy" in result.output and "toy.h5" in result.output
    assert not (tmp_path / "runs").exists()


def test_evaluate_without_trained_weights_is_a_clear_error(tmp_path):
    params = write_toy_params(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--model", "mmn", "-p", str(params)])
    assert result.exit_code == 2 and "best.pt" in result.output


def test_unknown_selection_split_is_a_params_error(tmp_path):
    params = write_toy_params(tmp_path, select_split="val")
    result = CliRunner().invoke(app, ["train", "--model", "mmn", "-p", str(params)])
    assert result.exit_code == 2 and "trainer.select_split" in result.output and "'val'" in result.output
