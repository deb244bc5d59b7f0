"""`vmr export --format mesm|mmn|cnm|mrnet`: through the CLI, checked against the official files' structure
(the released MMN and CPL Charades json in ../shared) and read back with vmr's own parsers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.text.annotations import load_split
from pipeline.text.sentence_features import query_key, read_query_features
from pipeline.text.vocab import load_glove_pkl
from tests.support.toy import write_toy_data

WORDS = ["person", "does", "thing", ".", "a", "the"] + [str(i) for i in range(12)]


def toy_params(root: Path, **dataset) -> Path:
    """Toy Charades-STA data (6-d features in features/toy.h5), a tiny GloVe file, every model on `toy`."""
    data = write_toy_data(root / "data")
    (root / "glove.txt").write_text("".join(f"{w} {i}.5 -{i}.25 0.125\n" for i, w in enumerate(WORDS)))
    params = {
        "seed": 0,
        "dataset": {**data.model_dump(), **dataset},
        "merge": {"out_dir": str(root / "data" / "features")},
        "vocab": {"out_dir": str(root / "vocab"), "glove_file": str(root / "glove.txt"), "glove_dim": 3,
                  "splits": ["train", "test"]},
        "model": {"mmn": {"features": ["toy"]}, "mesm": {"features": ["toy"]}, "cnm": {"feature": "toy"},
                  "mrnet": {"feature": "toy", "query_feature": "query_toy"}},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def vmr(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    p = toy_params(root)
    for cmd in (["vocab"], ["query-features", "--model", "mrnet"]):
        result = vmr(*cmd, "--params", p)
        assert result.exit_code == 0, result.output
    return root


def exported(project: Path, fmt: str, *extra: str) -> Path:
    out = project / f"out_{fmt}"
    result = vmr("export", out, "--format", fmt, "--params", project / "params.yaml", *extra)
    assert result.exit_code == 0, result.output
    return out


def toy_queries(project: Path, split: str, cleaning: str):
    d = yaml.safe_load((project / "params.yaml").read_text())["dataset"]
    return load_split(d["splits"][split], "charades_sta", durations=d["durations"], cleaning=cleaning)


def as_tuples(queries):
    return [(q.video_id, q.duration, q.moments, q.sentence) for q in queries]


def assert_features_equal(exported_h5: Path, source_h5: Path):
    with h5py.File(exported_h5) as a, h5py.File(source_h5) as b:
        assert sorted(a) == sorted(b)
        for vid in b:
            assert isinstance(a[vid], h5py.Dataset) and a[vid].dtype == np.float32
            np.testing.assert_array_equal(a[vid][()], b[vid][()])


# -- the structure of the real files ---------------------------------------------------------------


def check_mmn_structure(ours: dict, real: dict) -> None:
    """Same nesting, key set and types as MMN's released charades json (seconds, floats)."""
    real_keys = {frozenset(r) for r in real.values()}
    assert real_keys == {frozenset({"duration", "timestamps", "sentences"})}
    for vid, rec in ours.items():
        assert isinstance(vid, str) and frozenset(rec) in real_keys
        assert isinstance(rec["duration"], float)
        assert len(rec["timestamps"]) == len(rec["sentences"]) >= 1
        assert all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, float) for x in t)
                   for t in rec["timestamps"])
        assert all(0 <= s <= e <= rec["duration"] for s, e in rec["timestamps"])  # MMN's ends are clipped
        assert all(isinstance(s, str) for s in rec["sentences"])


def check_cpl_structure(ours: list, real: list) -> None:
    def shape(item):
        vid, duration, moment, sentence = item
        return (type(vid), type(duration), type(moment), len(moment), type(moment[0]), type(moment[1]), type(sentence))

    assert {shape(x) for x in real} == {(str, float, list, 2, float, float, str)}
    assert {shape(x) for x in ours} == {(str, float, list, 2, float, float, str)}
    assert all(0 <= s < e <= d for _, d, (s, e), _ in ours)  # CPL's rule: only valid moments


