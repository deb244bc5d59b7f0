"""Query annotations of every supported dataset: one record type, one parser per file format, and
explicit, named cleaning policies with counts of what each rule changed.

API (stable; the trainer and every model read annotations through it)
-------------------------------------------------------------------
    Query                       frozen dataclass, one natural-language query:
        dataset, split, video_id, duration (s, None when the format has none), sentence, qid,
        moments: tuple[(start, end), ...] in seconds (empty for unlabelled splits),
        relevant_clip_ids, saliency_scores (QVHighlights only, else None),
        .moment -> the first (start, end) (the only one outside QVHighlights).

    load_split(path, format="charades_sta", *, dataset, split, durations=(), video_durations=None,
               cleaning="none", on_error="raise") -> Annotations
        Parse one split file and clean it. `Annotations` is a list-like of Query (len, iter,
        index) with `.report`: {"file", "format", "records_read", "malformed_skipped",
        "malformed": [first few "file:line: why"], "cleaning": {"policy", rule -> count},
        "records": kept count}.
        `durations` are Charades csv files (column `length`); only `charades_sta` needs them.
        Without them, `video_durations` ({video id: seconds}, e.g. what decode measured) is used.

    load_dataset_split(dataset_params, split, video_durations=None) -> Annotations  (DatasetParams)
    clean(queries, policy) -> (kept, counts)                       the policies on their own
    FORMATS, CLEANING_POLICIES                                     the names accepted above
    read_durations(csv_paths) -> {video_id: seconds}
    load_msrvtt_video_list(csv_path) -> [video_id, ...]            MSR-VTT train.{9k,7k}.csv

Formats (names for `format`)
    charades_sta   `VID start end##sentence` txt + Charades_v1 csv durations (also the synthetic set),
                   or durations given as {vid: seconds} (own videos: decode's measurements)
    grounding_json {vid: {duration | video_duration, timestamps, sentences, ...}}: MMN / 2D-TAN
                   Charades, Charades-CD, Charades-CG, ActivityNet Captions
    cpl_json       [[vid, duration, [s, e], sentence], ...] (CPL / CNM)
    tacos_json     2D-TAN TACoS: timestamps in frame indices, converted with the file's fps
    qvhighlights   Moment-DETR jsonl (the test split has no labels)
    msrvtt_csv     MSRVTT_JSFUSION_test.csv (`key,vid_key,video_id,sentence`; `sentences` accepted)
    msrvtt_json    MSRVTT_data.json sentences, restricted to the videos of a split csv
    video_captions {vid: caption} (the synthetic dataset's retrieval captions)

Cleaning policies (each seed's convention; `none` keeps the file as it is)
    mmn   drop moments with start > end, clip ends to the duration      (MMN json: 12404 train)
    mesm  drop moments starting after the duration, swap start > end, clamp ends (3720 test)
    cnm   keep only 0 <= start < end <= duration                         (CPL json: 10602 / 3158)
A query whose moments are all dropped is dropped; a query without moments (unlabelled test
splits, retrieval captions) passes every policy untouched.

Errors: a malformed line or record raises `AnnotationError` naming the file and the line (text
formats) or the key path (json). With `on_error="skip"` it is counted and listed in the report
instead; nothing is ever dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import VmrError

Moment = tuple[float, float]


class AnnotationError(VmrError, ValueError):
    """A malformed annotation: the message names the file and the line or key."""


@dataclass(frozen=True)
class Query:
    dataset: str
    split: str
    video_id: str
    duration: float | None
    moments: tuple[Moment, ...]
    sentence: str
    qid: int | str
    relevant_clip_ids: tuple[int, ...] | None = None
    saliency_scores: tuple[tuple[int, ...], ...] | None = None

    @property
    def moment(self) -> Moment:
        if not self.moments:
            raise ValueError(f"query {self.qid!r} of {self.dataset}/{self.split} has no moment (unlabelled)")
        return self.moments[0]


@dataclass
class Annotations(Sequence[Query]):
    queries: list[Query]
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i):  # type: ignore[override]
        return self.queries[i]

    def __iter__(self) -> Iterator[Query]:
        return iter(self.queries)

    def video_ids(self) -> list[str]:
        """Distinct video ids in order of first appearance."""
        return list(dict.fromkeys(q.video_id for q in self.queries))


# -- error collection -------------------------------------------------------------------------


class _Problems:
    """Raise at the first malformed record, or (on_error="skip") count and keep the messages."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        if self.on_error == "raise":
            raise AnnotationError(message)
        self.messages.append(message)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return x


