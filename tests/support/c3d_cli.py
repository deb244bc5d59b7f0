"""C3D through the commands a user types: `vmr decode` on a folder of videos, then `vmr extract` with the
network stubbed so that its input can be compared with a reference rendering of Caffe's preprocessing."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from extractors.c3d import C3DExtractor
from pipeline.cli import app


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def decode_workspace(root: Path, batch_size: int, **decode) -> Path:
    """params.yaml for clips16 (stride 8, tail pad) over root/videos, and `vmr decode` run on it."""
    params = {
        "features": ["c3d"],
        "dataset": {"video_dir": str(root / "videos")},
        "decode": {"out_dir": str(root / "frames"), "workers": 1, "backend": "pyav", **decode},
        "merge": {"npy_dir": str(root / "npy"), "out_dir": str(root / "features")},
        "extractors": {"c3d": {"protocol": "clips16", "stride": 8, "tail": "pad", "batch_size": batch_size}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = run("decode", "--params", root / "params.yaml")
    assert result.exit_code == 0, result.output
    return root


def extract(root: Path, npy: str, *sets: str):
    """`vmr extract --feature c3d` into root/npy with `--set` overrides."""
    args = ["extract", "--feature", "c3d", "--params", root / "params.yaml", "--set", f"merge.npy_dir={root / npy}"]
    for s in sets:
        args += ["--set", s]
    return run(*args)


def record_network_inputs(monkeypatch) -> list[torch.Tensor]:
    """Stub the network: every batch `vmr extract` feeds it is appended to the returned list."""
    seen: list[torch.Tensor] = []

    def record_input(self, model, x):
        seen.append(x.clone())
        return torch.zeros(len(x), self.dim)

    monkeypatch.setattr(C3DExtractor, "embed", record_input)
    return seen
