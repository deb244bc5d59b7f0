"""`vmr export`: vmr's annotations, features and vocabularies in the layouts the official code reads.

    export(fmt, out_dir, splits, features, vocab_dir=None, query_features=None, notes=...) -> manifest
    run(params, source, fmt, out_dir, features=None, cleaning="official")    the command's glue

One directory per export, mirroring the official repository's own data folders, so that copying it
over a checkout (or pointing the config keys named in its README.txt at it) is all a user does:

    mesm   data/charades/annotations/charades_sta_{split}.txt, Charades_v1_{split}.csv,
           CLIP_tokenized_count.txt, GloVe_tokenized_count.txt[, glove.pkl]; data/charades/<f>.hdf5
           (lntzm/MESM `CharadesDataset`: `ann_path`, `feat_files`)
    mmn    dataset/Charades_STA/charades_{split}.json {vid: {duration, timestamps, sentences}},
           dataset/Charades_STA/<f>.hdf5  (MCG-NJU/MMN `CharadesDataset` via `paths_catalog.py`)
    cnm    data/charades/{split}.json [[vid, duration, [s, e], sentence], ...], data/charades/glove.pkl,
           data/charades/<f>.hdf5  (minghangz/cnm `CharadesSTA`: `train_data`, `vocab_path`, ...)
    mrnet  dataset/Charades_STA/{split}_audio_new.json (MMN's keys + `audios`, one name per sentence),
           dataset/Charades_STA/text_distbert_feat/<audio stem>.pt  (1, D) float32 per sentence,
           dataset/Charades_STA/video_features.hdf5  (xian-sh/MRNet `CharadesDataset`)

Every file is in seconds. Features are rewritten flat (`f[vid]` = (T, D) float32), the layout every
one of these Charades loaders reads, whatever `merge.layout` was. Cleaning: `official` applies the
convention of the target's own released files (MMN/MRNet json: `mmn`, CPL/CNM json: `cnm`; MESM reads
the raw txt and fixes it itself: `none`), so exporting Charades-STA reproduces those files.

The whole directory is built under a temporary sibling and renamed into place: a failed export leaves
nothing. An existing OUT_DIR is replaced only if it is empty or an earlier export (vmr_export.json).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.core.atomic import temporary_prefix
from pipeline.core.errors import VmrError
from pipeline.core.progress import track
from pipeline.text.annotations import Query

MANIFEST = "vmr_export.json"
CHARADES_CSV_HEADER = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects",
                       "descriptions", "actions", "length"]  # Charades_v1_*.csv; MESM reads id and the last column
OFFICIAL_CLEANING = {"mesm": "none", "mmn": "mmn", "cnm": "cnm", "mrnet": "mmn"}
FORMATS = tuple(OFFICIAL_CLEANING)


class ExportError(VmrError, ValueError):
    """An input the export needs is missing or cannot be written in the target's format."""


# -- annotations ----------------------------------------------------------------------------------


def _check_queries(split: str, queries: Sequence[Query]) -> None:
    for q in queries:
        where = f"split '{split}', video '{q.video_id}', query {q.qid!r}"
        if len(q.moments) != 1:
            raise ExportError(f"{where}: has {len(q.moments)} moments; these formats hold exactly one per sentence")
        if q.duration is None:
            raise ExportError(f"{where}: has no duration; these formats need one per video")


def _by_video(split: str, queries: Sequence[Query]) -> dict[str, dict[str, Any]]:
    """{vid: {duration, timestamps, sentences}} in order of first appearance (MMN's json)."""
    videos: dict[str, dict[str, Any]] = {}
    for q in queries:
        rec = videos.setdefault(q.video_id, {"duration": q.duration, "timestamps": [], "sentences": []})
        if rec["duration"] != q.duration:
            raise ExportError(f"split '{split}', video '{q.video_id}': two durations ({rec['duration']}, {q.duration})")
        rec["timestamps"].append([q.moment[0], q.moment[1]])
        rec["sentences"].append(q.sentence)
    return videos


