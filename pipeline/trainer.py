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
    data.queries(split)       -> list of `pipeline.annotations.Query` records of that split, parsed
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
    input_files(cfg, data) (classmethod) -> {role: path} read besides annotations (checked, hashed)

Grounding models (`GroundingModel`, task = "grounding") add:
    predict_step(batch) -> list of {"qid", "vid", "pred_relevant_windows": [[s, e, score], ...]}
        seconds, best first (after the model's own NMS), optionally "pred_saliency_scores": [...]
        (Moment-DETR's jsonl format; evaluate writes exactly these lines).
    metrics(predictions, queries) -> dict[str, float]
        the seed's evaluation convention through the shared evaluator (`pipeline.evaluation`);
        keys such as "R@1,IoU@0.5" (pipeline.evaluation) are what `select_metric` names. The
        trainer calls it on the predictions and on a random-proposal baseline for the same queries.
    random_predictions(queries, seed) -> predictions of that baseline (optional; default: uniform
        random windows inside each video)

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
import io
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate as torch_default_collate

from pipeline.atomic import write_bytes
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
    select_metric: str = "R@1,IoU@0.5"  # key of metrics() maximised by model selection


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
        """The parsed, cleaned `pipeline.annotations.Query` records of a split (cached)."""
        key = (self.dataset.model_dump_json(), split)
        if key not in _QUERY_CACHE:
            from pipeline.annotations import load_dataset_split

            _QUERY_CACHE[key] = list(load_dataset_split(self.dataset, split))
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

    @classmethod
    def input_files(cls, cfg: TrainConfig, data: DataContext) -> dict[str, Path]:
        """{role: path} of the files the model reads besides the annotations (checked before any
        work, hashed into provenance), e.g. {"features.clip": data.feature_file("clip")}."""
        return {}


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


# -- processes, devices, seeds --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """One process, or one rank of a torchrun job (env RANK/WORLD_SIZE/LOCAL_RANK): gloo on CPU, nccl on CUDA."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world_size=world_size, device=dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_to_main(obj: Any, env: Dist) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, [] elsewhere. Objects travel as torch.save
    bytes (gathering tensors inside objects directly fails to unpickle in this torch version)."""
    if env.world_size == 1:
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    gathered: list[Any] = [None] * env.world_size if env.is_main else None  # type: ignore[assignment]
    dist.gather_object(buf.getvalue(), gathered, dst=0)
    if not env.is_main:
        return []
    return [torch.load(io.BytesIO(b), map_location="cpu", weights_only=True) for b in gathered]


def move_to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


# -- batching -------------------------------------------------------------------------------------


def global_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool) -> list[list[int]]:
    """The epoch's global batches: a permutation drawn from (seed, epoch) alone, so resume and any
    number of processes see exactly the same batches."""
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def rank_share(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Contiguous share of a global batch for one rank; sizes differ by at most one."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (rank < extra)]


class _RankBatchSampler:
    def __init__(self, batches: list[list[int]], rank: int, world_size: int):
        # A global batch smaller than the number of ranks would leave a rank without data (and
        # the collective ops hanging); such a last batch is dropped under DDP, never in one process.
        self.batches = [b for b in batches if len(b) >= world_size]
        if len(self.batches) < len(batches):
            log(f"note: dropped a last batch of {len(batches[-1])} items (< {world_size} ranks)")
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        for b in self.batches:
            yield [(i, len(b)) for i in rank_share(b, self.rank, self.world_size)]

    def __len__(self) -> int:
        return len(self.batches)


class _CountedDataset(Dataset):
    """Wraps a dataset so the collate function knows the size of the global batch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        index, global_n = key
        return self.dataset[index], global_n

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _CountedCollate:
    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, pairs: list[tuple[Any, int]]) -> tuple[int, int, Any]:
        items = [item for item, _ in pairs]
        return len(items), pairs[0][1], self.collate(items)


# -- optimisation ---------------------------------------------------------------------------------


def _trainable(params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]


def _optimizer_params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return _trainable([p for group in opt.param_groups for p in group["params"]])


def sync_gradients(params: Sequence[torch.nn.Parameter], local_n: int, global_n: int, world_size: int) -> None:
    """Make every rank's gradients those of the whole global batch.

    Each rank's loss is a mean over its own items, so its gradient is weighted by its share
    local_n / global_n and the weighted gradients are summed over ranks: the exact mean-loss
    gradient of the global batch, also when ranks hold unequal shares. Done by hand rather than
    with the DistributedDataParallel wrapper so that models may run several backward passes and
    optimiser steps per batch (CNM). Parameters no rank produced a gradient for stay None, as in
    one process (so the optimiser skips them).
    """
    if world_size == 1:
        return
    params = list(params)
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has_grad.tolist(), strict=True) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in live]) * (local_n / global_n)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in live:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


