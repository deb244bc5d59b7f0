"""Frozen query features for MRNet: one 768-d vector per sentence (NLMR) or per spoken query (SLMR).

The official preprocessing (xian-sh/MRNet `preprocess/{text,audio}_encode.py`) runs a frozen
encoder over one query at a time, standardises every token/frame with a freshly initialised
LayerNorm (weight 1, bias 0: a plain per-vector standardisation, eps 1e-5) and averages over all
positions: for text every token including [CLS] and [SEP], for audio every encoder frame.

    encode_sentences(sentences, tokenizer, model)      -> (n, D) float32   (DistilBERT-style text)
    encode_waveforms(waveforms, feature_extractor, model) -> (n, D) float32 (wav2vec2-style audio)
    read_wav(path, sample_rate=16000)                  -> mono float32 waveform at sample_rate
    synthetic_speech(text, sample_rate=16000)          -> a deterministic stand-in "utterance"
    write_query_features(path, keys, features, provenance, tokens=None) / read_query_features(path)
    read_query_tokens(path)                            -> {key: (L, D)} per-token features (imported)

The HDF5 file holds `keys` (utf-8 strings: the query sentence, stripped) and `features` (n, D)
float32, one row per distinct key, sorted by key so the bytes do not depend on annotation order.
Spoken queries are keyed by the sentence they speak, so a model looks up text and audio features
the same way. Imported published query features (`vmr import-features`, QVHighlights
clip_text_features) are keyed by qid instead, and add a group `tokens` of (L, D) per-token features.
"""

from __future__ import annotations

import json
import os
import wave
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.atomic import atomic_path
from pipeline.core.progress import track
from pipeline.text.query_config import QueryEncoderConfig  # noqa: F401  (re-exported: its users import it from here)
from pipeline.text.tokenizers import train_wordpiece, wordpiece_from_vocab

SAMPLE_RATE = 16000  # what wav2vec2/data2vec audio encoders expect (the official code resamples to it)


def query_key(sentence: str) -> str:
    return sentence.strip()


def _standardised_mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-position LayerNorm without affine, then the mean over the kept positions. hidden (B, L, D)."""
    hidden = F.layer_norm(hidden.float(), hidden.shape[-1:], eps=1e-5)
    keep = keep.to(hidden.dtype).unsqueeze(-1)
    return (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)


@torch.no_grad()
def encode_sentences(sentences: Sequence[str], tokenizer: Any, model: torch.nn.Module, batch_size: int = 32) -> np.ndarray:
    """Sentence features from a DistilBERT-style encoder (`last_hidden_state`).

    `tokenizer` is a `tokenizers.Tokenizer` with BERT post-processing ([CLS] ... [SEP]), the
    tokenizer MMN uses. Sentences are batched with padding; pad positions are excluded from the
    mean, so each row equals encoding that sentence alone (the official setting).
    """
    from torch.nn.utils.rnn import pad_sequence

    model.eval()
    pad_id = tokenizer.token_to_id("[PAD]") or 0
    out = []
    for start in track(range(0, len(sentences), batch_size), "encode sentences"):
        encodings = tokenizer.encode_batch([query_key(s) for s in sentences[start : start + batch_size]])
        ids = pad_sequence([torch.tensor(e.ids) for e in encodings], batch_first=True, padding_value=pad_id)
        lengths = torch.tensor([len(e.ids) for e in encodings])
        keep = torch.arange(ids.shape[1])[None] < lengths[:, None]
        hidden = model(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        out.append(_standardised_mean(hidden, keep).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.config.hidden_size), np.float32)


def load_text_encoder(encoder_dir: str | os.PathLike | None, train_sentences: Sequence[str], seed: int = 0,
                      vocab_size: int = 30522) -> tuple[Any, torch.nn.Module]:
    """(tokenizer, DistilBERT) from a local HF directory (config + weights + vocab.txt), or a seeded
    random distilbert-base-shaped encoder with a WordPiece vocabulary trained on `train_sentences`.

    Tokenizers as MMN's text encoder (models/common.py: one rule for both models)."""
    from transformers import DistilBertConfig, DistilBertModel


    if encoder_dir is None:
        torch.manual_seed(seed)
        tokenizer = train_wordpiece(train_sentences, vocab_size)
        return tokenizer, DistilBertModel(DistilBertConfig(vocab_size=vocab_size, pad_token_id=0))
    path = Path(encoder_dir)
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(f"{path}: text encoder directory has no vocab.txt")
    return wordpiece_from_vocab(path / "vocab.txt"), DistilBertModel.from_pretrained(str(path), local_files_only=True)


@torch.no_grad()
def encode_waveforms(waveforms: Sequence[np.ndarray], feature_extractor: Any, model: torch.nn.Module) -> np.ndarray:
    """Spoken-query features from a wav2vec2-style encoder, one utterance at a time (as the official code)."""
    model.eval()
    out = []
    for wav in track(waveforms, "encode audio"):
        inputs = feature_extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        hidden = model(inputs["input_values"]).last_hidden_state  # (1, frames, D)
        out.append(_standardised_mean(hidden, torch.ones(hidden.shape[:2]))[0].numpy())
    return np.stack(out).astype(np.float32)


