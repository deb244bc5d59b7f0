"""Vocabulary files: MESM's published count files, CPL's glove.pkl rebuilt byte for byte, safe loading."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest

from pipeline.nets.clip import bpe_tokenizer
from pipeline.text.annotations import load_split
from pipeline.text.vocab import (
    GloveError,
    GlovePickleError,
    build_glove_pkl,
    clip_token_counts,
    dumps_glove_pkl,
    format_clip_counts,
    format_glove_counts,
    glove_word_counts,
    load_glove_pkl,
    pos_tagger_name,
    pos_weights,
    read_glove_text,
    word_tokenize,
    write_glove_pkl,
)


def _charades_sentences(shared, policy):
    d = shared / "charades_sta"
    out = []
    for split in ("train", "test"):  # MESM and CPL both counted train then test
        ann = load_split(d / f"charades_sta_{split}.txt", durations=[d / "Charades_v1_train.csv", d / "Charades_v1_test.csv"],
                         cleaning=policy)
        out += [q.sentence for q in ann]
    return out


def test_mesm_count_files_reproduced(shared_annotations):
    sentences = _charades_sentences(shared_annotations, "mesm")  # MESM skipped starts past the duration
    clip = format_clip_counts(clip_token_counts(sentences)).splitlines()
    assert len(clip) == 1354 and clip[0] == "269 16139"  # '.' ; SOT/EOT never counted
    assert not any(line.split()[0] in ("49406", "49407") for line in clip)
    glove = format_glove_counts(glove_word_counts(sentences)).splitlines()
    assert len(glove) == 1268 and glove[:2] == ["person 772 16074", "a 6 12667"]


def test_clip_counts_cut_each_sentence_before_counting():
    sentences = ["a dog runs.", "a dog, a cat"]  # BPE: a dog runs . / a dog , a cat
    counts = clip_token_counts(sentences, max_pieces=3)
    assert counts == Counter(i for s in sentences for i in bpe_tokenizer().encode(s)[:3])
    assert format_clip_counts(counts) == "320 2\n1929 2\n5586 1\n267 1\n"  # ties: first appearance


@pytest.fixture(scope="module")
def cpl_reference(reference_data):
    return load_glove_pkl(reference_data / "glove" / "charades_glove_cpl.pkl")


def _glove_text_from(pkl, path, extra_words=()):
    """A GloVe text file holding exactly the reference vectors (shortest float32 repr round-trips)."""
    lines = [w + " " + " ".join(np.format_float_positional(x, unique=True) for x in pkl["id2vec"][i])
             for w, i in pkl["w2id"].items() if i]
    lines += [w + " " + " ".join(["0.5"] * 300) for w in extra_words]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cpl_glove_pkl_rebuilt_byte_for_byte(shared_annotations, reference_data, cpl_reference, tmp_path):
    glove_file = _glove_text_from(cpl_reference, tmp_path / "glove.txt", extra_words=["unusedword"])
    sentences = _charades_sentences(shared_annotations, "cnm")  # CPL's filtered train (10602) + test (3158)
    ours = build_glove_pkl(sentences, read_glove_text(glove_file, 300))
    assert list(ours["w2id"].items()) == list(cpl_reference["w2id"].items())
    assert list(ours["counter"].items()) == list(cpl_reference["counter"].items())  # values and tie order
    assert all(a.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(ours["id2vec"], cpl_reference["id2vec"], strict=True))
    # punkt (absent here) would only matter for a period inside a query; there is none in these sentences,
    # so NLTKWordTokenizer alone gives exactly word_tokenize's tokens and the file is identical
    assert not any(". " in s.strip() for s in sentences)
    assert dumps_glove_pkl(ours) == (reference_data / "glove" / "charades_glove_cpl.pkl").read_bytes()


def test_glove_pkl_roundtrip_and_numpy1_names(tmp_path):
    obj = build_glove_pkl(["A cat sits.", "the cat"], {w: np.full(3, i, np.float32) for i, w in enumerate(["a", "cat", "sits", ".", "the"])})
    assert obj["w2id"] == {"<PAD>": 0, "a": 1, "cat": 2, "sits": 3, ".": 4, "the": 5}
    assert obj["counter"] == Counter({"cat": 2, "a": 1, "sits": 1, ".": 1, "the": 1})
    write_glove_pkl(tmp_path / "g.pkl", obj)
    data = (tmp_path / "g.pkl").read_bytes()
    assert b"numpy.core.multiarray" in data and b"numpy._core" not in data  # loads under numpy 1.x too
    back = load_glove_pkl(tmp_path / "g.pkl")
    assert back["w2id"] == obj["w2id"] and np.array_equal(back["id2vec"][2], obj["id2vec"][2])


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"w2id": {}, "id2vec": [_Exploit()], "counter": Counter()}))
    with pytest.raises(GlovePickleError, match=r"refusing to load '(posix|os|nt)\.system'"):
        load_glove_pkl(bad)
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"w2id": {"<PAD>": 0}}))
    with pytest.raises(GlovePickleError, match="keys w2id, id2vec, counter"):
        load_glove_pkl(wrong)
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x03not a pickle")
    with pytest.raises(GlovePickleError, match="not a readable pickle"):
        load_glove_pkl(tmp_path / "junk.pkl")


def test_glove_text_errors_name_the_line(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("a 1 2 3\nb 1 x 3\n")
    with pytest.raises(GloveError, match=r"g.txt:2: word 'b'"):
        read_glove_text(path, 3)
    path.write_text("a 1 2 3\nb 1 2\n")
    with pytest.raises(GloveError, match=r"g.txt:2: expected a word and 3 numbers"):
        read_glove_text(path, 3)
    path.write_text("a 1 2 3\nx y 4 5 6\n")  # 840B-style words with spaces keep the last `dim` fields
    assert set(read_glove_text(path, 3)) == {"a", "x y"}


def test_tokenizer_and_pos_weights():
    assert word_tokenize("person opens the door, isn't he?") == ["person", "opens", "the", "door", ",", "is", "n't", "he", "?"]
    weights = pos_weights(["a", "person", "is", "quickly", "opening", "the", "big", "door", "."])
    assert weights == [1, 2, 2, 2, 2, 1, 2, 2, 1]
    assert "nltk" in pos_tagger_name() or "fallback" in pos_tagger_name()
