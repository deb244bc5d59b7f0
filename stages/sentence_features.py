"""Stage `sentence_features`: frozen query features for MRNet, cached like any other artifact.

Reads: the annotation splits of `dataset` (`model.mrnet.query_encoder.splits`), the encoder
directory `model.mrnet.query_encoder.encoder_dir` (text: DistilBERT; audio: wav2vec2-style) or
seeded random init, and for spoken queries the wav files of `audio_manifest`.
Writes: `features/<model.mrnet.query_feature>.h5` (keys + features, see
pipeline.sentence_features) with its provenance record in the file's attrs.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.params import Params, ParamsError, require_files, subset
from pipeline.progress import log

CODE = ("pipeline/sentence_features.py", "stages/sentence_features.py", "models/common.py")


def _weights_file(encoder_dir: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (encoder_dir / name).is_file():
            return encoder_dir / name
    return None


def _audio_waveforms(sentences: list[str], manifest: str | None) -> tuple[list, str]:
    from pipeline.sentence_features import query_key, read_wav, synthetic_speech

    if manifest is None:
        log("sentence_features: no audio_manifest: encoding synthetic stand-in utterances")
        return [synthetic_speech(s) for s in sentences], "synthetic"
    table = json.loads(Path(manifest).read_text())
    base = Path(manifest).parent
    missing = [s for s in sentences if s not in {query_key(k) for k in table}]
    if missing:
        raise ParamsError(f"{manifest} (model.mrnet.query_encoder.audio_manifest): no wav file for "
                          f"{len(missing)} queries, e.g. {missing[0]!r}")
    by_key = {query_key(k): v for k, v in table.items()}
    return [read_wav(base / by_key[s]) for s in sentences], manifest


def run(params: Params, source: str, **_) -> None:
    import torch

    from pipeline.annotations import load_dataset_split
    from pipeline.provenance import make_record, weights_record
    from pipeline.sentence_features import (
        encode_sentences,
        encode_waveforms,
        unique_sentences,
        write_query_features,
    )

    cfg = params.model_config_of("mrnet")
    enc = cfg.query_encoder
    require_files(source, {"model.mrnet.query_encoder.encoder_dir": enc.encoder_dir,
                           "model.mrnet.query_encoder.audio_manifest": enc.audio_manifest})
    require_files(source, {f"dataset.splits.{s}": params.dataset.splits.get(s, f"<split '{s}' not in dataset.splits>")
                           for s in enc.splits})
    queries = {s: load_dataset_split(params.dataset, s) for s in enc.splits}
    sentences = unique_sentences(q.sentence for split in queries.values() for q in split)
    torch.manual_seed(params.seed)
    weights_file = _weights_file(Path(enc.encoder_dir)) if enc.encoder_dir else None
    weights = weights_record(weights_file, enc.encoder_sha256)
    extra = {}
    if enc.modality == "text":
        from pipeline.sentence_features import load_text_encoder

        train_sentences = [q.sentence for q in queries.get("train", [])]
        tokenizer, model = load_text_encoder(enc.encoder_dir, train_sentences, seed=params.seed)
        features = encode_sentences(sentences, tokenizer, model, enc.batch_size)
    else:
        from pipeline.sentence_features import load_audio_encoder

        waveforms, extra["audio"] = _audio_waveforms(sentences, enc.audio_manifest)
        extractor, model = load_audio_encoder(enc.encoder_dir, seed=params.seed)
        features = encode_waveforms(waveforms, extractor, model)
    out = Path(params.merge.out_dir) / f"{cfg.query_feature}.h5"  # where DataContext.feature_file looks
    record = make_record(
        "sentence_features",
        {**subset(params, "dataset"), "model.mrnet.query_encoder": enc.model_dump(),
         "model.mrnet.query_feature": cfg.query_feature},
        inputs={f"annotations.{s}": params.dataset.splits[s] for s in enc.splits},
        weights={"query_encoder": weights},
        extra={"queries": len(sentences), "dim": int(features.shape[1]), **extra},
        code=CODE,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_query_features(out, sentences, features, record)
    log(f"sentence_features: {len(sentences)} queries x {features.shape[1]} -> {out}")