def test_mmn_export_matches_mmn_json_and_round_trips(project, shared_annotations):
    out = exported(project, "mmn")
    base = out / "dataset" / "Charades_STA"
    real = json.loads((shared_annotations / "charades_sta" / "mmn" / "charades_test.json").read_text())
    for split in ("train", "test"):
        ours = json.loads((base / f"charades_{split}.json").read_text())
        check_mmn_structure(ours, real)
        back = load_split(base / f"charades_{split}.json", "grounding_json")
        assert as_tuples(back) == as_tuples(toy_queries(project, split, "mmn"))
    assert_features_equal(base / "toy.hdf5", project / "data" / "features" / "toy.h5")
    manifest = json.loads((out / "vmr_export.json").read_text())
    assert manifest["format"] == "mmn" and manifest["cleaning"] == "mmn"
    readme = (out / "README.txt").read_text()
    assert "paths_catalog.py" in readme and "FEATPOOL.INPUT_SIZE: 6" in readme


def test_cnm_export_matches_cpl_json_and_round_trips(project, shared_annotations):
    out = exported(project, "cnm")
    base = out / "data" / "charades"
    real = json.loads((shared_annotations / "charades_sta" / "cpl" / "test.json").read_text())
    for split in ("train", "test"):
        ours = json.loads((base / f"{split}.json").read_text())
        check_cpl_structure(ours, real)
        back = load_split(base / f"{split}.json", "cpl_json")
        assert as_tuples(back) == as_tuples(toy_queries(project, split, "cnm"))
    assert (base / "glove.pkl").read_bytes() == (project / "vocab" / "glove.pkl").read_bytes()
    assert set(load_glove_pkl(base / "glove.pkl")) == {"w2id", "id2vec", "counter"}
    assert_features_equal(base / "toy.hdf5", project / "data" / "features" / "toy.h5")
    readme = (out / "README.txt").read_text()
    assert '"feature_path": "data/charades/toy.hdf5"' in readme and '"frame_dim": 6' in readme
    assert '"word_dim": 3' in readme  # the tiny GloVe file's size, not CNM's default 300


def test_mesm_export_is_charades_sta_with_count_files_beside(project, shared_annotations):
    out = exported(project, "mesm")
    ann = out / "data" / "charades" / "annotations"
    real_txt = (shared_annotations / "charades_sta" / "charades_sta_test.txt").read_text().splitlines()
    line = re.compile(r"^\S+ \d+(\.\d+)? \d+(\.\d+)?##[^\n]*$")
    assert all(line.match(x) for x in real_txt)  # the pattern fits the real file ...
    real_header = (shared_annotations / "charades_sta" / "Charades_v1_test.csv").read_text().splitlines()[0]
    for split in ("train", "test"):
        txt = (ann / f"charades_sta_{split}.txt").read_text().splitlines()
        assert txt and all(line.match(x) for x in txt)  # ... and ours
        assert (ann / f"Charades_v1_{split}.csv").read_text().splitlines()[0] == real_header
        back = load_split(ann / f"charades_sta_{split}.txt", "charades_sta", durations=[ann / f"Charades_v1_{split}.csv"])
        assert as_tuples(back) == as_tuples(toy_queries(project, split, "none"))  # raw: MESM cleans on load
    for name in ("CLIP_tokenized_count.txt", "GloVe_tokenized_count.txt", "glove.pkl"):
        assert (ann / name).read_bytes() == (project / "vocab" / name).read_bytes()
    assert_features_equal(out / "data" / "charades" / "toy.hdf5", project / "data" / "features" / "toy.h5")
    assert '"feat_files": ["data/charades/toy.hdf5"]' in (out / "README.txt").read_text()


def test_mrnet_export_one_query_tensor_per_sentence(project, shared_annotations):
    out = exported(project, "mrnet")
    base = out / "dataset" / "Charades_STA"
    real = json.loads((shared_annotations / "charades_sta" / "mmn" / "charades_test.json").read_text())
    table = read_query_features(project / "data" / "features" / "query_toy.h5")
    stems = []
    for split in ("train", "test"):
        ours = json.loads((base / f"{split}_audio_new.json").read_text())
        check_mmn_structure({v: {k: r[k] for k in r if k != "audios"} for v, r in ours.items()}, real)
        for vid, rec in ours.items():
            assert len(rec["audios"]) == len(rec["sentences"])
            for name, sentence in zip(rec["audios"], rec["sentences"], strict=True):
                assert re.fullmatch(rf"{vid}_{split}_\d+\.wav", name)
                tensor = torch.load(base / "text_distbert_feat" / f"{name.split('.')[0]}.pt")
                assert tensor.shape == (1, 768) and tensor.dtype == torch.float32
                np.testing.assert_array_equal(tensor[0].numpy(), table[query_key(sentence)])
                stems.append(name)
        back = load_split(base / f"{split}_audio_new.json", "grounding_json")
        assert as_tuples(back) == as_tuples(toy_queries(project, split, "mmn"))
    assert len(set(stems)) == len(stems) == len(list((base / "text_distbert_feat").iterdir()))
    assert_features_equal(base / "video_features.hdf5", project / "data" / "features" / "toy.h5")


