"""The recipe read from provenance, and the refusals, on crafted records (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from support.pca import make_params
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
    with pytest.raises(RecipeMismatch, match="nothing can stand in for them"):
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


def test_a_pca_recipe_reproduces_the_feature_pca_stage(tmp_path, monkeypatch):
    """MRNet on PCA-reduced features: the recipe follows feature_pca back to its source and fit split,
    and the refitted PCA gives the stage's own rows for a video."""
    import torch

    from pipeline.media.feature_pca import apply_pca
    from pipeline.media.features import FeatureFile
    from pipeline.predict.features import FeatureCache
    from stages import feature_pca as stage

    monkeypatch.chdir(tmp_path)
    params = make_params(tmp_path)
    with h5py.File(tmp_path / "features" / "c3d.h5", "a") as h5:  # as if merged here from extracted C3D
        described = EXTRACTORS.get("c3d")().describe()
        h5.attrs["provenance"] = json.dumps({"stage": "merge-c3d", "params": {}, "inputs": {},
                                             "extractor": described, "weights": {"c3d": "random"}})
    stage.run(params, source="params.yaml", model="mrnet")
    reduced = tmp_path / "features" / "c3d_pca4.h5"
    best = tmp_path / "runs" / "mrnet" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"x")
    write_record(best, {"stage": "train-mrnet", "params": {"seed": 0, "dataset": params.dataset.model_dump()},
                        "inputs": {"features.c3d_pca4": {"path": str(reduced), "sha256": sha256_file(reduced)}},
                        "model_config": params.model["mrnet"]})
    recipe = read_recipe(best)
    (feature,) = recipe.features
    assert feature.name == "c3d_pca4" and feature.extractor == "c3d"
    assert feature.pca.fit_videos == ["A", "B"] and feature.pca.components == 4
    mean, components = FeatureCache(recipe, tmp_path / "cache", torch.device("cpu"))._pca_basis(feature)
    ours = apply_pca(FeatureFile(tmp_path / "features" / "c3d.h5")["C"], mean, components)
    np.testing.assert_allclose(ours, FeatureFile(reduced)["C"], atol=1e-5)


def with_sidecar(record: dict, npy_dir: Path, *, decode_code: str, extract_code: str) -> dict:
    """`record` (a merge record) naming `npy_dir`, holding one extract sidecar written by that code
    (the fields extract's resume compares: see pipeline/media/extract.py)."""
    from pipeline.media.extract import extractor_digest

    npy_dir.mkdir(parents=True)
    (npy_dir / "v1.json").write_text(json.dumps({
        "frames": f"{'0' * 64}+{decode_code}",
        "extractor": extractor_digest(record["extractor"], record["weights"]["clip"], extract_code), "units": 4}))
    write_record(npy_dir, {"stage": "extract-clip", "code_version": "vmr-0.0.0+code.0ldextract00"})
    return record | {"inputs": {"features": {"path": str(npy_dir), "sha256": "0" * 64}}}


def test_training_features_of_other_code_are_a_mismatch_and_the_code_keys_the_cache(tmp_path, monkeypatch):
    from pipeline.media.decode import decoder_code
    from pipeline.media.extract import extractor_code
    from pipeline.predict import recipe as recipe_module

    decode_now, extract_now = decoder_code(), extractor_code(EXTRACTORS.get("clip"))
    same = crafted(tmp_path / "same", feature_record=with_sidecar(
        merge_record("random"), tmp_path / "same" / "npy", decode_code=decode_now, extract_code=extract_now))
    recipe = read_recipe(same)
    assert recipe.mismatches == [] and recipe.features[0].code == {"decode": decode_now, "extract": extract_now}

    old = crafted(tmp_path / "old", feature_record=with_sidecar(
        merge_record("random"), tmp_path / "old" / "npy", decode_code="vmr-0.0.0+code.0lddecode000",
        extract_code="vmr-0.0.0+code.0ldextract00"))
    decode_msg, extract_msg = read_recipe(old).mismatches
    assert "decoder code changed" in decode_msg and "vmr-0.0.0+code.0lddecode000" in decode_msg
    assert decode_now in decode_msg
    assert "'clip' extractor code changed" in extract_msg and "vmr-0.0.0+code.0ldextract00" in extract_msg
    assert extract_now in extract_msg
    with pytest.raises(RecipeMismatch, match="decoder code changed"):
        Predictor.from_checkpoint(old, cache_dir=tmp_path / "cache")
    result, out = run_predict(tmp_path, "--checkpoint", str(old), "--model", "mmn", "--query", "x")
    assert result.exit_code == 2 and "extractor code changed" in result.output and not out.exists()
    p = Predictor.from_checkpoint(old, allow_recipe_mismatch=True, cache_dir=tmp_path / "cache")
    assert any("decoder code changed" in m for m in p._identity()["recipe_mismatch"])

    # cached features of other code are never reused: the code is part of the cache key
    monkeypatch.setattr(recipe_module, "decoder_code", lambda: "vmr-0.0.0+code.edited00000")
    assert read_recipe(same).digest != recipe.digest


def test_relative_weights_are_found_from_another_directory(tmp_path, monkeypatch):
    """Weights configured relative to the project (an OpenAI CLIP state dict, as `clip.load(jit=False)`
    saves it) are found and loaded when predicting from elsewhere."""
    import torch

    from extractors.clip import ClipExtractor
    from pipeline.predict.features import FeatureCache

    project = tmp_path / "project"
    weights = project / "weights" / "ViT-B-32.pt"
    weights.parent.mkdir(parents=True)
    reference = ClipExtractor(ClipExtractor.Config(seed=123)).build_model().state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in reference.items()}, weights)
    digest = sha256_file(weights)
    best = crafted(project, feature_record=merge_record(digest, {"weights": "weights/ViT-B-32.pt"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = read_recipe(best)
    assert recipe.mismatches == [], recipe.mismatches
    (feature,) = recipe.features
    assert feature.weights_file == weights and feature.config["weights"] == "weights/ViT-B-32.pt"
    _, _, loaded = FeatureCache(recipe, tmp_path / "cache", torch.device("cpu"))._extractor(feature)
    assert loaded == digest  # the extractor loaded the file itself, not random init