def charades_sta_text(split: str, queries: Sequence[Query]) -> str:
    """`VID start end##sentence` lines (Charades-STA txt, what MESM's CharadesDataset reads)."""
    lines = []
    for q in queries:
        if any(c.isspace() for c in q.video_id):
            raise ExportError(f"split '{split}': video id {q.video_id!r} holds whitespace, which the txt format splits on")
        if "##" in q.sentence or "\n" in q.sentence or "\r" in q.sentence:
            raise ExportError(f"split '{split}', video '{q.video_id}': sentence {q.sentence!r} holds '##' or a line "
                              "break, which the txt format cannot hold")
        lines.append(f"{q.video_id} {float(q.moment[0])!r} {float(q.moment[1])!r}##{q.sentence}\n")
    return "".join(lines)


def charades_csv_text(queries: Sequence[Query]) -> str:
    """Charades_v1 csv: the official header, `id` and `length` filled (durations for the txt)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CHARADES_CSV_HEADER)
    for vid, rec in _by_video("csv", queries).items():
        writer.writerow([vid] + [""] * (len(CHARADES_CSV_HEADER) - 2) + [repr(float(rec["duration"]))])
    return buf.getvalue()


def cpl_list(queries: Sequence[Query]) -> list[list[Any]]:
    """CPL/CNM json: [[vid, duration, [start, end], sentence], ...] in annotation order."""
    return [[q.video_id, q.duration, [q.moment[0], q.moment[1]], q.sentence] for q in queries]


def audio_stem(video_id: str, split: str, index: int) -> str:
    """MRNet's per-sentence name `<vid>_<split>_<k>` (k from 1). Its loader keeps the part of the
    name before the first '.', so dots in the video id (TACoS `s30-d52.avi`) become '_'."""
    return f"{video_id.replace('.', '_')}_{split}_{index}"


# -- features --------------------------------------------------------------------------------------


def write_flat_features(src: Path, dst: Path, needed: Sequence[str]) -> dict[str, Any]:
    """Every video of `src` (flat or ActivityNet layout) as `dst[vid]` = (T, D) float32, attrs kept.
    A video the annotations name but `src` lacks is an error naming it."""
    with h5py.File(src, "r") as fin:
        missing = [v for v in dict.fromkeys(needed) if v not in fin]
        if missing:
            raise ExportError(f"{src}: no features for {len(missing)} annotated videos, e.g. {missing[:3]} "
                              "(run `vmr extract` and `vmr merge` over every video of the dataset)")
        dim = None
        with h5py.File(dst, "w") as fout:
            for key, value in fin.attrs.items():
                fout.attrs[key] = value
            for vid in track(sorted(fin.keys()), f"export {src.name}"):
                node = fin[vid]
                data = node["c3d_features"] if isinstance(node, h5py.Group) else node
                arr = np.asarray(data[()], dtype=np.float32)
                if arr.ndim != 2:
                    raise ExportError(f"{src}: video '{vid}' has shape {arr.shape}, expected (T, D)")
                dim = arr.shape[1]
                out = fout.create_dataset(vid, data=arr)
                for key, value in data.attrs.items():
                    out.attrs[key] = value
        return {"videos": len(fin.keys()), "dim": dim}


# -- the export ------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # ASCII with \u escapes: the official loaders open files with the locale's encoding
    path.write_text(json.dumps(obj) + "\n", encoding="utf-8")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _need_file(path: Path | None, what: str, how: str) -> Path:
    if path is None or not Path(path).is_file():
        raise ExportError(f"{what} not found: {path} ({how})")
    return Path(path)


def _write_mesm(root: Path, splits, features, vocab_dir, query_features) -> dict[str, Any]:
    ann = root / "data" / "charades" / "annotations"
    ann.mkdir(parents=True)
    how = "run `vmr vocab`"
    for name in ("CLIP_tokenized_count.txt", "GloVe_tokenized_count.txt"):
        _copy(_need_file(vocab_dir and vocab_dir / name, f"vocab file {name}", how), ann / name)
    files = {"ann_path": "data/charades/annotations"}
    if vocab_dir and (vocab_dir / "glove.pkl").is_file():  # only the GloVe-pkl configs read it
        _copy(vocab_dir / "glove.pkl", ann / "glove.pkl")
    for split, queries in splits.items():
        (ann / f"charades_sta_{split}.txt").write_text(charades_sta_text(split, queries), encoding="utf-8")
        (ann / f"Charades_v1_{split}.csv").write_text(charades_csv_text(queries), encoding="utf-8")
    feats = {}
    for name, src in features.items():
        feats[name] = write_flat_features(src, root / "data" / "charades" / f"{name}.hdf5", _videos(splits))
    files["feat_files"] = [f"data/charades/{n}.hdf5" for n in features]
    return {"files": files, "features": feats}


def _write_mmn(root: Path, splits, features, vocab_dir, query_features) -> dict[str, Any]:
    base = root / "dataset" / "Charades_STA"
    for split, queries in splits.items():
        _write_json(base / f"charades_{split}.json", _by_video(split, queries))
    (name, src), = features.items()
    feats = {name: write_flat_features(src, base / f"{name}.hdf5", _videos(splits))}
    files = {f"ann_file ({split})": f"dataset/Charades_STA/charades_{split}.json" for split in splits}
    files["feat_file"] = f"dataset/Charades_STA/{name}.hdf5"
    return {"files": files, "features": feats}


def _glove_dim(path: Path) -> int:
    from pipeline.text.vocab import load_glove_pkl

    return len(load_glove_pkl(path)["id2vec"][0])


def _write_cnm(root: Path, splits, features, vocab_dir, query_features) -> dict[str, Any]:
    base = root / "data" / "charades"
    _copy(_need_file(vocab_dir and vocab_dir / "glove.pkl", "vocab file glove.pkl",
                     "run `vmr vocab` with `vocab.glove_file` set"), base / "glove.pkl")
    word_dim = _glove_dim(base / "glove.pkl")
    for split, queries in splits.items():
        _write_json(base / f"{split}.json", cpl_list(queries))
    (name, src), = features.items()
    feats = {name: write_flat_features(src, base / f"{name}.hdf5", _videos(splits))}
    files = {f"{split}_data": f"data/charades/{split}.json" for split in splits}
    files |= {"vocab_path": "data/charades/glove.pkl", "feature_path": f"data/charades/{name}.hdf5"}
    return {"files": files, "features": feats, "word_dim": word_dim}


def _write_mrnet(root: Path, splits, features, vocab_dir, query_features) -> dict[str, Any]:
    import torch

    from pipeline.text.sentence_features import query_key, read_query_features

    table = read_query_features(_need_file(query_features, "query feature file",
                                           "run `vmr query-features --model mrnet`"))
    base = root / "dataset" / "Charades_STA"
    audio_dir = base / "text_distbert_feat"
    audio_dir.mkdir(parents=True)
    stems: dict[str, str] = {}
    dim = None
    for split, queries in splits.items():
        missing = [q.sentence for q in queries if query_key(q.sentence) not in table]
        if missing:
            raise ExportError(f"{query_features}: no query feature for {len(missing)} sentences of split "
                              f"'{split}', e.g. {missing[0]!r} (re-run `vmr query-features --model mrnet` "
                              "with this split in the encoder's `splits`)")
        videos = _by_video(split, queries)
        by_vid: dict[str, list[Query]] = {}
        for q in queries:
            by_vid.setdefault(q.video_id, []).append(q)
        for vid, rec in track(videos.items(), f"export query tensors ({split})", total=len(videos)):
            rec["audios"] = []
            for k, q in enumerate(by_vid[vid], 1):
                stem = audio_stem(vid, split, k)
                if stem in stems:
                    raise ExportError(f"videos '{stems[stem]}' and '{vid}' map to the same MRNet query file {stem}.pt")
                stems[stem] = vid
                rec["audios"].append(stem + ".wav")
                row = np.asarray(table[query_key(q.sentence)], dtype=np.float32)
                dim = row.shape[-1]
                # MRNet's own preprocessing saves one (1, D) tensor per sentence; its loader squeezes dim 1
                torch.save(torch.from_numpy(row.reshape(1, -1)).clone(), audio_dir / f"{stem}.pt")
        _write_json(base / f"{split}_audio_new.json", videos)
    (name, src), = features.items()
    # MRNet picks its feature reader by substrings of the path ('i3d' -> npy dir, 'C3D' -> .pt dir):
    # a neutral name keeps it on the HDF5 branch whatever the feature is called.
    feats = {name: write_flat_features(src, base / "video_features.hdf5", _videos(splits))}
    files = {f"ann_file ({split})": f"dataset/Charades_STA/{split}_audio_new.json" for split in splits}
    files |= {"audio_dir": "dataset/Charades_STA/text_distbert_feat", "feat_file": "dataset/Charades_STA/video_features.hdf5"}
    return {"files": files, "features": feats, "query_dim": dim, "query_files": len(stems)}


_WRITERS = {"mesm": _write_mesm, "mmn": _write_mmn, "cnm": _write_cnm, "mrnet": _write_mrnet}


def _videos(splits: Mapping[str, Sequence[Query]]) -> list[str]:
    return list(dict.fromkeys(q.video_id for queries in splits.values() for q in queries))


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
            raise ExportError(f"{out_dir}: not empty and not an earlier `vmr export` (no {MANIFEST}); "
                              "choose another OUT_DIR or empty it")


def export(
    fmt: str,
    out_dir: str | os.PathLike,
    splits: Mapping[str, Sequence[Query]],
    features: Mapping[str, str | os.PathLike],
    vocab_dir: str | os.PathLike | None = None,
    query_features: str | os.PathLike | None = None,
    notes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `splits` (split -> queries, already cleaned) and `features` (name -> merged .h5) in the
    layout of `fmt` under `out_dir`; returns the manifest (also written as vmr_export.json)."""
    if fmt not in _WRITERS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {list(_WRITERS)}")
    if not features:
        raise ExportError("no feature file to export")
    if fmt != "mesm" and len(features) != 1:
        raise ExportError(f"{fmt} reads one feature file; got {list(features)} (choose one with --feature)")
    for name, path in features.items():
        _need_file(Path(path), f"feature file of '{name}'", f"run `vmr merge --feature {name}`")
    for split, queries in splits.items():
        if not queries:
            raise ExportError(f"split '{split}' has no queries after cleaning")
        _check_queries(split, queries)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir.name), dir=out_dir.parent))
    try:
        written = _WRITERS[fmt](staging, dict(splits), {n: Path(p) for n, p in features.items()},
                                Path(vocab_dir) if vocab_dir else None, query_features and Path(query_features))
        manifest = {
            "format": fmt,
            "splits": {s: {"queries": len(q), "videos": len(_videos({s: q}))} for s, q in splits.items()},
            **written,
            **(notes or {}),
        }
        _write_json(staging / MANIFEST, manifest)
        (staging / "README.txt").write_text(readme(fmt, manifest), encoding="utf-8")
        os.chmod(staging, 0o777 & ~_umask())
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished export onto OUT_DIR; an earlier export there is moved aside, then removed."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir.name), dir=out_dir.parent))
        os.replace(out_dir, old / "previous")
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- README.txt --------------------------------------------------------------------------------