class _Stepper:
    """Backward, gradient sync, unscale, clip and step for one batch (both optimisation modes)."""

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


# -- checkpoints and logs -------------------------------------------------------------------------

CHECKPOINT_RE = re.compile(r"epoch_(\d+)\.pt$")


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, atomically and byte-reproducibly: saving to a file names the zip's inner folder
    after the (here random, temporary) file name, so serialise in memory first."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: Path) -> Any:
    # Our own files, but loaded without arbitrary unpickling all the same.
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("epoch_*.pt") if (m := CHECKPOINT_RE.search(p.name))]
    return sorted(found)


def write_live_logs(live_dir: Path, history: list[dict[str, float]]) -> None:
    """(Re)write the dvclive logs from the whole history: one dvclive step per epoch.

    Rewriting from the checkpointed history (rather than appending) keeps the curves exact after
    a resume: an epoch that was logged but not checkpointed before a kill is not logged twice.
    """
    import shutil

    from dvclive import Live

    shutil.rmtree(live_dir, ignore_errors=True)
    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for entry in history:
            for key, value in entry.items():
                if key != "epoch":
                    live.log_metric(key, float(value))
            live.log_metric("epoch", int(entry["epoch"]), plot=False)
            live.next_step()


@dataclasses.dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    best_path: Path
    weights: dict[str, str]


def _autocast(device: torch.device, amp: bool, dtype: str):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return torch.autocast("cpu", enabled=False)


