"""Stage `train-<model>`: train one registered model with the shared trainer (pipeline.training)."""

from __future__ import annotations

from pathlib import Path

from models import MODELS
from pipeline.core import provenance
from pipeline.core.codedeps import stage_code
from pipeline.core.params import Params, ParamsError, require_files, subset
from pipeline.core.progress import is_rank_zero, log
from pipeline.training.context import DataContext
from stages.common import duration_files


def data_context(params: Params, model: str) -> DataContext:
    cfg = MODELS.config(params, model)
    return DataContext(
        dataset=params.dataset,
        features_dir=Path(params.merge.out_dir),
        vocab_dir=Path(params.vocab.out_dir),
        frames_dir=Path(params.decode.out_dir),
        run_dir=Path(params.trainer.out_dir) / model,
        seed=cfg.seed if cfg.seed is not None else params.seed,
        video_features=tuple(MODELS.spec(model).needs(cfg, params.dataset).features),
    )


def annotation_files(params: Params, source: str = "params") -> dict[str, Path]:
    """The annotation files every model reads: the splits, and the durations where the format needs them."""
    return {f"dataset.splits.{s}": Path(p) for s, p in params.dataset.splits.items()} | duration_files(params, source)


def model_inputs(params: Params, model: str, data: DataContext, source: str = "params") -> dict[str, Path]:
    """Every file training `model` reads, by role: the annotations and what the model needs."""
    needs = MODELS.spec(model).needs(MODELS.config(params, model), params.dataset)
    return annotation_files(params, source) | data.input_files(needs)


def check_inputs(params: Params, source: str, model: str, data: DataContext) -> dict[str, Path]:
    """`model_inputs`, after checking that each exists (exit 2 naming the key if one is missing)."""
    inputs = model_inputs(params, model, data, source)
    require_files(source, {k: str(v) for k, v in inputs.items()})
    # every query's video has features (or is skipped), before any work
    for split in sorted({"train", params.trainer.select_split, params.evaluate.split} & set(data.splits)):
        data.queries(split)
    return inputs


def run(params: Params, source: str, model: str) -> None:
    # here, not at the top: `vmr dag` reads this module's helpers above and must not import torch
    from pipeline.training.checkpoints import finished_run_fields
    from pipeline.training.trainer import fit

    cls = MODELS.get(model)
    cfg = MODELS.config(params, model)
    t = params.trainer
    data = data_context(params, model)
    inputs = check_inputs(params, source, model, data)
    if t.select_split is not None and t.select_split not in params.dataset.splits:
        raise ParamsError(f"{source}: key 'trainer.select_split': no split '{t.select_split}' in dataset.splits "
                          f"{sorted(params.dataset.splits)}")
    selects_on_eval = t.select_split == params.evaluate.split
    if selects_on_eval:
        log(f"WARNING: model selection on '{t.select_split}', the split evaluate reports (as the seeds did): "
            "the reported numbers are optimistic")
    code = stage_code("train", [cls])
    result = fit(
        model, cls, cfg, data,
        device=t.device, num_workers=t.num_workers, select_split=t.select_split,
        select_metric=t.select_metric, deterministic=t.deterministic, amp=t.amp, amp_dtype=t.amp_dtype,
        resume=t.resume, keep_checkpoints=t.keep_checkpoints,
        # Code and input digests in the record: a checkpoint of older code or of other features,
        # vocabularies or annotations is never resumed (DVC keeps checkpoints: persist).
        config_record={"dataset": params.dataset.model_dump(), "code": provenance.code_version(code),
                       "inputs": {role: provenance.sha256_path(path) for role, path in inputs.items()}},
    )
    if result is None or not is_rank_zero():
        return
    record = provenance.make_record(
        f"train-{model}",
        subset(params, "seed", "dataset", "trainer", f"model.{model}") if model in params.model
        else subset(params, "seed", "dataset", "trainer"),
        inputs=inputs,
        weights=result.weights,
        code=code,
        # marks the run finished (pipeline.training.checkpoints.unfinished_reason, checked by evaluate)
        extra={**finished_run_fields(result.best_path), "selected_epoch": result.best_epoch,
               "model_config": cfg.model_dump(),
               "selected_on": t.select_split, "selected_on_evaluated_split": selects_on_eval,
               "selection_metrics": result.best_metrics},
    )
    provenance.write_record(result.best_path, record)
    log(f"train-{model}: kept epoch {result.best_epoch} -> {result.best_path}")
