"""Parsers and cleaning policies on the real shared annotation files (counts from their READMEs)."""

from __future__ import annotations

import json

import pytest

from pipeline.text.annotations import (
    AnnotationError,
    Query,
    clean,
    load_msrvtt_video_list,
    load_split,
)


def _charades(shared, split, cleaning="none", **kw):
    d = shared / "charades_sta"
    return load_split(d / f"charades_sta_{split}.txt", "charades_sta", dataset="charades_sta", split=split,
                      durations=[d / "Charades_v1_train.csv", d / "Charades_v1_test.csv"], cleaning=cleaning, **kw)


@pytest.mark.parametrize("split,raw", [("train", 12408), ("test", 3720)])
def test_charades_sta_raw_counts(shared_annotations, split, raw):
    ann = _charades(shared_annotations, split)
    assert len(ann) == raw and ann.report["records_read"] == raw
    q = ann[0]
    assert isinstance(q, Query) and q.split == split and q.duration > 0 and len(q.moments) == 1


def test_charades_sta_cleaning_counts(shared_annotations):
    train_mmn = _charades(shared_annotations, "train", "mmn")
    assert len(train_mmn) == 12404
    c = train_mmn.report["cleaning"]
    assert (c["dropped_reversed"], c["end_clipped"]) == (4, 1805 - 3)  # 3 of the 1805 late ends are reversed ones
    assert all(0 <= q.moment[0] <= q.moment[1] <= q.duration for q in train_mmn)

    test_mesm = _charades(shared_annotations, "test", "mesm")
    assert len(test_mesm) == 3720
    assert test_mesm.report["cleaning"]["end_clamped"] == 562
    train_mesm = _charades(shared_annotations, "train", "mesm")
    c = train_mesm.report["cleaning"]
    assert (c["dropped_start_past_duration"], c["swapped_reversed"], len(train_mesm)) == (3, 1, 12405)

    assert len(_charades(shared_annotations, "train", "cnm")) == 10602
    assert len(_charades(shared_annotations, "test", "cnm")) == 3158


def test_mmn_json_equals_charades_txt_under_mmn(shared_annotations):
    for split in ("train", "test"):
        ours = _charades(shared_annotations, split, "mmn")
        theirs = load_split(shared_annotations / "charades_sta" / "mmn" / f"charades_{split}.json", "grounding_json")
        assert len(ours) == len(theirs)
        key = lambda q: (q.video_id, q.duration, q.moments)  # noqa: E731
        assert [key(q) for q in ours] == [key(q) for q in theirs]
        # MMN fixed typos in 12 test sentences ("adn llooked" -> "and looked"); nothing else differs
        diff = [(a.sentence, b.sentence) for a, b in zip(ours, theirs, strict=True) if a.sentence != b.sentence]
        assert len(diff) == (0 if split == "train" else 12)


def test_cpl_json_equals_charades_txt_under_cnm(shared_annotations):
    for split, n in (("train", 10602), ("test", 3158)):
        theirs = load_split(shared_annotations / "charades_sta" / "cpl" / f"{split}.json", "cpl_json")
        ours = _charades(shared_annotations, split, "cnm")
        assert len(theirs) == n
        assert [(q.video_id, q.duration, q.moments, q.sentence) for q in ours] == \
               [(q.video_id, q.duration, q.moments, q.sentence) for q in theirs]


def test_malformed_charades_line_names_file_and_line(tmp_path, shared_annotations):
    csv = shared_annotations / "charades_sta" / "Charades_v1_train.csv"
    txt = tmp_path / "bad.txt"
    txt.write_text("AO8RW 0.0 6.9##a person is putting a book on a shelf.\nAO8RW 0.0 x##bad number\n"
                   "AO8RW 1.0##missing end\nNOVID 0 1##unknown video\n")
    with pytest.raises(AnnotationError, match=r"bad.txt:2: .*end"):
        load_split(txt, durations=[csv])
    ann = load_split(txt, durations=[csv], on_error="skip")
    assert len(ann) == 1 and ann.report["malformed_skipped"] == 3
    assert [m.split(":")[1] for m in ann.report["malformed"]] == ["2", "3", "4"]


def test_clean_rejects_unknown_policy():
    with pytest.raises(ValueError, match="unknown cleaning policy"):
        clean([], "bogus")


# -- every other shared format ----------------------------------------------------------------

