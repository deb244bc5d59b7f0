"""The shared trainer: one loop for every model (MMN, MESM, CNM, MRNet, GLSCL).

It owns everything that is not the model: seeding and determinism, data loading and batching,
AMP on CUDA, DDP under torchrun, gradient clipping, checkpoints and resume, model selection,
dvclive logs, prediction and evaluation. A model owns its layers, its data items, its losses and
its optimisers, and declares what it reads. The split is Lightning-like and deliberately small.

This module is the contract below and the loop over it (`fit`, `predict`, `load_for_evaluation`).
The machinery lives beside it in `pipeline/training/`:
    checkpoints.py   checkpoint files (byte-reproducible torch.save, listing, pruning), RNG states, dvclive logs
    resume.py        whether a checkpoint found on start is resumed: a pure decision
    distributed.py   device, seeds, determinism, the DDP collectives, global batches and their rank shares
    evaluation.py    the shared evaluator that models' metrics() call (the seeds' conventions)
(`setup_distributed` and `configure_determinism`, which stage evaluate calls, are importable from here.)

THE MODEL CONTRACT
==================

Registration and config
-----------------------
    from models import MODELS
    from pipeline.training.trainer import GroundingModel, TrainConfig      # or RetrievalModel

    @MODELS.register("mmn")
    class MMN(GroundingModel):
        class Config(TrainConfig):          # params.yaml `model.mmn`, validated (extra keys = error)
            epochs: Count = 18              # TrainConfig fields: seed, epochs, batch_size,
            batch_size: Count = 48          #   eval_batch_size, grad_clip, eval_every, eval_from,
            lr: Positive = 1e-4             #   select_metric. Defaults = the model's published
            ...                             #   defaults; everything else is the model's own.

        def __init__(self, cfg: Config, data: DataContext): ...

`cfg.batch_size` is the GLOBAL batch in dataset items (what the seed calls batch size: videos for
MMN/MRNet, video groups for MESM, queries for CNM, pairs for GLSCL). Under DDP each of the W ranks
gets a contiguous 1/W share of every global batch, so W processes see the same items per step as one.

What a model reads: `needs(cfg, dataset) -> Needs` (classmethod; `dataset` is params `dataset`)
-------------------------------------------------------------------------------------------------
Everything a model reads besides the annotation splits, declared without building the model:
    features        merged feature files it loads, `features/<name>.h5` (a PCA target included)
    query_features  QueryFeatures(name, encoder, config_keys): sentences encoded once by a frozen
                    encoder (stage `query_features-<model>` writes `features/<name>.h5`)
    pca             ReducedFeatures(name, pca, config_keys): a PCA-reduced copy of
                    `features/<pca.source>.h5` (stage `feature_pca-<model>`)
    frames          the SamplingProtocol of the frames decode keeps for it (models trained on pixels)
    vocab           files of the vocab stage it reads, `vocab/<name>`
    files           any other file, by the params key that names it (pretrained weights, captions)
(`config_keys`: the model config keys a derived file depends on, the params of its stage.)
Everything follows it, so a model's stages depend on exactly what it reads: the DAG (`pipeline.dag`:
each model's stages and their deps), the decode stage, the input checks before training and
evaluation (`DataContext.input_files(needs)` -> {role: path}; a missing file exits 2 naming it),
the resume record (their sha256) and provenance.

Construction: `Model(cfg, data)` runs after the trainer seeded every RNG with `cfg.seed` (or the
top-level `seed` when that is None), so random init is reproducible. `data` is a `DataContext`:
    data.feature_file(name)   -> Path of the merged HDF5 `features/<name>.h5` (one dataset per video
                                 id, (T, D) float; `pipeline.media.features` loads them with the seeds'
                                 conventions: per-frame L2 norm, average to N clips, concatenation
                                 of several files truncated to the shortest, TEF)
    data.queries(split)       -> list of `pipeline.text.annotations.Query` records of that split, parsed
                                 and cleaned as params `dataset` says (qid, video_id, duration,
                                 sentence, moments in seconds, ...). Cached.
    data.splits               -> split names available in params `dataset.splits`
    data.vocab_dir            -> `vocab/` (CLIP_tokenized_count.txt, GloVe_tokenized_count.txt, glove.pkl)
    data.frames_dir           -> `work/frames/` (decoded frames, for models that read pixels: GLSCL)
    data.run_dir              -> `runs/<model>/`: a place for artifacts the model builds (tokenizer...)
    data.seed                 -> the resolved seed
Anything a model derives from data at construction (e.g. a WordPiece vocab trained on the training
sentences) must be deterministic, or be kept in the state dict via `get_extra_state` /
`set_extra_state` so that evaluation rebuilds the exact model from the checkpoint.

Methods every model implements (nn.Module subclasses of `GroundingModel` or `RetrievalModel`):
    build_dataset(split, data, train: bool) -> torch Dataset of items (any picklable objects)
    collate(items: list) -> batch          (default: torch default_collate). Tensors anywhere in
                                            nested dicts/lists/tuples are moved to the device.
    configure_optimizers() -> Optimization(optimizers=[...], schedulers=[...], interval="epoch"|"step")
                                            schedulers are stepped once per epoch (after it) or once
                                            per training batch, in list order.
    training_step(batch, ctx: StepContext) -> dict[str, Tensor]
        Must contain 'loss' (a scalar); every entry is logged (per-epoch mean, 'train/<key>').
        ctx.epoch is 1-based, ctx.step counts the batches done before this one, ctx.world_size.
        Automatic optimisation (default): the trainer zeroes grads, backprops 'loss', averages
        gradients over ranks, unscales (AMP), clips to cfg.grad_clip, steps EVERY optimiser and
        then calls on_after_optimizer_step(i) for each.
        Manual optimisation: set `manual_optimization = True` on the class and call
        `ctx.optimizer_step(loss, index, retain_graph=False)` once per optimiser step; it zeroes that
        optimiser's grads, backprops, averages over ranks, clips that optimiser's parameters and
        steps it (CNM: the reconstructor step, then the generator step, per batch). The returned
        dict is then only logged.
Optional hooks:
    on_train_epoch_start(epoch)         e.g. freeze/unfreeze BERT, loss-weight schedules
    on_after_optimizer_step(index)      e.g. clamp CLIP's logit_scale after every step
    weights_provenance() -> dict[str, str]   {"text_encoder": sha256 or "random"} for provenance

The task: `GroundingModel` and `RetrievalModel` say how a model is evaluated, so neither the
trainer nor stage evaluate asks which kind it holds. A model implements its task's own methods
(below); these it inherits:
    eval_data(split, data) -> EvalData                     what predicting a split reads
    predict_all(eval_data, batch_size, env, num_workers)   the split's predictions on rank 0 (else None)
    score(predictions, eval_data) -> {metric: value}       through the model's metrics()
    random_baseline(predictions, eval_data, seed)          the same metrics of chance
    write_predictions(predictions, out_dir) -> Path        predictions.jsonl / similarity.npz

Grounding models (`GroundingModel`, task = "grounding") add:
    predict_step(batch) -> list of {"qid", "vid", "pred_relevant_windows": [[s, e, score], ...]}
        seconds, best first (after the model's own NMS), optionally "pred_saliency_scores": [...]
        (Moment-DETR's jsonl format; `predict_all` adds each query's text as "query" after "qid",
        so that evaluate writes lines that can be read without the annotation file).
    metrics(predictions, queries) -> dict[str, float]
        the seed's evaluation convention through the shared evaluator (`pipeline.training.evaluation`);
        keys such as "R@1,IoU@0.5" are what `select_metric` names. Called on the predictions (model
        selection, evaluate) and, by evaluate, on a random-proposal baseline for the same queries.
    random_predictions(queries, seed) -> predictions of that baseline (optional; default: uniform
        random windows inside each video)

Retrieval models (`RetrievalModel`, task = "retrieval") add:
    build_eval_datasets(split, data) -> (text_dataset, video_dataset)
    encode_text(batch)  -> {"qid": [...], "vid": [ground-truth video id per text], "emb": Tensor | tuple of Tensors,
                            optionally "text": [the query text] (then written with the similarity)}
    encode_video(batch) -> {"vid": [...], "emb": Tensor | tuple of Tensors}
        embeddings are concatenated over batches along dim 0 (element-wise for tuples)
    similarity(text_emb, video_emb) -> Tensor [num_texts, num_videos] (called on blocks of
        `eval_batch_size` texts x all videos, so it may be a pairwise head, not just a dot product)
    metrics(result: RetrievalResult) -> dict[str, float] (e.g. "t2v_R1", ...)

Run directory (`trainer.out_dir/<model>/`):
    checkpoints/epoch_NNN.pt   every epoch: model, optimisers, schedulers, AMP scaler, the RNG
                               states of every rank, config record, history (resume point)
    best.pt                    the selected weights (+ config record, epoch, metrics): what evaluate reads
    live/                      dvclive: metrics.json, plots/metrics/{train,<select_split>}/*.tsv
    best.pt.prov.json          provenance
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data import default_collate as torch_default_collate

from pipeline.core.atomic import atomic_path, write_text
from pipeline.core.errors import VmrError
from pipeline.core.progress import log, track
from pipeline.training.checkpoints import (
    checkpoint_path,
    checkpoints,
    load_torch,
    prune_checkpoints,
    rng_state,
    save_torch,
    set_rng_state,
    write_live_logs,
)
from pipeline.training.context import DataContext, MissingVideoError  # noqa: F401  (re-exported)
from pipeline.training.distributed import (
    Dist,
    all_reduce_means,
    barrier,
    broadcast_from_main,
    configure_determinism,
    gather_to_main,
    global_batches,
    move_to,
    rank_loader,
    run_sharded,
    seed_everything,
    setup_distributed,
    sync_gradients,
    teardown_distributed,
)
from pipeline.training.resume import decide_resume
from pipeline.training.spec import Needs, QueryFeatures, ReducedFeatures, TrainConfig  # noqa: F401  (the contract, re-exported)

# -- the contract ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Optimization:
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[Any] = dataclasses.field(default_factory=list)
    interval: Literal["epoch", "step"] = "epoch"


@dataclasses.dataclass
class StepContext:
    epoch: int  # 1-based
    step: int  # batches done before this one, over all epochs
    world_size: int
    optimizer_step: Callable[..., None]  # (loss, index=0, retain_graph=False): manual optimisation


@dataclasses.dataclass
class RetrievalResult:
    similarity: torch.Tensor  # [num_texts, num_videos], float32 on CPU
    text_qids: list[Any]
    text_vids: list[Any]  # ground-truth video of each text
    video_vids: list[Any]
    text_queries: list[str] | None = None  # the text of each row, when the model's encode_text gives it


@dataclasses.dataclass
class EvalData:
    """What predicting a split reads (`VmrModel.eval_data`)."""

    split: str
    primary: Dataset  # grounding: the items; retrieval: the texts
    videos: Dataset | None = None  # retrieval only
    queries: list | None = None  # grounding only: the annotation records (ground truth)


class VmrModel(nn.Module):
    """Base of every trainable model; see the module docstring for the contract."""

    task: ClassVar[str] = ""
    Config: ClassVar[type[TrainConfig]] = TrainConfig
    manual_optimization: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig, data: DataContext):
        super().__init__()
        self.cfg = cfg

    def build_dataset(self, split: str, data: DataContext, train: bool) -> Dataset:
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        return torch_default_collate(items)

    def configure_optimizers(self) -> Optimization:
        raise NotImplementedError

    def training_step(self, batch: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_train_epoch_start(self, epoch: int) -> None:
        pass

    def on_after_optimizer_step(self, index: int) -> None:
        pass

    def weights_provenance(self) -> dict[str, str]:
        return {}

    @classmethod
    def needs(cls, cfg: TrainConfig, dataset: Any) -> Needs:
        """What the model reads besides the annotation splits (`dataset`: params `dataset`)."""
        raise NotImplementedError

    # -- the task: how the model is evaluated, written and compared with chance ---------------------
    def eval_data(self, split: str, data: DataContext) -> EvalData:
        raise NotImplementedError

    def predict_all(self, data: EvalData, batch_size: int, env: Dist, num_workers: int) -> Any:
        """Predictions of the whole split on rank 0 (None elsewhere); called in eval mode."""
        raise NotImplementedError

    def score(self, predictions: Any, data: EvalData) -> dict[str, float]:
        raise NotImplementedError

    def random_baseline(self, predictions: Any, data: EvalData, seed: int) -> dict[str, float]:
        raise NotImplementedError

    def write_predictions(self, predictions: Any, out_dir: Path) -> Path:
        raise NotImplementedError


class GroundingModel(VmrModel):
    task: ClassVar[str] = "grounding"

    def predict_step(self, batch: Any) -> list[dict]:
        raise NotImplementedError

    def metrics(self, predictions: list[dict], queries: list) -> dict[str, float]:
        raise NotImplementedError

    def random_predictions(self, queries: list, seed: int) -> list[dict]:
        """The random baseline: uniform random windows. Override to draw random scores over the
        model's own candidate set (e.g. MMN's valid 2D-map cells, then its NMS)."""
        return random_grounding_predictions(queries, seed)

    def eval_data(self, split: str, data: DataContext) -> EvalData:
        return EvalData(split, self.build_dataset(split, data, train=False), queries=data.queries(split))

    def predict_all(self, data: EvalData, batch_size: int, env: Dist, num_workers: int) -> list[dict] | None:
        outs = run_sharded(self.predict_step, data.primary, batch_size, self.collate, env, num_workers,
                            f"predict {data.split}")
        if not env.is_main:
            return None
        order = {q.qid: i for i, q in enumerate(data.queries or [])}
        preds = [p for batch in outs for p in batch]
        return with_query_text(sorted(preds, key=lambda p: order.get(p["qid"], len(order))), data.queries or [])

    def score(self, predictions: list[dict], data: EvalData) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics(predictions, data.queries).items()}

    def random_baseline(self, predictions: list[dict], data: EvalData, seed: int) -> dict[str, float]:
        return self.score(self.random_predictions(data.queries or [], seed), data)

    def write_predictions(self, predictions: list[dict], out_dir: Path) -> Path:
        """Moment-DETR's jsonl: one prediction per line."""
        path = Path(out_dir) / "predictions.jsonl"
        write_text(path, "".join(json.dumps(p) + "\n" for p in predictions))
        return path


