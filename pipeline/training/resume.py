"""Whether a run picks up its newest checkpoint or starts afresh: a pure decision, tested on its own.

A checkpoint is resumed only if its config record (model config, seed, selection, and what the
train stage adds: dataset, code version, input digests) equals the current one, so a persisted
checkpoint never carries a run over to other code or inputs. `dvc repro` deletes best.pt (a cached
out) but keeps the checkpoints (persist): best.pt is then rebuilt from the checkpoint if it holds the
kept weights (the kept epoch is the last one done), and the run is retrained if it does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ResumeDecision:
    resume: bool  # False: delete the checkpoints and train from epoch 1
    reason: str  # why, for the log
    rewrite_best: bool = False  # best.pt is gone and the checkpoint holds its weights: write it again


def decide_resume(checkpoint: Mapping[str, Any] | None, record: Mapping[str, Any],
                  best_exists: bool) -> ResumeDecision:
    """`checkpoint`: the newest checkpoint's state (None: there is none); `record`: the current
    config record; `best_exists`: whether best.pt is on disk."""
    if checkpoint is None:
        return ResumeDecision(False, "no checkpoint")
    if checkpoint["config"] != record:
        return ResumeDecision(False, "made with a different config or code")
    done, kept = checkpoint["epoch"], checkpoint["best"]["epoch"]  # kept 0: nothing selected yet
    if not best_exists and kept and kept != done:
        return ResumeDecision(False, f"the kept weights of epoch {kept} (best.pt) are gone")
    return ResumeDecision(True, f"epoch {done} done", rewrite_best=not best_exists and kept == done)
