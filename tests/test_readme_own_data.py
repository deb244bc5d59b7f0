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
# The integrator's switch for the README's last step, `vmr predict` (built on branch `predict`):
# while False that line is left out and no prediction is checked. `test_predict_switch_matches_the_cli`
# fails as soon as the command exists and the switch is still off, so it cannot be forgotten.
PREDICT_MERGED = True

# id: (frames, fps or None for variable, width, height, container, audio)
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


def test_predict_switch_matches_the_cli():
    assert PREDICT_MERGED == ("predict" in cli_commands()), (
        "`vmr predict` is merged: set PREDICT_MERGED = True in this file" if not PREDICT_MERGED
        else "PREDICT_MERGED is True but `vmr` has no predict command")


def test_the_section_uses_only_existing_commands_and_the_profile():
    block = readme_block()
    commands = [line for line in block.splitlines() if line.startswith("vmr ")]
    assert commands, "the section runs no vmr command"
    known = cli_commands() | {"predict"}  # predict: the switch above
    assert {c.split()[1] for c in commands} <= known
    assert all("--profile profiles/own_data.yaml" in c for c in commands)


@pytest.mark.slow
def test_readme_own_videos_section_runs_as_written(tmp_path):
    make_clone_with_data(tmp_path)
    block = readme_block()
    if not PREDICT_MERGED:
        block = "\n".join(line for line in block.splitlines() if not line.startswith("vmr predict"))
    bindir = str(Path(sys.executable).parent)  # the `vmr` of this environment
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=str(REPO_ROOT),
               VMR_NO_PROGRESS="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]

    # durations came from decode, one per video: FFmpeg's end time, the VFR one's last pts (4.13 s)
    # plus its packet duration (one 1 ms tick of its time base)
    durations = json.loads((tmp_path / "work" / "frames" / "durations.json").read_text())
    assert sorted(durations) == sorted(VIDEOS)
    assert durations["hall04"] == pytest.approx(4.131, abs=1e-3)
    assert durations["kitchen02"] == pytest.approx(4.0, abs=1e-3)
    assert durations["yard05"] == pytest.approx(3.0, abs=0.04)

    metrics = json.loads((tmp_path / "results" / "mmn" / "metrics.json").read_text())
    predicted = (tmp_path / "results" / "mmn" / "predictions" / "predictions.jsonl").read_text().splitlines()
    assert len(predicted) == len(TEST.splitlines())  # every test query, none dropped
    for line in map(json.loads, predicted):  # moments span the measured duration of their video
        ends = [w[1] for w in line["pred_relevant_windows"]]
        assert max(ends) == pytest.approx(durations[line["vid"]], abs=1e-3)
    shown = json.loads(run.stdout[run.stdout.index("{"):run.stdout.rindex("}") + 1])  # `cat` printed it
    assert shown == metrics
    scores = {k: v for k, v in _flat(metrics).items() if re.fullmatch(r".*R@[15],IoU@0\.[357]|.*mIoU", k)}
    assert scores and all(0.0 <= v <= 100.0 for v in scores.values()), scores
    assert not (tmp_path / "data" / "synth").exists(), "the synthetic dataset leaked into the run"

    if PREDICT_MERGED:
        prediction = json.loads((tmp_path / "prediction.json").read_text())
        entries = prediction if isinstance(prediction, list) else [prediction]
        assert {Path(e["video"]).stem for e in entries} == set(VIDEOS)
        for e in entries:
            vid = Path(e["video"]).stem
            assert e["query"] == "a person opens the door"
            assert e["duration"] == pytest.approx(durations[vid], abs=1e-3)  # measured alike
            moments = e["moments"]
            assert moments and all(0 <= m["start"] < m["end"] <= durations[vid] + 1e-3 for m in moments)
            assert [m["score"] for m in moments] == sorted((m["score"] for m in moments), reverse=True)


def _flat(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out
