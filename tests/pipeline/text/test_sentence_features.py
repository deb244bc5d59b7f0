"""Query features for MRNet: text (DistilBERT-style) and spoken queries (wav2vec2-style), both from
local model directories written here in the real Hugging Face format with random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.text.sentence_features import (
    encode_sentences,
    encode_waveforms,
    load_text_encoder,
    query_key,
    read_query_features,
    read_wav,
    synthetic_speech,
    write_query_features,
    write_wav,
)
from pipeline.text.tokenizers import train_wordpiece

SENTENCES = ["the red circle moves to the left.", "a blue square grows", " the green triangle disappears "]


@pytest.fixture(scope="module")
def text_encoder_dir(tmp_path_factory):
    """A DistilBERT HF directory (config.json, model.safetensors, vocab.txt) with random weights."""
    from transformers import DistilBertConfig, DistilBertModel

    from pipeline.text.tokenizers import train_wordpiece

    path = tmp_path_factory.mktemp("distilbert")
    tok = train_wordpiece(SENTENCES * 3, 200)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (path / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def audio_encoder_dir(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    path = tmp_path_factory.mktemp("wav2vec2")
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(path)
    return path


def test_text_features_match_one_sentence_at_a_time(text_encoder_dir):
    tokenizer, model = load_text_encoder(text_encoder_dir, [])
    batched = encode_sentences(SENTENCES, tokenizer, model, batch_size=8)
    assert batched.shape == (3, 32) and batched.dtype == np.float32
    for i, sentence in enumerate(SENTENCES):
        # The official recipe by hand: one sentence, no padding, LN without affine, mean incl. CLS/SEP.
        ids = torch.tensor([tokenizer.encode(query_key(sentence)).ids])
        assert ids[0, 0] == tokenizer.token_to_id("[CLS]") and ids[0, -1] == tokenizer.token_to_id("[SEP]")
        with torch.no_grad():
            hidden = model(input_ids=ids).last_hidden_state[0]
        expected = torch.nn.functional.layer_norm(hidden, (32,)).mean(0).numpy()
        np.testing.assert_allclose(batched[i], expected, atol=1e-5)
    assert not np.allclose(batched[0], batched[1])


def test_wordpiece_vocabulary_is_a_function_of_the_sentences():
    tok = train_wordpiece(SENTENCES, 80)
    assert tok.get_vocab() == train_wordpiece(list(reversed(SENTENCES)), 80).get_vocab()
    assert tok.encode("The red circle").tokens == ["[CLS]", "the", "red", "circle", "[SEP]"]
    assert tok.encode("reed zebra").tokens == ["[CLS]", "r", "##e", "##e", "##d", "[UNK]", "[SEP]"]


def test_random_text_encoder_is_seeded():
    tok_a, model_a = load_text_encoder(None, SENTENCES, seed=3, vocab_size=120)
    tok_b, model_b = load_text_encoder(None, SENTENCES, seed=3, vocab_size=120)
    assert model_a.config.dim == 768 and tok_a.get_vocab() == tok_b.get_vocab()
    np.testing.assert_array_equal(encode_sentences(SENTENCES[:1], tok_a, model_a), encode_sentences(SENTENCES[:1], tok_b, model_b))


def test_wav_roundtrip_and_resampling(tmp_path):
    wav = synthetic_speech("the red circle")
    assert wav.ndim == 1 and len(wav) > 16000 * 0.3
    assert not np.allclose(wav[:2000], synthetic_speech("a blue square")[:2000])
    write_wav(tmp_path / "a.wav", wav)
    np.testing.assert_allclose(read_wav(tmp_path / "a.wav"), wav, atol=1e-4)
    write_wav(tmp_path / "b.wav", wav, sample_rate=8000)  # same samples declared at 8 kHz -> upsampled x2
    assert abs(len(read_wav(tmp_path / "b.wav")) - 2 * len(wav)) <= 1
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    with pytest.raises(ValueError, match="bad.wav"):
        read_wav(tmp_path / "bad.wav")


def test_audio_features_from_generated_speech(audio_encoder_dir):
    from transformers import AutoFeatureExtractor, AutoModel

    extractor, model = AutoFeatureExtractor.from_pretrained(audio_encoder_dir), AutoModel.from_pretrained(audio_encoder_dir)
    waves = [synthetic_speech(s) for s in SENTENCES]
    feats = encode_waveforms(waves, extractor, model)
    assert feats.shape == (3, 32)
    # LN then mean: every frame has zero mean over channels, so the average does too.
    np.testing.assert_allclose(feats.mean(axis=1), 0.0, atol=1e-5)
    assert not np.allclose(feats[0], feats[1])


def test_query_feature_file_roundtrip(tmp_path):
    keys = ["b sentence", "a sentence"]
    feats = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_query_features(tmp_path / "q.h5", keys, feats, {"stage": "sentence_features"})
    table = read_query_features(tmp_path / "q.h5")
    assert list(table) == ["a sentence", "b sentence"]  # sorted: independent of annotation order
    np.testing.assert_array_equal(table["b sentence"], feats[0])
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        read_query_features(tmp_path / "missing.h5")


def test_a_vocabulary_too_small_for_the_characters_names_the_setting():
    with pytest.raises(ValueError, match=r"model.mmn.vocab_size 8 < the \d+ special tokens and characters"):
        train_wordpiece(SENTENCES, 8, "model.mmn.vocab_size")
