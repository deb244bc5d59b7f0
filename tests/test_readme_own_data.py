"""README "Your own videos", run literally: the section's bash block, unchanged, in a fresh directory
that holds what a clone holds (params.yaml, profiles/) plus generated videos of mixed frame rate,
size and container (one with an audio stream, one with a variable frame rate) and hand-written
Charades-STA files without any duration file. The README cannot drift from what works."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.videos import write_video
from typer.main import get_command

from pipeline.cli import app
from pipeline.core.codedeps import REPO_ROOT

SECTION = "## Your own videos"

# video id -> write_video arguments (`suffix`: the container; `pts_ms`: variable frame times)
VIDEOS = {
    "kitchen01": dict(frames=120, fps=24, width=160, height=120),  # 5 s
    "kitchen02": dict(frames=120, fps=30, width=192, height=108, audio=True),  # 4 s, with sound
    "hall03": dict(frames=150, fps=25, width=120, height=160),  # 6 s, portrait
    # 4.13 s with a variable frame rate: 40 ms steps, then 80 ms, then 70 ms
    "hall04": dict(frames=70, pts_ms=[40 * i for i in range(30)] + [1200 + 80 * i for i in range(20)]
                   + [2800 + 70 * i for i in range(20)]),
    "yard05": dict(frames=90, fps=30, width=176, height=144, suffix=".mkv"),  # 3 s
    "yard06": dict(frames=120, fps=24, width=160, height=90),  # 5 s
}
TRAIN = """\
kitchen01 0.0 2.5##a person opens the fridge.
kitchen01 2.0 5.0##a person closes the fridge.
kitchen02 0.5 2.0##someone pours water into a cup.
kitchen02 2.0 4.0##someone drinks from the cup.
hall03 0.0 3.0##a person walks to the door.
hall03 3.0 6.0##a person opens the door.
hall04 0.0 1.5##the light turns on.
hall04 1.5 4.1##a person sits on the chair.
"""
TEST = """\
yard05 0.0 1.5##a person opens the door.
yard05 1.5 3.0##a person walks outside.
yard06 0.0 2.5##someone picks up a ball.
yard06 2.0 5.0##someone throws the ball.
"""


def readme_block() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no section '{SECTION}'"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"'{SECTION}': expected one bash block, found {len(blocks)}"
    return blocks[0]


def make_clone_with_data(root: Path) -> None:
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO_ROOT / "profiles", root / "profiles")
    videos = root / "data" / "own" / "videos"
    videos.mkdir(parents=True)
    for vid, spec in VIDEOS.items():
        spec = dict(spec)
        suffix = spec.pop("suffix", ".mp4")
        if "pts_ms" in spec:
            spec |= dict(width=160, height=120)
        write_video(videos / f"{vid}{suffix}", **spec)
    (root / "data" / "own" / "train.txt").write_text(TRAIN)
    (root / "data" / "own" / "test.txt").write_text(TEST)


def cli_commands() -> set[str]:
    return set(get_command(app).commands)


def test_the_section_uses_only_existing_commands_and_the_profile():
    block = readme_block()
    commands = [line for line in block.splitlines() if line.startswith("vmr ")]
    assert commands, "the section runs no vmr command"
    assert {c.split()[1] for c in commands} <= cli_commands()
    assert commands[-1].startswith("vmr predict ")  # from metrics on to predictions
    assert all("--profile profiles/own_data.yaml" in c for c in commands)


def bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script` as a user would in `cwd`: this environment's `vmr`, this checkout's code."""
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=str(REPO_ROOT),
               VMR_NO_PROGRESS="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return run


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("clone")
    make_clone_with_data(root)
    return root, bash(readme_block(), root)