class RetrievalModel(VmrModel):
    task: ClassVar[str] = "retrieval"

    def build_eval_datasets(self, split: str, data: DataContext) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def encode_text(self, batch: Any) -> dict:
        raise NotImplementedError

    def encode_video(self, batch: Any) -> dict:
        raise NotImplementedError

    def similarity(self, text_emb: Any, video_emb: Any) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, result: RetrievalResult) -> dict[str, float]:
        raise NotImplementedError

    def eval_data(self, split: str, data: DataContext) -> EvalData:
        texts, videos = self.build_eval_datasets(split, data)
        return EvalData(split, texts, videos=videos)

    def predict_all(self, data: EvalData, batch_size: int, env: Dist, num_workers: int) -> RetrievalResult | None:
        texts = run_sharded(self.encode_text, data.primary, batch_size, self.collate, env, num_workers,
                             f"encode texts {data.split}")
        videos = run_sharded(self.encode_video, data.videos, batch_size, self.collate, env, num_workers,
                              f"encode videos {data.split}")
        if not env.is_main:
            return None
        text_emb, video_emb = _cat([t["emb"] for t in texts]), _cat([v["emb"] for v in videos])
        num_texts = len(text_emb[0] if isinstance(text_emb, tuple) else text_emb)
        video_on_device = _rows(video_emb, 0, None, env.device)
        blocks = [self.similarity(_rows(text_emb, i, i + batch_size, env.device), video_on_device).float().cpu()
                  for i in range(0, num_texts, batch_size)]
        return RetrievalResult(
            similarity=torch.cat(blocks),
            text_qids=[q for t in texts for q in t["qid"]],
            text_vids=[v for t in texts for v in t["vid"]],
            video_vids=[v for b in videos for v in b["vid"]],
            text_queries=[s for t in texts for s in t["text"]] if all("text" in t for t in texts) else None,
        )

    def score(self, predictions: RetrievalResult, data: EvalData) -> dict[str, float]:
        return {k: float(v) for k, v in self.metrics(predictions).items()}

    def random_baseline(self, predictions: RetrievalResult, data: EvalData, seed: int) -> dict[str, float]:
        return self.score(random_retrieval_result(predictions, seed), data)

    def write_predictions(self, predictions: RetrievalResult, out_dir: Path) -> Path:
        """The similarity matrix with the ids of its rows and columns (and the query texts of its rows)."""
        path = Path(out_dir) / "similarity.npz"
        texts = {} if predictions.text_queries is None else {"text_queries": np.asarray(predictions.text_queries)}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, similarity=predictions.similarity.numpy(), text_qids=np.asarray(predictions.text_qids),
                     text_vids=np.asarray(predictions.text_vids), video_vids=np.asarray(predictions.video_vids),
                     **texts)
        return path