# -- exporting the real Charades-STA reproduces the released files ---------------------------------


def test_real_charades_sta_export_reproduces_mmn_and_cpl_files(tmp_path, shared_annotations):
    sta = shared_annotations / "charades_sta"
    durations = [str(sta / "Charades_v1_train.csv"), str(sta / "Charades_v1_test.csv")]
    vids = set()
    for split in ("train", "test"):
        vids |= {x.split()[0] for x in (sta / f"charades_sta_{split}.txt").read_text().splitlines() if x.strip()}
    (tmp_path / "features").mkdir()
    with h5py.File(tmp_path / "features" / "clip.h5", "w") as h5:  # 2 rows per video: the files are the point here
        for vid in sorted(vids):
            h5[vid] = np.ones((2, 3), np.float32)
    params = {"dataset": {"name": "charades_sta", "format": "charades_sta", "durations": durations,
                          "splits": {s: str(sta / f"charades_sta_{s}.txt") for s in ("train", "test")},
                          "video_captions": None},
              "merge": {"out_dir": str(tmp_path / "features")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = vmr("export", tmp_path / "mmn", "--format", "mmn", "--feature", "clip", "--params", tmp_path / "params.yaml")
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "mmn" / "dataset" / "Charades_STA" / "charades_train.json").read_text())
    assert ours == json.loads((sta / "mmn" / "charades_train.json").read_text())  # 12404 moments, same order
    ours = json.loads((tmp_path / "mmn" / "dataset" / "Charades_STA" / "charades_test.json").read_text())
    real = json.loads((sta / "mmn" / "charades_test.json").read_text())
    assert list(ours) == list(real)
    assert all(ours[v]["duration"] == real[v]["duration"] and ours[v]["timestamps"] == real[v]["timestamps"]
               for v in real)
    edited = [v for v in real if ours[v]["sentences"] != real[v]["sentences"]]
    assert len(edited) == 12  # MMN's test json corrects typos in 12 videos' sentences ("adn" -> "and")

    # CNM/CPL: the list format, cleaned with CPL's rule. Its glove.pkl check is the vocab stage's business:
    # give the export one so that only the annotation files differ.
    (tmp_path / "vocab").mkdir()
    from pipeline.text.vocab import build_glove_pkl, write_glove_pkl

    write_glove_pkl(tmp_path / "vocab" / "glove.pkl", build_glove_pkl(["a person"], {"a": np.ones(3, np.float32)}))
    result = vmr("export", tmp_path / "cnm", "--format", "cnm", "--feature", "clip", "--params", tmp_path / "params.yaml",
                 "--set", f"vocab.out_dir={tmp_path / 'vocab'}")
    assert result.exit_code == 0, result.output
    for split in ("train", "test"):
        ours = json.loads((tmp_path / "cnm" / "data" / "charades" / f"{split}.json").read_text())
        assert ours == json.loads((sta / "cpl" / f"{split}.json").read_text())  # 10602 / 3158, exactly


# -- refusals ------------------------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp-"))


def test_refuses_missing_inputs_and_leaves_nothing(tmp_path):
    p = toy_params(tmp_path)
    out = tmp_path / "out"
    result = vmr("export", out, "--format", "mrnet", "--params", p)
    assert result.exit_code == 2 and "vmr query-features --model mrnet" in result.output
    result = vmr("export", out, "--format", "cnm", "--params", p)  # no vocab yet
    assert result.exit_code == 2 and "glove.pkl" in result.output and "vmr vocab" in result.output
    result = vmr("export", out, "--format", "mmn", "--params", p, "--feature", "nope")
    assert result.exit_code == 2 and "vmr merge --feature nope" in result.output
    result = vmr("export", out, "--format", "timesformer", "--params", p)
    assert result.exit_code == 2 and "mesm" in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def test_refuses_missing_video_features_atomically(tmp_path):
    p = toy_params(tmp_path)
    with h5py.File(tmp_path / "data" / "features" / "toy.h5", "a") as h5:
        del h5["TE001"]
    result = vmr("export", tmp_path / "out", "--format", "mmn", "--params", p)
    assert result.exit_code == 2 and "TE001" in result.output and "vmr merge" in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_out_dir_replaced_only_when_an_earlier_export(tmp_path):
    p = toy_params(tmp_path)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    result = vmr("export", foreign, "--format", "mmn", "--params", p)
    assert result.exit_code == 2 and "not empty" in result.output
    assert [x.name for x in foreign.iterdir()] == ["keep.txt"]
    out = tmp_path / "out"
    assert vmr("export", out, "--format", "mmn", "--params", p).exit_code == 0
    (out / "dataset" / "Charades_STA" / "stale.json").write_text("{}")
    result = vmr("export", out, "--format", "mmn", "--params", p, "--cleaning", "none")
    assert result.exit_code == 0, result.output
    assert not (out / "dataset" / "Charades_STA" / "stale.json").exists()
    assert json.loads((out / "vmr_export.json").read_text())["cleaning"] == "none"
    assert leftovers(tmp_path) == []


