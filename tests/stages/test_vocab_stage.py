"""The `vocab` stage end to end on a tiny Charades-format dataset, through the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.text.vocab import load_glove_pkl


@pytest.fixture()
def tiny_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "train.txt").write_text("V1 0.0 5.0##a person opens the door.\nV1 6.0 12.0##person sits down.\n"
                                   "V2 2.0 1.0##reversed moment.\nV2 1.0 30.0##the person runs past the end.\n")
    (ann / "test.txt").write_text("V3 0.0 3.0##a dog barks.\n")
    (ann / "durations.csv").write_text('id,length\nV1,20.5\nV2,"10.0"\nV3,8.0\n')
    words = ["a", "person", "opens", "the", "door", ".", "sits", "down", "runs", "past", "end", "dog", "barks"]
    (tmp_path / "glove.txt").write_text("".join(f"{w} {i}.5 -{i}.25 0.125\n" for i, w in enumerate(words)))
    params = {
        "dataset": {"name": "tiny", "format": "charades_sta", "video_dir": "videos", "cleaning": "mmn",
                    "splits": {"train": "ann/train.txt", "test": "ann/test.txt"}, "durations": ["ann/durations.csv"]},
        "vocab": {"out_dir": "vocab", "glove_file": "glove.txt", "glove_dim": 3},
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    return tmp_path


def test_vocab_stage_writes_seed_formats_and_report(tiny_dataset):
    result = CliRunner().invoke(app, ["vocab"])
    assert result.exit_code == 0, result.output
    out = tiny_dataset / "vocab"
    glove_counts = (out / "GloVe_tokenized_count.txt").read_text().splitlines()
    # kept words, alphabetical from 2: a door down end opens past person (the reversed line is dropped)
    assert glove_counts[0] == "person 8 3"
    clip = [line.split() for line in (out / "CLIP_tokenized_count.txt").read_text().splitlines()]
    assert all(len(x) == 2 and x[0].isdigit() for x in clip) and int(clip[0][1]) >= int(clip[-1][1])
    pkl = load_glove_pkl(out / "glove.pkl")
    assert list(pkl["w2id"])[:4] == ["<PAD>", "a", "person", "opens"] and "dog" not in pkl["w2id"]  # train only
    report = json.loads((out / "vocab_report.json").read_text())
    assert report["splits"] == ["train"] and report["sentences"] == 3
    assert report["annotations"]["train"]["cleaning"] == {"policy": "mmn", "dropped_reversed": 1, "end_clipped": 1,
                                                         "queries_dropped": 1}
    assert report["glove_missing_words"] == [] and report["glove_pkl_words"] == 11  # incl. "."
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "vocab" and prov["params"]["vocab"]["splits"] == ["train"] and prov["pos_tagger"]


def test_vocab_stage_train_and_test_and_errors(tiny_dataset):
    runner = CliRunner()
    result = runner.invoke(app, ["vocab", "--set", "vocab.splits=[train, test]", "--set", "vocab.glove_file=null"])
    assert result.exit_code == 0, result.output
    assert "dog" in (tiny_dataset / "vocab" / "GloVe_tokenized_count.txt").read_text()
    assert not (tiny_dataset / "vocab" / "glove.pkl").exists()
    result = runner.invoke(app, ["vocab", "--set", "vocab.splits=[val]"])
    assert result.exit_code == 2 and "vocab.splits" in result.output
    (tiny_dataset / "ann" / "train.txt").write_text("V1 0.0 5.0 missing separator\n")
    result = runner.invoke(app, ["vocab"])
    assert result.exit_code == 2 and "train.txt:1" in result.output


def test_the_synthetic_glove_file_is_refused_for_another_dataset(tiny_dataset):
    """A new user's run once read `data/synth/glove.synthetic.300d.txt`, the synthetic default's
    random vectors, for real videos: outside the synthetic dataset that file is an error naming the key."""
    synth = tiny_dataset / "data" / "synth"
    synth.mkdir(parents=True)
    (synth / "glove.synthetic.3d.txt").write_text((tiny_dataset / "glove.txt").read_text())
    runner = CliRunner()
    result = runner.invoke(app, ["vocab", "--set", "vocab.glove_file=data/synth/glove.synthetic.3d.txt"])
    assert result.exit_code == 2 and "vocab.glove_file" in result.output and "synthetic" in result.output
    result = runner.invoke(app, ["vocab", "--set", "vocab.glove_file=data/synth/glove.synthetic.3d.txt",
                                 "--set", "dataset.name=synthetic"])
    assert result.exit_code == 0, result.output


def test_durations_from_decode_records(tiny_dataset):
    """No duration csv (`dataset.durations: []`): the durations decode measured, read from the frame
    store, and recorded as an input of the vocabulary."""
    frames = tiny_dataset / "work" / "frames"
    frames.mkdir(parents=True)
    (frames / "durations.json").write_text(json.dumps({"V1": 20.5, "V2": 10.0, "V3": 8.0}))
    result = CliRunner().invoke(app, ["vocab", "--set", "dataset.durations=[]"])
    assert result.exit_code == 0, result.output
    report = json.loads((tiny_dataset / "vocab" / "vocab_report.json").read_text())
    assert report["annotations"]["train"]["cleaning"]["end_clipped"] == 1  # V2's 30.0 clipped to 10.0
    prov = json.loads((tiny_dataset / "vocab" / "provenance.json").read_text())
    assert prov["inputs"]["durations"]["path"].endswith("durations.json")