# -- training -------------------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    best_path: Path
    weights: dict[str, str]


@dataclasses.dataclass
class _Run:
    """What stays fixed over the epochs of one `fit`."""

    name: str  # the model's registry name
    cfg: TrainConfig
    model: VmrModel
    optim: Optimization
    scaler: torch.amp.GradScaler
    env: Dist
    amp: bool  # autocast on (CUDA and trainer.amp only)
    amp_dtype: str
    num_workers: int
    seed: int
    run_dir: Path
    ckpt_dir: Path
    best_path: Path
    keep_checkpoints: int
    record: dict[str, Any]  # everything that determines the result: a checkpoint resumes only if equal
    select_split: str | None  # None: keep the last epoch
    select_metric: str


@dataclasses.dataclass
class _Progress:
    """Where training stands; checkpointed with the weights and the optimiser states."""

    epoch: int = 0  # epochs done
    step: int = 0  # training batches done
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # one log entry per epoch
    best: dict[str, Any] = dataclasses.field(  # the epoch kept in best.pt (0: none yet)
        default_factory=lambda: {"epoch": 0, "metrics": {}, "value": -math.inf})


def fit(
    name: str,
    model_cls: type[VmrModel],
    cfg: TrainConfig,
    data: DataContext,
    *,
    device: str = "auto",
    num_workers: int = 0,
    select_split: str | None = None,
    select_metric: str | None = None,
    deterministic: bool = True,
    amp: bool = True,
    amp_dtype: str = "float16",
    resume: bool = True,
    keep_checkpoints: int = 1,
    config_record: dict[str, Any] | None = None,
) -> FitResult | None:
    """Train `model_cls(cfg, data)` and write the run directory `data.run_dir` (see module docstring).

    `config_record` is everything that determines the result besides `cfg` (dataset, features):
    a checkpoint is resumed only if its record is identical. Returns the result on rank 0.
    """
    env = setup_distributed(device)
    configure_determinism(deterministic)
    seed_everything(data.seed)
    metric = select_metric or cfg.select_metric
    run_dir = Path(data.run_dir)
    ckpt_dir, best_path = run_dir / "checkpoints", run_dir / "best.pt"
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    record = {"model": name, "model_config": cfg.model_dump(), "seed": data.seed, "select_split": select_split,
              "select_metric": metric, **(config_record or {})}

    model = model_cls(cfg, data).to(env.device)
    use_amp = amp and env.device.type == "cuda"
    run = _Run(name=name, cfg=cfg, model=model, optim=model.configure_optimizers(),
               scaler=torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == "float16"),
               env=env, amp=use_amp, amp_dtype=amp_dtype, num_workers=num_workers, seed=data.seed,
               run_dir=run_dir, ckpt_dir=ckpt_dir, best_path=best_path, keep_checkpoints=keep_checkpoints,
               record=record, select_split=select_split, select_metric=metric)
    progress = _resume_or_start_afresh(run) if resume else _Progress()
    broadcast_from_main(model, env)  # every rank starts from rank 0's weights, as DDP does
    # datasets after the checkpoint: they may depend on state it restores (e.g. a trained tokenizer)
    train_set = model.build_dataset("train", data, train=True)
    select_set = model.eval_data(select_split, data) if select_split is not None else None

    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        train_logs, progress.step = _train_epoch(run, train_set, epoch, progress.step)
        evaluated = select_set is not None and _evaluation_due(cfg, epoch)
        metrics = _selection_metrics(run, select_set) if evaluated else {}  # {} off rank 0
        progress.history.append({"epoch": epoch, **train_logs,
                                 **{f"{select_split}/{k}": v for k, v in metrics.items()}})
        progress.epoch = epoch
        if env.is_main:
            _keep_if_best(run, progress, metrics, evaluated)
        _save_progress(run, progress)

    result = None
    if env.is_main:
        write_live_logs(run.run_dir / "live", progress.history)
        result = FitResult(best_epoch=progress.best["epoch"], best_metrics=progress.best["metrics"],
                           history=progress.history, best_path=run.best_path, weights=model.weights_provenance())
    teardown_distributed()
    return result


