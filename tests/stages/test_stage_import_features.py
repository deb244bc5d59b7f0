"""Stage import_features-<name> through the CLI: published files in, vmr feature files out, models train from them."""

from __future__ import annotations

import h5py
import numpy as np
import yaml
from support import published
from support.toy import write_toy_params
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.provenance import read_record, sha256_file, sha256_tree
from pipeline.media.features import FeatureFile
from pipeline.text.sentence_features import read_query_features, read_query_tokens

runner = CliRunner()


def write_params(tmp_path, imports: dict, **extra) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"merge": {"out_dir": str(tmp_path / "features")}, "imports": imports, **extra}))
    return str(path)


def vmr(*args: str):
    return runner.invoke(app, list(args))


def test_toy_features_published_as_flat_hdf5_train_and_evaluate_mmn_with_no_video(tmp_path):
    """The tiny end-to-end: a "released" flat HDF5 for Charades-STA-format data, imported, then MMN
    trains and evaluates from it; the lineage ends at the released file's sha256."""
    params_path = write_toy_params(tmp_path)
    features = tmp_path / "data" / "features"
    release = tmp_path / "release" / "vgg_rgb_features.hdf5"
    with h5py.File(features / "toy.h5") as made:  # the toy features, re-published as 2D-TAN's gzip file
        published.flat_hdf5(release, {vid: made[vid][()] for vid in made})
    (features / "toy.h5").unlink()
    assert not (tmp_path / "data" / "videos").exists()  # nothing to decode
    params = yaml.safe_load(params_path.read_text())
    params["imports"] = {"toy": {"path": str(release), "layout": "hdf5_flat", "seconds_per_row": 1.0,
                                 "sha256": sha256_file(release)}}
    params_path.write_text(yaml.safe_dump(params))

    result = vmr("import-features", "--name", "toy", "-p", str(params_path))
    assert result.exit_code == 0, result.output
    ff = FeatureFile(features / "toy.h5")
    with h5py.File(release) as h5:
        assert sorted(ff._file()) == sorted(h5) and all(np.array_equal(ff[v], h5[v][()]) for v in h5)
    assert ff.seconds_per_row() == 1.0

    for command in ("train", "evaluate"):
        result = vmr(command, "--model", "mmn", "-p", str(params_path))
        assert result.exit_code == 0, result.output
    metrics = yaml.safe_load((tmp_path / "results" / "mmn" / "metrics.json").read_text())
    assert "R@1,IoU@0.5" in metrics
    record = read_record(tmp_path / "runs" / "mmn" / "best.pt")
    assert record["inputs"]["features.toy"]["sha256"] == sha256_file(features / "toy.h5")

    result = vmr("lineage", str(features / "toy.h5"))
    assert result.exit_code == 0, result.output
    assert f"published, not re-extracted: {release} (hdf5_flat) sha256={sha256_file(release)}" in result.output
    assert "stage: import_features-toy" in result.output and "raw input: the chain starts here" in result.output
    result = vmr("lineage", str(tmp_path / "runs" / "mmn" / "best.pt"))  # the checkpoint's chain ends there too
    assert result.exit_code == 0 and f"sha256={sha256_file(release)}" in result.output, result.output


def test_qvhighlights_release_through_the_cli(tmp_path):
    root = tmp_path / "moment_detr_features"
    clip = published.qvh_video_npz(root / "clip_features", ["v1_0.0_150.0", "v2_30.0_180.0"], 512, [75, 74])
    slowfast = published.qvh_video_npz(root / "slowfast_features", ["v1_0.0_150.0", "v2_30.0_180.0"], 2304, [75, 75])
    text = published.qvh_text_npz(root / "clip_text_features", [3, 12], [9, 14])
    params = write_params(tmp_path, {
        "clip": {"path": str(root / "clip_features"), "published": "qvhighlights_clip"},
        "slowfast": {"path": str(root / "slowfast_features"), "published": "qvhighlights_slowfast"},
        "clip_text": {"path": str(root / "clip_text_features"), "published": "qvhighlights_clip_text"},
    })
    for name in ("clip", "slowfast", "clip_text"):
        result = vmr("import-features", "--name", name, "-p", params)
        assert result.exit_code == 0, result.output
    for name, src in (("clip", clip), ("slowfast", slowfast)):
        ff = FeatureFile(tmp_path / "features" / f"{name}.h5")
        assert ff.seconds_per_row() == 2.0
        assert all(np.array_equal(ff[v], a.astype(np.float32)) for v, a in src.items())
        record = read_record(tmp_path / "features" / f"{name}.h5")
        assert record["inputs"]["published"]["sha256"] == sha256_tree(root / f"{name}_features")
        assert record["published"]["seconds_per_row"] == 2.0 and record["published"]["row_times_from"].startswith(
            "published qvhighlights_")
    out = tmp_path / "features" / "clip_text.h5"
    pooled, tokens = read_query_features(out), read_query_tokens(out)
    assert sorted(pooled) == sorted(tokens) == ["12", "3"]
    for qid, arrays in text.items():
        np.testing.assert_array_equal(pooled[qid], arrays["pooler_output"])
        np.testing.assert_array_equal(tokens[qid], arrays["last_hidden_state"])
    assert read_record(out)["published"]["queries"] == 2


