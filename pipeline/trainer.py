"""The shared trainer: one loop for every model (MMN, MESM, CNM, MRNet, GLSCL).

It owns everything that is not the model: seeding and determinism, data loading and batching,
AMP on CUDA, DDP under torchrun, gradient clipping, checkpoints and resume, model selection,
dvclive logs, prediction and evaluation. A model owns its layers, its data items, its losses and
its optimisers. The split is Lightning-like and deliberately small.

THE MODEL CONTRACT
==================

Registration and config
-----------------------
    from models import MODELS
    from pipeline.trainer import GroundingModel, TrainConfig      # or RetrievalModel

    @MODELS.register("mmn")
    class MMN(GroundingModel):
        class Config(TrainConfig):          # params.yaml `model.mmn`, validated (extra keys = error)
            epochs: int = 18                # TrainConfig fields: seed, epochs, batch_size,
            batch_size: int = 48            #   eval_batch_size, grad_clip, eval_every, eval_from,
            lr: float = 1e-4                #   select_metric. Defaults = the model's published
            ...                             #   defaults; everything else is the model's own.

        def __init__(self, cfg: Config, data: DataContext): ...

`cfg.batch_size` is the GLOBAL batch in dataset items (what the seed calls batch size: videos for
MMN/MRNet, video groups for MESM, queries for CNM, pairs for GLSCL). Under DDP each of the W ranks
gets a contiguous 1/W share of every global batch, so W processes see the same items per step as one.

Construction: `Model(cfg, data)` runs after the trainer seeded every RNG with `cfg.seed` (or the
top-level `seed` when that is None), so random init is reproducible. `data` is a `DataContext`:
    data.feature_file(name)   -> Path of the merged HDF5 `features/<name>.h5` (one dataset per video
                                 id, (T, D) float; `pipeline.features` loads them with the seeds'
                                 conventions: per-frame L2 norm, average to N clips, concatenation
                                 of several files truncated to the shortest, TEF)
    data.queries(split)       -> list of parsed, cleaned annotation records of that split
                                 (`pipeline.annotations`; each has qid, vid, duration, sentence,
                                 timestamps in seconds, ...). Cached.
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

Grounding models (`GroundingModel`, task = "grounding") add:
    predict_step(batch) -> list of {"qid", "vid", "pred_relevant_windows": [[s, e, score], ...]}
        seconds, best first (after the model's own NMS), optionally "pred_saliency_scores": [...]
        (Moment-DETR's jsonl format; evaluate writes exactly these lines).
    metrics(predictions, queries) -> dict[str, float]
        the seed's evaluation convention through the shared evaluator (`pipeline.evaluation`);
        keys such as "R1@0.5" are what `select_metric` names. The trainer calls it on the model's
        predictions and on a random-proposal baseline for the same queries.

Retrieval models (`RetrievalModel`, task = "retrieval") add:
    build_eval_datasets(split, data) -> (text_dataset, video_dataset)
    encode_text(batch)  -> {"qid": [...], "vid": [ground-truth video id per text], "emb": Tensor | tuple of Tensors}
    encode_video(batch) -> {"vid": [...], "emb": Tensor | tuple of Tensors}
        embeddings are concatenated over batches along dim 0 (element-wise for tuples)
    similarity(text_emb, video_emb) -> Tensor [num_texts, num_videos] (called on blocks of
        `eval_batch_size` texts x all videos, so it may be a pairwise head, not just a dot product)
    metrics(result: RetrievalResult) -> dict[str, float] (e.g. "t2v_R1", ...)

Run directory (`trainer.out_dir/<model>/`):
    checkpoints/epoch_NNN.pt   every epoch: model, optimisers, schedulers, AMP scaler, the RNG
                               states of every rank, resolved config, history (resume point)
    best.pt                    the selected weights (+ config, epoch, metrics): what evaluate reads
    live/                      dvclive: metrics.json, plots/metrics/{train,val}/*.tsv
    best.pt.prov.json          provenance
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate as torch_default_collate

from pipeline.atomic import atomic_path
from pipeline.params import Section
from pipeline.progress import log, track

# -- the contract ---------------------------------------------------------------------------------


class TrainConfig(Section):
    """Fields every model Config has. Subclass it and override the defaults with the seed's."""

    seed: int | None = None  # None: the top-level params `seed`
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)  # global, in dataset items
    eval_batch_size: int = Field(16, ge=1)  # per rank
    grad_clip: float | None = Field(None, gt=0)  # max global L2 grad norm; None: no clipping
    eval_every: int = Field(1, ge=1)  # epochs between evaluations on the selection split
    eval_from: int = Field(1, ge=1)  # first epoch evaluated (the seeds' SKIP_TEST + 1)
    select_metric: str = "R1@0.5"  # key of metrics() maximised by model selection


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


_QUERY_CACHE: dict[tuple, list] = {}


@dataclasses.dataclass(frozen=True)
class DataContext:
    """Where a model finds its data. Built by the trainer from params; models never read params."""

    dataset: Any  # pipeline.params.DatasetParams
    features_dir: Path
    vocab_dir: Path
    frames_dir: Path
    run_dir: Path
    seed: int

    @property
    def splits(self) -> list[str]:
        return list(self.dataset.splits)

    def feature_file(self, name: str) -> Path:
        return Path(self.features_dir) / f"{name}.h5"

    def queries(self, split: str) -> list:
        if split not in self.dataset.splits:
            raise KeyError(f"split '{split}' is not in params dataset.splits {sorted(self.dataset.splits)}")
        key = (self.dataset.model_dump_json(), split)
        if key not in _QUERY_CACHE:
            from pipeline.annotations import load_split  # issue 5

            _QUERY_CACHE[key] = list(load_split(self.dataset, split))
        return _QUERY_CACHE[key]


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


class GroundingModel(VmrModel):
    task: ClassVar[str] = "grounding"

    def predict_step(self, batch: Any) -> list[dict]:
        raise NotImplementedError

    def metrics(self, predictions: list[dict], queries: list) -> dict[str, float]:
        raise NotImplementedError


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
