"""The recipe of a checkpoint: how the features that trained it were made, read from provenance.

The train stage writes `best.pt.prov.json`, whose `inputs` name every file training read
(`features.<name>`, `vocab.<file>`, `dataset.splits.<split>`, ...) with its sha256. Each merged
feature file carries the merge record in its HDF5 attrs: the extractor (name, protocol, config),
the weights digest (or "random") and the decoder; its `inputs.features` names the per-video
directory whose extract record names the frame store, whose decode record names the backend.
PCA-reduced files (`feature_pca-<model>`) point at their source file and the train split the PCA
was fitted on; MRNet's query-feature file records its frozen encoder. This is the chain `vmr
lineage` prints, read here as data.

`read_recipe` never raises on a recipe it cannot reproduce: it lists what differs in
`Recipe.mismatches`, and the Predictor refuses (or, when told to, goes on and says so).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from extractors import EXTRACTORS
from models import MODELS
from pipeline.core.params import DatasetParams
from pipeline.core.provenance import read_record, record_path, sha256_file, sha256_path
from pipeline.media.decode import decoder_code
from pipeline.media.extract import extractor_code, extractor_digest
from pipeline.media.sampling import SamplingProtocol
from pipeline.text.annotations import load_dataset_split

# provenance keys a hand-made record may use to say the features were not made here
FOREIGN_MARKERS = ("published", "imported")


@dataclasses.dataclass
class PCAStep:
    """A PCA-reduced feature file: refitted from `source_file` on `fit_videos` (None: every video)."""

    source_file: Path
    fit_videos: list[str] | None
    components: int


@dataclasses.dataclass
class FeatureRecipe:
    """How one feature file the model reads was made (`name`: its file, features/<name>.h5)."""

    name: str
    extractor: str  # registry name
    config: dict[str, Any]  # the extractor config as the extract stage recorded it
    protocol_key: str | None  # the recorded sampling protocol (checked against the rebuilt one)
    weights: str  # sha256 of the weights, or "random"
    decode_backend: str = "pyav"
    merge: dict[str, Any] = dataclasses.field(default_factory=dict)  # dtype, compression, layout
    pca: PCAStep | None = None
    path: Path | None = None  # the training feature file, found here (GLSCL's search reads its train rows)
    device_type: str | None = None  # where the training features were extracted ("cpu", "cuda"), if recorded
    # the code that makes the features here (decoder, extractor): part of the cache key
    code: dict[str, str] = dataclasses.field(default_factory=dict)
    weights_file: Path | None = None  # config["weights"] found from here (see `locate`)


@dataclasses.dataclass
class QueryRecipe:
    """MRNet's frozen query encoder as stage query_features ran it."""

    name: str  # its feature file, features/<name>.h5
    encoder: dict[str, Any]  # QueryEncoderConfig
    seed: int
    train_sentences: list[str]  # the WordPiece vocabulary of a random-init encoder is learnt on them
    weights: str


@dataclasses.dataclass
class Recipe:
    model: str
    checkpoint: Path
    checkpoint_sha256: str
    model_config: dict[str, Any]
    dataset: dict[str, Any]
    seed: int
    features: list[FeatureRecipe]
    query: QueryRecipe | None
    vocab_dir: Path | None
    mismatches: list[str]  # what cannot be reproduced (the Predictor refuses unless told otherwise)
    missing: list[str]  # files the model reads that cannot be made or found at all (no override helps)
    notes: list[str]  # what was assumed (logged)

    @functools.cached_property
    def digest(self) -> str:
        """What the cached features of a video depend on (the cache key, with the video's sha256)."""
        parts = [dataclasses.asdict(f) | {"path": None, "device_type": None, "weights_file": None,
                                          "pca": None if f.pca is None else {
            "source": sha256_file(f.pca.source_file), "fit": f.pca.fit_videos, "k": f.pca.components}}
            for f in self.features]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def locate(recorded: str | os.PathLike, anchor: Path) -> Path | None:
    """A path as a record names it (relative to the directory the stage ran in): as is, or under
    an ancestor of `anchor` (the checkpoint), so that predicting works from another directory."""
    path = Path(recorded)
    if path.is_absolute():
        return path if path.exists() else None
    for base in [Path.cwd(), *Path(anchor).resolve().parents]:
        if (base / path).exists():
            return base / path
    return None


