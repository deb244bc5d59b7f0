"""Checkpoint files: byte-reproducible saves, listing in epoch order, pruning, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import torch

from pipeline.training.checkpoints import (
    checkpoint_path,
    checkpoints,
    load_torch,
    prune_checkpoints,
    rng_state,
    save_torch,
    set_rng_state,
)


def test_save_torch_gives_the_same_bytes_whatever_the_file_name(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "history": [{"epoch": 1, "train/loss": 0.5}]}
    save_torch(state, tmp_path / "a.pt")
    save_torch(state, tmp_path / "b" / "epoch_001.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "epoch_001.pt").read_bytes()
    loaded = load_torch(tmp_path / "a.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["history"] == state["history"]


def test_checkpoints_are_listed_by_epoch_and_pruned_to_the_newest(tmp_path):
    for epoch in (10, 2, 1, 100):
        save_torch({"epoch": epoch}, checkpoint_path(tmp_path, epoch))
    (tmp_path / "epoch_x.pt").write_bytes(b"")  # not a checkpoint name
    assert [e for e, _ in checkpoints(tmp_path)] == [1, 2, 10, 100]
    prune_checkpoints(tmp_path, keep=2)
    assert [(e, p.name) for e, p in checkpoints(tmp_path)] == [(10, "epoch_010.pt"), (100, "epoch_100.pt")]


def test_rng_state_survives_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_torch(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(load_torch(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
