"""`vmr predict` / `vmr search` / `Predictor` on a tiny trained project (tests/support/trained.py, the `project` fixture of tests/conftest.py).

The oracle for "the features are made as for training": predicting on a test video with its test
query gives what `vmr evaluate` predicted for that query from the pipeline's own features."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.params import DatasetParams
from pipeline.core.provenance import read_record, sha256_file, write_record
from pipeline.predict import Predictor
from pipeline.text.annotations import load_dataset_split
from pipeline.text.sentence_features import read_query_features

pytestmark = pytest.mark.slow
GROUNDING = ["mmn", "mesm", "cnm", "mrnet"]


def invoke(project: Path, *args: str):
    return CliRunner().invoke(app, [*args, "-p", str(project / "params.yaml")])


def split_queries(project: Path) -> list:
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    return list(load_dataset_split(DatasetParams.model_validate(params["dataset"]), "test"))


def video_of(project: Path, vid: str) -> Path:
    return project / "data" / "synth" / "videos" / f"{vid}.mp4"


@pytest.mark.parametrize("model", GROUNDING)
def test_each_grounding_model_predicts_what_evaluate_predicted(project, model, tmp_path):
    """All test queries of one video, in file order: evaluate's item for that video (MMN and MESM
    encode a video's sentences together, padded alike)."""
    first = split_queries(project)[0]
    asked = [q for q in split_queries(project) if q.video_id == first.video_id]
    out = tmp_path / "p.json"
    query_args = [a for q in asked for a in ("--query", q.sentence)]
    result = invoke(project, "predict", "--model", model, str(video_of(project, first.video_id)), *query_args,
                    "--top-k", "3", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    recs = json.loads(out.read_text())
    assert [r["query"] for r in recs] == [q.sentence for q in asked]
    best = project / "runs" / model / "best.pt"
    lines = (project / "results" / model / "predictions" / "predictions.jsonl").read_text().splitlines()
    evaluated = {p["qid"]: p["pred_relevant_windows"] for p in map(json.loads, lines)}
    for q, rec in zip(asked, recs, strict=True):
        assert rec["model"] == model and rec["checkpoint_sha256"] == sha256_file(best)
        assert rec["video_sha256"] == sha256_file(video_of(project, q.video_id))
        assert "recipe_mismatch" not in rec
        moments = rec["moments"]
        assert 1 <= len(moments) <= 3
        assert [m["score"] for m in moments] == sorted((m["score"] for m in moments), reverse=True)
        assert all(0 <= m["start"] <= m["end"] <= rec["duration"] + 1e-3 for m in moments)
        assert rec["duration"] == pytest.approx(q.duration, abs=1e-6)  # the fixture's exact durations csv
        got = np.array([[m["start"], m["end"], m["score"]] for m in moments])
        want = np.array(evaluated[q.qid][: len(moments)], dtype=float)
        np.testing.assert_allclose(got[:, 2], want[:, 2], atol=1e-4)
        np.testing.assert_allclose(got[:, :2], want[:, :2], atol=2e-3)  # rounded to 3 and 4 decimals


def test_a_second_query_on_the_same_video_skips_decode_and_extraction(project, tmp_path):
    q = split_queries(project)[0]
    video = video_of(project, q.video_id)
    p = Predictor.from_checkpoint(project / "runs" / "mmn" / "best.pt", cache_dir=tmp_path / "cache")
    first = p.predict(video, [q.sentence], top_k=2)
    assert (p.counters.decoded, p.counters.extracted) == (1, 1)
    second = p.predict(video, ["the circle moves", q.sentence], top_k=2)
    assert (p.counters.decoded, p.counters.extracted, p.counters.cache_hits) == (1, 1, 1)
    assert second[1]["moments"] == first[0]["moments"]
    # a new Predictor (a new process) finds the cached features by the video's content
    copy = tmp_path / "renamed.mp4"
    shutil.copy(video, copy)
    again = Predictor.from_checkpoint(project / "runs" / "mmn" / "best.pt", cache_dir=tmp_path / "cache")
    assert again.predict(copy, [q.sentence], top_k=2)[0]["moments"] == first[0]["moments"]
    assert (again.counters.decoded, again.counters.cache_hits) == (0, 1)


def test_a_folder_is_decoded_once_per_video(project, tmp_path):
    videos = sorted((project / "data" / "synth" / "videos").glob("*.mp4"))
    p = Predictor.from_checkpoint(project / "runs" / "cnm" / "best.pt", cache_dir=tmp_path / "cache")
    sentence = split_queries(project)[0].sentence
    results = p.predict_many([(v, [sentence, sentence]) for v in videos] + [(videos[0], [sentence])], top_k=1)
    assert len(results) == len(videos) + 1
    assert (p.counters.decoded, p.counters.extracted) == (len(videos), len(videos))
    # through the CLI: a folder and a QVHighlights-style query file (one query for one video only)
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"qid": 5, "query": sentence, "vid": videos[1].stem}) + "\n"
                       + json.dumps({"qid": 6, "query": sentence}) + "\n")
    out = tmp_path / "p.jsonl"
    result = invoke(project, "predict", "--model", "cnm", str(videos[0].parent), "--queries", str(queries),
                    "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(Path(r["video"]).stem, r["qid"]) for r in recs] == sorted(
        [(v.stem, 6) for v in videos] + [(videos[1].stem, 5)])