def test_refuses_vocab_made_for_another_dataset(tmp_path):
    p = toy_params(tmp_path)
    assert vmr("vocab", "--params", p).exit_code == 0
    result = vmr("export", tmp_path / "out", "--format", "cnm", "--params", p, "--set", "dataset.name=other")
    assert result.exit_code == 2 and "another `dataset`" in result.output and "vmr vocab" in result.output


def test_sentence_the_txt_cannot_hold_is_refused(tmp_path):
    p = toy_params(tmp_path)
    train = tmp_path / "data" / "train.txt"
    train.write_text(train.read_text().replace("person does thing 0.", "person does # thing\u2028 0."))
    assert vmr("vocab", "--params", p).exit_code == 0
    assert vmr("export", tmp_path / "ok", "--format", "mesm", "--params", p).exit_code == 0  # '#' alone is fine
    d = yaml.safe_load(p.read_text())
    d["dataset"]["format"] = "grounding_json"
    (tmp_path / "bad.json").write_text(json.dumps({"TR000": {"duration": 20.0, "timestamps": [[1.0, 2.0]],
                                                             "sentences": ["a ## b"]}}))
    d["dataset"]["splits"] = {"train": str(tmp_path / "bad.json")}
    d["vocab"]["splits"] = ["train"]
    p.write_text(yaml.safe_dump(d))
    assert vmr("vocab", "--params", p).exit_code == 0
    result = vmr("export", tmp_path / "bad", "--format", "mesm", "--params", p)
    assert result.exit_code == 2 and "'##'" in result.output and not (tmp_path / "bad").exists()


def test_mrnet_names_without_dots_and_collisions_refused(tmp_path):
    """MRNet keeps a query file's name up to the first '.': dotted ids are renamed, and two ids that
    would then share names are refused."""
    from pipeline.export import ExportError, export
    from pipeline.text.annotations import Query
    from pipeline.text.sentence_features import write_query_features

    with h5py.File(tmp_path / "f.h5", "w") as h5:
        for vid in ("s30-d52.avi", "s30-d52_avi"):
            h5[vid] = np.ones((4, 2), np.float32)
    write_query_features(tmp_path / "q.h5", ["a b", "c d"], np.eye(2, 3, dtype=np.float32))
    queries = [Query("x", "test", "s30-d52.avi", 9.0, ((1.0, 2.0),), "a b", 0)]
    export("mrnet", tmp_path / "ok", {"test": queries}, {"f": tmp_path / "f.h5"}, query_features=tmp_path / "q.h5")
    ann = json.loads((tmp_path / "ok" / "dataset" / "Charades_STA" / "test_audio_new.json").read_text())
    assert ann["s30-d52.avi"]["audios"] == ["s30-d52_avi_test_1.wav"]
    assert (tmp_path / "ok" / "dataset" / "Charades_STA" / "text_distbert_feat" / "s30-d52_avi_test_1.pt").is_file()
    queries.append(Query("x", "test", "s30-d52_avi", 9.0, ((1.0, 2.0),), "c d", 1))
    with pytest.raises(ExportError, match="same MRNet query file"):
        export("mrnet", tmp_path / "bad", {"test": queries}, {"f": tmp_path / "f.h5"}, query_features=tmp_path / "q.h5")
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []


# -- your own videos: durations from decode's records ------------------------------------------------

OWN_DURATIONS = {"kitchen01": 5.25, "hall02": 4.125, "yard03": 6.5}  # as decode writes durations.json
OWN_TRAIN = "kitchen01 0.0 2.5##a person opens the fridge.\nhall02 1.0 4.0##a person sits on the chair.\n"
OWN_TEST = "yard03 0.5 3.0##a person opens the door.\n"


