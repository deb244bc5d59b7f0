"""MESM's spec: its Config and `needs()`, torch free (see `models/specs/__init__.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from models import MODELS
from pipeline.core.params import Count, Fraction, NonNegative, Positive
from pipeline.training.spec import Needs, TrainConfig


class MESMConfig(TrainConfig):
    # training (MESM's runner: AdamW, StepLR per epoch, grad-norm clip 0.1; batch = video groups)
    seed: int | None = 2019
    epochs: Count = 200
    batch_size: Count = 12
    eval_batch_size: Count = 30
    grad_clip: Positive | None = 0.1
    select_metric: str = "mAP"  # MESM's stop_score (mAP for Charades, mIoU for CG / TACoS)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_drop: int = Field(400, ge=1)
    lr_gamma: Positive = 0.5
    # data
    features: list[str] = Field(default_factory=lambda: ["clip", "slowfast"])
    layout: Literal["single", "qvhighlights"] = "single"  # one GT moment per query / QVH windows + scores
    # seconds per feature row, checked against the row times merge stored in the feature files;
    # -1: GT frames from normalised times (TACoS)
    clip_len: float = 1.0
    max_video_l: int = Field(194, ge=1)
    max_words_l: int = Field(16, ge=3)
    use_tef: bool = True
    normalize_video: bool = True
    # Not in MESM (off in every published profile): per-channel standardisation of the video
    # features with statistics of the training videos, kept in the state dict. Random-init CLIP
    # features (the synthetic default) share one dominant direction (frame cosine > 0.98).
    standardize_video: bool = False
    # the cross-attention mask's head order as released (published numbers) or corrected; see
    # models/mesm/layers.py CrossAttentionLayer. As released, a query's scores depend on which
    # videos share its evaluation batch (docs/mesm.md, "Batch dependence").
    official_mask_order: bool = True
    normalize_txt: bool = True
    contra_samples: int = Field(2, ge=1)
    max_gather_size: int = Field(-1, ge=-1) # TACoS: 10 queries per item
    max_windows: int = Field(5, ge=1)
    max_ts_val: Positive = 150
    # text
    text_encoder: Literal["clip", "glove_pkl", "glove_txt"] = "clip"
    text_weights: str | None = None  # clip: clip_text_encoder.pth; None = random init (recorded)
    text_weights_sha256: str | None = None
    glove_file: str | None = None  # glove_txt: a GloVe text file (glove.6B.300d.txt)
    glove_dim: int = Field(300, ge=1)
    vocab_size: int = Field(1111, ge=1)
    # network
    hidden_dim: int = Field(256, ge=8)
    nheads: int = Field(8, ge=1)
    dim_feedforward: int = Field(1024, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    input_dropout: float = Field(0.5, ge=0, lt=1)
    n_input_proj: int = Field(2, ge=1, le=3)
    enc_layers: int = Field(2, ge=1)
    dec_layers: int = Field(2, ge=1)
    t2v_layers: int = Field(2, ge=1)
    num_recfw_layers: int = Field(2, ge=1)
    num_recss_layers: int = Field(4, ge=1)
    num_queries: int = Field(10, ge=1)
    share_mlp: bool = True
    use_txt_pos: bool = False
    rec_fw: bool = True
    rec_ss: bool = True
    # losses and matching
    set_cost_span: NonNegative = 10
    set_cost_giou: NonNegative = 1
    set_cost_class: NonNegative = 4
    loss_span_coef: NonNegative = 10
    loss_giou_coef: NonNegative = 1
    loss_label_coef: NonNegative = 4
    loss_saliency_coef: NonNegative = 4
    loss_recfw_coef: NonNegative = 0.1
    loss_recss_coef: NonNegative = 0.1
    eos_coef: NonNegative = 0.1
    rank_coef: NonNegative = 12
    use_triplet: bool = False
    saliency_margin: NonNegative = 0.2
    iou_gamma: Fraction = 0.9
    recss_tau: Positive = 0.5
    # evaluation
    r1_thresholds: list[Fraction] = Field(default_factory=lambda: [0.3, 0.5, 0.7])
    length_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"short": (0, 10), "middle": (10, 30), "long": (30, 150), "full": (0, 150)})

    @field_validator("clip_len")
    @classmethod
    def _seconds_or_minus_one(cls, v: float) -> float:
        if v != -1 and v <= 0:
            raise ValueError(f"clip_len must be seconds per feature (> 0) or -1 (normalised times), got {v}")
        return v


@MODELS.register("mesm", impl="models.mesm.model:MESM")
class MESMSpec:
    """What params validation, `vmr decode` and `vmr dag` know of MESM without importing it
    (nor torch): its Config and what it reads. `models.mesm.model.MESM` inherits both."""

    Config = MESMConfig

    @classmethod
    def needs(cls, cfg: MESMConfig, dataset) -> Needs:
        if cfg.text_encoder == "clip":
            vocab, files = "CLIP_tokenized_count.txt", {"model.mesm.text_weights": cfg.text_weights}
        elif cfg.text_encoder == "glove_pkl":
            vocab, files = "glove.pkl", {}
        else:
            vocab, files = "GloVe_tokenized_count.txt", {"model.mesm.glove_file": cfg.glove_file}
        return Needs(features=tuple(cfg.features), vocab=(vocab,),
                     files={role: path for role, path in files.items() if path})
