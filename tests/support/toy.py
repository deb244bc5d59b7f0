"""A tiny grounding model and dataset that exercise the trainer contract (and a torchrun worker).

Data: Charades-STA files and one merged HDF5 file written to a directory; the features of each
video carry its first moment (a bump over the moment's clips), so the model can learn something.
Model: mean-pooled features -> MLP with dropout (so resume must restore the RNG) -> (start, end)
as fractions of the duration; MSE loss.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from pipeline.core.params import DatasetParams
from pipeline.media.features import FeatureFile, load_video
from pipeline.training.evaluation import evaluate_moments
from pipeline.training.trainer import DataContext, GroundingModel, Optimization, TrainConfig, fit

NUM_CLIPS = 8
DIM = 6


def write_toy_data(root: Path, num_train: int = 12, num_test: int = 4, seed: int = 0) -> DatasetParams:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(exist_ok=True)
    csv_lines = ["id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"]
    with h5py.File(root / "features" / "toy.h5", "w") as h5:
        for split, n in (("train", num_train), ("test", num_test)):
            lines = []
            for i in range(n):
                vid = f"{split[:2].upper()}{i:03d}"
                duration = float(rng.uniform(10, 30))
                s = float(rng.uniform(0, duration * 0.6))
                e = float(min(duration, s + rng.uniform(2, duration * 0.4)))
                t = int(round(duration))
                feats = rng.normal(0, 0.1, size=(t, DIM)).astype(np.float32)
                feats[int(s) : max(int(e), int(s) + 1), 0] += 1.0
                feats[:, 1] = np.arange(t) / t
                h5[vid] = feats
                lines.append(f"{vid} {s:.1f} {e:.1f}##person does thing {i}.")
                csv_lines.append(f"{vid},S,room,5,6,Yes,script,,desc,,{duration:.2f}")
            (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "videos.csv").write_text("\n".join(csv_lines) + "\n")
    return DatasetParams(
        name="toy",
        format="charades_sta",
        video_dir=str(root / "videos"),
        splits={"train": str(root / "train.txt"), "test": str(root / "test.txt")},
        durations=[str(root / "videos.csv")],
        cleaning="mmn",
        video_captions=None,
    )


def toy_context(root: Path, run_dir: Path, seed: int = 0) -> DataContext:
    dataset = write_toy_data(root) if not (root / "train.txt").exists() else DatasetParams(
        name="toy", format="charades_sta", video_dir=str(root / "videos"),
        splits={"train": str(root / "train.txt"), "test": str(root / "test.txt")},
        durations=[str(root / "videos.csv")], cleaning="mmn", video_captions=None)
    return DataContext(dataset=dataset, features_dir=root / "features", vocab_dir=root / "vocab",
                       frames_dir=root / "frames", run_dir=run_dir, seed=seed)


class ToyItems(torch.utils.data.Dataset):
    def __init__(self, queries, features: FeatureFile):
        self.queries, self.features = queries, features

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict:
        q = self.queries[i]
        x = load_video([self.features], q.video_id, l2norm=False, num_clips=NUM_CLIPS)
        target = np.asarray(q.moment, dtype=np.float32) / q.duration
        return {"x": torch.from_numpy(x.reshape(-1)), "target": torch.from_numpy(target),
                "qid": q.qid, "vid": q.video_id, "duration": q.duration}


class ToyModel(GroundingModel):
    class Config(TrainConfig):
        epochs: int = 3
        batch_size: int = 4
        eval_batch_size: int = 4
        grad_clip: float | None = 1.0
        lr: float = 0.05
        hidden: int = 16
        dropout: float = 0.1

    def __init__(self, cfg: Config, data: DataContext):
        super().__init__(cfg, data)
        self.features = FeatureFile(data.feature_file("toy"))
        self.net = nn.Sequential(nn.Linear(NUM_CLIPS * DIM, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, 2))

    def build_dataset(self, split, data, train):
        return ToyItems(data.queries(split), self.features)

    def collate(self, items):
        return {"x": torch.stack([it["x"] for it in items]), "target": torch.stack([it["target"] for it in items]),
                "qid": [it["qid"] for it in items], "vid": [it["vid"] for it in items],
                "duration": [it["duration"] for it in items]}

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.cfg.lr, momentum=0.9)
        return Optimization([opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)])

    def training_step(self, batch, ctx):
        if os.environ.get("TOY_SLEEP"):  # lets a test kill the process in the middle of an epoch
            time.sleep(float(os.environ["TOY_SLEEP"]))
        loss = ((self.net(batch["x"]) - batch["target"]) ** 2).mean()
        return {"loss": loss, "mse": loss.detach()}

    def predict_step(self, batch):
        out = self.net(batch["x"]).sort(dim=1).values.clamp(0, 1)
        return [{"qid": q, "vid": v, "pred_relevant_windows": [[float(s) * d, float(e) * d, 1.0]]}
                for q, v, d, (s, e) in zip(batch["qid"], batch["vid"], batch["duration"], out.tolist(), strict=True)]

    def metrics(self, predictions, queries):
        by_qid = {p["qid"]: p for p in predictions}
        # windows per query may differ in number: pad to 5 with empty windows (never a hit)
        padded = np.zeros((len(queries), 5, 2))
        for i, q in enumerate(queries):
            w = np.asarray([w[:2] for w in by_qid[q.qid]["pred_relevant_windows"][:5]])
            padded[i, : len(w)] = w
        gt = np.asarray([q.moment for q in queries])
        return evaluate_moments(padded, None, gt, ks=(1, 5), thresholds=(0.3, 0.5))


def _main() -> None:
    """torchrun worker: python tests/support/toy.py DATA_ROOT RUN_DIR CONFIG_JSON"""
    root, run_dir, cfg_json = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    cfg = ToyModel.Config.model_validate(json.loads(cfg_json))
    fit("toy", ToyModel, cfg, toy_context(root, run_dir), device="cpu", select_split="test", keep_checkpoints=100)


if __name__ == "__main__":
    _main()


# A tiny MMN on the toy features: trains in seconds through `vmr train`.
TINY_MMN = dict(features=["toy"], input_size=None, num_pre_clips=8, num_clips=4, pool_kernel=2,
                pooling_counts=[3], feat_hidden=16, pred_hidden=16, pred_kernel=3, pred_layers=2,
                joint_size=16, text_dim=16, text_layers=1, text_heads=2, text_ffn=32, vocab_size=120,
                freeze_bert=0, epochs=2, batch_size=4, eval_batch_size=4, milestones=[1],
                iou_thresholds=[0.3, 0.5, 0.7])


def write_toy_params(root: Path, **trainer) -> Path:
    """root/params.yaml for TINY_MMN on toy data written under root/data (runs/, results/ beside)."""
    import yaml

    dataset = write_toy_data(root / "data")
    params = {
        "seed": 0,
        "dataset": dataset.model_dump(),
        "merge": {"out_dir": str(root / "data" / "features")},
        "trainer": {"out_dir": str(root / "runs"), "device": "cpu", **trainer},
        "evaluate": {"out_dir": str(root / "results"), "split": "test"},
        "models": ["mmn"],
        "model": {"mmn": TINY_MMN},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path
