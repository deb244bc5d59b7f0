"""Label-free query files: QVHighlights-style jsonl without windows, or one query per line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.predict.queries import AskedQuery, QueryFileError, assign, read_query_file


def test_plain_text_one_query_per_line(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text("a person opens a door\n\n  the dog runs  \n")
    assert read_query_file(path) == [AskedQuery("a person opens a door"), AskedQuery("the dog runs")]


def test_qvhighlights_jsonl_without_windows(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"qid": 7, "query": "a man cooks", "vid": "abc_60.0_210.0"}\n'
                    '{"qid": "x", "query": "someone sings"}\n')
    assert read_query_file(path) == [AskedQuery("a man cooks", 7, "abc_60.0_210.0"), AskedQuery("someone sings", "x")]


@pytest.mark.parametrize("text, message", [
    ('{"qid": 1, "query": "ok"}\n{"qid": 2\n', "q.jsonl:2: not a JSON object"),
    ('{"qid": 1, "query": ""}\n', "q.jsonl:1: missing or empty 'query'"),
    ('{"qid": 1}\n', "q.jsonl:1: missing or empty 'query'"),
    ('{"qid": 1, "query": "ok"}\n[1, 2]\n', "q.jsonl:2: expected a JSON object"),
    ("\n\n", "no query in the file"),
])
def test_malformed_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(QueryFileError, match=message.replace("(", r"\(")):
        read_query_file(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(QueryFileError, match="not found"):
        read_query_file(tmp_path / "none.txt")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(QueryFileError, match="not UTF-8"):
        read_query_file(tmp_path / "b.txt")


def test_assign_queries_to_videos():
    videos = [Path("d/a.mp4"), Path("d/b.mp4"), Path("d/c.mp4")]
    queries = [AskedQuery("everywhere"), AskedQuery("only b", 1, "b")]
    jobs = assign(queries, videos)
    assert [(v.name, [q.text for q in qs]) for v, qs in jobs] == [
        ("a.mp4", ["everywhere"]), ("b.mp4", ["everywhere", "only b"]), ("c.mp4", ["everywhere"])]
    # only per-video queries: videos asked nothing are left out
    assert [v.name for v, _ in assign([AskedQuery("x", 1, "c")], videos)] == ["c.mp4"]
    with pytest.raises(QueryFileError, match="not given: \\['zz'\\]"):
        assign([AskedQuery("x", 1, "zz")], videos)