def _all_reduce_sums(sums: dict[str, float], count: float, world_size: int, device: torch.device) -> dict[str, float]:
    keys = sorted(sums)
    if world_size > 1:
        t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        values, count = t[:-1].tolist(), t[-1].item()
    else:
        values = [sums[k] for k in keys]
    return {k: v / max(count, 1.0) for k, v in zip(keys, values, strict=True)}


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
    seed = data.seed
    seed_everything(seed)
    metric = select_metric or cfg.select_metric
    run_dir = Path(data.run_dir)
    ckpt_dir, best_path = run_dir / "checkpoints", run_dir / "best.pt"
    if env.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    record = {"model": name, "model_config": cfg.model_dump(), "seed": seed, "select_split": select_split,
              "select_metric": metric, **(config_record or {})}

    model = model_cls(cfg, data).to(env.device)
    optim = model.configure_optimizers()
    use_amp = amp and env.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == "float16")
    stepper = _Stepper(model, optim, scaler, cfg.grad_clip, env.world_size)
    start_epoch, step, history, best = 1, 0, [], {"epoch": 0, "metrics": {}, "value": -math.inf}
    found = checkpoints(ckpt_dir) if resume else []
    if found:
        state = load_torch(found[-1][1])
        kept = state["best"]["epoch"] if state["config"] == record else 0
        if state["config"] != record:
            reason = "made with a different config or code"
        elif kept and kept != state["epoch"] and not best_path.exists():
            reason = f"the kept weights of epoch {kept} (best.pt) are gone"
        else:
            reason = None
        if reason:
            log(f"{found[-1][1]}: {reason}; training afresh")
            if env.is_main:
                for _, p in found:
                    p.unlink()
        else:
            model.load_state_dict(state["model"])
            for opt, s in zip(optim.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(s)
            for sched, s in zip(optim.schedulers, state["schedulers"], strict=True):
                sched.load_state_dict(s)
            scaler.load_state_dict(state["scaler"])
            start_epoch, step = state["epoch"] + 1, state["step"]
            history, best = state["history"], state["best"]
            rngs = state["rng"]
            if len(rngs) != env.world_size:
                log(f"note: checkpoint from {len(rngs)} process(es), resuming with {env.world_size}")
            set_rng_state(rngs[env.rank % len(rngs)])
            log(f"resuming {name} from {found[-1][1]} (epoch {state['epoch']} done)")
            if env.is_main and not best_path.exists() and kept == state["epoch"]:
                save_torch({"model": state["model"], "config": record, "epoch": kept,
                            "metrics": state["best"]["metrics"]}, best_path)
    if env.world_size > 1:
        # every rank starts from rank 0's weights, as DistributedDataParallel does
        for tensor in [*model.parameters(), *(b for b in model.buffers() if b.dtype != torch.bool)]:
            dist.broadcast(tensor.data, src=0)
        dist.barrier()  # nobody reads checkpoints rank 0 may be about to delete
    # datasets after the checkpoint: they may depend on state it restores (e.g. a trained tokenizer)
    train_set = _CountedDataset(model.build_dataset("train", data, train=True))
    select_set = _eval_data(model, select_split, data) if select_split is not None else None

    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        model.on_train_epoch_start(epoch)
        batches = global_batches(len(train_set), cfg.batch_size, seed, epoch, shuffle=True)
        loader = DataLoader(
            train_set,
            batch_sampler=_RankBatchSampler(batches, env.rank, env.world_size),
            collate_fn=_CountedCollate(model.collate),
            num_workers=num_workers,
        )
        sums: dict[str, float] = {}
        count = 0.0
        for local_n, global_n, batch in track(loader, f"{name} epoch {epoch}/{cfg.epochs}"):
            stepper.local_n, stepper.global_n = local_n, global_n
            ctx = StepContext(epoch=epoch, step=step, world_size=env.world_size, optimizer_step=stepper.manual)
            with _autocast(env.device, use_amp, amp_dtype):
                losses = model.training_step(move_to(batch, env.device), ctx)
            if "loss" not in losses:
                raise KeyError(f"{model_cls.__name__}.training_step must return a dict with 'loss'")
            if not model.manual_optimization:
                stepper.automatic(losses["loss"])
            scaler.update()
            if optim.interval == "step":
                for sched in optim.schedulers:
                    sched.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * local_n
            count += local_n
            step += 1
        if optim.interval == "epoch":
            for sched in optim.schedulers:
                sched.step()

        entry: dict[str, float] = {"epoch": epoch}
        entry.update({f"train/{k}": v for k, v in _all_reduce_sums(sums, count, env.world_size, env.device).items()})
        for i, opt in enumerate(optim.optimizers):
            entry[f"train/lr{i if i else ''}"] = opt.param_groups[0]["lr"]

        evaluate_now = select_set is not None and epoch >= cfg.eval_from and (
            epoch % cfg.eval_every == 0 or epoch == cfg.epochs)
        metrics: dict[str, float] = {}
        if evaluate_now:
            metrics = predict_and_score(model, select_set, cfg.eval_batch_size, env, use_amp, amp_dtype,
                                        num_workers)[1]
            if env.is_main:
                if metric not in metrics:
                    raise KeyError(f"select_metric '{metric}' is not among the metrics {sorted(metrics)}")
                entry.update({f"{select_split}/{k}": v for k, v in metrics.items()})
        history.append(entry)

        if env.is_main:
            improved = metrics.get(metric, -math.inf) > best["value"] if evaluate_now else select_set is None
            if improved:
                best = {"epoch": epoch, "metrics": metrics, "value": metrics.get(metric, float(epoch))}
                save_torch({"model": model.state_dict(), "config": record, "epoch": epoch, "metrics": metrics},
                           best_path)
        rngs = gather_to_main(rng_state(), env)
        if env.is_main:
            save_torch({
                "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in optim.optimizers],
                "schedulers": [s.state_dict() for s in optim.schedulers],
                "scaler": scaler.state_dict(),
                "rng": rngs, "epoch": epoch, "step": step, "config": record,
                "history": history, "best": best,
            }, ckpt_dir / f"epoch_{epoch:03d}.pt")
            for _, old in checkpoints(ckpt_dir)[:-keep_checkpoints]:
                old.unlink()
            write_live_logs(run_dir / "live", history)
            shown = {k: round(v, 4) for k, v in entry.items() if k != "epoch"}
            log(f"{name} epoch {epoch}/{cfg.epochs}: {shown}")

    result = None
    if env.is_main:
        write_live_logs(run_dir / "live", history)
        result = FitResult(best_epoch=best["epoch"], best_metrics=best["metrics"], history=history,
                           best_path=best_path, weights=model.weights_provenance())
    teardown_distributed()
    return result


# -- prediction and scoring -----------------------------------------------------------------------


@dataclasses.dataclass
class EvalData:
    split: str
    primary: Dataset  # grounding: the items; retrieval: the texts
    videos: Dataset | None = None  # retrieval only
    queries: list | None = None  # grounding only: the annotation records (ground truth)


def _eval_data(model: VmrModel, split: str, data: DataContext) -> EvalData:
    if isinstance(model, GroundingModel):
        return EvalData(split, model.build_dataset(split, data, train=False), queries=data.queries(split))
    if isinstance(model, RetrievalModel):
        texts, videos = model.build_eval_datasets(split, data)
        return EvalData(split, texts, videos=videos)
    raise TypeError(f"{type(model).__name__} must subclass GroundingModel or RetrievalModel")


def _to_cpu(obj: Any) -> Any:
    return move_to(obj, torch.device("cpu"))


def _run_sharded(fn: Callable[[Any], Any], dataset: Dataset, batch_size: int, collate: Callable, env: Dist,
                 num_workers: int, description: str) -> list[Any]:
    """fn over the batches of this rank's share of `dataset`; rank 0 gets every rank's outputs."""
    indices = list(range(env.rank, len(dataset), env.world_size))  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        collate_fn=collate, num_workers=num_workers)
    outputs = [_to_cpu(fn(move_to(batch, env.device))) for batch in track(loader, description)]
    return [o for rank_outputs in gather_to_main(outputs, env) for o in rank_outputs]


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], (tuple, list)):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


