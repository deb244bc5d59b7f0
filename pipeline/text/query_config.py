"""`QueryEncoderConfig`: how `vmr query-features` encodes a model's queries. Its own torch-free
module, because params validation reads it (through the models' Configs) and must not import torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.params import Section


class QueryEncoderConfig(Section):
    """How `vmr query-features` encodes a model's queries (frozen, offline; MRNet)."""

    modality: Literal["text", "audio"] = "text"  # NLMR: DistilBERT; SLMR: wav2vec2-style audio encoder
    encoder_dir: str | None = None  # local Hugging Face directory; None: seeded random init (weights: random)
    encoder_sha256: str | None = None  # sha256 of the weights file in encoder_dir, checked when given
    # audio: JSON {sentence: wav path relative to the manifest}; None: synthetic stand-in utterances
    audio_manifest: str | None = None
    splits: list[str] = Field(default_factory=lambda: ["train", "test"])
    batch_size: int = Field(32, ge=1)