def _pair(value: Any, where: str) -> Moment:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where}: expected [start, end], got {value!r}")
    return _number(value[0], f"{where}[0]"), _number(value[1], f"{where}[1]")


def read_utf8(path: str | os.PathLike) -> str:
    """A whole text file; bytes that are not UTF-8 are an error naming the file, line and column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise AnnotationError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})") from None


def _utf8_lines(path: Path, problems: _Problems) -> Iterator[tuple[int, str]]:
    """(line number, line) of a line-based file; a line that is not UTF-8 is a malformed record
    (named, and skipped under on_error: skip) instead of an error for the whole file."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")


def _id_problem(vid: Any) -> str | None:
    """Why `vid` cannot be a video id, or None. Ids are HDF5 keys and file names: './S0000',
    '/S0000' and 'S0000/' would all read S0000's features, so only plain names are accepted."""
    if not isinstance(vid, str) or not vid:
        return f"video id {vid!r} is not a non-empty string"
    if "/" in vid or "\\" in vid or vid in (".", "..") or vid != vid.strip() or "\x00" in vid:
        return f"video id {vid!r} is not a plain name (no slashes, surrounding spaces, '.' or '..')"
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


# -- durations --------------------------------------------------------------------------------


def read_durations(csv_paths: Iterable[str | os.PathLike]) -> dict[str, float]:
    """{video id: length in seconds} from Charades_v1_*.csv files (fields hold commas and quotes)."""
    durations: dict[str, float] = {}
    for path in csv_paths:
        with io.StringIO(read_utf8(path), newline="") as fh:
            reader = csv.DictReader(fh)
            for key in ("id", "length"):
                if key not in (reader.fieldnames or []):
                    raise AnnotationError(f"{path}:1: csv header has no '{key}' column")
            for row in reader:
                try:
                    durations[row["id"]] = _number(row["length"], "length")
                except ValueError as e:
                    raise AnnotationError(f"{path}:{reader.line_num}: {e}") from None
    return durations


# -- parsers: each yields Query records (uncleaned) and reports problems ------------------------


def _parse_charades_sta(path, *, dataset, split, durations, video_durations, problems, **_) -> Iterator[Query]:
    if durations:
        lengths, source = read_durations(durations), "the duration csvs"
    elif video_durations is not None:
        lengths, source = video_durations, "decode's records (not in the video folder, or its decode failed)"
    else:
        raise AnnotationError(f"{path}: the charades_sta format needs durations: csv files (Charades_v1_*.csv) "
                              "or the decoded videos' records")
    qid = 0
    for lineno, line in _utf8_lines(path, problems):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        head, sep, sentence = line.partition("##")
        fields = head.split()
        if not sep or len(fields) != 3:
            problems(f"{path}:{lineno}: expected 'VID start end##sentence', got {line!r}")
            continue
        vid = fields[0]
        if bad := _id_problem(vid):
            problems(f"{path}:{lineno}: {bad}")
            continue
        try:
            moment = (_number(fields[1], "start"), _number(fields[2], "end"))
        except ValueError as e:
            problems(f"{path}:{lineno}: {e}")
            continue
        if vid not in lengths:
            problems(f"{path}:{lineno}: video '{vid}' has no duration in {source}")
            continue
        yield Query(dataset, split, vid, lengths[vid], (moment,), sentence, qid)
        qid += 1


