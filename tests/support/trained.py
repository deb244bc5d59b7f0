"""A tiny MMN trained through the CLI on tiny generated videos, for the tests of prediction and of
`vmr serve`: `vmr synth` (the tiny profile at 96x64) -> decode -> extract clip (seeded random init)
-> merge -> vocab -> train, every path under one folder. A few minutes on a loaded 2-core machine,
so the tests that use it are marked slow; it is made once per test session (tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.params import deep_merge

REPO = Path(__file__).resolve().parents[2]
# Small enough to train in seconds on 6 videos of 5-7 s; CLIP features at 1 frame per second.
TINY_MMN = {"epochs": 2, "num_pre_clips": 8, "num_clips": 4, "pooling_counts": [3], "feat_hidden": 32,
            "pred_hidden": 32, "joint_size": 32, "text_dim": 32, "text_ffn": 64, "milestones": [1]}


@dataclass(frozen=True)
class TinyRun:
    params: Path  # the params file every command was run with (absolute paths inside)
    checkpoint: Path  # trainer.out_dir/mmn/best.pt
    videos: Path  # the synthetic videos it was trained on


def tiny_params(root: Path) -> Path:
    """root/params.yaml: the repository's params with the tiny profile, only CLIP and MMN, and
    every output under root (absolute paths, so commands may run from any directory)."""
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                        yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text()))
    synth, ann = root / "synth", root / "synth" / "annotations"
    overrides = {
        "synth": {"out_dir": str(synth), "width": 96, "height": 64},
        "dataset": {"video_dir": str(synth / "videos"),
                    "splits": {"train": str(ann / "charades_sta_train.txt"), "test": str(ann / "charades_sta_test.txt")},
                    "durations": [str(ann / "Charades_v1_train.csv"), str(ann / "Charades_v1_test.csv")],
                    "video_captions": str(ann / "video_captions.json")},
        "decode": {"video_dir": str(synth / "videos"), "out_dir": str(root / "frames"), "workers": 1},
        "merge": {"npy_dir": str(root / "npy"), "out_dir": str(root / "features")},
        "vocab": {"out_dir": str(root / "vocab"),
                  "glove_file": str(synth / f"glove.synthetic.{params['synth']['glove_dim']}d.txt")},
        "features": ["clip"],
        "models": ["mmn"],
        "model": {"mmn": TINY_MMN},
        "trainer": {"out_dir": str(root / "runs"), "device": "cpu"},
        "evaluate": {"out_dir": str(root / "results")},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(params, overrides), sort_keys=False))
    return path


def train_tiny_mmn(root: Path) -> TinyRun:
    root.mkdir(parents=True, exist_ok=True)
    params = tiny_params(root)
    runner = CliRunner()
    for command in (["synth"], ["decode"], ["extract", "--feature", "clip"], ["merge", "--feature", "clip"],
                    ["vocab"], ["train", "--model", "mmn"]):
        result = runner.invoke(app, [*command, "--params", str(params)])
        assert result.exit_code == 0, f"vmr {' '.join(command)} -> {result.exit_code}:\n{result.output}"
    checkpoint = root / "runs" / "mmn" / "best.pt"
    assert checkpoint.is_file(), f"vmr train wrote no {checkpoint}"
    return TinyRun(params=params, checkpoint=checkpoint, videos=root / "synth" / "videos")