@pytest.fixture(scope="module")
def own_project(tmp_path_factory) -> Path:
    """A clone with profiles/own_data.yaml's files: Charades-STA txt without any duration csv,
    decode's durations.json (written here instead of decoding), a tiny flat features/clip.h5."""
    from pipeline.core.codedeps import REPO_ROOT

    root = tmp_path_factory.mktemp("own")
    (root / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    (root / "profiles").mkdir()
    (root / "profiles" / "own_data.yaml").write_text((REPO_ROOT / "profiles" / "own_data.yaml").read_text())
    own = root / "data" / "own"
    (own / "videos").mkdir(parents=True)
    (own / "train.txt").write_text(OWN_TRAIN)
    (own / "test.txt").write_text(OWN_TEST)
    (root / "work" / "frames").mkdir(parents=True)
    (root / "work" / "frames" / "durations.json").write_text(json.dumps(OWN_DURATIONS))
    (root / "features").mkdir()
    rng = np.random.default_rng(0)
    with h5py.File(root / "features" / "clip.h5", "w") as h5:
        for vid, seconds in OWN_DURATIONS.items():
            h5[vid] = rng.normal(size=(int(seconds), 4)).astype(np.float32)
    (root / "glove.txt").write_text("".join(f"{w} {i}.5 -{i}.25 0.125\n" for i, w in enumerate(
        "a person opens the fridge sits on chair door .".split())))
    return root


def own_vmr(root: Path, *args: str, monkeypatch):
    monkeypatch.chdir(root)  # the profile's paths are relative, as in a clone
    return vmr(*args, "--profile", "profiles/own_data.yaml", "--set", "vocab.glove_file=glove.txt",
               "--set", "vocab.glove_dim=3", "--set", "vocab.splits=[train, test]")


def test_own_data_exports_with_decoded_durations_in_every_format(own_project, monkeypatch):
    """issue 19: the official code trained on vmr's features of one's own videos. Every format reads
    the durations decode measured (MESM's Charades_v1 csv `length` too); none is invented."""
    for cmd in (["vocab"], ["query-features", "--model", "mrnet"]):
        result = own_vmr(own_project, *cmd, monkeypatch=monkeypatch)
        assert result.exit_code == 0, result.output
    durations_of = {}
    for fmt in ("mesm", "mmn", "cnm", "mrnet"):
        result = own_vmr(own_project, "export", f"out_{fmt}", "--format", fmt, monkeypatch=monkeypatch)
        assert result.exit_code == 0, result.output
        out = own_project / f"out_{fmt}"
        manifest = json.loads((out / "vmr_export.json").read_text())
        assert manifest["sources"]["durations"] == ["work/frames/durations.json"]
        assert {s: v["queries"] for s, v in manifest["splits"].items()} == {"train": 2, "test": 1}
        got = {}
        for split in ("train", "test"):
            if fmt == "mesm":
                ann = out / "data" / "charades" / "annotations"
                queries = load_split(ann / f"charades_sta_{split}.txt", "charades_sta",
                                     durations=[ann / f"Charades_v1_{split}.csv"])
                got |= {q.video_id: q.duration for q in queries}
            elif fmt == "cnm":
                got |= {vid: d for vid, d, _, _ in json.loads((out / "data" / "charades" / f"{split}.json").read_text())}
            else:
                name = f"charades_{split}.json" if fmt == "mmn" else f"{split}_audio_new.json"
                videos = json.loads((out / "dataset" / "Charades_STA" / name).read_text())
                got |= {vid: rec["duration"] for vid, rec in videos.items()}
        durations_of[fmt] = got
    assert all(got == OWN_DURATIONS for got in durations_of.values()), durations_of


def test_own_data_export_without_decode_records_names_the_file(own_project, tmp_path, monkeypatch):
    import shutil

    clone = tmp_path / "clone"
    shutil.copytree(own_project, clone, ignore=shutil.ignore_patterns("out_*"))
    (clone / "work" / "frames" / "durations.json").unlink()
    result = own_vmr(clone, "export", "out", "--format", "mmn", monkeypatch=monkeypatch)
    assert result.exit_code == 2
    assert "key 'dataset.durations (empty: decode's records)': input file not found: work/frames/durations.json" \
        in result.output
    assert not (clone / "out").exists()