def _resume_or_start_afresh(run: _Run) -> _Progress:
    """Restore the newest checkpoint into `run` if `decide_resume` says so; otherwise delete the
    checkpoints and start at epoch 1."""
    found = checkpoints(run.ckpt_dir)
    state = load_torch(found[-1][1]) if found else None
    decision = decide_resume(state, run.record, run.best_path.exists())
    barrier(run.env)  # every rank has read the checkpoint before rank 0 deletes it
    if not decision.resume:
        if found:
            log(f"{found[-1][1]}: {decision.reason}; training afresh")
        if run.env.is_main:
            for _, path in found:
                path.unlink()
        return _Progress()

    _restore(run, state)
    log(f"resuming {run.name} from {found[-1][1]} (epoch {state['epoch']} done)")
    if run.env.is_main and decision.rewrite_best:
        best = state["best"]
        save_torch({"model": state["model"], "config": run.record, "epoch": best["epoch"],
                    "metrics": best["metrics"]}, run.best_path)
    return _Progress(epoch=state["epoch"], step=state["step"], history=state["history"], best=state["best"])


def _restore(run: _Run, state: dict[str, Any]) -> None:
    """Weights, optimiser, scheduler and AMP scaler states, and this rank's RNG states."""
    run.model.load_state_dict(state["model"])
    for opt, s in zip(run.optim.optimizers, state["optimizers"], strict=True):
        opt.load_state_dict(s)
    for sched, s in zip(run.optim.schedulers, state["schedulers"], strict=True):
        sched.load_state_dict(s)
    run.scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    if len(rngs) != run.env.world_size:
        log(f"note: checkpoint from {len(rngs)} process(es), resuming with {run.env.world_size}")
    set_rng_state(rngs[run.env.rank % len(rngs)])


