"""The recipe read from provenance, and the refusals, on crafted records (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from support.videos import write_video
from typer.testing import CliRunner

from extractors import EXTRACTORS
from pipeline.cli import app
from pipeline.core.params import DatasetParams
from pipeline.core.provenance import sha256_file, write_record
from pipeline.predict import Predictor, RecipeMismatch
from pipeline.predict.recipe import FeatureRecipe, read_recipe

REPO = Path(__file__).resolve().parents[3]


def clip_description() -> dict:
    extractor = EXTRACTORS.get("clip")()
    return extractor.describe()


def crafted(tmp_path: Path, *, feature_record: dict | None, model: str = "mmn") -> Path:
    """runs/<model>/best.pt whose training record names features/clip.h5 (with `feature_record`)."""
    features = tmp_path / "features" / "clip.h5"
    features.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(features, "w") as h5:
        h5["v1"] = np.zeros((4, 512), np.float32)
        if feature_record is not None:
            h5.attrs["provenance"] = json.dumps(feature_record)
    best = tmp_path / "runs" / model / "best.pt"
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_bytes(b"not read before the recipe is accepted")
    write_record(best, {"stage": f"train-{model}", "params": {"seed": 0, "dataset": DatasetParams().model_dump()},
                        "inputs": {"features.clip": {"path": str(features), "sha256": sha256_file(features)}},
                        "model_config": {"features": ["clip"]} if model == "mmn" else {"feature": "clip"}})
    return best


def merge_record(weights: str, config: dict | None = None) -> dict:
    described = clip_description()
    if config:
        described["config"] |= config
    return {"stage": "merge-clip", "params": {"merge": {"dtype": "float32", "compression": "none", "layout": "flat"}},
            "inputs": {"features": {"path": "/nowhere/npy/clip", "sha256": "0" * 64}},
            "extractor": described, "weights": {"clip": weights}}


def test_random_weights_are_reproducible(tmp_path):
    recipe = read_recipe(crafted(tmp_path, feature_record=merge_record("random")))
    assert recipe.mismatches == [] and recipe.missing == []
    (feature,) = recipe.features
    assert feature.extractor == "clip" and feature.weights == "random"
    assert feature.protocol_key == EXTRACTORS.get("clip")().protocol().key
    assert any("no decode record" in n for n in recipe.notes)  # the backend is assumed, and said so


def test_weights_missing_here_are_refused(tmp_path):
    best = crafted(tmp_path, feature_record=merge_record("ab" * 32, {"weights": str(tmp_path / "ViT-B-32.pt")}))
    with pytest.raises(RecipeMismatch, match="weights of sha256 abab.*not on this machine"):
        Predictor.from_checkpoint(best, cache_dir=tmp_path / "cache")
    # overriding cannot extract without the weights, unless settings to use instead are given
    with pytest.raises(RecipeMismatch, match="nothing to extract with"):
        Predictor.from_checkpoint(best, allow_recipe_mismatch=True, cache_dir=tmp_path / "cache")
    fallback = {"clip": FeatureRecipe("clip", "clip", {}, None, "unknown")}
    p = Predictor.from_checkpoint(best, allow_recipe_mismatch=True, cache_dir=tmp_path / "cache", fallback=fallback)
    mismatch = p._identity()["recipe_mismatch"]
    assert any("not on this machine" in m for m in mismatch) and any("current params" in m for m in mismatch)


def test_weights_of_another_sha256_are_refused(tmp_path):
    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(b"other weights")
    best = crafted(tmp_path, feature_record=merge_record("ab" * 32, {"weights": str(weights)}))
    with pytest.raises(RecipeMismatch, match=f"sha256 {sha256_file(weights)} differs from the abab"):
        Predictor.from_checkpoint(best, cache_dir=tmp_path / "cache")
    p = Predictor.from_checkpoint(best, allow_recipe_mismatch=True, cache_dir=tmp_path / "cache")
    assert p.recipe.features[0].config["weights_sha256"] is None  # the file here is used as it is
    assert "differs" in p._identity()["recipe_mismatch"][0]


@pytest.mark.parametrize("record, message", [
    ({"stage": "import", "imported": True, "source": "HERO release"}, "holds imported features"),
    ({"stage": "features", "published": "MMN Charades-STA VGG"}, "holds published features"),
    (None, "has no extraction record"),
    ({"stage": "merge-clip", "params": {}, "inputs": {}, "weights": {}}, "names no extractor"),
])
def test_published_or_imported_features_are_refused(tmp_path, record, message):
    best = crafted(tmp_path, feature_record=record)
    with pytest.raises(RecipeMismatch, match=message):
        Predictor.from_checkpoint(best, cache_dir=tmp_path / "cache")


def test_a_feature_file_changed_since_training_is_a_mismatch(tmp_path):
    best = crafted(tmp_path, feature_record=merge_record("random"))
    with h5py.File(tmp_path / "features" / "clip.h5", "a") as h5:
        h5["v2"] = np.ones((2, 512), np.float32)
    assert "changed since training" in read_recipe(best).mismatches[0]


def test_a_checkpoint_of_another_model_or_without_record_is_refused(tmp_path):
    best = crafted(tmp_path, feature_record=merge_record("random"), model="cnm")
    with pytest.raises(ValueError, match="a checkpoint of model 'cnm', not of 'mmn'"):
        read_recipe(best, "mmn")
    lone = tmp_path / "lone.pt"
    lone.write_bytes(b"x")
    with pytest.raises(ValueError, match="no provenance record"):
        read_recipe(lone)


# -- through the CLI: one error line, exit 2, nothing written -------------------------------------


def run_predict(tmp_path, *args):
    video = write_video(tmp_path / "v.mp4", frames=30)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(app, ["predict", str(video), "-p", str(REPO / "params.yaml"), "--out", str(out),
                                      "--cache-dir", str(tmp_path / "cache"), *args])
    return result, out


@pytest.mark.parametrize("case, args, message", [
    ("sha", ["--model", "mmn", "--query", "x"], "not on this machine"),
    ("kind", ["--model", "cnm", "--query", "x"], "a checkpoint of model 'mmn', not of 'cnm'"),
    ("missing", ["--model", "mmn", "--query", "x"], "checkpoint not found"),
    ("empty", ["--model", "mmn", "--query", "  "], "query 1 is empty"),
    ("both", ["--model", "mmn"], "--query TEXT (repeatable) or --queries FILE"),
    ("suffix", ["--model", "mmn", "--query", "x", "--out", "o.txt"], "unknown format '.txt'"),
    ("video", ["--model", "mmn", "--query", "x", "nope.mp4"], "nope.mp4: no such video file or folder"),
])
def test_cli_refuses_with_one_message_and_writes_nothing(tmp_path, case, args, message):
    best = crafted(tmp_path, feature_record=merge_record("ab" * 32, {"weights": "/nowhere/ViT-B-32.pt"}))
    checkpoint = tmp_path / "absent.pt" if case == "missing" else best
    result, out = run_predict(tmp_path, "--checkpoint", str(checkpoint), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "o.txt").exists()
