"""A decord hang: the worker is killed at `decode.timeout_s` and the video is decoded again with PyAV.

decord 0.6 can deadlock holding the GIL (dmlc/decord#373) on files we cannot reproduce on demand, so
the hang is simulated: `vmr decode` runs as a user types it, in a subprocess whose PYTHONPATH puts a
`decord` package first whose reader never returns. Everything else is real: the worker pool, the
SIGKILL at the timeout, the retry with PyAV, the record and the frames.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from support.videos import write_video

HANGING_DECORD = '''
"""Stands in for decord 0.6 in a test: opening a video blocks forever, as decord's deadlock does."""
import time

__version__ = "0.6.0-hangs"


def cpu(index=0):
    return index


class VideoReader:
    def __init__(self, *args, **kwargs):
        while True:  # never returns; only the pool's SIGKILL ends it
            time.sleep(60)
'''


def _decode(tmp_path: Path, backend: str, fake: bool) -> Path:
    videos, store = tmp_path / "videos", tmp_path / f"frames-{backend}-{fake}"
    params = {
        "dataset": {"video_dir": str(videos)},
        "decode": {"out_dir": str(store), "workers": 1, "timeout_s": 3.0, "backend": backend},
        "features": ["clip"],
    }
    params_file = tmp_path / f"params-{backend}-{fake}.yaml"
    params_file.write_text(yaml.safe_dump(params))
    env = dict(os.environ, VMR_NO_PROGRESS="1")
    if fake:
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "fake"), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "decode", "--params", str(params_file)],
                            cwd=Path(__file__).resolve().parents[3], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return store


def test_a_hanging_decord_is_killed_and_the_video_decoded_with_pyav(tmp_path):
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "stuck.mp4", frames=45, width=64, height=48)
    (tmp_path / "fake" / "decord").mkdir(parents=True)
    (tmp_path / "fake" / "decord" / "__init__.py").write_text(HANGING_DECORD)

    store = _decode(tmp_path, "decord", fake=True)
    record = json.loads((store / "videos" / "stuck.json").read_text())
    assert record["status"] == "ok"
    assert record["decoder"].startswith("pyav")
    assert record["fallback"] == "pyav after decord: timed out after 3 s (worker killed)"
    assert json.loads((store / "failures.json").read_text())["failed"] == 0

    # the frames equal what the pyav backend keeps on its own
    reference = _decode(tmp_path, "pyav", fake=False)
    (key,) = record["protocols"]
    got, want = np.load(store / key / "stuck.npy"), np.load(reference / key / "stuck.npy")
    assert got.shape[0] > 0 and np.array_equal(got, want)
    assert record["protocols"] == json.loads((reference / "videos" / "stuck.json").read_text())["protocols"]


@pytest.fixture(autouse=True)
def _fake_is_not_importable_here():
    """The fake decord only ever lives on the subprocess's path, never in this test process."""
    yield
    assert "0.6.0-hangs" not in getattr(sys.modules.get("decord"), "__version__", "")
