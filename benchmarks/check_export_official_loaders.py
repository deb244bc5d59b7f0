"""Load `vmr export`'s output with the official repositories' own, unmodified data loaders and compare
every value they produce with vmr's.

    python benchmarks/check_export_official_loaders.py --mmn CHECKOUT --mrnet CHECKOUT \
        --mesm CHECKOUT --cnm CHECKOUT [--work DIR] [--out results.json]

Pass any subset of the four checkouts (a git clone, or `git archive` of one) at the pinned commits:

    MMN    MCG-NJU/MMN    e694e69d218acd2ee86ddc0b256e9570fd01693f   make_data_loader -> CharadesDataset
    MRNet  xian-sh/MRNet  53432f54fdaf8599dde19048be26b4ad480b6f9e   CharadesDataset + BatchCollator
    MESM   lntzm/MESM     8501bdea711b7897952ed2bdacf2883665c0950b   CharadesDataset (CLIP and GloVe-pkl) + collate
    CNM    minghangz/cnm  5ccb192fa21691705fe07bfea4d95757cef2e3b9   CharadesSTA + its collate

What it does:
1. Writes a tiny Charades-STA-format dataset with the quirks the loaders treat differently (a reversed
   moment, an end past the duration, a start past the duration, a video id with a dot, videos shorter
   and longer than the loaders' clip counts), random features, a tiny GloVe file; runs `vmr vocab`,
   `vmr query-features --model mrnet` and `vmr export --format F` for each format.
2. For each checkout, a separate Python process imports the official dataset class from the checkout,
   loads the export, iterates every item through the official collate function, and saves what came
   out. Nothing of the official code is edited. What the process adds around it, and why:
   - MMN imports `torchtext`, MRNet `librosa` and MESM `pandas` at module level, used only by code the
     Charades loaders never run (GloVe / audio encoding / a markdown helper); an empty stand-in module
     is registered for each that is not installed (torchtext no longer builds against current torch).
   - MMN's loader calls `DistilBertTokenizer.from_pretrained("distilbert-base-uncased")`; without the
     internet a local folder of that name is made holding a WordPiece vocabulary of the exported
     sentences' words, so the token ids are not the real model's (the check decodes them back to
     the sentence instead).
   - MESM and CNM call nltk's `word_tokenize` and `pos_tag`, whose data (punkt_tab,
     averaged_perceptron_tagger_eng) is a download; where it is not installed a stand-in is written
     (empty punkt parameters; a tagger that tags vmr's closed-class words DT and everything else NN),
     so POS weights are not compared.
   - MMN's `paths_catalog.py` names `./dataset/Charades_STA/vgg_rgb_features.hdf5`: the run folder
     links that name to the exported feature file (what a user does by editing the catalog).
3. Compares: moments, durations, sentences and their order (after each loader's own cleaning,
   against vmr's cleaning policy of the same name), video features after each loader's own
   normalisation and resampling (against vmr's `pipeline.media.features` conventions; CNM's also
   against the items of vmr's CNM dataset, the model's own input), MRNet's
   query tensors (against vmr's query-feature file), MESM's count-file vocabularies and CNM's
   glove.pkl vocabulary and word vectors (against vmr's vocab files). Prints a table; exit 1 when a
   comparison fails, 2 when a loader could not run.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import pickle
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PINNED = {
    "mmn": ("MCG-NJU/MMN", "e694e69d218acd2ee86ddc0b256e9570fd01693f"),
    "mrnet": ("xian-sh/MRNet", "53432f54fdaf8599dde19048be26b4ad480b6f9e"),
    "mesm": ("lntzm/MESM", "8501bdea711b7897952ed2bdacf2883665c0950b"),
    "cnm": ("minghangz/cnm", "5ccb192fa21691705fe07bfea4d95757cef2e3b9"),
}
FEATURE = "toy"
DIM = 8
MMN_PRE_CLIPS, MMN_CLIPS = 32, 16  # configs/pool_charades_16x16_k5l8.yaml
MESM_MAX_VIDEO_L = 24  # smaller than the config's 194 so that the long toy videos take MESM's pooling path
CNM_FRAMES = 200  # config/charades/i3d_features.json max_num_frames

# (video id, duration, [(start, end, sentence), ...]); the quirks each loader treats its own way
TRAIN = [
    ("AO8RW", 33.67, [(0.0, 6.9, "a person is putting a book on a shelf."), (5.1, 12.0, "person opens the door.")]),
    ("Y6R7T", 21.0, [(20.8, 30.0, "person begins to play on a phone."),  # end past the duration
                     (8.0, 7.0, "the person sits down.")]),  # reversed: MMN drops, MESM swaps, CNM drops
    ("KX9QF", 12.5, [(13.0, 14.0, "a person walks past the end."),  # starts after the end of the video
                     (1.0, 4.5, "person holds a cup of coffee.")]),
    ("S01.avi", 48.0, [(2.0, 9.0, "a person cooks at the stove."), (9.0, 30.0, "person eats the food."),
                       (30.0, 47.5, "the person washes a dish.")]),
    ("L0NG1", 180.0, [(100.0, 170.0, "person runs around the room.")]),
    ("SH0RT", 4.0, [(1.5, 3.5, "a person laughs.")]),
]
TEST = [
    ("3MSZA", 30.96, [(24.3, 30.4, "person turn a light on."), (24.3, 30.4, "person flipped the light switch near the door.")]),
    ("AMT7R", 30.08, [(4.3, 12.5, "a person is putting a picture onto the wall."), (1.0, 40.0, "person walks in.")]),
]
ROWS_PER_SECOND = 1.0


# == step 1: the vmr side ===========================================================================


def write_dataset(root: Path) -> Path:
    import h5py
    import yaml

    rng = np.random.default_rng(0)
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(exist_ok=True)
    csv = ["id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"]
    words = set()
    with h5py.File(root / "features" / f"{FEATURE}.h5", "w") as h5:
        for split, videos in (("train", TRAIN), ("test", TEST)):
            lines = []
            for vid, duration, queries in videos:
                csv.append(f"{vid},P,room,5,6,Yes,,,,,{duration}")
                rows = max(2, int(duration * ROWS_PER_SECOND))
                h5[vid] = rng.normal(size=(rows, DIM)).astype(np.float32)
                for s, e, sentence in queries:
                    lines.append(f"{vid} {s} {e}##{sentence}")
                    words |= set(sentence.lower().replace(".", " . ").split())
            (ann / f"charades_sta_{split}.txt").write_text("\n".join(lines) + "\n")
    (ann / "Charades_v1.csv").write_text("\n".join(csv) + "\n")
    glove = "".join(f"{w} " + " ".join(f"{x:.4f}" for x in rng.normal(size=3)) + "\n" for w in sorted(words))
    (root / "glove.txt").write_text(glove)
    params = {
        "seed": 0,
        "dataset": {"name": "check", "format": "charades_sta", "video_dir": str(root / "videos"), "cleaning": "none",
                    "splits": {s: str(ann / f"charades_sta_{s}.txt") for s in ("train", "test")},
                    "durations": [str(ann / "Charades_v1.csv")], "video_captions": None},
        "merge": {"out_dir": str(root / "features")},
        "vocab": {"out_dir": str(root / "vocab"), "glove_file": str(root / "glove.txt"), "glove_dim": 3,
                  "splits": ["train", "test"]},
        "model": {"mmn": {"features": [FEATURE]}, "mesm": {"features": [FEATURE]}, "cnm": {"feature": FEATURE},
                  "mrnet": {"feature": FEATURE, "query_feature": "query_check"}},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def vmr(*args) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], check=True, env=env, cwd=REPO)


# == step 2: the official side (runs in its own process, the checkout first on sys.path) ============


def _stand_in_module(name: str) -> None:
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers probes find_spec()
        sys.modules[name] = module
        print(f"  [{name} not installed: an empty stand-in module is registered; the Charades loader never uses it]")


def _stand_in_nltk_data(run_dir: Path) -> None:
    import nltk

    try:
        nltk.pos_tag(nltk.word_tokenize("a person."))
        return
    except LookupError:
        pass
    sys.path.insert(0, str(REPO))
    from pipeline.text.vocab import _CLOSED_CLASS

    data = run_dir / "nltk_data"
    punkt = data / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).write_text("")
    tagger = data / "taggers" / "averaged_perceptron_tagger_eng"
    tagger.mkdir(parents=True, exist_ok=True)
    stem = tagger / "averaged_perceptron_tagger_eng"
    Path(f"{stem}.weights.json").write_text("{}")
    Path(f"{stem}.tagdict.json").write_text(json.dumps({w: "DT" for w in _CLOSED_CLASS}))
    Path(f"{stem}.classes.json").write_text(json.dumps(["DT", "NN"]))
    nltk.data.path.insert(0, str(data))
    sys.path.remove(str(REPO))
    print("  [nltk data not installed: stand-in punkt (no abbreviations) and tagger (closed-class words DT, else NN)]")


def _local_bert_vocab(run_dir: Path, sentences) -> None:
    import re

    words = sorted({w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    folder = run_dir / "distilbert-base-uncased"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    print("  [distilbert-base-uncased: a local WordPiece vocabulary of the exported words (no internet)]")


def worker_mmn(repo: Path, export: Path, run_dir: Path) -> dict:
    base = export / "dataset" / "Charades_STA"
    data = run_dir / "dataset" / "Charades_STA"
    data.mkdir(parents=True)
    for split in ("train", "test"):
        (data / f"charades_{split}.json").symlink_to(base / f"charades_{split}.json")
    feat = json.loads((export / "vmr_export.json").read_text())["files"]["feat_file"]
    (data / "vgg_rgb_features.hdf5").symlink_to(export / feat)
    sentences = [s for split in ("train", "test")
                 for r in json.loads((base / f"charades_{split}.json").read_text()).values() for s in r["sentences"]]
    _local_bert_vocab(run_dir, sentences)
    _stand_in_module("torchtext")
    os.chdir(run_dir)
    from mmn.config import cfg
    from mmn.data import make_data_loader
    from transformers import DistilBertTokenizer

    cfg.merge_from_file(str(repo / "configs" / "pool_charades_16x16_k5l8.yaml"))
    cfg.merge_from_list(["DATALOADER.NUM_WORKERS", 0, "SOLVER.BATCH_SIZE", 2, "TEST.BATCH_SIZE", 2])
    tokenizer = DistilBertTokenizer.from_pretrained("distilbert-base-uncased")
    out = {}
    loaders = {"train": make_data_loader(cfg, is_train=True, is_distributed=False),
               "test": make_data_loader(cfg, is_train=False, is_distributed=False)[0]}
    for split, loader in loaders.items():
        items = {}
        ds = loader.dataset
        for batch, idxs in loader:
            for j, idx in enumerate(idxs):
                words = [tokenizer.decode(q[: int(n)], skip_special_tokens=True)
                         for q, n in zip(batch.queries[j], batch.wordlens[j], strict=True)]
                items[ds.get_vid(idx)] = {"duration": float(ds.get_duration(idx)), "sentences": ds.get_sentence(idx),
                                          "moments": batch.moments[j].tolist(), "feat": batch.feats[j].numpy(),
                                          "decoded": words, "iou2d": tuple(batch.all_iou2d[j].shape)}
        out[split] = items
    return out


def worker_mrnet(repo: Path, export: Path, run_dir: Path) -> dict:
    import torch

    _stand_in_module("librosa")
    from ret.data.collate_batch import BatchCollator
    from ret.data.datasets.charades import CharadesDataset

    base = export / "dataset" / "Charades_STA"
    files = json.loads((export / "vmr_export.json").read_text())["files"]
    out = {}
    for split in ("train", "test"):
        ds = CharadesDataset(audio_dir=str(export / files["audio_dir"]), ann_file=str(base / f"{split}_audio_new.json"),
                             feat_file=str(export / files["feat_file"]), num_pre_clips=MMN_PRE_CLIPS, num_clips=MMN_CLIPS)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=BatchCollator())
        items = {}
        for batch, idxs in loader:
            for j, idx in enumerate(idxs):
                items[ds.get_vid(idx)] = {"duration": float(ds.get_duration(idx)), "sentences": ds.get_sentence(idx),
                                          "moments": batch.moments[j].tolist(), "feat": batch.feats[j].numpy(),
                                          "queries": batch.queries[j].numpy()}
        out[split] = items
    return out


def worker_mesm(repo: Path, export: Path, run_dir: Path) -> dict:
    import open_clip
    import torch

    _stand_in_nltk_data(run_dir)
    _stand_in_module("pandas")  # utils/func_utils.py: only dict_to_markdown uses it
    from dataset.base import collate
    from dataset.charades import CharadesDataset

    np.random.seed(0)
    ann = export / "data" / "charades" / "annotations"
    feats = [str(export / f) for f in json.loads((export / "vmr_export.json").read_text())["files"]["feat_files"]]
    bpe = str(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
    with open(ann / "glove.pkl", "rb") as f:  # as MESM's runner.py loads it
        glove = pickle.load(f)
    out = {}
    for text in ("CLIP", "GloVeNLTK"):
        for split in ("train", "test"):
            ds = CharadesDataset(ann_path=str(ann), feat_files=feats, split=split, use_tef=True, clip_len=1.0,
                                 max_words_l=16, max_video_l=MESM_MAX_VIDEO_L, tokenizer_type=text,
                                 load_vocab_pkl=text == "GloVeNLTK", bpe_path=bpe, vocab=glove,
                                 normalize_video=True, contra_samples=2, recfw=True, vocab_size=1111,
                                 max_gather_size=-1)
            items = {}
            batch = [ds[i] for i in range(len(ds))]
            collate(batch)  # the official collate must take them
            for item in batch:
                items[item["video_id"]] = {"duration": float(item["duration"]), "sentences": item["sentence"],
                                           "moments": [list(map(float, m)) for m in item["moment"]],
                                           "feat": item["video_feat"].numpy(),
                                           "words_id": [w.numpy() if torch.is_tensor(w) else np.asarray(w)
                                                        for w in item["words_id"]]}
            out[f"{text}/{split}"] = items
            out[f"{text}/id2label"] = {str(k): v for k, v in ds.tokenizer.id2label.items()}
    return out


def worker_cnm(repo: Path, export: Path, run_dir: Path) -> dict:
    _stand_in_nltk_data(run_dir)
    from datasets.charades_sta import CharadesSTA

    files = json.loads((export / "vmr_export.json").read_text())["files"]
    with open(export / files["vocab_path"], "rb") as fp:  # as CNM's main_runner.py loads it
        vocab = pickle.load(fp)
    config = json.loads((repo / "config" / "charades" / "i3d_features.json").read_text())["dataset"]
    word_dim = len(vocab["id2vec"][0])
    args = {**config, "feature_path": str(export / files["feature_path"]), "frame_dim": DIM, "word_dim": word_dim}
    out = {}
    for split in ("train", "test"):
        ds = CharadesSTA(str(export / files[f"{split}_data"]), vocab, args)
        samples = [ds[i] for i in range(len(ds))]
        ds.collate_data(samples)  # the official collate must take them
        out[split] = [{"raw": s["raw"], "feat": s["frames_feat"], "words_id": s["words_id"],
                       "words_feat": np.stack(s["words_feat"])} for s in samples]
        out["keep_vocab"] = dict(ds.keep_vocab)
    return out


WORKERS = {"mmn": worker_mmn, "mrnet": worker_mrnet, "mesm": worker_mesm, "cnm": worker_cnm}


def run_worker(fmt: str, repo: Path, export: Path, run_dir: Path, dump: Path) -> tuple[bool, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(repo)  # the checkout only: its `utils`, `datasets`, `dataset` packages win
    cmd = [sys.executable, __file__, "--worker", fmt, "--repo", str(repo), "--export", str(export),
           "--run-dir", str(run_dir), "--dump", str(dump)]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True)
    log = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, log


# == step 3: compare ================================================================================


class Checks:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, fmt: str, what: str, ok: bool, detail: str = "") -> None:
        self.rows.append((fmt, what, "PASS" if ok else "FAIL", detail))


def vmr_queries(params_path: Path, cleaning: str) -> dict[str, dict[str, list]]:
    """{split: {vid: [(start, end, sentence), ...]}} and durations, with vmr's cleaning policy."""
    import yaml

    from pipeline.text.annotations import load_split

    d = yaml.safe_load(params_path.read_text())["dataset"]
    out = {}
    for split, path in d["splits"].items():
        videos: dict[str, dict] = {}
        for q in load_split(path, "charades_sta", durations=d["durations"], cleaning=cleaning):
            rec = videos.setdefault(q.video_id, {"duration": q.duration, "queries": []})
            rec["queries"].append((q.moment[0], q.moment[1], q.sentence))
        out[split] = videos
    return out


