"""The oracle-feature dataset of benchmarks/cnm_weak_supervision.py: what docs/cnm.md's claim rests on."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.text.annotations import load_split

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "cnm_weak_supervision.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cnm_weak_supervision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_actors_are_on_screen_around_their_own_event_only(bench):
    for seed in range(20):
        plan = bench.plan_video(np.random.default_rng(seed))
        events = plan["events"]
        assert 2 <= len(events) <= 4
        assert len({(e["colour"], e["shape"]) for e in events}) == len(events)  # one actor per event
        for e in events:
            assert 0 <= e["enter"] <= e["start"] < e["end"] <= e["leave"] <= plan["duration"]
            assert e["start"] - e["enter"] <= bench.LEAD[1] and e["leave"] - e["end"] <= bench.LEAD[1]
            assert e["caption"].startswith(f"the {e['colour']} {e['shape']} ")


def test_features_hold_exactly_what_is_on_screen(bench):
    plan = bench.plan_video(np.random.default_rng(3))
    emb = {k: np.eye(bench.DIM)[i] * 10 for i, k in enumerate((*bench.COLOURS, *bench.SHAPES, *bench.ACTIONS))}
    # noise-free copy: the same call with the noise level set to zero
    clean = bench.features(plan, emb, np.random.default_rng(0)) - bench.NOISE * np.random.default_rng(0).normal(
        size=(int(plan["duration"]), bench.DIM))
    for t, row in enumerate(clean):
        expected = np.zeros(bench.DIM)
        for e in plan["events"]:
            if e["enter"] <= t + 0.5 < e["leave"]:
                expected += emb[e["colour"]] + emb[e["shape"]]
            if e["start"] <= t + 0.5 < e["end"]:
                expected += emb[e["kind"]]
        np.testing.assert_allclose(row, expected, atol=1e-4)


def test_written_files_are_read_by_the_real_parsers(bench, tmp_path):
    bench.write_dataset(tmp_path, num_train=5, num_test=3, seed=0)
    ann = tmp_path / "annotations"
    durations = [ann / "Charades_v1_train.csv", ann / "Charades_v1_test.csv"]
    with h5py.File(tmp_path / "features" / "clip.h5") as h5:
        for split, n in (("train", 5), ("test", 3)):
            queries = load_split(ann / f"charades_sta_{split}.txt", "charades_sta", split=split, durations=durations)
            assert len({q.video_id for q in queries}) == n
            for q in queries:
                start, end = q.moment
                assert 0 <= start < end <= q.duration
                assert h5[q.video_id].shape == (int(q.duration), bench.DIM)
    # the test videos do not depend on how many training videos there are
    other = tmp_path / "other"
    bench.write_dataset(other, num_train=2, num_test=3, seed=0)
    assert (other / "annotations" / "charades_sta_test.txt").read_text() == (ann / "charades_sta_test.txt").read_text()


@pytest.mark.slow
def test_the_script_runs_the_real_stages(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--num-train", "6", "--num-test", "2",
         "--set", "model.cnm.epochs=1", "--set", "model.cnm.hidden_size=16", "--set", "model.cnm.num_heads=2"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert "predicted vs true centre: r =" in out and "random baseline" in out
    assert (tmp_path / "results" / "cnm" / "metrics.json").is_file()
