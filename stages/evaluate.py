"""Stage `evaluate-<model>`: predictions and metrics of the kept weights, next to a random baseline."""

from __future__ import annotations

from pathlib import Path

from models import MODELS
from pipeline.core import provenance
from pipeline.core.atomic import write_json
from pipeline.core.codedeps import stage_code
from pipeline.core.errors import VmrError
from pipeline.core.params import Params, require_files, subset
from pipeline.core.progress import log
from pipeline.training.checkpoints import unfinished_reason
from pipeline.training.trainer import (
    configure_determinism,
    load_for_evaluation,
    predict_and_score,
    setup_distributed,
)
from stages.train import check_inputs, data_context


class UnfinishedTraining(VmrError):
    """best.pt is from a training run that did not finish."""


def run(params: Params, source: str, model: str, allow_unfinished: bool = False) -> None:
    cls = MODELS.get(model)
    data = data_context(params, model)
    best = Path(params.trainer.out_dir) / model / "best.pt"
    require_files(source, {f"trainer.out_dir ({model} weights)": str(best)})
    unfinished = unfinished_reason(best)
    if unfinished and not allow_unfinished:
        raise UnfinishedTraining(f"{unfinished}; run `vmr train --model {model}` to finish it, "
                                 "or pass --allow-unfinished")
    if unfinished:
        log(f"WARNING: evaluating unfinished training: {unfinished} (recorded in metrics.json)")
    inputs = check_inputs(params, source, model, data)
    split = params.evaluate.split
    out_dir = Path(params.evaluate.out_dir) / model

    env = setup_distributed(params.trainer.device)
    configure_determinism(params.trainer.deterministic)
    net, state = load_for_evaluation(cls, best, data, env.device)
    eval_data = net.eval_data(split, data)
    use_amp = params.trainer.amp and env.device.type == "cuda"
    preds, metrics = predict_and_score(net, eval_data, net.cfg.eval_batch_size, env, use_amp,
                                       params.trainer.amp_dtype, params.trainer.num_workers)
    baseline = net.random_baseline(preds, eval_data, params.evaluate.random_baseline_seed)

    predictions_path = net.write_predictions(preds, out_dir / "predictions")
    metrics_path = out_dir / "metrics.json"
    write_json(metrics_path, {**metrics, "random_baseline": baseline, "epoch": int(state["epoch"]),
                              **({"unfinished_training": unfinished} if unfinished else {})})

    selected_on = state["config"].get("select_split")
    record = provenance.make_record(
        f"evaluate-{model}",
        subset(params, "seed", "dataset", "evaluate", f"model.{model}") if model in params.model
        else subset(params, "seed", "dataset", "evaluate"),
        inputs={"weights": best, **inputs},
        weights=net.weights_provenance(),
        code=stage_code("evaluate", [cls]),
        extra={"split": split, "epoch": int(state["epoch"]), "selected_on": selected_on,
               "selected_on_evaluated_split": selected_on == split},
    )
    for artifact in (predictions_path, metrics_path):
        provenance.write_record(artifact, record)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    shown_random = ", ".join(f"{k} {v:.2f}" for k, v in baseline.items())
    log(f"evaluate-{model} on {split}: {shown}\n  random baseline: {shown_random}")