def readme(fmt: str, manifest: Mapping[str, Any]) -> str:
    files = manifest["files"]
    feats = manifest["features"]
    listing = "\n".join(f"    {k}: {v}" for k, v in files.items())
    splits = ", ".join(f"{s} ({v['queries']} queries, {v['videos']} videos)" for s, v in manifest["splits"].items())
    dims = ", ".join(f"{n}: {f['dim']}-d, {f['videos']} videos" for n, f in feats.items())
    head = (f"vmr export --format {fmt}\n\nSplits: {splits}\nFeatures: {dims}\n"
            f"Cleaning of the moments: {manifest.get('cleaning', 'unknown')}\n"
            f"Dataset: {manifest.get('dataset', 'unknown')}\n\nFiles (paths relative to this folder):\n{listing}\n\n")
    total_dim = sum(f["dim"] for f in feats.values())
    body = {
        "mesm": lambda: f"""lntzm/MESM (dataset/charades.py, CharadesDataset). Copy data/charades/ into the checkout's data/
(or point the config at this folder) and set in config/charades/<your config>.json:
    "dataset_name": "charades"
    "ann_path": "data/charades/annotations"      (the txt, csv and count files; glove.pkl too)
    "feat_files": {json.dumps(files['feat_files'])}
    "v_feat_dim": {total_dim}      (plus 2 for TEF, which the code adds itself when use_tef is true)
    "clip_len": seconds per feature row of the exported features (vmr's extractor setting)
The loader reads the splits "train" and "test" (charades_sta_<split>.txt with Charades_v1_<split>.csv).
CLIP_tokenized_count.txt / GloVe_tokenized_count.txt are vmr's `vocab` output for the splits named in its
params (`vocab.splits`; MESM's released files count train + test). glove.pkl is present only if
`vmr vocab` made one (configs with "load_vocab_pkl": true read it from ann_path).
The txt holds the moments as annotated; MESM drops/swaps/clamps them itself when loading.
""",
        "mmn": lambda: f"""MCG-NJU/MMN (mmn/data/datasets/charades.py, CharadesDataset). Copy dataset/Charades_STA/ into the
checkout's dataset/ and, in mmn/config/paths_catalog.py, point "charades_train" / "charades_test" at:
    "ann_file": "./dataset/Charades_STA/charades_<split>.json"   (the names MMN already uses)
    "feat_file": "./{files['feat_file']}"
and in the config: INPUT.NUM_PRE_CLIPS (rows each video is averaged to), MODEL.MMN.FEATPOOL.INPUT_SIZE: {total_dim}.
The json is MMN's own shape: {{vid: {{"duration": s, "timestamps": [[s, e], ...], "sentences": [...]}}}}.
""",
        "cnm": lambda: f"""minghangz/cnm (datasets/charades_sta.py, CharadesSTA). Copy data/charades/ into the checkout's data/
and set in config/charades/<your config>.json, section "dataset":
    "dataset": "CharadesSTA"
    "feature_path": "{files['feature_path']}"
    "vocab_path": "data/charades/glove.pkl"
    "frame_dim": {total_dim}
    "word_dim": {manifest.get('word_dim')}      (the GloVe vectors' size in glove.pkl)
    "train_data": "data/charades/train.json", "test_data" and "val_data": "data/charades/test.json"
Each json is CPL's list [[vid, duration, [start, end], sentence], ...] in seconds. CNM tokenises with nltk
(word_tokenize + pos_tag: install nltk's punkt and averaged_perceptron_tagger data) and keeps the words of
glove.pkl's `counter.most_common(vocab_size)`; a sentence with none of them fails in CNM's __getitem__.
""",
        "mrnet": lambda: f"""xian-sh/MRNet (ret/data/datasets/charades.py, CharadesDataset). Copy dataset/Charades_STA/ into the
checkout's dataset/ and, in ret/config/paths_catalog.py, set for "charades_train" / "charades_test":
    "ann_file": "./dataset/Charades_STA/<split>_audio_new.json"   (the names MRNet already uses)
    "audio_dir": "<this folder>/dataset/Charades_STA/text_distbert_feat"
    "feat_file": "<this folder>/{files['feat_file']}"
and in the config: MODEL.RET.VIDEO_MODE: a value other than vgg, c3d, c3d_pca and i3d (those replace
feat_file with the authors' own paths), MODEL.RET.FEATPOOL.INPUT_SIZE: {total_dim}, the query dimension
{manifest.get('query_dim')} for the text input (768 for DistilBERT). MRNet chooses its feature reader by
substrings of feat_file ('i3d' -> a folder of .npy, 'C3D' -> a folder of .pt): keep those out of the path.
Each sentence's query tensor is text_distbert_feat/<name in "audios" without .wav>.pt, shape (1, D) float32,
the output of vmr's `query-features` stage (frozen DistilBERT, standardised, token mean, as MRNet's
preprocess/text_encode.py).
""",
    }[fmt]()
    return head + body


