"""A tiny trained project for the tests of prediction and of `vmr serve`: the synthetic dataset of
profiles/tiny.yaml (six short videos), decoded, extracted (CLIP, random init), merged, and every
model trained for one epoch and evaluated, all through the CLI. Built once per test session by the
`project` fixture (tests/conftest.py; about a minute on CPU), so the tests that use it are marked slow."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.params import deep_merge

REPO = Path(__file__).resolve().parents[2]
GROUNDING = ["mmn", "mesm", "cnm", "mrnet"]


def tiny_params(root: Path) -> dict:
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                        yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text()))
    synth, ann = root / "data" / "synth", root / "data" / "synth" / "annotations"
    overlay = {
        "synth": {"out_dir": str(synth), "width": 160, "height": 120},
        "dataset": {"video_dir": str(synth / "videos"),
                    "splits": {"train": str(ann / "charades_sta_train.txt"), "test": str(ann / "charades_sta_test.txt")},
                    "durations": [str(ann / "Charades_v1_train.csv"), str(ann / "Charades_v1_test.csv")],
                    "video_captions": str(ann / "video_captions.json")},
        "decode": {"out_dir": str(root / "work" / "frames"), "workers": 1},
        "merge": {"npy_dir": str(root / "work" / "npy"), "out_dir": str(root / "features")},
        "vocab": {"out_dir": str(root / "vocab"), "glove_file": str(synth / "glove.synthetic.300d.txt")},
        "trainer": {"out_dir": str(root / "runs"), "device": "cpu"},
        "evaluate": {"out_dir": str(root / "results")},
        # evaluate one item per batch, as predict does: MESM's scores depend on what shares a batch
        # (the released attention mask, docs/mesm.md), so only batch-1 evaluation is the oracle for a prediction
        "model": {m: {"epochs": 1, "eval_batch_size": 1} for m in GROUNDING} | {"glscl": {"epochs": 1, "eval_every": 1}},
    }
    return deep_merge(params, overlay)


def vmr(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"vmr {' '.join(args)}:\n{result.output}"


def exact_durations(root: Path) -> None:
    """The durations csv with the decoded stream durations, as predict measures them (synth rounds
    them to 2 decimals): windows scale with the duration, and MMN's NMS (IoU > 0.5 on grid windows,
    often exactly 0.5) would otherwise keep other windows in evaluate than in predict."""
    import csv
    import json

    decoded = {p.stem: json.loads(p.read_text())["duration"] for p in (root / "work" / "frames" / "videos").glob("*.json")}
    for path in (root / "data" / "synth" / "annotations").glob("Charades_v1_*.csv"):
        rows = list(csv.DictReader(path.open()))
        for row in rows:
            row["length"] = repr(decoded[row["id"]])
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def build_project(root: Path) -> Path:
    """root: params.yaml, the data, features, vocab, runs/<model>/best.pt and results/<model>/."""
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(root)))
    p = ["-p", str(params)]
    vmr("synth", *p)
    vmr("decode", *p)
    exact_durations(root)
    for cmd in (["extract", "--feature", "clip"], ["merge", "--feature", "clip"], ["vocab"],
                ["query-features", "--model", "mrnet"]):
        vmr(*cmd, *p)
    for model in [*GROUNDING, "glscl"]:
        vmr("train", "--model", model, *p)
        vmr("evaluate", "--model", model, *p)
    return root
