"""Parsers and cleaning policies on the real shared annotation files (counts from their READMEs)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from pipeline.annotations import AnnotationError, Query, clean, load_msrvtt_video_list, load_split


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
        diff = [(a.sentence, b.sentence) for a, b in zip(ours, theirs) if a.sentence != b.sentence]
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