def _train_epoch(run: _Run, train_set: Dataset, epoch: int, step: int) -> tuple[dict[str, float], int]:
    """One pass over the training set. Returns the epoch's log entries (`train/<key>`: the mean of
    every returned loss over all items of all ranks; `train/lr<i>`) and the batches done after it."""
    model, env = run.model, run.env
    model.train()
    model.on_train_epoch_start(epoch)
    stepper = _Stepper(model, run.optim, run.scaler, run.cfg.grad_clip, env.world_size)
    batches = global_batches(len(train_set), run.cfg.batch_size, run.seed, epoch, shuffle=True)
    loader = rank_loader(train_set, batches, model.collate, env, run.num_workers)
    sums: dict[str, float] = {}
    count = 0.0
    for local_n, global_n, batch in track(loader, f"{run.name} epoch {epoch}/{run.cfg.epochs}"):
        stepper.local_n, stepper.global_n = local_n, global_n
        ctx = StepContext(epoch=epoch, step=step, world_size=env.world_size, optimizer_step=stepper.manual)
        with _autocast(env.device, run.amp, run.amp_dtype):
            try:
                losses = model.training_step(move_to(batch, env.device), ctx)
            except RuntimeError:  # e.g. BCE refusing NaN probabilities: say so if the weights diverged
                _check_finite_parameters(run.name, model, epoch, step, limit=EXPLODED)
                raise
        if "loss" not in losses:
            raise KeyError(f"{type(model).__name__}.training_step must return a dict with 'loss'")
        _check_finite_losses(run.name, losses, epoch, step)
        if not model.manual_optimization:
            stepper.automatic(losses["loss"])
        stepper.end_batch()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) * local_n
        count += local_n
        step += 1
    stepper.end_epoch()
    _check_finite_parameters(run.name, model, epoch)
    logs = {f"train/{k}": v for k, v in all_reduce_means(sums, count, env).items()}
    for i, opt in enumerate(run.optim.optimizers):
        logs[f"train/lr{i if i else ''}"] = opt.param_groups[0]["lr"]
    return logs, step


