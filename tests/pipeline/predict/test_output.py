"""Output writers (json, jsonl, csv, srt) and the self-contained HTML page."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from support.videos import index_of, write_video

from pipeline.predict.output import OutputError, output_format, render, render_html, write
from pipeline.predict.predictor import thumbnail


def records(video="v.mp4", mismatch=None):
    base = {"video": video, "video_sha256": "ab" * 32, "duration": 10.0, "model": "mmn",
            "checkpoint": "runs/mmn/best.pt", "checkpoint_sha256": "cd" * 32}
    if mismatch:
        base["recipe_mismatch"] = mismatch
    return [
        {**base, "query": "a person, opens \"the\" door", "moments": [
            {"start": 1.0, "end": 3.5, "score": 0.9}, {"start": 0.0, "end": 62.25, "score": 0.4}]},
        {**base, "query": "nothing found", "moments": []},
    ]


def test_json_and_jsonl_round_trip(tmp_path):
    recs = records(mismatch=["weights differ"])
    write(recs, tmp_path / "o.json")
    assert json.loads((tmp_path / "o.json").read_text()) == recs
    write(recs, tmp_path / "o.jsonl")
    assert [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()] == recs


def test_csv_one_row_per_moment():
    rows = list(csv.DictReader(io.StringIO(render(records(mismatch=["a", "b"]), "csv"))))
    assert [(r["query"], r["rank"], r["start"], r["end"], r["score"]) for r in rows] == [
        ('a person, opens "the" door', "1", "1.0", "3.5", "0.9"),
        ('a person, opens "the" door', "2", "0.0", "62.25", "0.4"),
        ("nothing found", "", "", "", "")]
    assert rows[0]["checkpoint_sha256"] == "cd" * 32 and rows[0]["recipe_mismatch"] == "a; b"


def test_srt_cues_in_time_order():
    text = render(records(), "srt")
    assert text == ("1\n00:00:00,000 --> 00:01:02,250\na person, opens \"the\" door (#2, 0.400)\n\n"
                    "2\n00:00:01,000 --> 00:00:03,500\na person, opens \"the\" door (#1, 0.900)\n\n")
    with pytest.raises(OutputError, match="one video"):
        render(records("a.mp4") + records("b.mp4"), "srt")


def test_srt_records_an_overridden_mismatch_in_a_first_cue(tmp_path):
    """SRT has no comments: the override is the first cue, which ffmpeg (the oracle) reads as one."""
    write(records(mismatch=["weights differ", "decoder code changed:\n  old"]), tmp_path / "o.srt")
    vtt = subprocess.run(["ffmpeg", "-v", "error", "-i", str(tmp_path / "o.srt"), "-f", "webvtt", "-"],
                         capture_output=True, text=True, check=True).stdout
    cues = [c for c in vtt.split("\n\n") if "-->" in c]
    assert len(cues) == 3
    assert cues[0].splitlines() == ["00:00.000 --> 00:05.000", "vmr predict: recipe mismatch, overridden:",
                                    "weights differ", "decoder code changed: old"]
    assert "(#2, 0.400)" in cues[1] and "(#1, 0.900)" in cues[2]


def test_unknown_suffix_is_refused():
    assert output_format("x.JSONL") == "jsonl"
    with pytest.raises(OutputError, match=r"unknown format '\.txt'"):
        output_format("x.txt")


def test_html_is_self_contained(tmp_path):
    video = write_video(tmp_path / "v.mp4", frames=60, fps=30, width=64, height=48)
    recs = records(str(video), mismatch=["the weights differ"])
    page = render_html(recs, thumbnail, tmp_path / "page.html")
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert refs and not [r for r in refs if re.match(r"(?i)(https?:)?//", r)]
    assert page.count("data:image/jpeg;base64,") == 6  # 2 moments x start, middle, end
    assert "<video" in page and "data:video/mp4;base64," in page
    assert "onclick='seek(\"v0\",1.000)'" in page  # a click seeks to the moment's start
    assert "the weights differ" in page
    assert "a person, opens &quot;the&quot; door" in page  # escaped


def test_a_large_video_is_linked_by_an_encoded_url(tmp_path, monkeypatch):
    from pipeline.predict import output

    monkeypatch.setattr(output, "EMBED_VIDEO_MAX_BYTES", 0)
    video = tmp_path / "clips" / "take #1? 50% off.mp4"
    video.parent.mkdir()
    write_video(tmp_path / "v.mp4", frames=30, fps=30, width=64, height=48).rename(video)
    page = tmp_path / "pages" / "page.html"
    src = re.search(r"<video[^>]* src='([^']*)'", render_html(records(str(video)), thumbnail, page)).group(1)
    assert not set("#? ") & set(src)
    # resolved as a browser does: against the page's URL, then back to a file path
    url = urllib.parse.urljoin(page.as_uri(), src)
    assert Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)) == video


def test_thumbnail_is_a_jpeg_of_the_requested_width(tmp_path):
    from PIL import Image

    video = write_video(tmp_path / "v.mp4", frames=60, fps=30, width=64, height=48)
    data = thumbnail(video, 1.0, width=32)
    assert data[:2] == b"\xff\xd8"
    image = Image.open(io.BytesIO(data))
    assert image.size == (32, 24)
    # the frame index is coded in the right half's grey level: frame 30 at 1.0 s
    grey = image.convert("L").getpixel((28, 12))
    assert abs(grey - (16 * (30 % 16) + 8)) < 12


@pytest.mark.parametrize("suffix, audio, frame", [(".ts", False, 30), (".mp4", False, 30), (".mp4", True, 15)])
def test_thumbnail_times_count_from_the_file_start(tmp_path, suffix, audio, frame):
    """Moments count from the file start (decode's time zero). Video frames from 0.5 s of the file's
    clock: without audio the file starts there too (start_time 0.5 s, frame 30 shows at 1.0 s); with
    audio from 0 s the file starts at 0 and the video 0.5 s later (frame 15 at 1.0 s). 30 fps."""
    import av
    import numpy as np
    from PIL import Image

    video = write_video(tmp_path / f"v{suffix}", frames=60, pts_ms=[500 + round(i * 1000 / 30) for i in range(60)],
                        audio=audio)
    with av.open(str(video)) as c:
        assert c.start_time == (0 if audio else 500_000)
    image = Image.open(io.BytesIO(thumbnail(video, 1.0, width=64)))
    assert index_of(np.asarray(image.convert("RGB"))) == frame