def _parse_grounding_json(path, *, dataset, split, problems, **_) -> Iterator[Query]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object {{video id: record}}")
    qid = 0
    for vid, rec in data.items():
        try:
            if bad := _id_problem(vid):
                raise ValueError(bad)
            if not isinstance(rec, dict):
                raise ValueError("expected an object")
            # Charades-CD stores the duration as `video_duration`.
            dkey = "duration" if "duration" in rec else "video_duration"
            if dkey not in rec:
                raise ValueError("missing key 'duration' (or 'video_duration')")
            duration = _number(rec[dkey], dkey)
            stamps, sentences = rec.get("timestamps"), rec.get("sentences")
            if not isinstance(stamps, list) or not isinstance(sentences, list):
                raise ValueError("'timestamps' and 'sentences' must be lists")
            if len(stamps) != len(sentences):
                raise ValueError(f"{len(stamps)} timestamps but {len(sentences)} sentences")
            moments = [_pair(t, f"timestamps[{i}]") for i, t in enumerate(stamps)]
            for i, s in enumerate(sentences):
                if not isinstance(s, str):
                    raise ValueError(f"sentences[{i}]: expected a string")
        except ValueError as e:
            problems(f"{path}: key '{vid}': {e}")
            continue
        for moment, sentence in zip(moments, sentences, strict=True):
            yield Query(dataset, split, vid, duration, (moment,), sentence, qid)
            qid += 1


def _parse_cpl_json(path, *, dataset, split, problems, **_) -> Iterator[Query]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of [vid, duration, [start, end], sentence]")
    for i, item in enumerate(data):
        try:
            if not isinstance(item, list) or len(item) != 4:
                raise ValueError(f"expected [vid, duration, [start, end], sentence], got {item!r:.120}")
            vid, duration, moment, sentence = item
            if not isinstance(vid, str) or not isinstance(sentence, str):
                raise ValueError("video id and sentence must be strings")
            if bad := _id_problem(vid):
                raise ValueError(bad)
            record = Query(dataset, split, vid, _number(duration, "duration"), (_pair(moment, "moment"),), sentence, i)
        except ValueError as e:
            problems(f"{path}: item [{i}]: {e}")
            continue
        yield record