def read_recipe(checkpoint: Path, model: str | None = None, fallback: dict[str, FeatureRecipe] | None = None) -> Recipe:
    """The recipe of `checkpoint` (see the module docstring). Raises `ValueError` only where there is
    nothing to read: no record next to the checkpoint, or a checkpoint of another model.

    `fallback` {feature file name: recipe} (the CLI: the extractor configs of params.yaml) stands in
    for a feature file whose recipe cannot be read; using it is itself a mismatch."""
    checkpoint = Path(checkpoint)
    record = read_record(checkpoint)
    if record is None:
        raise ValueError(f"{checkpoint}: no provenance record ({record_path(checkpoint).name}) next to it: "
                         "not a checkpoint written by `vmr train`")
    stage = str(record.get("stage", ""))
    if not stage.startswith("train-"):
        raise ValueError(f"{checkpoint}: its record is of stage '{stage}', not of a `vmr train` run")
    kind = stage.removeprefix("train-")
    if model is not None and kind != model:
        raise ValueError(f"{checkpoint}: a checkpoint of model '{kind}', not of '{model}' "
                         f"(pass --model {kind}, or the checkpoint of a {model} run)")
    params = record.get("params", {})
    inputs = record.get("inputs", {})
    mismatches: list[str] = []
    notes: list[str] = []
    dataset = _relocated_dataset(params.get("dataset", {}), checkpoint)
    cls = MODELS.get(kind)
    cfg = cls.Config.model_validate(record.get("model_config", {}))
    needs = cls.needs(cfg, None if dataset is None else _dataset_params(dataset))
    features, missing = [], []
    for name in needs.features:
        found = _feature_recipe(name, inputs.get(f"features.{name}"), checkpoint, dataset, mismatches, notes)
        if found is None and fallback and name in fallback:
            found = fallback[name]
            mismatches.append(f"feature file '{name}': extracting with the '{found.extractor}' settings of "
                              "the current params instead of the unknown training recipe")
        if found is not None:
            features.append(found)
        else:
            missing.append(name)
    query = None
    if needs.query_features is not None:
        name = needs.query_features.name
        query = _query_recipe(name, inputs.get(f"features.{name}"), checkpoint, mismatches)
        if query is None:
            missing.append(name)
    vocab_dir = None
    for name in needs.vocab:
        path = _checked_input(inputs.get(f"vocab.{name}"), f"vocab file {name}", checkpoint, mismatches)
        if path is None:
            missing.append(f"vocab/{name}")
        else:
            vocab_dir = path.parent
    return Recipe(model=kind, checkpoint=checkpoint, checkpoint_sha256=sha256_file(checkpoint),
                  model_config=record.get("model_config", {}), dataset=dataset or {},
                  seed=_seed(params, cfg), features=features, query=query, vocab_dir=vocab_dir,
                  mismatches=mismatches, missing=missing, notes=notes)


def _seed(params: dict, cfg: Any) -> int:
    return cfg.seed if getattr(cfg, "seed", None) is not None else int(params.get("seed", 0))


def _dataset_params(dataset: dict) -> DatasetParams:
    return DatasetParams.model_validate(dataset)


def _relocated_dataset(dataset: dict, anchor: Path) -> dict | None:
    """The recorded `dataset` params with its files found from here (see `locate`)."""
    if not dataset:
        return None
    out = dict(dataset)

    def here(p):
        return str(locate(p, anchor) or p)

    out["splits"] = {s: here(p) for s, p in dataset.get("splits", {}).items()}
    out["durations"] = [here(p) for p in dataset.get("durations", [])]
    if dataset.get("video_captions"):
        out["video_captions"] = here(dataset["video_captions"])
    return out


def _checked_input(entry: dict | None, what: str, anchor: Path, mismatches: list[str]) -> Path | None:
    """The file a record input names, found and with the recorded sha256; else a mismatch."""
    if entry is None:
        mismatches.append(f"the training record names no {what}")
        return None
    path = locate(entry["path"], anchor)
    if path is None:
        mismatches.append(f"{what} {entry['path']}, which trained the checkpoint, is not on this machine")
        return None
    if sha256_path(path) != entry.get("sha256"):
        mismatches.append(f"{what} {path} changed since training (sha256 {sha256_path(path)[:16]}, "
                          f"training read {str(entry.get('sha256'))[:16]})")
    return path