def test_mrnet_encodes_queries_with_the_training_encoder(project, tmp_path):
    train_sentence = load_dataset_split(
        DatasetParams.model_validate(__import__("yaml").safe_load((project / "params.yaml").read_text())["dataset"]),
        "train")[0].sentence
    p = Predictor.from_checkpoint(project / "runs" / "mrnet" / "best.pt", cache_dir=tmp_path / "cache")
    video = p.predict(video_of(project, split_queries(project)[0].video_id), [train_sentence])[0]
    ours = read_query_features(p._scratch / video["video_sha256"] / "query_distilbert.h5")
    theirs = read_query_features(project / "features" / "query_distilbert.h5")
    np.testing.assert_allclose(ours[train_sentence.strip()], theirs[train_sentence.strip()], atol=1e-5)


def imported_copy(project: Path, tmp_path: Path) -> Path:
    """The mmn checkpoint, trained (so its record says) on features imported from elsewhere."""
    features = tmp_path / "clip.h5"
    shutil.copy(project / "features" / "clip.h5", features)
    with h5py.File(features, "a") as h5:
        h5.attrs["provenance"] = json.dumps({"stage": "import", "imported": True, "source": "elsewhere"})
    best = tmp_path / "runs" / "mmn" / "best.pt"
    best.parent.mkdir(parents=True)
    shutil.copy(project / "runs" / "mmn" / "best.pt", best)
    record = read_record(project / "runs" / "mmn" / "best.pt")
    record["inputs"]["features.clip"] = {"path": str(features), "sha256": sha256_file(features)}
    write_record(best, record)
    return best


