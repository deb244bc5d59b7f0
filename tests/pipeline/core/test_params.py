"""params.yaml validation: every kind of bad input fails before any work, exit 2, one clear message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from extractors import EXTRACTORS
from models import MODELS
from pipeline.cli import app
from pipeline.core.params import ParamsError, load_params, require_files, subset

runner = CliRunner()


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def invoke(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=False)


def test_repo_params_are_valid():
    params = load_params(Path(__file__).resolve().parents[3] / "params.yaml", registries=(EXTRACTORS, MODELS))
    assert params.synth.fps > 0


@pytest.mark.parametrize(
    "yaml_text, key, expected",
    [
        ("synth:\n  colour: red\n", "synth.colour", "unknown key"),
        ("synth:\n  num_train: many\n", "synth.num_train", "valid integer"),
        ("synth:\n  fps: -30\n", "synth.fps", "greater than 0"),
        ("decode:\n  max_failure_share: 1.5\n", "decode.max_failure_share", "less than or equal to 1"),
        ("features: [nosuchnet]\n", "features.0", "unknown extractor 'nosuchnet'"),
        ("models: [nosuchmodel]\n", "models.0", "unknown model 'nosuchmodel'"),
        ("bogus_top_level: 1\n", "bogus_top_level", "unknown key"),
        ("extract:\n  engine: spark\n", "extract.engine", "'local' or 'ray'"),
        ("ray:\n  actors: 0\n", "ray.actors", "greater than or equal to 1"),
        ("ray:\n  address: auto\n  num_cpus: 4\n", "ray", "num_cpus sizes a local instance"),
    ],
)
def test_bad_params_exit_2_with_one_clear_message(tmp_path, yaml_text, key, expected):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ParamsError) as exc:
        load_params(path, registries=(EXTRACTORS, MODELS))
    message = str(exc.value)
    assert str(path) in message and f"key '{key}'" in message and expected in message

    result = invoke(["synth", "--params", str(path)])
    assert result.exit_code == 2
    assert f"key '{key}'" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_override_errors_name_the_key(tmp_path):
    path = write(tmp_path, "seed: 0\n")
    result = invoke(["synth", "--params", str(path), "--set", "synth.width=tiny"])
    assert result.exit_code == 2 and "key 'synth.width'" in result.stderr


def test_override_needs_key_value(tmp_path):
    path = write(tmp_path, "seed: 0\n")
    result = invoke(["synth", "--params", str(path), "--set", "synth.width"])
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.stderr


def test_missing_params_file(tmp_path):
    result = invoke(["synth", "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "params file not found" in result.stderr


def test_missing_input_file_names_key_and_path(tmp_path):
    with pytest.raises(ParamsError) as exc:
        require_files("params.yaml", {"dataset.splits.train": str(tmp_path / "missing.txt")})
    assert "key 'dataset.splits.train'" in str(exc.value) and "missing.txt" in str(exc.value)


def test_profiles_and_overrides_merge(tmp_path):
    path = write(tmp_path, "synth:\n  num_train: 10\n  num_test: 3\n")
    profile = tmp_path / "profile.yaml"
    profile.write_text("synth:\n  num_train: 5\n")
    params = load_params(path, overrides=["synth.num_test=2"], profiles=[profile])
    assert (params.synth.num_train, params.synth.num_test) == (5, 2)
    assert subset(params, "synth.num_train") == {"synth.num_train": 5}