def _rows(emb: Any, start: int, stop: int, device: torch.device) -> Any:
    if isinstance(emb, tuple):
        return tuple(e[start:stop].to(device) for e in emb)
    return emb[start:stop].to(device)


@torch.no_grad()
def predict(model: VmrModel, data: EvalData, batch_size: int, env: Dist, amp: bool = False,
            amp_dtype: str = "float16", num_workers: int = 0) -> list[dict] | RetrievalResult | None:
    """Grounding: the predictions in query order; retrieval: the similarity matrix. None off rank 0."""
    was_training = model.training
    model.eval()
    try:
        with _autocast(env.device, amp, amp_dtype):
            if isinstance(model, GroundingModel):
                outs = _run_sharded(model.predict_step, data.primary, batch_size, model.collate, env,
                                    num_workers, f"predict {data.split}")
                if not env.is_main:
                    return None
                order = {q.qid: i for i, q in enumerate(data.queries or [])}
                preds = [p for batch in outs for p in batch]
                return sorted(preds, key=lambda p: order.get(p["qid"], len(order)))
            texts = _run_sharded(model.encode_text, data.primary, batch_size, model.collate, env,
                                 num_workers, f"encode texts {data.split}")
            videos = _run_sharded(model.encode_video, data.videos, batch_size, model.collate, env,
                                  num_workers, f"encode videos {data.split}")
            if not env.is_main:
                return None
            text_emb, video_emb = _cat([t["emb"] for t in texts]), _cat([v["emb"] for v in videos])
            num_texts = len(text_emb[0] if isinstance(text_emb, tuple) else text_emb)
            video_on_device = _rows(video_emb, 0, None, env.device)  # type: ignore[arg-type]
            blocks = [model.similarity(_rows(text_emb, i, i + batch_size, env.device), video_on_device).float().cpu()
                      for i in range(0, num_texts, batch_size)]
            return RetrievalResult(
                similarity=torch.cat(blocks),
                text_qids=[q for t in texts for q in t["qid"]],
                text_vids=[v for t in texts for v in t["vid"]],
                video_vids=[v for b in videos for v in b["vid"]],
            )
    finally:
        model.train(was_training)


def score(model: VmrModel, predictions: list[dict] | RetrievalResult, data: EvalData) -> dict[str, float]:
    if isinstance(model, GroundingModel):
        return {k: float(v) for k, v in model.metrics(predictions, data.queries).items()}  # type: ignore[arg-type]
    return {k: float(v) for k, v in model.metrics(predictions).items()}  # type: ignore[union-attr, arg-type]


def predict_and_score(model: VmrModel, data: EvalData, batch_size: int, env: Dist, amp: bool = False,
                      amp_dtype: str = "float16", num_workers: int = 0) -> tuple[Any, dict[str, float]]:
    preds = predict(model, data, batch_size, env, amp, amp_dtype, num_workers)
    return preds, (score(model, preds, data) if env.is_main else {})  # type: ignore[arg-type]


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


def random_baseline(model: VmrModel, predictions: Any, data: EvalData, seed: int) -> dict[str, float]:
    if isinstance(model, GroundingModel):
        return score(model, model.random_predictions(data.queries or [], seed), data)
    return score(model, random_retrieval_result(predictions, seed), data)


def load_for_evaluation(model_cls: type[VmrModel], best_path: Path, data: DataContext,
                        device: torch.device) -> tuple[VmrModel, dict[str, Any]]:
    """Rebuild the trained model from `best.pt` with the config it was trained with."""
    state = load_torch(best_path)
    cfg = model_cls.Config.model_validate(state["config"]["model_config"])
    seed_everything(data.seed)
    model = model_cls(cfg, data)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
