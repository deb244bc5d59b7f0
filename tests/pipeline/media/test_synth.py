"""The synthetic dataset: deterministic, real H.264 that decord reads, real Charades-STA formats."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.media import synth

# The Charades-STA line grammar, strictly: 5-char id, two decimals, '##', a non-empty sentence.
STA_LINE = re.compile(r"^([0-9A-Z]{5}) (\d+\.\d+) (\d+\.\d+)##(.+)$")


def strict_sta(path: Path) -> list[tuple[str, float, float, str]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = STA_LINE.match(line)
        assert m, f"{path}:{n}: not a Charades-STA line: {line!r}"
        rows.append((m[1], float(m[2]), float(m[3]), m[4]))
    return rows


def strict_csv_lengths(path: Path) -> dict[str, float]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames is not None and reader.fieldnames[0] == "id" and "length" in reader.fieldnames
        return {row["id"]: float(row["length"]) for row in reader}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = synth.SynthConfig(seed=3, num_train=3, num_test=2, min_duration=4.0, max_duration=6.0)
    out = tmp_path_factory.mktemp("synth") / "ds"
    manifest = synth.generate(cfg, out)
    return cfg, out, manifest


def test_strict_parsers_accept_the_real_files(shared_annotations):
    rows = strict_sta(shared_annotations / "charades_sta" / "charades_sta_train.txt")
    assert len(rows) == 12408
    lengths = strict_csv_lengths(shared_annotations / "charades_sta" / "Charades_v1_train.csv")
    assert len(lengths) == 7985


def test_formats_read_by_the_strict_parsers(tiny):
    cfg, out, manifest = tiny
    for split, n in (("train", cfg.num_train), ("test", cfg.num_test)):
        rows = strict_sta(out / "annotations" / f"charades_sta_{split}.txt")
        lengths = strict_csv_lengths(out / "annotations" / f"Charades_v1_{split}.csv")
        assert len(lengths) == n
        for vid, start, end, sentence in rows:
            assert vid in lengths, f"{vid} missing from the csv"
            assert 0 <= start < end <= lengths[vid], (vid, start, end, lengths[vid])
            assert sentence.startswith("the ") and sentence.endswith(".")
    captions = json.loads((out / "annotations" / "video_captions.json").read_text())
    assert set(captions) == set(manifest["videos"])
    assert len(set(captions.values())) == len(captions)  # distinct, so retrieval is well posed


def test_videos_decode_and_metadata_matches_intent(tiny):
    import decord

    _, out, manifest = tiny
    for vid, meta in manifest["videos"].items():
        path = out / "videos" / f"{vid}.mp4"
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert float(stream.average_rate) == pytest.approx(meta["fps"], rel=1e-3)
            assert (stream.width, stream.height) == (meta["width"], meta["height"])
            decoded = sum(1 for _ in container.decode(video=0))
        assert decoded == meta["num_frames"]
        assert meta["num_frames"] / meta["fps"] == pytest.approx(meta["duration"])
        reader = decord.VideoReader(str(path))
        assert len(reader) == meta["num_frames"]
        assert reader[0].shape == (meta["height"], meta["width"], 3)
        for e in meta["events"]:
            assert 0 <= e["start"] < e["end"] <= meta["duration"]


def _generate_in_fresh_process(cfg: synth.SynthConfig, out: Path) -> None:
    # A fresh interpreter per run, as `vmr synth` is: other libraries loaded into this test process
    # (decord bundles its own FFmpeg) must not be part of what is compared.
    code = f"from pipeline.media import synth; synth.generate(synth.SynthConfig(**{cfg.__dict__!r}), {str(out)!r})"
    subprocess.run([sys.executable, "-c", code], check=True)


def _decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.int16)


def test_deterministic_for_a_seed(tiny, tmp_path):
    """Annotations and rendered frames are bit-exact; the H.264 bytes may vary (x264), the pixels not."""
    cfg, _, _ = tiny
    first, again = tmp_path / "first", tmp_path / "again"
    _generate_in_fresh_process(cfg, first)
    _generate_in_fresh_process(cfg, again)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix != ".mp4":
            assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel
        else:
            a, b = _decoded(first / rel), _decoded(again / rel)
            assert a.shape == b.shape and np.abs(a - b).mean() < 0.5, rel
    other = synth.SynthConfig(**{**cfg.__dict__, "seed": cfg.seed + 1})
    assert synth.plan_video(other, "S0000", "train", 0).events != synth.plan_video(cfg, "S0000", "train", 0).events


def test_rendered_frames_are_bit_exact_across_processes():
    code = (
        "import hashlib; from pipeline.media import synth\n"
        "cfg = synth.SynthConfig(seed=5, num_train=2, num_test=1, min_duration=4.0, max_duration=5.0)\n"
        "h = hashlib.sha256()\n"
        "for i, (vid, split) in enumerate(synth.video_ids(cfg)):\n"
        "    p = synth.plan_video(cfg, vid, split, i); bg = synth._background(p); n = synth.noise_bank(p)\n"
        "    for k in range(0, p.num_frames, 7):\n"
        "        h.update(synth.rgb_to_yuv420p(synth.render_frame(p, k, bg, n)).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    digests = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
               for _ in range(2)}
    assert len(digests) == 1


def test_events_are_visible_in_the_pixels(tiny):
    """A 'moves' event changes the frame between its start and end; the frames match the plan."""
    cfg, out, manifest = tiny
    plan = synth.plan_video(cfg, "S0000", "train", 0)
    bg = synth._background(plan)
    noise = synth.noise_bank(plan)
    e = plan.events[0]
    before = synth.render_frame(plan, int(e.start * plan.fps), bg, noise).astype(float)
    after = synth.render_frame(plan, min(int(e.end * plan.fps), plan.num_frames - 1), bg, noise).astype(float)
    assert np.abs(after - before).mean() > 1.0


def test_glove_file_is_glove_text_format(tiny):
    cfg, out, _ = tiny
    lines = (out / f"glove.synthetic.{cfg.glove_dim}d.txt").read_text().splitlines()
    words = [ln.split(" ", 1)[0] for ln in lines]
    assert "circle" in words and "left" in words and len(set(words)) == len(words)
    assert all(len(ln.split(" ")) == cfg.glove_dim + 1 for ln in lines)


def test_every_event_kind_can_be_planned():
    cfg = synth.SynthConfig(seed=0, num_train=40, num_test=1)
    kinds = {e.kind for i, (vid, split) in enumerate(synth.video_ids(cfg))
             for e in synth.plan_video(cfg, vid, split, i).events}
    assert kinds == set(synth.EVENT_KINDS)