class TrainingDiverged(VmrError):
    """A loss or a parameter stopped being finite: training stops before anything is saved."""


def _check_finite_losses(name: str, losses: dict[str, Any], epoch: int, step: int) -> None:
    bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(torch.as_tensor(v).detach()).all()}
    if bad:
        raise TrainingDiverged(f"{name}: training diverged: loss {bad} is not finite at epoch {epoch}, step {step + 1}; "
                               "stopped without saving this epoch (lower the learning rate or check the inputs)")


# A weight this large has diverged (float32 activations overflow long before): used only to explain an
# error raised inside a training step, e.g. a loss refusing the NaNs such weights produce.
EXPLODED = 1e15


def _check_finite_parameters(name: str, model: torch.nn.Module, epoch: int, step: int | None = None,
                             limit: float = math.inf) -> None:
    bad = [n for n, p in model.named_parameters()
           if not torch.isfinite(p.detach()).all() or (p.numel() and p.detach().abs().max() > limit)]
    if bad:
        when = f"at epoch {epoch}, step {step + 1}" if step is not None else f"after epoch {epoch}"
        raise TrainingDiverged(f"{name}: training diverged: parameters {bad[:3]}{' ...' if len(bad) > 3 else ''} "
                               f"are not finite{'' if limit == math.inf else f' or exceed {limit:g}'} {when}; "
                               "stopped without saving (lower the learning rate)")


