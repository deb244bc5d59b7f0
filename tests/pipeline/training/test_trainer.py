"""The shared trainer: batching, checkpoints, resume after SIGKILL, DDP equivalence, evaluation helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.toy import ToyModel, toy_context

from pipeline.training.checkpoints import checkpoints, load_torch
from pipeline.training.distributed import Dist, global_batches, rank_share
from pipeline.training.trainer import (
    RetrievalModel,
    TrainConfig,
    fit,
    predict_and_score,
    random_grounding_predictions,
)

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).resolve().parents[2] / "support" / "toy.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), VMR_NO_PROGRESS="1")
    env.pop("TOY_SLEEP", None)
    return env


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_torch(checkpoints(run_dir / "checkpoints")[-1][1])["model"]


def test_global_batches_are_a_seeded_permutation_and_rank_shares_tile_them():
    a = global_batches(10, 4, seed=3, epoch=1, shuffle=True)
    assert [len(b) for b in a] == [4, 4, 2]
    assert sorted(i for b in a for i in b) == list(range(10))
    assert a == global_batches(10, 4, seed=3, epoch=1, shuffle=True)
    assert a != global_batches(10, 4, seed=3, epoch=2, shuffle=True)
    for batch in a:
        shares = [rank_share(batch, r, 3) for r in range(3)]
        assert [i for s in shares for i in s] == batch  # contiguous, in order, nothing lost
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_fit_writes_checkpoint_best_and_dvclive_logs(tmp_path):
    ctx = toy_context(tmp_path / "data", tmp_path / "run")
    result = fit("toy", ToyModel, ToyModel.Config(epochs=2), ctx, device="cpu", select_split="test",
                 keep_checkpoints=5)
    ckpts = checkpoints(tmp_path / "run" / "checkpoints")
    assert [e for e, _ in ckpts] == [1, 2]
    state = load_torch(ckpts[-1][1])
    assert {"model", "optimizers", "schedulers", "scaler", "rng", "epoch", "step", "config", "history",
            "best"} <= set(state)
    assert state["epoch"] == 2 and state["step"] == 6  # 12 train queries / batch 4, 2 epochs
    assert state["config"]["model_config"] == ToyModel.Config(epochs=2).model_dump()
    assert state["schedulers"][0]["last_epoch"] == 2
    assert len(state["rng"]) == 1 and set(state["rng"][0]) >= {"python", "numpy", "torch"}
    best = load_torch(tmp_path / "run" / "best.pt")
    assert best["epoch"] == result.best_epoch
    assert best["metrics"] == result.best_metrics
    live = json.loads((tmp_path / "run" / "live" / "metrics.json").read_text())
    assert live["epoch"] == 2 and "loss" in live["train"] and "R@1,IoU@0.5" in live["test"]
    rows = (tmp_path / "run" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "loss"] and len(rows) == 3  # no timestamps: deterministic


def test_checkpoint_round_trip_resume_matches_uninterrupted(tmp_path):
    cfg = ToyModel.Config(epochs=3)
    full = tmp_path / "full"
    fit("toy", ToyModel, cfg, toy_context(tmp_path / "data", full), device="cpu", keep_checkpoints=5)
    # resume from the epoch-1 checkpoint: drop the later ones
    part = tmp_path / "part"
    fit("toy", ToyModel, ToyModel.Config(epochs=1), toy_context(tmp_path / "data", tmp_path / "tmp"),
        device="cpu")
    part.mkdir()
    (part / "checkpoints").mkdir()
    for e, p in checkpoints(full / "checkpoints"):
        if e == 1:
            (part / "checkpoints" / p.name).write_bytes(p.read_bytes())
    fit("toy", ToyModel, cfg, toy_context(tmp_path / "data", part), device="cpu", keep_checkpoints=5)
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_torch(checkpoints(full / "checkpoints")[-1][1])["history"] == \
        load_torch(checkpoints(part / "checkpoints")[-1][1])["history"]
    # byte for byte (dvc.lock must not change after a resume): pickle's memo once made them differ
    assert checkpoints(full / "checkpoints")[-1][1].read_bytes() == checkpoints(part / "checkpoints")[-1][1].read_bytes()
    assert (full / "best.pt").read_bytes() == (part / "best.pt").read_bytes()


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    ctx = toy_context(tmp_path / "data", tmp_path / "run")
    fit("toy", ToyModel, ToyModel.Config(epochs=1), ctx, device="cpu")
    fit("toy", ToyModel, ToyModel.Config(epochs=1, lr=0.01), ctx, device="cpu")
    state = load_torch(checkpoints(tmp_path / "run" / "checkpoints")[-1][1])
    assert state["config"]["model_config"]["lr"] == 0.01 and len(state["history"]) == 1


@pytest.mark.slow  # two worker processes (~50 s on a loaded 2-core machine)
def test_sigkill_mid_epoch_then_resume_gives_the_same_final_weights(tmp_path):
    cfg = json.dumps({"epochs": 4})
    data = tmp_path / "data"
    toy_context(data, tmp_path / "unused")  # write the data once
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(WORKER), str(data), str(ref), cfg], env=_env(), check=True,
                   capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(WORKER), str(data), str(run), cfg],
                            env=dict(_env(), TOY_SLEEP="0.15"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180  # generous: importing torch alone takes a minute on a loaded machine
    while not (run / "checkpoints" / "epoch_002.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "worker ended before its epoch-2 checkpoint"
        time.sleep(0.05)
    time.sleep(0.2)  # into epoch 3
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "checkpoints" / "epoch_004.pt").exists()

    subprocess.run([sys.executable, str(WORKER), str(data), str(run), cfg], env=_env(), check=True,
                   capture_output=True)
    a, b = _weights(ref), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_torch(ref / "best.pt")["epoch"] == load_torch(run / "best.pt")["epoch"]


@pytest.mark.slow  # torchrun with 2 workers plus 1 reference process
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """Same global batch on 2 CPU processes (gloo) as on 1: losses within 1e-6 relative and weights
    within 1e-6 absolute (only float summation order differs). Dropout is off: each rank draws its
    own masks, which no process count can reproduce."""
    cfg, data, one = _one_process_reference(tmp_path, epochs=3)
    two = tmp_path / "two"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(WORKER), str(data), str(two), cfg],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_training(one, two)


def _one_process_reference(tmp_path: Path, epochs: int) -> tuple[str, Path, Path]:
    """(worker config, toy data, run dir) of the toy model trained by one process, dropout off."""
    cfg = json.dumps({"epochs": epochs, "dropout": 0.0})
    data, one = tmp_path / "data", tmp_path / "one"
    toy_context(data, tmp_path / "unused")
    subprocess.run([sys.executable, str(WORKER), str(data), str(one), cfg], env=_env(), check=True,
                   capture_output=True)
    return cfg, data, one


def _assert_same_training(one: Path, two: Path) -> None:
    """Equal epochs and losses (1e-6 relative) and final weights (1e-6 absolute)."""
    h1 = load_torch(checkpoints(one / "checkpoints")[-1][1])["history"]
    h2 = load_torch(checkpoints(two / "checkpoints")[-1][1])["history"]
    assert len(h2[-1]) == len(h1[-1])
    for e1, e2 in zip(h1, h2, strict=True):
        assert e1["train/loss"] == pytest.approx(e2["train/loss"], rel=1e-6)
    a, b = _weights(one), _weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun launchers plus 1 reference process
def test_two_node_torchrun_rendezvous_matches_one_process(tmp_path):
    """The multi-node launch of docs/training.md, with both "nodes" on this machine: two torchrun
    launchers (`--nnodes 2 --node-rank i`, one process each) meet at a c10d rendezvous and train
    as one job; losses and weights equal one process's, as for the single-node run above."""
    cfg, data, one = _one_process_reference(tmp_path, epochs=2)
    two = tmp_path / "two"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                               "--rdzv-id=vmr-test", str(WORKER), str(data), str(two), cfg],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    _assert_same_training(one, two)


