"""One process, or one rank of a torchrun job: its device and seeding, the few collectives the
trainer needs, and how every global batch is shared out among the ranks.

Gradients are averaged by hand (`sync_gradients`) rather than by the DistributedDataParallel
wrapper, so that a model may run several backward passes and optimiser steps per batch (CNM).
In one process every collective here is a no-op.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.core.progress import log, track

# -- the process ----------------------------------------------------------------------------------


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


def move_to(obj: Any, device: torch.device) -> Any:
    """Every tensor in nested dicts, lists and tuples moved to `device`; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


# -- collectives ----------------------------------------------------------------------------------


def barrier(env: Dist) -> None:
    if env.world_size > 1:
        dist.barrier()


def broadcast_from_main(module: nn.Module, env: Dist) -> None:
    """Every rank starts from rank 0's weights, as DistributedDataParallel does."""
    if env.world_size == 1:
        return
    for tensor in [*module.parameters(), *(b for b in module.buffers() if b.dtype != torch.bool)]:
        dist.broadcast(tensor.data, src=0)


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


def all_reduce_means(sums: dict[str, float], count: float, env: Dist) -> dict[str, float]:
    """{key: sum over all ranks / count over all ranks}, keys sorted."""
    keys = sorted(sums)
    if env.world_size > 1:
        t = torch.tensor([sums[k] for k in keys] + [count], dtype=torch.float64, device=env.device)
        dist.all_reduce(t)
        values, count = t[:-1].tolist(), t[-1].item()
    else:
        values = [sums[k] for k in keys]
    return {k: v / max(count, 1.0) for k, v in zip(keys, values, strict=True)}


def sync_gradients(params: Sequence[torch.nn.Parameter], local_n: int, global_n: int, world_size: int) -> None:
    """Make every rank's gradients those of the whole global batch.

    Each rank's loss is a mean over its own items, so its gradient is weighted by its share
    local_n / global_n and the weighted gradients are summed over ranks: the exact mean-loss
    gradient of the global batch, also when ranks hold unequal shares. Parameters no rank produced
    a gradient for stay None, as in one process (so the optimiser skips them).
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


# -- sharing out the data -------------------------------------------------------------------------


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


def rank_loader(dataset: Dataset, batches: list[list[int]], collate: Callable[[list], Any], env: Dist,
                num_workers: int) -> DataLoader:
    """This rank's share of every global batch, as (local_n, global_n, collated batch): the sizes
    weight this rank's gradient (`sync_gradients`) and its losses."""
    return DataLoader(_WithGlobalSize(dataset), batch_sampler=_RankBatchSampler(batches, env.rank, env.world_size),
                      collate_fn=_CollateWithSizes(collate), num_workers=num_workers)


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


class _WithGlobalSize(Dataset):
    """Indexed by (index, global batch size): passes the size on to the collate function."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        index, global_n = key
        return self.dataset[index], global_n

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _CollateWithSizes:
    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, pairs: list[tuple[Any, int]]) -> tuple[int, int, Any]:
        items = [item for item, _ in pairs]
        return len(items), pairs[0][1], self.collate(items)


def run_sharded(fn: Callable[[Any], Any], dataset: Dataset, batch_size: int, collate: Callable, env: Dist,
                num_workers: int, description: str) -> list[Any]:
    """fn over the batches of this rank's share of `dataset` (every world_size-th item, in order);
    rank 0 gets every rank's outputs (on the CPU), rank by rank."""
    indices = list(range(env.rank, len(dataset), env.world_size))  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        collate_fn=collate, num_workers=num_workers)
    cpu = torch.device("cpu")
    outputs = [move_to(fn(move_to(batch, env.device)), cpu) for batch in track(loader, description)]
    return [o for rank_outputs in gather_to_main(outputs, env) for o in rank_outputs]