def _evaluation_due(cfg: TrainConfig, epoch: int) -> bool:
    return epoch >= cfg.eval_from and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs)


def _selection_metrics(run: _Run, data: EvalData) -> dict[str, float]:
    """The metrics of the selection split on rank 0 ({} elsewhere)."""
    metrics = predict_and_score(run.model, data, run.cfg.eval_batch_size, run.env, run.amp, run.amp_dtype,
                                run.num_workers)[1]
    if run.env.is_main and run.select_metric not in metrics:
        raise KeyError(f"select_metric '{run.select_metric}' is not among the metrics {sorted(metrics)}")
    return metrics


def _keep_if_best(run: _Run, progress: _Progress, metrics: dict[str, float], evaluated: bool) -> None:
    """Write best.pt if this epoch is the one to keep: without a selection split every epoch (the
    last one is kept), else an evaluated epoch that beats the best so far. Rank 0 only."""
    if run.select_split is None:
        value = float(progress.epoch)
    elif evaluated and metrics[run.select_metric] > progress.best["value"]:
        value = metrics[run.select_metric]
    else:
        return
    progress.best = {"epoch": progress.epoch, "metrics": metrics, "value": value}
    save_torch({"model": run.model.state_dict(), "config": run.record, "epoch": progress.epoch,
                "metrics": metrics}, run.best_path)


def _save_progress(run: _Run, progress: _Progress) -> None:
    """The epoch's checkpoint (older ones pruned), the dvclive logs and a log line."""
    rngs = gather_to_main(rng_state(), run.env)  # every rank's: each resumes its own
    if not run.env.is_main:
        return
    save_torch({
        "model": run.model.state_dict(),
        "optimizers": [o.state_dict() for o in run.optim.optimizers],
        "schedulers": [s.state_dict() for s in run.optim.schedulers],
        "scaler": run.scaler.state_dict(),
        "rng": rngs, "epoch": progress.epoch, "step": progress.step, "config": run.record,
        "history": progress.history, "best": progress.best,
    }, checkpoint_path(run.ckpt_dir, progress.epoch))
    prune_checkpoints(run.ckpt_dir, run.keep_checkpoints)
    write_live_logs(run.run_dir / "live", progress.history)
    shown = {k: round(v, 4) for k, v in progress.history[-1].items() if k != "epoch"}
    log(f"{run.name} epoch {progress.epoch}/{run.cfg.epochs}: {shown}")


def _autocast(device: torch.device, amp: bool, dtype: str):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return torch.autocast("cpu", enabled=False)


def _trainable(params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]


def _optimizer_params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return _trainable([p for group in opt.param_groups for p in group["params"]])