def _close(a, b, atol=1e-5) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, atol=atol))


def compare_grounding(checks, fmt, loaded, expected, video_feature, ordered=True):
    """Moments, durations, sentences (and their order when `ordered`) and features of every video."""
    for split, exp in expected.items():
        got = loaded[split]
        checks.add(fmt, f"{split}: videos", sorted(got) == sorted(exp), f"{len(got)} loaded, {len(exp)} expected")
        bad_q, bad_f = [], []
        for vid, rec in exp.items():
            if vid not in got:
                continue
            g = got[vid]
            ours = [(t, s, e) for s, e, t in rec["queries"]]
            theirs = [(t, s, e) for (s, e), t in zip(g["moments"], g["sentences"], strict=True)]
            if not ordered:
                ours, theirs = sorted(ours), sorted(theirs)
            same = ([t for t, _, _ in ours] == [t for t, _, _ in theirs]
                    and _close([m[1:] for m in ours], [m[1:] for m in theirs]))  # loaders hold float32 tensors
            if not same or abs(g["duration"] - rec["duration"]) > 1e-6:
                bad_q.append(vid)
            if not _close(g["feat"], video_feature(vid), atol=1e-5):
                bad_f.append(vid)
        n = sum(len(r["queries"]) for r in exp.values())
        checks.add(fmt, f"{split}: moments, durations, sentences", not bad_q, f"{n} queries; differ: {bad_q}")
        checks.add(fmt, f"{split}: video features as loaded", not bad_f, f"differ: {bad_f}")


