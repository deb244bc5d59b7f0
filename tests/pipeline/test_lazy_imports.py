"""Commands that do not run a network do not import torch (about 2 s of every run, more with
open_clip): `vmr --help`, params validation of every extractor and model section, `vmr decode` and
`vmr dag`.
Checked in a fresh process, as users run them, by looking at `sys.modules` after the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.videos import write_video

REPO = Path(__file__).resolve().parents[2]

# Runs the CLI in this process, then reports which heavy packages it imported.
RUN_AND_REPORT = """
import json, runpy, sys
sys.argv = ["vmr", *json.loads(sys.argv[1])]
try:
    runpy.run_module("pipeline.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "open_clip", "transformers", "scipy"})
print(json.dumps({"code": code, "heavy": heavy}))
"""


def run_cli(*args: str) -> dict:
    env = dict(os.environ, VMR_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, json.dumps(list(args))], cwd=REPO, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_no_torch():
    assert run_cli("--help") == {"code": 0, "heavy": []}
    assert run_cli("decode", "--help") == {"code": 0, "heavy": []}


def test_decode_validates_every_section_and_decodes_without_torch(tmp_path):
    """The project's params.yaml configures every extractor and every model; all their sections are
    validated (a bad value fails) and the frames are written, with no torch in the process."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", frames=40, fps=20, width=96, height=64)
    common = ("decode", "--params", str(REPO / "params.yaml"), "--set", f"dataset.video_dir={videos}",
              "--set", f"decode.out_dir={tmp_path / 'frames'}", "--set", "decode.workers=1")
    assert run_cli(*common, "--set", "model.glscl.max_words=1000") == {"code": 2, "heavy": []}  # > context_length
    assert run_cli(*common, "--set", "extractors.i3d.window=0")["code"] == 2
    assert run_cli(*common) == {"code": 0, "heavy": []}
    manifest = json.loads((tmp_path / "frames" / "manifest.json").read_text())
    assert manifest["videos"]["a"]["status"] == "ok"


def test_dag_check_imports_no_torch(tmp_path):
    """`vmr dag` reads every model's needs and every stage's code without importing any of it."""
    out = tmp_path / "dvc.yaml"
    assert run_cli("dag", "--out", str(out)) == {"code": 0, "heavy": []}
    assert out.read_text() == (REPO / "dvc.yaml").read_text()
    assert run_cli("dag", "--out", str(out), "--check") == {"code": 0, "heavy": []}