def test_imported_features_are_refused_unless_overridden(project, tmp_path):
    best = imported_copy(project, tmp_path)
    q = split_queries(project)[0]
    out = tmp_path / "p.json"
    args = ["predict", "--model", "mmn", "--checkpoint", str(best), str(video_of(project, q.video_id)),
            "--query", q.sentence, "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    result = invoke(project, *args)
    assert result.exit_code == 2 and "holds imported features" in result.output
    assert not out.exists()
    result = invoke(project, *args, "--allow-recipe-mismatch")
    assert result.exit_code == 0, result.output
    assert "WARNING: recipe mismatch, overridden" in result.output
    (rec,) = json.loads(out.read_text())
    assert any("imported" in m for m in rec["recipe_mismatch"])
    assert any("current params" in m for m in rec["recipe_mismatch"])
    assert rec["moments"]


def test_bad_inputs_exit_2_and_write_nothing(project, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    out, page = tmp_path / "p.json", tmp_path / "p.html"
    result = invoke(project, "predict", "--model", "mmn", str(bad), "--query", "a circle", "--out", str(out),
                    "--html", str(page), "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 2 and "broken.mp4: cannot decode the video" in result.output
    assert result.output.count("error:") == 1
    result = invoke(project, "predict", "--model", "mmn", "--checkpoint", str(project / "runs" / "cnm" / "best.pt"),
                    str(video_of(project, split_queries(project)[0].video_id)), "--query", "a circle",
                    "--out", str(out))
    assert result.exit_code == 2 and "a checkpoint of model 'cnm', not of 'mmn'" in result.output
    assert not out.exists() and not page.exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no half cache entry


def test_html_page_of_a_prediction(project, tmp_path):
    q = split_queries(project)[0]
    page = tmp_path / "p.html"
    result = invoke(project, "predict", "--model", "mesm", str(video_of(project, q.video_id)), "--query", q.sentence,
                    "--top-k", "2", "--html", str(page), "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["query"] == q.sentence  # no --out: JSON on stdout
    text = page.read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", text)
    assert not [r for r in refs if re.match(r"(?i)(https?:)?//", r)]
    assert text.count("data:image/jpeg;base64,") == 6 and "data:video/mp4;base64," in text


def test_search_ranks_videos_as_evaluate_scored_them(project, tmp_path):
    """GLSCL: searching the test videos for one test caption gives that caption's row of the
    similarity matrix evaluate wrote."""
    scored = np.load(project / "results" / "glscl" / "predictions" / "similarity.npz")
    text_vids, video_vids = [str(v) for v in scored["text_vids"]], [str(v) for v in scored["video_vids"]]
    captions = json.loads((project / "data" / "synth" / "annotations" / "video_captions.json").read_text())
    row = 0
    folder = tmp_path / "videos"
    folder.mkdir()
    for vid in video_vids:
        shutil.copy(video_of(project, vid), folder / f"{vid}.mp4")
    out = tmp_path / "s.json"
    result = invoke(project, "search", "--model", "glscl", str(folder), "--query", captions[text_vids[row]],
                    "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    recs = json.loads(out.read_text())
    assert sorted(Path(r["video"]).stem for r in recs) == sorted(video_vids)
    assert [r["score"] for r in recs] == sorted((r["score"] for r in recs), reverse=True)
    got = {Path(r["video"]).stem: r["score"] for r in recs}
    want = dict(zip(video_vids, scored["similarity"][row].tolist(), strict=True))
    np.testing.assert_allclose([got[v] for v in video_vids], [want[v] for v in video_vids], atol=1e-4)
    # a grounding model cannot search, and glscl cannot ground
    assert invoke(project, "search", "--model", "mmn", str(folder), "--query", "x").exit_code == 2


def test_a_killed_run_leaves_frames_that_the_next_run_removes(project, tmp_path):
    """A predict killed between decode and extraction leaves its work folder of decoded frames in the
    cache; the next `vmr predict` removes it (its process is dead) and predicts."""
    import os
    import socket
    import subprocess
    import sys

    q = split_queries(project)[0]
    video, cache = video_of(project, q.video_id), tmp_path / "cache"
    script = (
        "import os, signal, sys\n"
        "from pipeline.predict import Predictor, features\n"
        "decode = features.decode_all\n"
        "def decode_then_die(*a, **k):\n"
        "    decode(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "features.decode_all = decode_then_die\n"
        "Predictor.from_checkpoint(sys.argv[1], cache_dir=sys.argv[2]).predict(sys.argv[3], ['x'])\n")
    killed = subprocess.run([sys.executable, "-c", script, str(project / "runs" / "mmn" / "best.pt"), str(cache),
                             str(video)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (left,) = cache.glob("*/.tmp-work-*")
    assert any(p.is_file() for p in (left / "frames").rglob("*"))  # decoded frames
    live = left.parent / f".tmp-work-{socket.gethostname()}.{os.getpid()}.inflight"  # a live run's: kept
    live.mkdir()
    result = invoke(project, "predict", "--model", "mmn", str(video), "--query", q.sentence,
                    "--out", str(tmp_path / "p.json"), "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    assert list(cache.glob("*/.tmp-work-*")) == [live]
