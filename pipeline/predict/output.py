"""What `vmr predict` writes: json, jsonl, csv or srt by the file's suffix, and the HTML page.

Every writer renders the whole text first and writes it atomically (pipeline/core/atomic.py), so a
failure leaves no partial file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import mimetypes
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from pipeline.core.atomic import write_text
from pipeline.core.errors import VmrError

FORMATS = ("json", "jsonl", "csv", "srt")
EMBED_VIDEO_MAX_BYTES = 64 << 20  # larger videos are linked by relative path, not inlined


class OutputError(VmrError):
    """An output the records cannot be written to (unknown suffix, srt of several videos)."""


def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise OutputError(f"--out {path}: unknown format '.{suffix}'; expected one of "
                          f"{', '.join('.' + f for f in FORMATS)}")
    return suffix


def render(records: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records)
    if fmt == "csv":
        return _csv(records)
    if fmt == "srt":
        return _srt(records)
    raise OutputError(f"unknown output format '{fmt}'")


def write(records: list[dict], path: str | Path) -> None:
    write_text(path, render(records, output_format(path)))


def _csv(records: list[dict]) -> str:
    """One row per moment (rank 1 = best); a query without moments gets one row with empty times.
    Search records (ranked videos, no moments) give one row per video."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if records and "moments" not in records[0]:
        writer.writerow(["query", "rank", "video", "score", "model", "checkpoint_sha256"])
        for rank, r in enumerate(records, 1):
            writer.writerow([r["query"], rank, r["video"], r["score"], r["model"], r["checkpoint_sha256"]])
        return buf.getvalue()
    writer.writerow(["video", "query", "rank", "start", "end", "score", "model", "checkpoint_sha256",
                     "recipe_mismatch"])
    for r in records:
        mismatch = "; ".join(r.get("recipe_mismatch", []))
        rows = r["moments"] or [{"start": "", "end": "", "score": ""}]
        for rank, m in enumerate(rows, 1):
            writer.writerow([r["video"], r["query"], rank if r["moments"] else "", m["start"], m["end"], m["score"],
                             r["model"], r["checkpoint_sha256"], mismatch])
    return buf.getvalue()


def _srt_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


MISMATCH_CUE_SECONDS = 5.0


def _srt(records: list[dict]) -> str:
    """Subtitles of one video: each moment as a cue `query (#rank, score)`, in time order. An
    overridden recipe mismatch comes first, as a cue over the first seconds: SRT has no comment
    syntax (WebVTT's NOTE is not SRT), and a warning a player shows is better than one it drops."""
    videos = sorted({r["video"] for r in records})
    if len(videos) > 1:
        raise OutputError(f"--out .srt holds the moments of one video; got {len(videos)} videos "
                          "(use .json, .jsonl or .csv, or one video per run)")
    cues = sorted((m["start"], m["end"], f"{r['query']} (#{rank}, {m['score']:.3f})")
                  for r in records for rank, m in enumerate(r["moments"], 1))
    mismatch = records[0].get("recipe_mismatch") if records else None
    if mismatch:
        # a blank line ends an SRT cue: one line per mismatch, none empty
        lines = [" ".join(str(m).split()) for m in mismatch]
        cues.insert(0, (0.0, MISMATCH_CUE_SECONDS, "\n".join(["vmr predict: recipe mismatch, overridden:", *lines])))
    return "".join(f"{i}\n{_srt_time(s)} --> {_srt_time(e)}\n{text}\n\n" for i, (s, e, text) in enumerate(cues, 1))


# -- the HTML page ----------------------------------------------------------------------------------

_STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:1100px}
.query{border-top:1px solid #ccc;padding:.8em 0}
.timeline{position:relative;height:26px;background:#eee;margin:.4em 0}
.bar{position:absolute;top:3px;height:20px;background:#3a7bd5;opacity:.55;cursor:pointer}
.moment{display:flex;gap:6px;align-items:center;margin:.3em 0;cursor:pointer}
.moment img{border:1px solid #999}
video{max-width:480px;display:block}
.warn{color:#b00}
"""

_SCRIPT = """
function seek(id, t){var v=document.getElementById(id); v.currentTime=t; v.play();}
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _video_src(video: Path, page: Path) -> str:
    """The video inlined (self-contained), or its path relative to the page when too large."""
    if video.stat().st_size <= EMBED_VIDEO_MAX_BYTES:
        return _data_uri(video.read_bytes(), mimetypes.guess_type(video.name)[0] or "video/mp4")
    # a URL, not a path: `#`, `?` and `%` in a file name would otherwise end or garble it
    relative = Path(os.path.relpath(video.resolve(), page.resolve().parent)).as_posix()
    return html.escape(urllib.parse.quote(relative))


def render_html(records: list[dict], thumbnail: Callable[[str, float], bytes], page: Path) -> str:
    """One page: per video its player, per query a timeline of the top-k moments and thumbnails at
    each moment's start, middle and end (inline JPEG); a click seeks the player to the moment."""
    by_video: dict[str, list[dict]] = {}
    for r in records:
        by_video.setdefault(r["video"], []).append(r)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>vmr predict</title>",
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body><h1>vmr predict</h1>"]
    first = records[0] if records else {}
    parts.append(f"<p>model <b>{html.escape(str(first.get('model', '')))}</b>, checkpoint "
                 f"{html.escape(str(first.get('checkpoint', '')))} (sha256 "
                 f"{html.escape(str(first.get('checkpoint_sha256', ''))[:16])}&hellip;)</p>")
    if first.get("recipe_mismatch"):
        items = "".join(f"<li>{html.escape(m)}</li>" for m in first["recipe_mismatch"])
        parts.append(f"<div class='warn'>recipe mismatch, overridden:<ul>{items}</ul></div>")
    for n, (video, recs) in enumerate(by_video.items()):
        vid_id = f"v{n}"
        duration = max(float(recs[0].get("duration") or 0.0), 1e-6)
        parts.append(f"<h2>{html.escape(Path(video).name)}</h2>"
                     f"<video id='{vid_id}' controls preload='metadata' src='{_video_src(Path(video), page)}'></video>")
        for r in recs:
            parts.append(f"<div class='query'><b>{html.escape(r['query'])}</b><div class='timeline'>")
            for rank, m in enumerate(r["moments"], 1):
                left, width = 100 * m["start"] / duration, 100 * max(m["end"] - m["start"], 0) / duration
                parts.append(f"<div class='bar' style='left:{left:.2f}%;width:{width:.2f}%' "
                             f"title='#{rank} {m['start']:.2f}-{m['end']:.2f} s ({m['score']:.3f})' "
                             f"onclick='seek(\"{vid_id}\",{m['start']:.3f})'></div>")
            parts.append("</div>")
            for rank, m in enumerate(r["moments"], 1):
                times = (m["start"], (m["start"] + m["end"]) / 2, max(m["start"], m["end"] - 0.05))
                thumbs = "".join(f"<img alt='{t:.2f} s' src='{_data_uri(thumbnail(video, t), 'image/jpeg')}'>"
                                 for t in times)
                parts.append(f"<div class='moment' onclick='seek(\"{vid_id}\",{m['start']:.3f})'>"
                             f"#{rank} {m['start']:.2f}&ndash;{m['end']:.2f} s, score {m['score']:.3f} {thumbs}</div>")
            parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html(records: list[dict], thumbnail: Callable[[str, float], bytes], path: str | Path) -> None:
    write_text(path, render_html(records, thumbnail, Path(path)))
