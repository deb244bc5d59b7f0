"""MMN's spec: its Config and `needs()`, torch free (see `models/specs/__init__.py`)."""

from __future__ import annotations

from pydantic import Field

from models import MODELS
from pipeline.core.params import Count, Fraction, NonNegative, NonNegativeInt, Positive
from pipeline.training.spec import Needs, TrainConfig


class MMNConfig(TrainConfig):
    """Defaults: the official Charades-STA VGG config (pool_charades_16x16_k5l8)."""

    seed: int | None = 25285
    epochs: Count = 18
    batch_size: Count = 48  # videos, global
    eval_batch_size: Count = 48
    grad_clip: Positive | None = 5.0
    select_metric: str = "R@1,IoU@0.5"
    # video features (names of merged HDF5 files, concatenated if several)
    features: list[str] = Field(default_factory=lambda: ["vgg"])
    input_size: Count | None = 4096  # FEATPOOL.INPUT_SIZE; null: the feature files' width
    l2norm: bool = True
    num_pre_clips: int = Field(32, ge=1)
    num_clips: int = Field(16, ge=1)
    pool_kernel: int = Field(2, ge=1)
    pooling_counts: list[Count] = Field(default_factory=lambda: [15])
    feat_hidden: Count = 512
    pred_hidden: Count = 512
    pred_kernel: Count = 5
    pred_layers: int = Field(8, ge=1)
    joint_size: Count = 256
    # text encoder: a local HF DistilBERT directory, or a random DistilBERT-shaped one
    text_encoder: str | None = None
    text_encoder_sha256: str | None = None
    text_dim: Count = 768
    text_layers: Count = 6
    text_heads: Count = 12
    text_ffn: Count = 3072
    vocab_size: Count = 30522
    max_tokens: Count = 512
    # losses
    min_iou: Fraction = 0.5
    max_iou: Fraction = 1.0
    top_k: int = Field(1, ge=1)  # NUM_POSTIVE_VIDEO_PROPOSAL
    neg_iou: Fraction = 0.5
    sent_removal_iou: Fraction = 0.5
    tau_video: Positive = 0.1
    tau_sent: Positive = 0.1
    margin: NonNegative = 0.4
    contrastive_weight: NonNegative = 0.05
    only_iou: NonNegativeInt = 7  # full contrastive weight while epoch <= only_iou, then x0.01
    # optimisation
    lr: Positive = 1e-4
    bert_lr_scale: NonNegative = 0.1
    weight_decay: NonNegative = 1e-5
    betas: tuple[Fraction, Fraction] = (0.9, 0.99)
    milestones: list[Count] = Field(default_factory=lambda: [8, 13])
    gamma: Positive = 0.1
    freeze_bert: NonNegativeInt = 4  # BERT frozen while epoch <= freeze_bert
    # inference and evaluation
    nms_threshold: Fraction = 0.5
    score_pow: Positive = 0.5
    num_windows: int = Field(10, ge=1)  # windows kept per query after NMS
    recall_ks: list[Count] = Field(default_factory=lambda: [1, 5])
    iou_thresholds: list[Fraction] = Field(default_factory=lambda: [0.5, 0.7])


@MODELS.register("mmn", impl="models.mmn:MMN")
class MMNSpec:
    """What params validation, `vmr decode` and `vmr dag` know of MMN without importing it
    (nor torch): its Config and what it reads. `models.mmn.MMN` inherits both."""

    Config = MMNConfig

    @classmethod
    def needs(cls, cfg: MMNConfig, dataset) -> Needs:
        return Needs(features=tuple(cfg.features),
                     files={"model.mmn.text_encoder": cfg.text_encoder} if cfg.text_encoder else {})
