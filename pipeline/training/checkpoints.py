"""What a run leaves on disk: checkpoint files, the RNG states they carry, and the dvclive logs
rebuilt from their history. The layout of the run directory is in the trainer's docstring; whether
a checkpoint found there is resumed is `pipeline.training.resume`."""

from __future__ import annotations

import io
import random
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.atomic import write_bytes
from pipeline.core.provenance import read_record, sha256_file

CHECKPOINT_RE = re.compile(r"epoch_(\d+)\.pt$")


def save_torch(obj: Any, path: Path) -> None:
    """torch.save, atomically and byte-reproducibly: saving to a file names the zip's inner folder
    after the (here random, temporary) file name, so serialise in memory first; and the object is
    `canonical`, so that its bytes do not depend on where its parts came from."""
    buf = io.BytesIO()
    torch.save(canonical(obj), buf)
    write_bytes(path, buf.getvalue())


def canonical(obj: Any) -> Any:
    """`obj` with fresh dicts, lists and tuples and interned strings.

    Pickle writes an object seen before as a reference (its memo), so the bytes depend on which
    equal parts are the same object. A run resumed from a checkpoint holds loaded copies where an
    uninterrupted run shares objects (an optimizer's `betas` tuple, history keys), and would save
    other bytes for equal contents. Rebuilding every container and interning every string makes
    sharing a function of the contents. Tensors are left as they are (torch stores them by storage).
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if type(obj) in (dict, OrderedDict):  # state dicts are OrderedDicts with a `_metadata` attribute
        out = type(obj)((canonical(k), canonical(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = canonical(obj._metadata)
        return out
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):  # named tuples keep their class
        return tuple(canonical(v) for v in obj)
    return obj


def finished_run_fields(best: Path) -> dict[str, str]:
    """What the train stage's record of best.pt holds to mark its run finished: best.pt's sha256.
    best.pt is written during training, so a killed run leaves a record that is absent, or that
    names the bytes of an earlier run's best.pt (`unfinished_reason`)."""
    return {"best_sha256": sha256_file(best)}


def unfinished_reason(best: Path) -> str | None:
    """Why `best` is not the result of a finished training run, or None if it is."""
    record = read_record(best)
    if record is None or "best_sha256" not in record:
        return f"{best} has no training record: its run did not finish"
    if record["best_sha256"] != sha256_file(best):
        return f"{best} was rewritten after its training record: a later run did not finish"
    return None


def load_torch(path: Path) -> Any:
    # Our own files, but loaded without arbitrary unpickling all the same.
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_path(ckpt_dir: Path, epoch: int) -> Path:
    return Path(ckpt_dir) / f"epoch_{epoch:03d}.pt"


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every checkpoint in `ckpt_dir`, oldest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("epoch_*.pt") if (m := CHECKPOINT_RE.search(p.name))]
    return sorted(found)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints."""
    for _, old in checkpoints(ckpt_dir)[:-keep]:
        old.unlink()


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


def write_live_logs(live_dir: Path, history: list[dict[str, float]]) -> None:
    """(Re)write the dvclive logs from the whole history: one dvclive step per epoch.

    Rewriting from the checkpointed history (rather than appending) keeps the curves exact after
    a resume: an epoch that was logged but not checkpointed before a kill is not logged twice.
    """
    from dvclive import Live  # only training writes logs; evaluation need not import it

    shutil.rmtree(live_dir, ignore_errors=True)
    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for entry in history:
            for key, value in entry.items():
                if key != "epoch":
                    live.log_metric(key, float(value))
            live.log_metric("epoch", int(entry["epoch"]), plot=False)
            live.next_step()