COUNTS = [  # (file, format, records, videos) from the shared README / the MESM notes
    ("charades_cd/charades_train.json", "grounding_json", 11071, 4564),
    ("charades_cd/charades_val.json", "grounding_json", 859, 333),
    ("charades_cd/charades_test_iid.json", "grounding_json", 823, 333),
    ("charades_cd/charades_test_ood.json", "grounding_json", 3375, 1442),
    ("charades_cg/train.json", "grounding_json", 8281, 3555),
    ("charades_cg/test_trivial.json", "grounding_json", 3096, 1689),
    ("charades_cg/novel_composition.json", "grounding_json", 3442, 2480),
    ("charades_cg/novel_word.json", "grounding_json", 695, 580),
    ("qvhighlights/highlight_train_release.jsonl", "qvhighlights", 7218, 7100),
    ("qvhighlights/highlight_val_release.jsonl", "qvhighlights", 1550, 1519),
    ("qvhighlights/highlight_test_release.jsonl", "qvhighlights", 1542, 1529),
    ("tacos/train.json", "tacos_json", 9790, 75),
    ("tacos/val.json", "tacos_json", 4436, 27),
    ("tacos/test.json", "tacos_json", 4001, 25),
    ("activitynet_captions/train.json", "grounding_json", 37421, 10009),
    ("activitynet_captions/val_1.json", "grounding_json", 17505, 4917),
    ("activitynet_captions/val_2.json", "grounding_json", 17031, 4885),
    ("msrvtt/MSRVTT_JSFUSION_test.csv", "msrvtt_csv", 1000, 1000),
]


@pytest.mark.parametrize("rel,fmt,n,videos", COUNTS, ids=[c[0] for c in COUNTS])
def test_every_shared_file_parses_with_published_counts(shared_annotations, rel, fmt, n, videos):
    ann = load_split(shared_annotations / rel, fmt, dataset=rel.split("/")[0], split="x")
    assert len(ann) == n and len(ann.video_ids()) == videos
    assert ann.report["malformed_skipped"] == 0


def test_charades_cd_uses_video_duration(shared_annotations):
    raw = json.loads((shared_annotations / "charades_cd/charades_val.json").read_text())
    vid, rec = next(iter(raw.items()))
    q = load_split(shared_annotations / "charades_cd/charades_val.json", "grounding_json")[0]
    assert (q.video_id, q.duration, list(q.moment)) == (vid, rec["video_duration"], rec["timestamps"][0])


def test_qvhighlights_fields_and_unlabelled_test(shared_annotations):
    val = load_split(shared_annotations / "qvhighlights/highlight_val_release.jsonl", "qvhighlights")
    q = val[0]
    assert q.qid == 2579 and q.duration == 150 and q.video_id == "NUsG9BgSes0_210.0_360.0"
    assert len(q.relevant_clip_ids) == len(q.saliency_scores) and len(q.saliency_scores[0]) == 3
    assert max(len(q.moments) for q in val) > 1  # several windows per query exist
    test = load_split(shared_annotations / "qvhighlights/highlight_test_release.jsonl", "qvhighlights",
                      cleaning="mmn")
    assert len(test) == 1542 and all(q.moments == () and q.saliency_scores is None for q in test)
    with pytest.raises(ValueError, match="no moment"):
        _ = test[0].moment


def test_tacos_frames_become_seconds_and_late_ends_are_counted(shared_annotations):
    raw = json.loads((shared_annotations / "tacos/test.json").read_text())
    vid, rec = next(iter(raw.items()))
    q = load_split(shared_annotations / "tacos/test.json", "tacos_json")[0]
    assert q.duration == pytest.approx(rec["num_frames"] / rec["fps"])
    assert q.moment == pytest.approx(tuple(t / rec["fps"] for t in rec["timestamps"][0]))
    for split, late in (("train", 43), ("test", 5)):
        ann = load_split(shared_annotations / f"tacos/{split}.json", "tacos_json", cleaning="mmn")
        assert ann.report["cleaning"]["end_clipped"] == late


def test_activitynet_quirks_per_policy(shared_annotations):
    path = shared_annotations / "activitynet_captions/train.json"
    mmn = load_split(path, "grounding_json", cleaning="mmn").report["cleaning"]
    mesm = load_split(path, "grounding_json", cleaning="mesm").report["cleaning"]
    cnm = load_split(path, "grounding_json", cleaning="cnm").report["cleaning"]
    assert mmn["dropped_reversed"] == 2 and mesm["swapped_reversed"] == 2
    assert cnm["dropped_not_increasing"] == 4  # 2 reversed + 2 zero-length


def test_msrvtt_lists_and_header_variant(shared_annotations, tmp_path):
    train9k = load_msrvtt_video_list(shared_annotations / "msrvtt/MSRVTT_train.9k.csv")
    test = load_split(shared_annotations / "msrvtt/MSRVTT_JSFUSION_test.csv", "msrvtt_csv")
    assert len(train9k) == 9000 and len(load_msrvtt_video_list(shared_annotations / "msrvtt/MSRVTT_train.7k.csv")) == 7010
    assert set(train9k).isdisjoint(q.video_id for q in test)
    assert (test[0].qid, test[0].video_id, test[0].sentence) == ("ret0", "video9770", "a person is connecting something to system")
    variant = tmp_path / "test.csv"
    variant.write_text("key,vid_key,video_id,sentences\nret0,msr1,video1,a cat\n")
    assert load_split(variant, "msrvtt_csv")[0].sentence == "a cat"