def test_random_baseline_windows_lie_inside_the_video(tmp_path):
    ctx = toy_context(tmp_path / "data", tmp_path / "run")
    queries = ctx.queries("test")
    preds = random_grounding_predictions(queries, seed=0)
    assert [p["qid"] for p in preds] == [q.qid for q in queries]
    for p, q in zip(preds, queries, strict=True):
        scores = [w[2] for w in p["pred_relevant_windows"]]
        assert scores == sorted(scores, reverse=True)
        assert all(0 <= w[0] <= w[1] <= q.duration for w in p["pred_relevant_windows"])
    assert preds == random_grounding_predictions(queries, seed=0)


def test_a_finished_run_rebuilds_a_deleted_best_pt_identically(tmp_path):
    # `dvc repro` deletes best.pt (a cached out) but keeps the checkpoints (persist): the rerun must
    # not pass the last epoch off as the selected one
    ctx = toy_context(tmp_path / "data", tmp_path / "run")
    cfg = ToyModel.Config(epochs=3)
    fit("toy", ToyModel, cfg, ctx, device="cpu", select_split="test")
    best = load_torch(tmp_path / "run" / "best.pt")
    (tmp_path / "run" / "best.pt").unlink()
    fit("toy", ToyModel, cfg, ctx, device="cpu", select_split="test")
    again = load_torch(tmp_path / "run" / "best.pt")
    assert again["epoch"] == best["epoch"] and again["metrics"] == best["metrics"]
    assert all(torch.equal(again["model"][k], best["model"][k]) for k in best["model"])


