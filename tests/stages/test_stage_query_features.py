"""Stage query_features-mrnet: annotation splits -> query feature HDF5 with provenance, text and audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.params import Params, ParamsError
from pipeline.core.provenance import read_record
from pipeline.text.sentence_features import read_query_features, synthetic_speech, write_wav
from stages import query_features as stage

LINES = {"train": ["V1 0.0 2.0##the red circle moves left.", "V1 2.0 5.0##a square grows"],
         "test": ["V2 1.0 3.0##the red circle moves left.", "V2 3.0 4.0##the star disappears"]}


def make_params(root: Path, **query_encoder) -> Params:
    for split, lines in LINES.items():
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (root / "len.csv").write_text("id,length\nV1,6.0\nV2,6.0\n")
    return Params.model_validate({
        "dataset": {"name": "toy", "splits": {s: str(root / f"{s}.txt") for s in LINES},
                    "durations": [str(root / "len.csv")], "video_captions": None},
        "merge": {"out_dir": str(root / "features")},
        "model": {"mrnet": {"query_feature": "query_toy", "query_encoder": query_encoder}},
    })


@pytest.fixture(scope="module")
def tiny_audio_encoder(tmp_path_factory):
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    path = tmp_path_factory.mktemp("w2v")
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2),
                                 num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(path)
    return path


def test_text_random_encoder(tmp_path):
    params = make_params(tmp_path)
    stage.run(params, source="params.yaml", model="mrnet")
    out = tmp_path / "features" / "query_toy.h5"
    table = read_query_features(out)
    assert sorted(table) == ["a square grows", "the red circle moves left.", "the star disappears"]
    assert all(v.shape == (768,) for v in table.values())
    record = read_record(out)
    assert record["weights"] == {"query_encoder": "random"} and record["queries"] == 3
    stage.run(params, source="params.yaml", model="mrnet")  # deterministic: same bytes again
    assert all(np.array_equal(table[k], v) for k, v in read_query_features(out).items())


def test_audio_with_manifest_and_synthetic(tmp_path, tiny_audio_encoder):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    manifest = {}
    for i, sentence in enumerate(["the red circle moves left.", "a square grows", "the star disappears"]):
        write_wav(wavs / f"{i}.wav", synthetic_speech(sentence), sample_rate=16000)
        manifest[sentence] = f"{i}.wav"
    (wavs / "manifest.json").write_text(json.dumps(manifest))
    params = make_params(tmp_path, modality="audio", encoder_dir=str(tiny_audio_encoder),
                         audio_manifest=str(wavs / "manifest.json"))
    stage.run(params, source="params.yaml", model="mrnet")
    out = tmp_path / "features" / "query_toy.h5"
    from_files = read_query_features(out)
    assert all(v.shape == (16,) for v in from_files.values())
    assert read_record(out)["weights"]["query_encoder"] != "random"
    # without a manifest the same synthetic utterances are generated in memory: same features
    params = make_params(tmp_path, modality="audio", encoder_dir=str(tiny_audio_encoder))
    stage.run(params, source="params.yaml", model="mrnet")
    synthetic = read_query_features(out)
    assert all(np.allclose(from_files[k], synthetic[k], atol=1e-3) for k in from_files)


def test_missing_inputs_fail_before_work(tmp_path):
    params = make_params(tmp_path, encoder_dir=str(tmp_path / "nope"))
    with pytest.raises(ParamsError, match="model.mrnet.query_encoder.encoder_dir"):
        stage.run(params, source="params.yaml", model="mrnet")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"the red circle moves left.": "x.wav"}))
    params = make_params(tmp_path, modality="audio", audio_manifest=str(manifest))
    with pytest.raises(ParamsError, match="audio_manifest.*no wav file for 2 queries"):
        stage.run(params, source="params.yaml", model="mrnet")