class _Stepper:
    """Backward, gradient sync, unscale, clip, step and schedule, for one batch (both optimisation
    modes). `local_n` / `global_n`: this rank's share of the global batch, which weights its gradient."""

    def __init__(self, model: VmrModel, optim: Optimization, scaler: torch.amp.GradScaler,
                 grad_clip: float | None, world_size: int):
        self.model, self.optim, self.scaler = model, optim, scaler
        self.grad_clip, self.world_size = grad_clip, world_size
        self.local_n = self.global_n = 1

    def _finish(self, loss: torch.Tensor, params: list, optimizers: list[tuple[int, Any]], retain_graph: bool):
        for _, opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward(retain_graph=retain_graph)
        sync_gradients(params, self.local_n, self.global_n, self.world_size)
        for _, opt in optimizers:
            self.scaler.unscale_(opt)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for index, opt in optimizers:
            self.scaler.step(opt)
            self.model.on_after_optimizer_step(index)

    def automatic(self, loss: torch.Tensor) -> None:
        params = _trainable(list(self.model.parameters()))
        self._finish(loss, params, list(enumerate(self.optim.optimizers)), retain_graph=False)

    def manual(self, loss: torch.Tensor, index: int = 0, retain_graph: bool = False) -> None:
        opt = self.optim.optimizers[index]
        self._finish(loss, _optimizer_params(opt), [(index, opt)], retain_graph=retain_graph)

    def end_batch(self) -> None:
        self.scaler.update()
        if self.optim.interval == "step":
            for sched in self.optim.schedulers:
                sched.step()

    def end_epoch(self) -> None:
        if self.optim.interval == "epoch":
            for sched in self.optim.schedulers:
                sched.step()


# -- prediction and scoring -----------------------------------------------------------------------


@torch.no_grad()
def predict(model: VmrModel, data: EvalData, batch_size: int, env: Dist, amp: bool = False,
            amp_dtype: str = "float16", num_workers: int = 0) -> list[dict] | RetrievalResult | None:
    """Grounding: the predictions in query order; retrieval: the similarity matrix. None off rank 0."""
    was_training = model.training
    model.eval()
    try:
        with _autocast(env.device, amp, amp_dtype):
            return model.predict_all(data, batch_size, env, num_workers)
    finally:
        model.train(was_training)


def predict_and_score(model: VmrModel, data: EvalData, batch_size: int, env: Dist, amp: bool = False,
                      amp_dtype: str = "float16", num_workers: int = 0) -> tuple[Any, dict[str, float]]:
    preds = predict(model, data, batch_size, env, amp, amp_dtype, num_workers)
    return preds, (model.score(preds, data) if env.is_main else {})


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], (tuple, list)):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


def _rows(emb: Any, start: int, stop: int, device: torch.device) -> Any:
    if isinstance(emb, tuple):
        return tuple(e[start:stop].to(device) for e in emb)
    return emb[start:stop].to(device)


def with_query_text(predictions: list[dict], queries: list) -> list[dict]:
    """Moment-DETR's line order {qid, query, vid, ...}: the query text from the annotation record
    of each qid (a prediction whose qid no record has is left as it is)."""
    text = {q.qid: q.sentence for q in queries}
    return [{"qid": p["qid"], "query": text[p["qid"]], **{k: v for k, v in p.items() if k not in ("qid", "query")}}
            if p["qid"] in text else p for p in predictions]


def random_grounding_predictions(queries: list, seed: int, num_windows: int = 10) -> list[dict]:
    """The random-proposal baseline: per query, windows with uniform random ends inside the video,
    in random order (scores descending by construction)."""
    rng = np.random.default_rng(seed)
    preds = []
    for q in queries:
        duration = float(q.duration)
        ends = np.sort(rng.uniform(0.0, duration, size=(num_windows, 2)), axis=1)
        scores = np.sort(rng.uniform(size=num_windows))[::-1]
        preds.append({
            "qid": q.qid,
            "vid": q.video_id,
            "pred_relevant_windows": [[round(float(s), 4), round(float(e), 4), round(float(c), 4)]
                                      for (s, e), c in zip(ends, scores, strict=True)],
        })
    return preds


def random_retrieval_result(result: RetrievalResult, seed: int) -> RetrievalResult:
    gen = torch.Generator().manual_seed(seed)
    return dataclasses.replace(result, similarity=torch.rand(result.similarity.shape, generator=gen))


def load_for_evaluation(model_cls: type[VmrModel], best_path: Path, data: DataContext,
                        device: torch.device) -> tuple[VmrModel, dict[str, Any]]:
    """Rebuild the trained model from `best.pt` with the config it was trained with."""
    state = load_torch(best_path)
    cfg = model_cls.Config.model_validate(state["config"]["model_config"])
    seed_everything(data.seed)
    model = model_cls(cfg, data)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