def test_msrvtt_data_json_keeps_split_captions_in_file_order(tmp_path):
    (tmp_path / "split.csv").write_text("video_id\nvideo0\nvideo2\n")
    data = {"info": {}, "videos": [], "sentences": [
        {"sen_id": 0, "video_id": "video0", "caption": "a"}, {"sen_id": 1, "video_id": "video1", "caption": "b"},
        {"sen_id": 2, "video_id": "video2", "caption": "c"}, {"sen_id": 3, "video_id": "video0", "caption": "d"}]}
    (tmp_path / "data.json").write_text(json.dumps(data))
    ann = load_split(tmp_path / "data.json", "msrvtt_json", durations=[tmp_path / "split.csv"])
    assert [(q.video_id, q.sentence) for q in ann] == [("video0", "a"), ("video2", "c"), ("video0", "d")]


MALFORMED = [  # (format, file content, what the error must name)
    ("grounding_json", {"v1": {"duration": 10, "timestamps": [[0, 1]], "sentences": ["a"]},
                        "v2": {"duration": 10, "timestamps": [[0, 1], [2, 3]], "sentences": ["a"]}}, "key 'v2'"),
    ("grounding_json", {"v1": {"timestamps": [[0, 1]], "sentences": ["a"]}}, "key 'v1': missing key 'duration'"),
    ("cpl_json", [["v1", 10, [0, 1], "a"], ["v2", 10, [0], "b"]], r"item \[1\]"),
    ("tacos_json", {"s1.avi": {"fps": 29.4, "num_frames": 100, "timestamps": [[0, "x"]], "sentences": ["a"]}},
     "key 's1.avi'"),
    ("qvhighlights", '{"qid": 1, "query": "a", "duration": 150, "vid": "x_0.0_150.0"}\n{"qid": 2, "query": "b"}\n',
     r"\.jsonl:2: missing key 'duration'"),
    ("qvhighlights", '{"qid": 1, "query": "a", "duration": 150, "vid": "x"}\n{not json\n', r"\.jsonl:2:"),
    ("video_captions", {"v1": "a cat", "v2": 3}, "key 'v2'"),
]


@pytest.mark.parametrize("fmt,content,named", MALFORMED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_records_name_file_and_key_or_skip_with_count(tmp_path, fmt, content, named):
    path = tmp_path / ("bad.jsonl" if fmt == "qvhighlights" else "bad.json")
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(AnnotationError, match=named):
        load_split(path, fmt)
    ann = load_split(path, fmt, on_error="skip")
    assert ann.report["malformed_skipped"] == 1 and str(path) in ann.report["malformed"][0]
    good = 0 if named.startswith("key 'v1'") or "s1.avi" in named else 1  # records left beside the bad one
    assert ann.report["records_read"] == len(ann) == good


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        load_split(tmp_path / "nope.txt", durations=["x.csv"])
    with pytest.raises(ValueError, match="unknown annotation format"):
        load_split(tmp_path, "bogus")


def test_malformed_csv_inputs(tmp_path):
    (tmp_path / "d.csv").write_text('id,length\nV1,12.5\nV2,"a, b"\n')
    (tmp_path / "q.txt").write_text("V1 0 1##a\n")
    with pytest.raises(AnnotationError, match=r"d.csv:3: .*expected a number"):
        load_split(tmp_path / "q.txt", durations=[tmp_path / "d.csv"])
    (tmp_path / "nolength.csv").write_text("id,subject\nV1,x\n")
    with pytest.raises(AnnotationError, match=r"nolength.csv:1: csv header has no 'length'"):
        load_split(tmp_path / "q.txt", durations=[tmp_path / "nolength.csv"])
    (tmp_path / "t.csv").write_text("key,vid_key,video_id,sentence\nret0,msr0,video0,a cat\nret1,msr1,,a dog\n")
    with pytest.raises(AnnotationError, match=r"t.csv:3: empty video_id"):
        load_split(tmp_path / "t.csv", "msrvtt_csv")
    assert load_split(tmp_path / "t.csv", "msrvtt_csv", on_error="skip").report["malformed_skipped"] == 1
    (tmp_path / "split.csv").write_text("video_id\nvideo0\n")
    (tmp_path / "data.json").write_text('{"sentences": [{"video_id": "video0", "caption": "a"}, {"caption": "b"}]}')
    with pytest.raises(AnnotationError, match=r"data.json: key 'sentences\[1\]'"):
        load_split(tmp_path / "data.json", "msrvtt_json", durations=[tmp_path / "split.csv"])


def test_charades_sta_without_csv_takes_the_given_video_durations(tmp_path):
    """Own videos: no Charades_v1 csv; the durations decode measured come in as {video id: seconds},
    and the cleaning policy clips with them like with the csv's `length`."""
    path = tmp_path / "train.txt"
    path.write_text("a 0.0 2.5##one.\nb 1.0 9.0##two.\n")
    queries = load_split(path, "charades_sta", video_durations={"a": 5.0, "b": 4.25}, cleaning="mmn")
    assert [(q.video_id, q.duration, q.moment) for q in queries] == [("a", 5.0, (0.0, 2.5)), ("b", 4.25, (1.0, 4.25))]
    assert queries.report["cleaning"]["end_clipped"] == 1
    with pytest.raises(AnnotationError, match=r"train.txt:2: video 'b' has no duration in decode's records"):
        load_split(path, "charades_sta", video_durations={"a": 5.0})
    with pytest.raises(AnnotationError, match="needs durations"):
        load_split(path, "charades_sta")
