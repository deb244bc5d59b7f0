"""Stage `query_features-<model>`: frozen query features a model declares in `needs().query_features`
(MRNet: DistilBERT text or wav2vec2-style speech), cached like any other artifact.

Reads: the annotation splits of `dataset` named by the encoder config's `splits`, the encoder
directory `encoder_dir` (or seeded random init), and for spoken queries the wav files of
`audio_manifest`. Writes: `features/<name>.h5` (keys + features, see
pipeline.text.sentence_features) with its provenance record in the file's attrs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models import MODELS
from pipeline.core.codedeps import stage_code
from pipeline.core.params import Params, ParamsError, require_files, subset
from pipeline.core.progress import log
from pipeline.core.provenance import make_record, weights_record
from pipeline.media.framestore import decoded_durations, durations_path
from pipeline.text.annotations import load_dataset_split
from pipeline.text.sentence_features import (
    encode_sentences,
    encode_waveforms,
    load_audio_encoder,
    load_text_encoder,
    query_key,
    read_wav,
    synthetic_speech,
    unique_sentences,
    write_query_features,
)
from stages.common import duration_files


def _weights_file(encoder_dir: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (encoder_dir / name).is_file():
            return encoder_dir / name
    return None


def _audio_waveforms(sentences: list[str], manifest: str | None, key: str) -> tuple[list, str]:
    if manifest is None:
        log("query_features: no audio_manifest: encoding synthetic stand-in utterances")
        return [synthetic_speech(s) for s in sentences], "synthetic"
    table = json.loads(Path(manifest).read_text())
    base = Path(manifest).parent
    missing = [s for s in sentences if s not in {query_key(k) for k in table}]
    if missing:
        raise ParamsError(f"{manifest} ({key}): no wav file for {len(missing)} queries, e.g. {missing[0]!r}")
    by_key = {query_key(k): v for k, v in table.items()}
    return [read_wav(base / by_key[s]) for s in sentences], manifest


def run(params: Params, source: str, model: str, **_) -> None:
    if model not in MODELS:
        raise ParamsError(f"--model {model}: unknown model; expected one of {MODELS.names()}")
    spec = MODELS.get(model).needs(MODELS.config(params, model), params.dataset).query_features
    if spec is None:
        raise ParamsError(f"--model {model}: the model reads no frozen query features")
    enc, at = spec.encoder, f"model.{model}.{spec.config_keys[0]}"
    require_files(source, {f"{at}.encoder_dir": enc.encoder_dir, f"{at}.audio_manifest": enc.audio_manifest})
    require_files(source, {f"dataset.splits.{s}": params.dataset.splits.get(s, f"<split '{s}' not in dataset.splits>")
                           for s in enc.splits} | {k: str(p) for k, p in duration_files(params, source).items()})
    durations = decoded_durations(params.dataset, params.decode.out_dir)
    queries = {s: load_dataset_split(params.dataset, s, durations) for s in enc.splits}
    sentences = unique_sentences(q.sentence for split in queries.values() for q in split)
    torch.manual_seed(params.seed)
    weights_file = _weights_file(Path(enc.encoder_dir)) if enc.encoder_dir else None
    weights = weights_record(weights_file, enc.encoder_sha256)
    extra = {}
    if enc.modality == "text":
        train_sentences = [q.sentence for q in queries.get("train", [])]
        tokenizer, encoder = load_text_encoder(enc.encoder_dir, train_sentences, seed=params.seed)
        features = encode_sentences(sentences, tokenizer, encoder, enc.batch_size)
    else:
        waveforms, extra["audio"] = _audio_waveforms(sentences, enc.audio_manifest, f"{at}.audio_manifest")
        extractor, encoder = load_audio_encoder(enc.encoder_dir, seed=params.seed)
        features = encode_waveforms(waveforms, extractor, encoder)
    out = Path(params.merge.out_dir) / f"{spec.name}.h5"  # where DataContext.feature_file looks
    typed = MODELS.config(params, model).model_dump()
    model_keys = {f"model.{model}.{k}": typed[k] for k in spec.config_keys}
    record = make_record(
        f"query_features-{model}",
        {**subset(params, "seed", "dataset"), **model_keys},
        inputs={f"annotations.{s}": params.dataset.splits[s] for s in enc.splits}
        | ({"durations": str(durations_path(params.decode.out_dir))} if durations is not None else {}),
        weights={"query_encoder": weights},
        extra={"queries": len(sentences), "dim": int(features.shape[1]), "encoder": enc.model_dump(), **extra},
        code=stage_code("query_features", [MODELS.get(model)]),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_query_features(out, sentences, features, record)
    log(f"query_features-{model}: {len(sentences)} queries x {features.shape[1]} -> {out}")