def compare(fmt: str, dump: dict, work: Path, checks: Checks) -> None:
    import h5py

    from pipeline.media.features import add_tef, average_to_clips, cap_length, l2_normalize
    from pipeline.text.sentence_features import query_key, read_query_features
    from pipeline.text.vocab import load_glove_pkl, word_tokenize

    params = work / "params.yaml"
    with h5py.File(work / "features" / f"{FEATURE}.h5") as h5:
        raw = {vid: h5[vid][()] for vid in h5}

    if fmt == "mmn":
        # The json holds vmr's `mmn` policy (as MMN's own file: ends clipped, reversed moments dropped), which
        # keeps a moment starting after the video's end as (s, duration); MMN's loader skips s >= e
        exp = vmr_queries(params, "mmn")
        for videos in exp.values():
            for rec in videos.values():
                rec["queries"] = [q for q in rec["queries"] if q[0] < q[1]]
        compare_grounding(checks, fmt, dump, exp, lambda v: average_to_clips(l2_normalize(raw[v]), MMN_PRE_CLIPS))
        ok = all(["".join(d.split()) for d in g["decoded"]] == ["".join(t.lower().split()) for t in g["sentences"]]
                 for items in dump.values() for g in items.values())
        checks.add(fmt, "DistilBERT tokens decode back to the sentences", ok)
        ok = all(g["iou2d"][1:] == (MMN_CLIPS, MMN_CLIPS) for items in dump.values() for g in items.values())
        checks.add(fmt, f"one {MMN_CLIPS}x{MMN_CLIPS} IoU map per sentence", ok)
    elif fmt == "mrnet":
        exp = vmr_queries(params, "mmn")
        compare_grounding(checks, fmt, dump, exp, lambda v: average_to_clips(l2_normalize(raw[v]), MMN_PRE_CLIPS),
                          ordered=False)  # MRNet sorts a video's sentences by start time
        table = read_query_features(work / "features" / "query_check.h5")
        bad, sorted_ok = [], True
        for items in dump.values():
            for vid, g in items.items():
                rows = np.stack([table[query_key(s)] for s in g["sentences"]])
                if not _close(g["queries"], rows, atol=0):
                    bad.append(vid)
                starts = [m[0] for m in g["moments"]]
                sorted_ok &= starts == sorted(starts)
        checks.add(fmt, "query tensors = vmr query features, row per sentence", not bad, f"differ: {bad}")
        checks.add(fmt, "sentences sorted by start (MRNet's own order)", sorted_ok)
    elif fmt == "mesm":
        # MESM reads the raw txt and cleans it itself: drop start > duration, swap reversed, clamp ends
        exp = vmr_queries(params, "mesm")
        feature = lambda v: add_tef(cap_length(l2_normalize(raw[v]), MESM_MAX_VIDEO_L))  # noqa: E731
        for text in ("CLIP", "GloVeNLTK"):
            compare_grounding(checks, f"mesm/{text}", {s: dump[f"{text}/{s}"] for s in exp}, exp, feature,
                              ordered=False)  # MESM groups a video's queries sorted by start
        clip_lines = (work / "vocab" / "CLIP_tokenized_count.txt").read_text().split("\n")
        expected = {int(line.split()[0]): i for i, line in enumerate(x for x in clip_lines if x)}
        got = {int(k): v for k, v in dump["CLIP/id2label"].items() if k.isdigit()}
        checks.add("mesm", "CLIP count file -> MESM's label vocabulary", got == expected, f"{len(got)} tokens")
        pkl = load_glove_pkl(work / "vocab" / "glove.pkl")
        expected = {w: i for i, (w, _) in enumerate(pkl["counter"].most_common(1111))}
        got = {k: v for k, v in dump["GloVeNLTK/id2label"].items() if k != "<unknown>"}
        checks.add("mesm", "glove.pkl (pickle.load, numpy 2) -> MESM's label vocabulary", got == expected,
                   f"{len(got)} words")
    elif fmt == "cnm":
        exp = vmr_queries(params, "cnm")
        pkl = load_glove_pkl(work / "vocab" / "glove.pkl")
        keep = {w: i + 1 for i, (w, _) in enumerate(pkl["counter"].most_common(1111))}
        checks.add(fmt, "keep_vocab = glove.pkl counter.most_common(1111), ids from 1", dump["keep_vocab"] == keep,
                   f"{len(keep)} words")
        model_input = vmr_cnm_frames(params)
        for split, videos in exp.items():
            ours = [(vid, r["duration"], s, e, t) for vid, r in videos.items() for s, e, t in r["queries"]]
            theirs = [(v, d, s, e, t) for v, d, (s, e), t in (x["raw"] for x in dump[split])]
            # CNM's list is in annotation order, vmr's grouping above is by video: compare as multisets
            checks.add(fmt, f"{split}: [vid, duration, [s, e], sentence]", sorted(ours) == sorted(theirs),
                       f"{len(theirs)} queries")
            bad_f, bad_f64, bad_w = [], [], []
            for x in dump[split]:
                vid, sentence = x["raw"][0], x["raw"][3]
                if vid not in model_input[split] or not _close(x["feat"], model_input[split][vid]):
                    bad_f.append(vid)
                if not _close(x["feat"], _average_float64_edges(raw[vid], CNM_FRAMES)):
                    bad_f64.append(vid)
                words = [w for w in (t.lower() for t in word_tokenize(sentence)) if w in keep]
                vectors = np.stack([pkl["id2vec"][pkl["w2id"][w]] for w in words[:1] + words])
                if x["words_id"] != [keep[w] for w in words] or not _close(x["words_feat"], vectors, atol=0):
                    bad_w.append(sentence)
            checks.add(fmt, f"{split}: frames = exported rows, {CNM_FRAMES} bins with float64 edges", not bad_f64,
                       f"differ: {bad_f64}")
            checks.add(fmt, f"{split}: frames = vmr's CNM dataset items (its model's input)", not bad_f,
                       f"differ: {bad_f}")
            checks.add(fmt, f"{split}: word ids and GloVe vectors", not bad_w, f"differ: {bad_w}")