def test_bad_input_exits_2_naming_the_file_and_key(tmp_path):
    src = tmp_path / "clip_features"
    published.qvh_video_npz(src, ["a"], 512, [3])
    published.qvh_video_npz(src, ["b"], 500, [3])
    good = tmp_path / "good"
    published.qvh_video_npz(good, ["a"], 512, [3])
    (tmp_path / "corrupt.h5").write_bytes(b"not an hdf5 file at all")
    params = write_params(tmp_path, {
        "missing": {"path": str(tmp_path / "nowhere"), "published": "qvhighlights_clip"},
        "wrong_dim": {"path": str(src), "published": "qvhighlights_clip"},
        "wrong_key": {"path": str(good), "layout": "npz_dir", "key": "feats", "seconds_per_row": 2.0},
        "wrong_layout": {"path": str(good), "layout": "hdf5_flat", "seconds_per_row": 2.0},
        "corrupt": {"path": str(tmp_path / "corrupt.h5"), "published": "tacos_c3d"},
        "digest": {"path": str(good), "published": "qvhighlights_clip", "sha256": "0" * 64},
    })
    expected = {
        "missing": "key 'imports.missing.path': input file not found",
        "wrong_dim": f"{src / 'b.npz'}: key 'features': dim 500, expected 512",
        "wrong_key": f"{good / 'a.npz'}: no array 'feats'",
        "wrong_layout": f"{good}: this layout reads one HDF5 file, not a folder",
        "corrupt": f"{tmp_path / 'corrupt.h5'}: not a readable HDF5 file",
        "digest": f"sha256 {sha256_tree(good)} does not match the expected {'0' * 64}",
        "unknown": "--name unknown: no such key under 'imports'",
    }
    for name, message in expected.items():
        result = vmr("import-features", "--name", name, "-p", params)
        assert result.exit_code == 2, (name, result.output)
        assert message in result.output and "Traceback" not in result.output, (name, result.output)
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())


def test_params_refuse_an_incomplete_import_and_merge_will_not_overwrite_one(tmp_path):
    params = write_params(tmp_path, {"anet": {"path": "x.h5", "published": "activitynet_c3d"}})
    result = vmr("import-features", "--name", "anet", "-p", params)
    assert result.exit_code == 2 and "imports.anet.seconds_per_row" in result.output
    params = write_params(tmp_path, {"c": {"path": "x"}})
    result = vmr("import-features", "--name", "c", "-p", params)
    assert result.exit_code == 2 and "key 'imports.c': expected give `layout` or `published`" in result.output
    params = write_params(tmp_path, {"clip": {"path": "x", "published": "qvhighlights_clip"}})
    result = vmr("merge", "--feature", "clip", "-p", params)
    assert result.exit_code == 2 and "'clip' is imported" in result.output


def test_decode_keeps_no_frames_for_an_imported_feature(tmp_path):
    from extractors import EXTRACTORS
    from models import MODELS
    from pipeline.core.params import load_params
    from stages.decode import members, protocols_for

    path = write_params(tmp_path, {"clip": {"path": "x", "published": "qvhighlights_clip"}},
                        features=["clip", "vgg"], models=[])
    params = load_params(path, registries=(EXTRACTORS, MODELS))
    assert params.extracted_features() == ["vgg"] and members(params) == EXTRACTORS.modules("vgg")
    assert [p.key for p in protocols_for(params)] == [EXTRACTORS.get("vgg")(EXTRACTORS.config(params, "vgg")).protocol().key]