def _parse_tacos_json(path, *, dataset, split, problems, **_) -> Iterator[Query]:
    """Frame indices -> seconds with the file's own fps; duration = num_frames / fps."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object {{video: record}}")
    qid = 0
    for vid, rec in data.items():
        try:
            if bad := _id_problem(vid):
                raise ValueError(bad)
            if not isinstance(rec, dict):
                raise ValueError("expected an object")
            for key in ("fps", "num_frames", "timestamps", "sentences"):
                if key not in rec:
                    raise ValueError(f"missing key '{key}'")
            fps = _number(rec["fps"], "fps")
            if fps <= 0:
                raise ValueError(f"fps must be > 0, got {fps}")
            duration = _number(rec["num_frames"], "num_frames") / fps
            stamps, sentences = rec["timestamps"], rec["sentences"]
            if len(stamps) != len(sentences):
                raise ValueError(f"{len(stamps)} timestamps but {len(sentences)} sentences")
            moments = [tuple(x / fps for x in _pair(t, f"timestamps[{i}]")) for i, t in enumerate(stamps)]
        except (ValueError, TypeError) as e:
            problems(f"{path}: key '{vid}': {e}")
            continue
        for moment, sentence in zip(moments, sentences, strict=True):
            yield Query(dataset, split, vid, duration, (moment,), sentence, qid)
            qid += 1


def _parse_qvhighlights(path, *, dataset, split, problems, **_) -> Iterator[Query]:
    for lineno, line in _utf8_lines(path, problems):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            for key in ("qid", "query", "duration", "vid"):
                if key not in rec:
                    raise ValueError(f"missing key '{key}'")
            if bad := _id_problem(rec["vid"]):
                raise ValueError(bad)
            windows = tuple(_pair(w, f"relevant_windows[{i}]") for i, w in enumerate(rec.get("relevant_windows", [])))
            clip_ids = rec.get("relevant_clip_ids")
            scores = rec.get("saliency_scores")
            if clip_ids is not None:
                clip_ids = tuple(int(c) for c in clip_ids)
                scores = tuple(tuple(int(s) for s in row) for row in scores or [])
                if len(scores) != len(clip_ids):
                    raise ValueError(f"{len(clip_ids)} relevant_clip_ids but {len(scores)} saliency_scores")
            record = Query(dataset, split, rec["vid"], _number(rec["duration"], "duration"), windows,
                           rec["query"], rec["qid"], clip_ids, scores)
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            problems(f"{path}:{lineno}: {e}")
            continue
        yield record


def _msrvtt_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with io.StringIO(read_utf8(path), newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _parse_msrvtt_csv(path, *, dataset, split, problems, **_) -> Iterator[Query]:
    """1k-A test csv: one caption per video; some copies name the column `sentences`."""
    header, rows = _msrvtt_rows(path)
    text_key = "sentence" if "sentence" in header else "sentences"
    for key in ("key", "video_id", text_key):
        if key not in header:
            raise AnnotationError(f"{path}:1: csv header has no '{key}' column (got {header})")
    for i, row in enumerate(rows):
        if not row.get("video_id") or row.get(text_key) is None:
            problems(f"{path}:{i + 2}: empty video_id or sentence")
            continue
        if bad := _id_problem(row["video_id"]):
            problems(f"{path}:{i + 2}: {bad}")
            continue
        yield Query(dataset, split, row["video_id"], None, (), row[text_key], row["key"])


def load_msrvtt_video_list(path: str | os.PathLike) -> list[str]:
    """The video ids of an MSR-VTT split csv (MSRVTT_train.9k.csv / 7k: one `video_id` column)."""
    header, rows = _msrvtt_rows(Path(path))
    if "video_id" not in header:
        raise AnnotationError(f"{path}:1: csv header has no 'video_id' column (got {header})")
    return [r["video_id"] for r in rows]


def _parse_msrvtt_json(path, *, dataset, split, durations, problems, **_) -> Iterator[Query]:
    """MSRVTT_data.json captions (file order) of the videos listed in the split csv `durations[0]`
    (every caption is its own query, as in CLIP4Clip's training split)."""
    if not durations:
        raise AnnotationError(f"{path}: msrvtt_json needs the split's video-list csv (given as `durations`)")
    videos = set(load_msrvtt_video_list(durations[0]))
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise AnnotationError(f"{path}: expected an object with a 'sentences' list")
    for i, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or "video_id" not in s or "caption" not in s:
            problems(f"{path}: key 'sentences[{i}]': expected {{video_id, caption, ...}}")
            continue
        if bad := _id_problem(s["video_id"]):
            problems(f"{path}: key 'sentences[{i}]': {bad}")
            continue
        if s["video_id"] in videos:
            yield Query(dataset, split, s["video_id"], None, (), s["caption"], s.get("sen_id", i))


def _parse_video_captions(path, *, dataset, split, problems, **_) -> Iterator[Query]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object {{video id: caption}}")
    for i, (vid, caption) in enumerate(data.items()):
        if bad := _id_problem(vid):
            problems(f"{path}: key '{vid}': {bad}")
            continue
        if not isinstance(caption, str):
            problems(f"{path}: key '{vid}': expected a caption string")
            continue
        yield Query(dataset, split, vid, None, (), caption, i)


FORMATS: dict[str, Callable[..., Iterator[Query]]] = {
    "charades_sta": _parse_charades_sta,
    "grounding_json": _parse_grounding_json,
    "cpl_json": _parse_cpl_json,
    "tacos_json": _parse_tacos_json,
    "qvhighlights": _parse_qvhighlights,
    "msrvtt_csv": _parse_msrvtt_csv,
    "msrvtt_json": _parse_msrvtt_json,
    "video_captions": _parse_video_captions,
}


# -- cleaning ---------------------------------------------------------------------------------


def _mmn(m: Moment, duration: float, counts: dict[str, int]) -> Moment | None:
    start, end = m
    if start > end:
        counts["dropped_reversed"] += 1
        return None
    if end > duration:
        counts["end_clipped"] += 1
        end = duration
    return start, end


def _mesm(m: Moment, duration: float, counts: dict[str, int]) -> Moment | None:
    start, end = m
    if start > duration:
        counts["dropped_start_past_duration"] += 1
        return None
    if start > end:
        counts["swapped_reversed"] += 1
        start, end = end, start
    if end > duration:
        counts["end_clamped"] += 1
        end = duration
    return start, end


def _cnm(m: Moment, duration: float, counts: dict[str, int]) -> Moment | None:
    start, end = m
    # the first failing condition names the reason; any one drops the moment
    reason = (
        "dropped_negative_start" if start < 0
        else "dropped_not_increasing" if not start < end
        else "dropped_end_past_duration" if end > duration
        else None
    )
    if reason:
        counts[reason] += 1
        return None
    return start, end


_RULES = {
    "none": ((), None),
    "mmn": (("dropped_reversed", "end_clipped"), _mmn),
    "mesm": (("dropped_start_past_duration", "swapped_reversed", "end_clamped"), _mesm),
    "cnm": (("dropped_negative_start", "dropped_not_increasing", "dropped_end_past_duration"), _cnm),
}
CLEANING_POLICIES = tuple(_RULES)


def clean(queries: Iterable[Query], policy: str) -> tuple[list[Query], dict[str, int]]:
    """Apply a named cleaning policy; returns the kept queries and {rule: moments it changed},
    plus `queries_dropped` (queries left with no moment)."""
    if policy not in _RULES:
        raise ValueError(f"unknown cleaning policy {policy!r}; expected one of {list(_RULES)}")
    rule_names, rule = _RULES[policy]
    counts = dict.fromkeys(rule_names, 0)
    counts["queries_dropped"] = 0
    kept: list[Query] = []
    for q in queries:
        if rule is None or not q.moments:
            kept.append(q)
            continue
        if q.duration is None:
            raise ValueError(f"cleaning policy {policy!r} needs durations; query {q.qid!r} ({q.video_id}) has none")
        moments = tuple(m for m in (rule(m, q.duration, counts) for m in q.moments) if m is not None)
        if not moments:
            counts["queries_dropped"] += 1
            continue
        kept.append(q if moments == q.moments else _replace_moments(q, moments))
    return kept, counts


def _replace_moments(q: Query, moments: tuple[Moment, ...]) -> Query:
    from dataclasses import replace

    return replace(q, moments=moments)


# -- entry points -----------------------------------------------------------------------------

MAX_LISTED_PROBLEMS = 20


def load_split(
    path: str | os.PathLike,
    format: str = "charades_sta",
    *,
    dataset: str = "",
    split: str = "",
    durations: Sequence[str | os.PathLike] = (),
    video_durations: Mapping[str, float] | None = None,
    cleaning: str = "none",
    on_error: str = "raise",
) -> Annotations:
    """Parse one split file with the parser `format`, then apply the cleaning policy `cleaning`."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"unknown annotation format {format!r}; expected one of {sorted(FORMATS)}")
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    problems = _Problems(on_error)
    raw = list(FORMATS[format](path, dataset=dataset, split=split, durations=list(durations),
                               video_durations=video_durations, problems=problems))
    kept, counts = clean(raw, cleaning)
    report = {
        "file": str(path),
        "format": format,
        "records_read": len(raw),
        "malformed_skipped": len(problems.messages),
        "malformed": problems.messages[:MAX_LISTED_PROBLEMS],
        "cleaning": {"policy": cleaning, **counts},
        "records": len(kept),
    }
    return Annotations(kept, report)


def load_dataset_split(dataset_params: Any, split: str, video_durations: Mapping[str, float] | None = None) -> Annotations:
    """Load `split` of the dataset described by a `DatasetParams` section (pipeline.core.params);
    `video_durations` stand in for `dataset.durations` when that is empty (charades_sta)."""
    if split not in dataset_params.splits:
        raise AnnotationError(f"dataset '{dataset_params.name}' has no split '{split}'; "
                              f"params name {sorted(dataset_params.splits)}")
    return load_split(
        dataset_params.splits[split],
        dataset_params.format,
        dataset=dataset_params.name,
        split=split,
        durations=dataset_params.durations,
        video_durations=video_durations,
        cleaning=dataset_params.cleaning,
        on_error=getattr(dataset_params, "on_error", "raise"),
    )