def vmr_cnm_frames(params_path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{split: {vid: frames}} as vmr's CNM model gets them: its own dataset items at CNM_FRAMES frames."""
    from models import MODELS
    from pipeline.core.params import load_params
    from stages.train import data_context

    params = load_params(params_path, overrides=[f"model.cnm.max_num_frames={CNM_FRAMES}"], registries=[MODELS])
    data = data_context(params, "cnm")
    model = MODELS.get("cnm")(MODELS.config(params, "cnm"), data)
    return {split: {item["vid"]: item["frames_feat"] for item in model.build_dataset(split, data, train=False)}
            for split in data.splits}


def _average_float64_edges(x: np.ndarray, num_clips: int) -> np.ndarray:
    """The resampling with bin edges round(j * T / N) computed in numpy float64 (CNM's arithmetic),
    written out here independently of vmr's `average_to_clips`; float32 edges (MMN's torch code) round
    some .5 cases the other way (e.g. T=180, N=200: bins 35 and 115)."""
    edges = np.round(np.arange(num_clips + 1) / num_clips * len(x)).astype(np.int64).clip(max=len(x) - 1)
    return np.stack([x[s:e].mean(0) if s < e else x[s] for s, e in zip(edges[:-1], edges[1:], strict=True)])


# == main ===========================================================================================


def commit_of(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown (not a git checkout)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for fmt, (name, commit) in PINNED.items():
        ap.add_argument(f"--{fmt}", type=Path, help=f"checkout of {name} at {commit[:7]}")
    ap.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:  # inside the official checkout's process
        import torch

        sys.path.insert(0, str(a.repo))
        a.run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(WORKERS[a.worker](a.repo.resolve(), a.export.resolve(), a.run_dir.resolve()), a.dump)
        return 0

    sys.path.insert(0, str(REPO))
    import torch

    repos = {fmt: getattr(a, fmt) for fmt in PINNED if getattr(a, fmt)}
    if not repos:
        ap.error("give at least one checkout (--mmn, --mrnet, --mesm, --cnm)")
    work = (a.work or Path(tempfile.mkdtemp(prefix="vmr-official-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    params = write_dataset(work)
    vmr("vocab", "--params", params)
    vmr("query-features", "--model", "mrnet", "--params", params)
    checks, status = Checks(), {}
    for fmt, repo in repos.items():
        export = work / f"export_{fmt}"
        vmr("export", export, "--format", fmt, "--params", params)
        dump = work / f"loaded_{fmt}.pt"
        ok, log = run_worker(fmt, repo.resolve(), export, work / f"run_{fmt}", dump)
        status[fmt] = {"repository": PINNED[fmt][0], "pinned": PINNED[fmt][1], "checkout": commit_of(repo),
                       "loaded": ok, "log": log[-3000:]}
        print(f"== {fmt}: {PINNED[fmt][0]} at {status[fmt]['checkout']}: {'loaded' if ok else 'FAILED TO LOAD'}")
        if log:
            print("\n".join("   " + line for line in log.splitlines()[-25:]))
        if ok:
            compare(fmt, torch.load(dump, weights_only=False), work, checks)
    width = max(len(r[1]) for r in checks.rows) if checks.rows else 10
    for fmt, what, verdict, detail in checks.rows:
        print(f"{verdict:4}  {fmt:14} {what:{width}}  {detail}")
    failed = [r for r in checks.rows if r[2] == "FAIL"]
    if a.out:
        a.out.write_text(json.dumps({"loaders": status, "checks": [dict(zip(("format", "check", "verdict", "detail"), r,
                                                                            strict=True)) for r in checks.rows]},
                                    indent=2) + "\n")
    print(f"{len(checks.rows) - len(failed)} of {len(checks.rows)} checks pass; loaders that ran: "
          f"{[f for f, s in status.items() if s['loaded']]}, did not: {[f for f, s in status.items() if not s['loaded']]}")
    if not all(s["loaded"] for s in status.values()):
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