class _ToyRetrieval(RetrievalModel):
    """Texts and videos embedded as tuples, scored by a pairwise head: exercises the retrieval path."""

    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        self.proj = torch.nn.Linear(3, 3)

    def build_eval_datasets(self, split, data):
        texts = [{"qid": i, "vid": f"v{i % 4}", "x": torch.full((3,), float(i % 4))} for i in range(10)]
        videos = [{"vid": f"v{j}", "x": torch.full((3,), float(j))} for j in range(4)]
        return texts, videos

    def collate(self, items):
        return {"x": torch.stack([it["x"] for it in items]), "vid": [it["vid"] for it in items],
                "qid": [it.get("qid") for it in items]}

    def encode_text(self, batch):
        return {"qid": batch["qid"], "vid": batch["vid"], "emb": (batch["x"], batch["x"][:, :1])}

    def encode_video(self, batch):
        return {"vid": batch["vid"], "emb": (batch["x"], batch["x"][:, :1])}

    def similarity(self, text_emb, video_emb):
        return -(text_emb[1] - video_emb[1].t()).abs()  # pairwise: 0 on the matching video

    def metrics(self, result):
        gt = torch.tensor([result.video_vids.index(v) for v in result.text_vids])
        return {"t2v_R1": float((result.similarity.argmax(dim=1) == gt).float().mean() * 100)}


def test_retrieval_prediction_concatenates_tuple_embeddings_in_blocks(tmp_path):
    model = _ToyRetrieval(TrainConfig(), toy_context(tmp_path / "data", tmp_path / "run"))
    data = model.eval_data("test", None)
    env = Dist(rank=0, world_size=1, device=torch.device("cpu"))
    result, metrics = predict_and_score(model, data, batch_size=3, env=env)
    assert result.similarity.shape == (10, 4) and result.text_qids == list(range(10))
    assert result.video_vids == ["v0", "v1", "v2", "v3"] and metrics == {"t2v_R1": 100.0}
    baseline = model.random_baseline(result, data, seed=0)
    assert baseline["t2v_R1"] < 100.0 and baseline == model.random_baseline(result, data, seed=0)
