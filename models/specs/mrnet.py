"""MRNet's spec: its Config and `needs()`, torch free (see `models/specs/__init__.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from models import MODELS
from pipeline.core.params import Count, Fraction, NonNegative, NonNegativeInt, Positive
from pipeline.media.feature_pca import VideoPCAConfig
from pipeline.text.query_config import QueryEncoderConfig
from pipeline.training.spec import Needs, QueryFeatures, ReducedFeatures, TrainConfig

AttMode = Literal["all", "v", "trans", "no"]
MaskMode = Literal["both", "ret", "sparse", "no"]
QueryOrder = Literal["gt_start", "text"]


class MRNetConfig(TrainConfig):
    """Defaults: the official ActivityNet best config (`checkpoints/best/activity/config.yml`)."""

    seed: int | None = 25285
    epochs: Count = 15
    batch_size: Count = 12  # videos
    eval_batch_size: Count = 12
    grad_clip: Positive | None = 5.0
    eval_from: Count = 1  # SKIP_TEST 1: the official loop tests once epoch >= SKIP_TEST
    select_metric: str = "R@1,IoU@0.5"
    # inputs
    feature: str = "c3d"  # video features: `features/<feature>.h5`
    query_feature: str = "query_distilbert"  # frozen query features: `features/<query_feature>.h5`
    query_encoder: QueryEncoderConfig = QueryEncoderConfig()
    video_pca: VideoPCAConfig | None = None  # TACoS: C3D 4096-d -> 500-d before training
    input_size: int = Field(500, ge=1)  # FEATPOOL.INPUT_SIZE
    query_dim: int = Field(768, ge=1)  # INPUT_TEXT_DIM
    num_pre_clips: int = Field(256, ge=1)  # INPUT.NUM_PRE_CLIPS (avgfeats target)
    num_clips: int = Field(64, ge=1)  # N
    pool_kernel: int = Field(4, ge=1)  # FEATPOOL.KERNEL_SIZE; stride num_pre_clips // num_clips
    featpool_hidden: int = Field(512, ge=1)
    pooling_counts: list[Count] = Field(default_factory=lambda: [15, 8, 8])
    dim: int = Field(256, ge=1)  # JOINT_SPACE_SIZE: TransRet width, map channels, output heads
    predictor_hidden: int = Field(512, ge=1)
    predictor_kernel: int = Field(9, ge=1)
    predictor_layers: int = Field(4, ge=1)
    # TransRet (SOLVER.* in the official config)
    trans_layers: int = Field(2, ge=0)
    heads: int = Field(8, ge=1)
    gamma: float = Field(0.98, gt=0, le=1)
    ffn_dim: int = Field(1024, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    input_dropout: float = Field(0.5, ge=0, lt=1)
    att_mode: AttMode = "all"
    mask_mode: MaskMode = "both"
    bidirectional_decay: bool = True  # D_DOUBLE (diagonal 2)
    att_softmax: bool = True
    att_dropout: Fraction | None = None
    projection: Literal["matrices", "linear"] = "matrices"  # "linear": ret_model_tacos.py
    no_softmax_weights: Literal["zeros", "logits"] = "zeros"  # see MaskableRetention
    # losses (MODEL.RET.LOSS.* and SOLVER.*)
    min_iou: Fraction = 0.5
    max_iou: Fraction = 1.0
    top_k: int = Field(1, ge=1)  # NUM_POSTIVE_VIDEO_PROPOSAL
    neg_video_iou: Fraction = 0.5
    sent_removal_iou: Fraction = 0.5
    tau_video: Positive = 0.1
    tau_sent: Positive = 0.1
    margin: NonNegative = 0.3
    contrastive_weight: NonNegative = 0.1
    sparse_weight: NonNegative = 10.0
    loss_ratio: NonNegative = 0.15  # overall_min = loss_ratio * batch_size * sparse_weight
    sparsity_count_twice: bool = True  # official: sp is added again when sp >= overall_min
    only_iou: NonNegativeInt = 6  # full contrastive + sparsity weight while epoch <= only_iou, then x0.01
    # optimiser
    lr: Positive = 8e-4
    milestones: list[Count] = Field(default_factory=lambda: [7, 15])
    # inference
    nms_thresh: Fraction = 0.5
    score_pow: Positive = 0.5  # CONTRASTIVE_SCORE_POW
    thresholds: list[Fraction] = Field(default_factory=lambda: [0.3, 0.5, 0.7])
    test_query_order: QueryOrder = "gt_start"  # official; "text": honest (see query_order)
    report_both_orders: bool = True  # also predict/score with the other order ("text_order/..." metrics)
    num_predictions: int = Field(5, ge=1)  # windows kept per query after NMS
    # official released weights (pool_model_14.pth ANet, pool_model_110e.pth TACoS), loaded at init
    init_weights: str | None = None
    init_weights_sha256: str | None = None


@MODELS.register("mrnet", impl="models.mrnet:MRNet")
class MRNetSpec:
    """What params validation, `vmr decode` and `vmr dag` know of MRNet without importing it
    (nor torch): its Config and what it reads. `models.mrnet.MRNet` inherits both."""

    Config = MRNetConfig

    @classmethod
    def needs(cls, cfg: MRNetConfig, dataset) -> Needs:
        queries = QueryFeatures(cfg.query_feature, cfg.query_encoder, config_keys=("query_encoder", "query_feature"))
        pca = None if cfg.video_pca is None else ReducedFeatures(cfg.feature, cfg.video_pca,
                                                                 config_keys=("video_pca", "feature"))
        return Needs(features=(cfg.feature,), query_features=queries, pca=pca)
