"""The extract runner with a tiny extractor: the batch plan, cross-video batches, resume, shards,
variable units."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support.videos import write_video  # noqa: E402

from extractors._base import Extractor, ExtractorConfig, SamplingProtocol
from pipeline.media.decode import decode_all, list_videos
from pipeline.media.extract import (
    Piece,
    extract_videos,
    parse_shard,
    plan_batches,
    shard_of,
    split_by_shape,
)
from pipeline.media.framestore import FrameStore

PROTO = SamplingProtocol(rule="fps_filter", rate=4.0, short_side=8, crop=8)


class Tiny(Extractor):
    """Mean colour per frame through a seeded linear layer: cheap and exactly checkable."""

    name = "tiny"
    dim = 4

    def protocol(self):
        return PROTO

    def build_model(self):
        torch.manual_seed(self.config.seed)
        return torch.nn.Linear(8 * 8 * 3, self.dim)

    def load_weights(self, model, path):
        raise NotImplementedError

    def preprocess(self, units):
        return units.float().flatten(1) / 255

    def embed(self, model, x):
        return model(x)


class TinyChunks(Tiny):
    """A snippet-level shape: whole-video chunks of varying length, k rows per chunk (like LGI's I3D)."""

    def group(self, frames, windows, video=None):
        assert video is not None and video.fps == 30
        cuts = [frames[i : i + 3] for i in range(0, len(frames), 3)]  # last chunk shorter
        return cuts, windows[: sum(len(c) - 1 or 1 for c in cuts)]

    def preprocess(self, units):
        return units.float().flatten(2) / 255  # (1, F, 192)

    def embed(self, model, x):
        rows = model(x)  # (1, F, 4): one row per frame
        return rows[:, : max(rows.shape[1] - 1, 1)]  # F - 1 rows (at least one)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FrameStore:
    root = tmp_path_factory.mktemp("extract")
    (root / "videos").mkdir()
    for i, n in enumerate([31, 20, 45, 12, 38]):  # 5 videos, 4 kept frames per second
        write_video(root / "videos" / f"v{i}.mp4", frames=n, width=32, height=24)
    decode_all(list_videos(root / "videos"), root / "frames", [PROTO], workers=1)
    return FrameStore(root / "frames")


def run(store: FrameStore, out: Path, ids=None, extractor=None, batch_size=3):
    ex = extractor or Tiny(ExtractorConfig(batch_size=batch_size))
    model = ex.build_model().eval()
    all_ids = store.video_ids(PROTO.key)
    return extract_videos(ex, model, torch.device("cpu"), store, ids or all_ids, out, "random", all_ids)


def tree(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_outputs_match_a_per_video_forward(store, tmp_path):
    summary = run(store, tmp_path / "out")
    assert summary.computed == 5 and summary.skipped == 0
    ex = Tiny()
    model = ex.build_model()
    for vid in store.video_ids(PROTO.key):
        feats = np.load(tmp_path / "out" / f"{vid}.npy")
        frames = store.load(vid, PROTO.key)
        assert feats.dtype == np.float32 and feats.shape == (len(frames.frames), 4)
        with torch.inference_mode():
            expect = model(torch.from_numpy(np.array(frames.frames)).float().flatten(1) / 255).numpy()
        np.testing.assert_allclose(feats, expect, rtol=1e-5, atol=1e-6)
        side = json.loads((tmp_path / "out" / f"{vid}.json").read_text())
        assert side["windows"] == frames.windows.tolist() and side["units"] == len(feats)


def test_resume_is_byte_identical(store, tmp_path):
    run(store, tmp_path / "clean")
    out = tmp_path / "resumed"
    shutil.copytree(tmp_path / "clean", out)
    # as if killed: v1 lost its done marker, v3 both files, and a temporary was left behind
    (out / "v1.json").unlink()
    (out / "v3.npy").unlink()
    (out / "v3.json").unlink()
    (out / ".tmp-v4.npy.xyz").write_bytes(b"partial")
    (out / "stale_video.npy").write_bytes(b"from a video no longer in the store")
    summary = run(store, out)
    assert summary.computed == 2 and summary.skipped == 3
    assert tree(out) == tree(tmp_path / "clean")


def test_frames_of_other_decoder_code_are_extracted_again(store, tmp_path):
    """Re-decoded frames (other decoder code, same source bytes) must not resume old features."""
    run(store, tmp_path / "out")
    record = store.record_path("v2")
    saved = record.read_text()
    try:
        record.write_text(json.dumps({**json.loads(saved), "code": "vmr-0+code.newer"}))
        summary = run(store, tmp_path / "out")
    finally:
        record.write_text(saved)
    assert (summary.computed, summary.skipped) == (1, 4)


def test_changed_config_recomputes(store, tmp_path):
    run(store, tmp_path / "out")
    summary = run(store, tmp_path / "out", extractor=Tiny(ExtractorConfig(batch_size=3, seed=1)))
    assert summary.computed == 5


def test_shards_write_disjoint_files_that_add_up(store, tmp_path):
    ids = store.video_ids(PROTO.key)
    parts = [shard_of(ids, i, 3) for i in range(3)]
    assert sum(parts, []) == ids and all(parts)
    for part in parts:
        run(store, tmp_path / "sharded", ids=part)
    run(store, tmp_path / "whole")
    sharded, whole = tree(tmp_path / "sharded"), tree(tmp_path / "whole")
    assert sorted(sharded) == sorted(whole)
    for name in whole:
        if name.endswith(".npy"):  # batch composition differs: equal up to float rounding
            np.testing.assert_allclose(np.load(tmp_path / "sharded" / name), np.load(tmp_path / "whole" / name),
                                       rtol=1e-5, atol=1e-6)


def test_parse_shard(monkeypatch):
    assert parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (2, 3)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_variable_shape_units_and_several_rows_per_unit(store, tmp_path):
    run(store, tmp_path / "out", extractor=TinyChunks(ExtractorConfig(batch_size=2)))
    for vid in store.video_ids(PROTO.key):
        n = len(store.load(vid, PROTO.key).frames)
        chunks = [min(3, n - i) for i in range(0, n, 3)]
        feats = np.load(tmp_path / "out" / f"{vid}.npy")
        assert feats.shape == (sum(max(c - 1, 1) for c in chunks), 4)


# -- the batch plan ----------------------------------------------------------------------------------


def test_plan_cuts_the_unit_stream_across_videos():
    batches = list(plan_batches([2, 0, 5, 1], batch_size=3))
    assert batches == [
        [Piece(0, 0, 2), Piece(1, 0, 0), Piece(2, 0, 1)],  # an empty video keeps its place
        [Piece(2, 1, 4)],
        [Piece(2, 4, 5), Piece(3, 0, 1)],  # the last batch is short
    ]
    assert list(plan_batches([], batch_size=3)) == []
    assert list(plan_batches([0], batch_size=3)) == [[Piece(0, 0, 0)]]


def test_plan_boundaries_are_every_batch_size_units_of_the_stream():
    """The plan is the stream of all units cut every `batch_size`, whatever the counts."""
    rng = random.Random(0)
    for _ in range(200):
        counts = [rng.choice([0, 0, 1, 2, 3, 7, 20]) for _ in range(rng.randint(0, 8))]
        batch_size = rng.randint(1, 9)
        stream = [(v, i) for v, n in enumerate(counts) for i in range(n)]
        batches = list(plan_batches(counts, batch_size))
        got = [[(p.video, i) for p in batch for i in range(p.start, p.stop)] for batch in batches]
        expect = [stream[k : k + batch_size] for k in range(0, len(stream), batch_size)]
        assert [b for b in got if b] == expect, (counts, batch_size)
        empty = [p.video for batch in batches for p in batch if p.start == p.stop]
        assert empty == [v for v, n in enumerate(counts) if n == 0]


def test_plan_reads_unit_counts_only_as_batches_fill():
    """Counts of unfinished videos come from loading them: the plan must not read ahead."""
    read = []

    def counts():
        for video, n in enumerate([3, 2, 4]):
            read.append(video)
            yield n

    batches = plan_batches(counts(), batch_size=3)
    assert next(batches) == [Piece(0, 0, 3)] and read == [0]
    assert next(batches) == [Piece(1, 0, 2), Piece(2, 0, 1)] and read == [0, 1, 2]


def test_split_by_shape_cuts_forward_passes_where_the_unit_shape_changes():
    a, b = (3, 8), (4, 8)
    batch = [Piece(0, 5, 7), Piece(1, 0, 0), Piece(2, 0, 3), Piece(3, 2, 3)]
    shapes = [[a, a], [], [a, b, b], [a]]
    assert split_by_shape(batch, shapes) == [
        [Piece(0, 5, 7), Piece(2, 0, 1)],  # across videos while the shape holds
        [Piece(2, 1, 3)],  # cut inside a video
        [Piece(3, 2, 3)],  # the shape of an earlier pass again: a new pass, order kept
    ]
    assert split_by_shape([Piece(0, 0, 2), Piece(1, 0, 1)], [[a, a], [b]]) == [[Piece(0, 0, 2)], [Piece(1, 0, 1)]]
    assert split_by_shape([Piece(0, 0, 0)], [[]]) == []


class Logged(Tiny):
    """Tiny that records the number of units of every forward pass."""

    def __init__(self, config=None):
        super().__init__(config)
        self.passes: list[int] = []

    def embed(self, model, x):
        self.passes.append(len(x))
        return model(x)


def test_forward_passes_follow_the_plan(store, tmp_path):
    ex = Logged(ExtractorConfig(batch_size=4))
    summary = run(store, tmp_path / "out", extractor=ex)
    counts = [len(store.load(vid, PROTO.key).frames) for vid in store.video_ids(PROTO.key)]
    assert ex.passes == [sum(p.stop - p.start for p in b) for b in plan_batches(counts, 4)]
    assert summary.units == sum(counts)
