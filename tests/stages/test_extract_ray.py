"""`vmr extract --engine ray` through the CLI: the local engine's bytes from a Ray instance the
command starts itself; Ray is imported only when selected, and a clear error when it is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.ray_local import TESTS, require_ray, worker_path
from support.tiny_extractor import register
from support.videos import write_video
from typer.testing import CliRunner

from pipeline.cli import app

REPO = TESTS.parent
runner = CliRunner()


def vmr(*args: str, code: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, f"vmr {' '.join(args)} -> {result.exit_code}:\n{result.output}"
    return result


@pytest.fixture
def tiny_registered(monkeypatch):
    register(monkeypatch)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("extract_ray")
    (root / "videos").mkdir()
    for i, n in enumerate([29, 14, 40]):
        write_video(root / "videos" / f"clip{i}.mp4", frames=n, width=32, height=24)
    params = {
        "dataset": {"video_dir": str(root / "videos")},
        "decode": {"out_dir": str(root / "frames"), "workers": 1},
        "merge": {"npy_dir": str(root / "npy"), "out_dir": str(root / "features")},
        "features": ["tiny"],
        "extractors": {"tiny": {"batch_size": 4, "device": "cpu"}},
        "ray": {"num_cpus": 2, "actors": 2, "cpus_per_actor": 0},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_ray_engine_writes_the_local_engines_bytes(workspace, tiny_registered, monkeypatch):
    ray = require_ray()
    worker_path(monkeypatch)
    p = ["--params", str(workspace / "params.yaml")]
    vmr("decode", *p)
    vmr("extract", "--feature", "tiny", *p, "--set", f"merge.npy_dir={workspace / 'local'}")
    vmr("extract", "--feature", "tiny", *p, "--engine", "ray", "--set", f"merge.npy_dir={workspace / 'ray'}")
    assert not ray.is_initialized()  # the command started its own instance and shut it down

    local, on_ray = workspace / "local" / "tiny", workspace / "ray" / "tiny"
    files = sorted(f.name for f in local.iterdir() if f.name != "provenance.json")
    assert files == [f"clip{i}.{ext}" for i in range(3) for ext in ("json", "npy")]
    assert sorted(f.name for f in on_ray.iterdir()) == sorted(f.name for f in local.iterdir())
    for name in files:
        assert (on_ray / name).read_bytes() == (local / name).read_bytes(), name
    prov = {e: json.loads((workspace / e / "tiny" / "provenance.json").read_text()) for e in ("local", "ray")}
    assert prov["local"]["engine"] == "local" and prov["ray"]["engine"] == "ray"
    assert prov["ray"]["ray"] == {"version": ray.__version__, "actors": 2} and prov["ray"]["device_type"] == "cpu"
    assert prov["ray"]["weights"] == prov["local"]["weights"] == {"tiny": "random"}


def test_ray_selected_but_not_installed_is_a_clear_error(workspace, tiny_registered, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = vmr("extract", "--feature", "tiny", "--params", str(workspace / "params.yaml"), "--engine", "ray",
                 "--set", f"merge.npy_dir={workspace / 'none'}", code=2)
    assert "extract.engine" in result.output and "pip install -e '.[ray]'" in result.output
    assert not (workspace / "none").exists()


def test_an_unknown_engine_names_the_key(workspace):
    result = vmr("extract", "--feature", "clip", "--params", str(workspace / "params.yaml"), "--engine", "spark",
                 code=2)
    assert "extract.engine" in result.output


def test_decode_and_local_extract_never_import_ray(tmp_path):
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", frames=10, width=32, height=24)
    params = {
        "dataset": {"video_dir": str(tmp_path / "videos")},
        "decode": {"out_dir": str(tmp_path / "frames"), "workers": 1},
        "merge": {"npy_dir": str(tmp_path / "npy")},
        "features": ["tiny"],
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    script = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from typer.testing import CliRunner
from pipeline.cli import app
import pytest
from support.tiny_extractor import register
register(pytest.MonkeyPatch())
for args in (["decode"], ["extract", "--feature", "tiny"]):
    result = CliRunner().invoke(app, [*args, "--params", {str(tmp_path / "params.yaml")!r}])
    assert result.exit_code == 0, result.output
print("imported ray:", "ray" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "imported ray: False" in out.stdout
    assert (tmp_path / "npy" / "tiny" / "a.npy").is_file()
