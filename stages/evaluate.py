"""Stage `evaluate@<model>`: predictions and metrics of the kept weights, next to a random baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models import MODELS
from pipeline import provenance
from pipeline.atomic import atomic_path, write_json, write_text
from pipeline.params import Params, require_files, subset
from pipeline.progress import log
from pipeline.trainer import (
    GroundingModel,
    _eval_data,
    configure_determinism,
    load_for_evaluation,
    predict_and_score,
    random_baseline,
    setup_distributed,
)
from stages.train import CODE as TRAIN_CODE
from stages.train import check_inputs, data_context

CODE = (*TRAIN_CODE, "stages/evaluate.py")


def run(params: Params, source: str, model: str) -> None:
    cls = MODELS.get(model)
    data = data_context(params, model)
    best = Path(params.trainer.out_dir) / model / "best.pt"
    require_files(source, {f"trainer.out_dir ({model} weights)": str(best)})
    inputs = check_inputs(params, source, model, data)
    split = params.evaluate.split
    out_dir = Path(params.evaluate.out_dir) / model

    env = setup_distributed(params.trainer.device)
    configure_determinism(params.trainer.deterministic)
    net, state = load_for_evaluation(cls, best, data, env.device)
    cfg = net.cfg
    eval_data = _eval_data(net, split, data)
    use_amp = params.trainer.amp and env.device.type == "cuda"
    preds, metrics = predict_and_score(net, eval_data, cfg.eval_batch_size, env, use_amp,
                                       params.trainer.amp_dtype, params.trainer.num_workers)
    baseline = random_baseline(net, preds, eval_data, params.evaluate.random_baseline_seed)

    if isinstance(net, GroundingModel):
        predictions_path = out_dir / "predictions" / "predictions.jsonl"
        write_text(predictions_path, "".join(json.dumps(p) + "\n" for p in preds))
    else:
        predictions_path = out_dir / "predictions" / "similarity.npz"
        with atomic_path(predictions_path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, similarity=preds.similarity.numpy(), text_qids=np.asarray(preds.text_qids),
                         text_vids=np.asarray(preds.text_vids), video_vids=np.asarray(preds.video_vids))
    metrics_path = out_dir / "metrics.json"
    write_json(metrics_path, {**metrics, "random_baseline": baseline, "epoch": int(state["epoch"])})

    selected_on = state["config"].get("select_split")
    record = provenance.make_record(
        f"evaluate@{model}",
        subset(params, "seed", "dataset", "evaluate", f"model.{model}") if model in params.model
        else subset(params, "seed", "dataset", "evaluate"),
        inputs={"weights": best, **inputs},
        weights=net.weights_provenance(),
        code=CODE,
        extra={"split": split, "epoch": int(state["epoch"]), "selected_on": selected_on,
               "selected_on_evaluated_split": selected_on == split},
    )
    for artifact in (predictions_path, metrics_path):
        provenance.write_record(artifact, record)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
    shown_random = ", ".join(f"{k} {v:.2f}" for k, v in baseline.items())
    log(f"evaluate@{model} on {split}: {shown}\n  random baseline: {shown_random}")