def _feature_recipe(name: str, entry: dict | None, anchor: Path, dataset: dict | None,
                    mismatches: list[str], notes: list[str]) -> FeatureRecipe | None:
    path = _checked_input(entry, f"feature file '{name}'", anchor, mismatches)
    if path is None:
        return None
    record = read_record(path)
    if record is None:
        mismatches.append(f"feature file {path} has no extraction record (published or imported features?): "
                          "how it was made is unknown")
        return None
    foreign = [k for k in FOREIGN_MARKERS if record.get(k)] + [
        k for k in FOREIGN_MARKERS if k in str(record.get("stage", "")).lower()]
    if foreign:
        mismatches.append(f"feature file {path} holds {foreign[0]} features (provenance: {foreign[0]}), "
                          "not features extracted here: their recipe cannot be reproduced")
        return None
    stage = str(record.get("stage", ""))
    if stage.startswith("feature_pca-"):
        return _pca_recipe(name, record, anchor, dataset, mismatches, notes)
    if not stage.startswith("merge-"):
        mismatches.append(f"feature file {path} was made by stage '{stage or '?'}', not by vmr extract + merge")
        return None
    described = record.get("extractor")
    if not described:
        mismatches.append(f"feature file {path}: its merge record names no extractor (merged from files "
                          "not written by `vmr extract`)")
        return None
    feature = described["name"]
    weights = (record.get("weights") or {}).get(feature, "unknown")
    config = dict(described.get("config", {}))
    weights_file = _check_weights(feature, config, weights, anchor, mismatches)
    if weights_file is False:
        return None
    code = {"decode": decoder_code(), "extract": extractor_code(EXTRACTORS.get(feature))}
    _check_code(path, feature, described, weights, code, record, anchor, mismatches, notes)
    return FeatureRecipe(
        name=name, extractor=feature, config=config,
        protocol_key=_protocol_key(described.get("protocol")), weights=weights,
        decode_backend=_decode_backend(record, anchor, notes),
        device_type=_extract_record(record, anchor).get("device_type"),
        merge={k: v for k, v in (record.get("params", {}).get("merge") or {}).items()
               if k in ("dtype", "compression", "layout")},
        path=path, code=code, weights_file=weights_file,
    )


def _check_weights(feature: str, config: dict, weights: str, anchor: Path, mismatches: list[str]) -> Path | None | bool:
    """The recorded weights file found here (None: random init or no file named); False when it
    cannot be loaded here. A mismatch is listed when it differs."""
    file = config.get("weights")
    if weights == "random":
        return None
    if weights == "unknown":
        mismatches.append(f"the '{feature}' features record no weights digest")
    found = locate(file, anchor) if file else None
    if found is None or not found.is_file():
        if weights == "unknown":
            return None
        mismatches.append(f"the '{feature}' features were extracted with weights of sha256 {weights}; "
                          f"that weights file ({file or 'no path recorded'}) is not on this machine")
        return False
    digest = sha256_file(found)
    if weights != "unknown" and digest != weights:
        mismatches.append(f"extractors.{feature}.weights {found}: sha256 {digest} differs from the {weights} "
                          "the training features were extracted with")
        config["weights_sha256"] = None  # overridden: the file here is used as it is
    return found


def _check_code(path: Path, feature: str, described: dict, weights: str, code: dict[str, str],
                merge_record: dict, anchor: Path, mismatches: list[str], notes: list[str]) -> None:
    """Compare the code that made the training features (named by the extract sidecars, as extract's
    resume reads them) with this checkout's: other code may make other features."""
    npy = (merge_record.get("inputs") or {}).get("features")
    npy_dir = locate(npy["path"], anchor) if npy else None
    sidecar = None
    if npy_dir is not None and npy_dir.is_dir():
        for p in sorted(npy_dir.glob("*.json")):
            if not p.name.endswith(".prov.json"):
                try:
                    sidecar = json.loads(p.read_text())
                except (OSError, ValueError):
                    continue
                if isinstance(sidecar, dict) and "extractor" in sidecar:
                    break
                sidecar = None
    if sidecar is None:
        notes.append(f"feature file {path}: no extract sidecars found (work/ cleaned?): the code version that "
                     "made the training features cannot be compared with this checkout's")
        return
    frames = str(sidecar.get("frames") or "")
    decoded_by = frames.split("+", 1)[1] if "+" in frames else None
    if decoded_by != code["decode"]:
        mismatches.append(f"decoder code changed: the frames of the '{feature}' training features were decoded "
                          f"by {decoded_by or 'unrecorded code'}, this checkout's decoder is {code['decode']}")
    if sidecar.get("extractor") != extractor_digest(described, weights, code["extract"]):
        made_by = (_extract_record(merge_record, anchor).get("code_version") or "unrecorded code")
        mismatches.append(f"'{feature}' extractor code changed: the training features were extracted by "
                          f"{made_by} (extract stage), this checkout's extractor code is {code['extract']}")


def _protocol_key(protocol: dict | None) -> str | None:
    if not protocol:
        return None
    try:
        return SamplingProtocol(**protocol).key
    except TypeError:
        return None


def _extract_record(merge_record: dict, anchor: Path) -> dict:
    """The extract record of a merged file's per-video directory ({} when it is gone)."""
    npy = (merge_record.get("inputs") or {}).get("features")
    return (read_record(p) if npy and (p := locate(npy["path"], anchor)) else None) or {}