@pytest.mark.slow
def test_readme_own_videos_section_runs_as_written(readme_run):
    tmp_path, run = readme_run

    # durations came from decode, one per video: FFmpeg's end time, the VFR one's last pts (4.13 s)
    # plus its packet duration (one 1 ms tick of its time base)
    durations = json.loads((tmp_path / "work" / "frames" / "durations.json").read_text())
    assert sorted(durations) == sorted(VIDEOS)
    assert durations["hall04"] == pytest.approx(4.131, abs=1e-3)
    assert durations["kitchen02"] == pytest.approx(4.0, abs=1e-3)
    assert durations["yard05"] == pytest.approx(3.0, abs=0.04)

    metrics_text = (tmp_path / "results" / "mmn" / "metrics.json").read_text()
    assert metrics_text in run.stdout  # `cat` showed it
    metrics = json.loads(metrics_text)
    predicted = [json.loads(line) for line in
                 (tmp_path / "results" / "mmn" / "predictions" / "predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == len(TEST.splitlines())  # every test query, none dropped
    for p in predicted:  # the moment grid spans the measured duration of its video
        assert max(w[1] for w in p["pred_relevant_windows"]) == pytest.approx(durations[p["vid"]], abs=1e-3)
    # R@1 recomputed from the predictions and the test file (qid: the line's position; the ends are
    # inside the videos, so the mmn cleaning policy keeps every moment as written)
    truth = [tuple(map(float, line.split("##")[0].split()[1:])) for line in TEST.splitlines()]
    top1 = {p["qid"]: p["pred_relevant_windows"][0][:2] for p in predicted}
    for threshold in (0.3, 0.5, 0.7):
        hits = [_iou(top1[qid], gt) >= threshold for qid, gt in enumerate(truth)]
        assert metrics[f"R@1,IoU@{threshold}"] == pytest.approx(100 * sum(hits) / len(hits))
    assert 0.0 <= metrics["mIoU"] <= 100.0 and "random_baseline" in metrics
    assert not (tmp_path / "data" / "synth").exists(), "the synthetic dataset leaked into the run"

    # the prediction: every video of the folder, the query's moments ranked, inside the video
    entries = json.loads((tmp_path / "prediction.json").read_text())
    assert sorted(Path(e["video"]).stem for e in entries) == sorted(VIDEOS)
    for e in entries:
        vid = Path(e["video"]).stem
        assert e["query"] == "a person opens the door" and e["model"] == "mmn"
        assert e["duration"] == pytest.approx(durations[vid], abs=1e-3)  # measured alike
        moments = e["moments"]
        assert moments and all(0 <= m["start"] < m["end"] <= durations[vid] + 1e-3 for m in moments)
        assert [m["score"] for m in moments] == sorted((m["score"] for m in moments), reverse=True)


@pytest.mark.slow
def test_mrnet_on_the_same_videos_as_docs_own_data_says(readme_run):
    """docs/own_data.md, "Another model": MRNet after its query features, through to `vmr predict`
    (its random-init query encoder learns its vocabulary from the train split, parsed with decode's
    durations from the training record)."""
    root, _ = readme_run
    bash("vmr query-features --profile profiles/own_data.yaml --model mrnet\n"
         "vmr train --profile profiles/own_data.yaml --model mrnet --set model.mrnet.epochs=1\n"
         "vmr evaluate --profile profiles/own_data.yaml --model mrnet\n"
         "vmr predict --profile profiles/own_data.yaml --model mrnet data/own/videos --query 'a person sits down' "
         "--out mrnet.json\n", root)
    durations = json.loads((root / "work" / "frames" / "durations.json").read_text())
    assert 0.0 <= json.loads((root / "results" / "mrnet" / "metrics.json").read_text())["mIoU"] <= 100.0
    entries = json.loads((root / "mrnet.json").read_text())
    assert sorted(Path(e["video"]).stem for e in entries) == sorted(VIDEOS)
    for e in entries:
        assert e["model"] == "mrnet" and e["moments"]
        assert all(0 <= m["start"] < m["end"] <= durations[Path(e["video"]).stem] + 1e-3 for m in e["moments"])


def _iou(a, b) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))