def read_wav(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A PCM wav file as mono float32 in [-1, 1], resampled to `sample_rate` (polyphase filter)."""
    from scipy.signal import resample_poly

    path = Path(path)
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path}: not a readable PCM wav file: {e}") from None
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise ValueError(f"{path}: unsupported sample width {width} bytes (expected 1, 2 or 4)")
    samples = np.frombuffer(raw, dtype=dtypes[width]).astype(np.float32)
    if width == 1:
        samples = samples - 128.0
    samples = samples.reshape(-1, channels).mean(axis=1) / float(2 ** (8 * width - 1))
    if rate != sample_rate:
        ratio = Fraction(sample_rate, rate).limit_denominator(1000)
        samples = resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
    return samples


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit mono PCM, written atomically."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with atomic_path(path) as tmp, wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def synthetic_speech(text: str, sample_rate: int = SAMPLE_RATE, seconds_per_char: float = 0.06) -> np.ndarray:
    """A deterministic stand-in utterance for `text` (no TTS engine is available offline).

    Each character becomes a short two-formant tone burst whose pitch depends on the character,
    with a Hann envelope and a little seeded noise; spaces are pauses. It is not speech, but it is
    a real waveform whose content depends on the words, which is what the SLMR path needs to be
    exercised end to end (real recordings or TTS output go through the same `read_wav`).
    """
    n = int(seconds_per_char * sample_rate)
    t = np.arange(n) / sample_rate
    window = np.hanning(n)
    rng = np.random.default_rng(sum(map(ord, text)))
    parts = []
    for ch in query_key(text).lower():
        if ch == " ":
            parts.append(np.zeros(n // 2))
            continue
        f1 = 200.0 + 25.0 * (ord(ch) % 32)
        f2 = 900.0 + 60.0 * (ord(ch) % 17)
        parts.append(window * (0.5 * np.sin(2 * np.pi * f1 * t) + 0.3 * np.sin(2 * np.pi * f2 * t)))
    wav = np.concatenate(parts or [np.zeros(n)])
    return (0.8 * wav + 0.01 * rng.standard_normal(wav.shape)).astype(np.float32)


def load_audio_encoder(encoder_dir: str | os.PathLike | None, seed: int = 0) -> tuple[Any, torch.nn.Module]:
    """(feature extractor, model) from a local wav2vec2-style HF directory (wav2vec2, data2vec-audio,
    UniSpeech-SAT: anything AutoModel loads with a `last_hidden_state`), or a seeded random
    wav2vec2-base-shaped encoder (768-d, 12 layers) when `encoder_dir` is None."""
    from transformers import (
        AutoFeatureExtractor,
        AutoModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    if encoder_dir is None:
        torch.manual_seed(seed)
        return Wav2Vec2FeatureExtractor(sampling_rate=SAMPLE_RATE, do_normalize=True), Wav2Vec2Model(Wav2Vec2Config())
    path = Path(encoder_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: audio encoder directory not found")
    extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
    return extractor, AutoModel.from_pretrained(path, local_files_only=True)


# -- the HDF5 file --------------------------------------------------------------------------------


def write_query_features(
    path: str | os.PathLike, keys: Sequence[str], features: np.ndarray, provenance: Mapping[str, Any] | None = None,
    tokens: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write keys + features sorted by key; duplicate keys must carry identical rows.

    `tokens` (key -> (L, D) per-token features, e.g. imported CLIP `last_hidden_state`) go in the
    group `tokens`, one dataset per key, in their own dtype."""
    import h5py

    if len(keys) != len(features):
        raise ValueError(f"{len(keys)} keys but {len(features)} feature rows")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("keys", data=[keys[i].encode() for i in order], dtype=h5py.string_dtype())
        f.create_dataset("features", data=np.asarray(features, np.float32)[order])
        if tokens is not None:
            group = f.create_group("tokens")
            for i in order:
                group.create_dataset(keys[i], data=tokens[keys[i]], track_times=False)
        if provenance is not None:
            f.attrs["provenance"] = json.dumps(provenance, sort_keys=True)


def read_query_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{query key: (D,) float32}. Raises with the file name when the layout is not ours."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: query feature file not found (run `vmr sentence-features`)")
    with h5py.File(path, "r") as f:
        if "keys" not in f or "features" not in f:
            raise ValueError(f"{path}: expected datasets 'keys' and 'features' (a vmr query feature file)")
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][:]]
        features = f["features"][:]
    if len(keys) != len(features):
        raise ValueError(f"{path}: {len(keys)} keys but {len(features)} feature rows")
    return dict(zip(keys, features, strict=True))


def read_query_tokens(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{query key: (L, D) float32} from the `tokens` group of a query feature file."""
    import h5py

    with h5py.File(path, "r") as f:
        if "tokens" not in f:
            raise ValueError(f"{path}: no per-token query features (group 'tokens')")
        return {k: np.asarray(v[()], np.float32) for k, v in f["tokens"].items()}


def unique_sentences(sentences: Iterable[str]) -> list[str]:
    return sorted({query_key(s) for s in sentences})