def _decode_backend(merge_record: dict, anchor: Path, notes: list[str]) -> str:
    """The decode backend, from the decode record two steps up (merge -> extract -> decode)."""
    frames = (_extract_record(merge_record, anchor).get("inputs") or {}).get("frames")
    decode_record = read_record(p) if frames and (p := locate(frames["path"], anchor)) else None
    backend = (((decode_record or {}).get("params") or {}).get("decode") or {}).get("backend")
    if backend is None:
        notes.append("no decode record found (work/ cleaned?): decoding with pyav, the default backend")
        return "pyav"
    return backend


def _pca_recipe(name: str, record: dict, anchor: Path, dataset: dict | None,
                mismatches: list[str], notes: list[str]) -> FeatureRecipe | None:
    inputs = record.get("inputs", {})
    sources = [role for role in inputs if role.startswith("features.")]
    if len(sources) != 1:
        mismatches.append(f"PCA feature file '{name}': its record names {len(sources)} source files")
        return None
    source_name = sources[0].removeprefix("features.")
    base = _feature_recipe(source_name, inputs[sources[0]], anchor, dataset, mismatches, notes)
    if base is None:
        return None
    pca = next((v for k, v in record.get("params", {}).items() if k.endswith(".video_pca")), None) or {}
    fit_videos = None
    if pca.get("fit_on", "train") == "train":
        split = _checked_input(inputs.get("dataset.splits.train"), "PCA fit split", anchor, mismatches)
        if split is None or dataset is None:
            return None
        fit_videos = sorted(load_dataset_split(_dataset_params({**dataset, "splits": {"train": str(split)}}),
                                               "train", _recorded_durations(inputs, anchor)).video_ids())
    source_file = locate(inputs[sources[0]]["path"], anchor)
    return dataclasses.replace(base, name=name, pca=PCAStep(source_file, fit_videos, int(pca.get("components", 500))))


def _recorded_durations(inputs: dict, anchor: Path) -> dict[str, float] | None:
    """The durations decode measured, where a record names them as an input (a dataset without a
    duration file: `dataset.durations: []`), else None."""
    entry = next((v for role, v in inputs.items() if "durations" in role and str(v.get("path")).endswith(
        "durations.json")), None)
    path = locate(entry["path"], anchor) if entry else None
    return json.loads(path.read_text()) if path else None


def _query_recipe(name: str, entry: dict | None, anchor: Path, mismatches: list[str]) -> QueryRecipe | None:
    path = _checked_input(entry, f"query feature file '{name}'", anchor, mismatches)
    if path is None:
        return None
    record = read_record(path) or {}
    encoder = record.get("encoder")
    if encoder is None:
        mismatches.append(f"query feature file {path} records no encoder: the queries cannot be encoded alike")
        return None
    if encoder.get("modality", "text") != "text":
        mismatches.append(f"query feature file {path}: spoken queries ({encoder.get('modality')}); "
                          "predict takes text queries only")
        return None
    weights = (record.get("weights") or {}).get("query_encoder", "unknown")
    if weights != "random":
        enc_dir = encoder.get("encoder_dir")
        found_dir = locate(enc_dir, anchor) if enc_dir else None
        files = [found_dir / n for n in ("model.safetensors", "pytorch_model.bin")] if found_dir else []
        file = next((f for f in files if f.is_file()), None)
        if file is None:
            mismatches.append(f"the query encoder of sha256 {weights} ({enc_dir}) is not on this machine")
            return None
        if sha256_file(file) != weights:
            mismatches.append(f"query encoder {file}: sha256 {sha256_file(file)} differs from the {weights} "
                              "that encoded the training queries")
        encoder = {**encoder, "encoder_dir": str(found_dir)}  # loaded from here, wherever predict runs
    params = record.get("params", {})
    train_sentences: list[str] = []
    if encoder.get("encoder_dir") is None:  # a random-init encoder's vocabulary is learnt on the train split
        dataset = _relocated_dataset(params.get("dataset", {}), anchor)
        if dataset is None or "train" not in dataset.get("splits", {}):
            mismatches.append(f"query feature file {path}: no train split recorded for its encoder's vocabulary")
            return None
        _checked_input(record.get("inputs", {}).get("annotations.train"), "query-encoder train split", anchor,
                       mismatches)
        train_sentences = [q.sentence for q in load_dataset_split(
            _dataset_params(dataset), "train", _recorded_durations(record.get("inputs", {}), anchor))]
    return QueryRecipe(name=name, encoder=encoder, seed=int(params.get("seed", 0)),
                       train_sentences=train_sentences, weights=weights)
