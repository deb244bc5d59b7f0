"""Label-free query files for `vmr predict --queries FILE`.

Two forms, told apart by content:
- QVHighlights-style jsonl without windows: one JSON object per line with `query` (required), and
  optionally `qid` and `vid` (the video id, a file stem: the query is asked of that video only;
  without `vid`, of every video given);
- plain text: one query per line (blank lines skipped).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.core.errors import VmrError


class QueryFileError(VmrError):
    """A malformed query file: the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class AskedQuery:
    text: str
    qid: str | int | None = None
    vid: str | None = None  # None: every video


def read_query_file(path: str | Path) -> list[AskedQuery]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QueryFileError(f"{path}: query file not found") from None
    except UnicodeDecodeError as e:
        raise QueryFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise QueryFileError(f"{path}: no query in the file")
    if not lines[0][1].startswith("{"):
        return [AskedQuery(line) for _, line in lines]
    out = []
    for n, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QueryFileError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict):
            raise QueryFileError(f"{path}:{n}: expected a JSON object with a 'query' key")
        query = obj.get("query")
        if not isinstance(query, str) or not query.strip():
            raise QueryFileError(f"{path}:{n}: missing or empty 'query'")
        vid = obj.get("vid")
        out.append(AskedQuery(query.strip(), obj.get("qid"), None if vid is None else str(vid)))
    return out


def assign(queries: list[AskedQuery], videos: list[Path]) -> list[tuple[Path, list[AskedQuery]]]:
    """(video, its queries) for every video that is asked something, in the videos' order. A query
    naming a `vid` that matches no given video is an error (a typo would otherwise ask nothing)."""
    stems = {p.stem for p in videos}
    unknown = sorted({q.vid for q in queries if q.vid is not None and q.vid not in stems})
    if unknown:
        raise QueryFileError(f"queries name video(s) not given: {unknown[:3]} (given: {sorted(stems)[:5]})")
    jobs = []
    for video in videos:
        mine = [q for q in queries if q.vid is None or q.vid == video.stem]
        if mine:
            jobs.append((video, mine))
    return jobs