# -- the command -----------------------------------------------------------------------------------


def run(params: Any, source: str, fmt: str, out_dir: str | os.PathLike, features: Sequence[str] | None = None,
        cleaning: str = "official", **_: object) -> dict[str, Any]:
    """`vmr export`: read the inputs params name (dataset, merge.out_dir, vocab.out_dir, the model's
    query features), check them, and export."""
    from models import MODELS
    from pipeline.core.params import ParamsError, require_files
    from pipeline.core.progress import log
    from pipeline.core.provenance import read_record
    from pipeline.media.framestore import decoded_durations
    from pipeline.text.annotations import CLEANING_POLICIES, AnnotationError, load_split
    from stages.common import duration_files

    if fmt not in FORMATS:
        raise ParamsError(f"--format {fmt}: expected one of {list(FORMATS)}")
    if cleaning != "official" and cleaning not in CLEANING_POLICIES:
        raise ParamsError(f"--cleaning {cleaning}: expected official or one of {list(CLEANING_POLICIES)}")
    policy = OFFICIAL_CLEANING[fmt] if cleaning == "official" else cleaning
    d = params.dataset
    files = {f"dataset.splits.{s}": p for s, p in d.splits.items()}
    durations = duration_files(params, source)  # own videos: decode's records, as training reads them
    require_files(source, files | {k: str(p) for k, p in durations.items()})

    needs = MODELS.get(fmt).needs(MODELS.config(params, fmt), d)
    names = list(features or needs.features)
    feature_files = {n: Path(params.merge.out_dir) / f"{n}.h5" for n in names}
    for n, p in feature_files.items():
        if not p.is_file():
            raise ExportError(f"{p}: feature file of '{n}' not found (`merge.out_dir`; run `vmr extract --feature {n}` "
                              f"and `vmr merge --feature {n}`)")
    vocab_dir = Path(params.vocab.out_dir)
    query_file = None
    if fmt in ("mesm", "cnm"):
        _check_made_for(read_record(vocab_dir), d, f"{vocab_dir} (vocab)", "vmr vocab")
    if fmt == "mrnet":
        query_file = Path(params.merge.out_dir) / f"{needs.query_features.name}.h5"
        if not query_file.is_file():
            raise ExportError(f"{query_file}: MRNet's query features not found (run `vmr query-features --model mrnet`)")
        _check_made_for(read_record(query_file), d, str(query_file), "vmr query-features --model mrnet")

    video_durations = decoded_durations(d, params.decode.out_dir)
    splits = {}
    try:
        for split, path in d.splits.items():
            splits[split] = list(load_split(path, d.format, dataset=d.name, split=split, durations=d.durations,
                                            video_durations=video_durations, cleaning=policy, on_error=d.on_error))
    except (AnnotationError, ValueError) as e:
        raise ParamsError(str(e)) from None
    manifest = export(fmt, out_dir, splits, feature_files, vocab_dir=vocab_dir, query_features=query_file,
                      notes={"dataset": d.name, "cleaning": policy,
                             "sources": {"annotations": dict(d.splits),
                                         "durations": [str(p) for p in durations.values()],
                                         "features": {n: str(p) for n, p in feature_files.items()},
                                         "vocab_dir": str(vocab_dir) if fmt in ("mesm", "cnm") else None,
                                         "query_features": str(query_file) if query_file else None}})
    counts = ", ".join(f"{s}: {v['queries']}" for s, v in manifest["splits"].items())
    log(f"export {fmt}: {counts} queries, features {list(feature_files)} (cleaning {policy}) -> {out_dir} "
        f"(README.txt there names the official config keys)")
    return manifest


def _check_made_for(record: dict | None, dataset: Any, what: str, command: str) -> None:
    """Refuse vocab/query files that provenance says were made from another dataset section."""
    if record is None:
        return
    made = record.get("params", {}).get("dataset")
    if made is not None and json.loads(json.dumps(made)) != json.loads(json.dumps(dataset.model_dump())):
        raise ExportError(f"{what} was made for another `dataset` section than the one in params; run `{command}`")
