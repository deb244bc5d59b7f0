"""GLSCL's spec: its Config and `needs()`, torch free (see `models/specs/__init__.py`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models import MODELS
from pipeline.core.params import Count, Fraction, NonNegative, Positive
from pipeline.media.sampling import SamplingProtocol
from pipeline.nets.clip import CONTEXT_LENGTH, VOCAB_SIZE
from pipeline.training.spec import Needs, TrainConfig

FRAMES_PER_SECOND = 1.0  # GLSCL samples one frame per second (the released decord stride round(fps))


def glscl_protocol():
    """GLSCL's frames: one per second, the first at or after each whole second (the released decord
    stride round(fps) from frame 0), short side 224 bicubic, centre crop 224."""

    return SamplingProtocol(rule="uniform", rate=FRAMES_PER_SECOND, short_side=224, crop=224,
                            interpolation="bicubic")


class GLSCLConfig(TrainConfig):
    # training defaults of train_msrvtt.sh / the README
    epochs: Count = 5
    batch_size: Count = 128  # global, in (caption, video) pairs
    eval_batch_size: Count = 64
    grad_clip: Positive | None = 1.0  # global clip_grad_norm_; BertAdam also clips each tensor to 1.0
    select_metric: str = "t2v_R1"
    # retrieval data: "video_captions" = the dataset's {vid: caption} file, split videos from
    # `dataset.splits` (the synthetic default); "msrvtt" = `dataset.splits` are CLIP4Clip's files
    # (train: MSRVTT_data.json with `dataset.durations[0]` = MSRVTT_train.9k.csv; test: the 1k-A csv)
    source: Literal["video_captions", "msrvtt"] = "video_captions"
    # CLIP backbone (defaults: ViT-B/32 as released by OpenAI)
    embed_dim: int = Field(512, ge=1)
    image_size: int = Field(224, ge=1)
    patch_size: int = Field(32, ge=1)
    vision_width: int = Field(768, ge=1)
    vision_layers: int = Field(12, ge=1)
    text_width: int = Field(512, ge=1)
    text_layers: int = Field(12, ge=1)
    context_length: int = Field(CONTEXT_LENGTH, ge=1)
    vocab_size: int = Field(VOCAB_SIZE, ge=1)
    weights: str | None = None  # OpenAI `ViT-B-32.pt` (TorchScript archive or a plain state dict)
    weights_sha256: str | None = None
    # video input: raw frames from the decode stage (end to end) or frozen CLIP frame features
    input: Literal["frames", "features"] = "frames"
    feature: str = "clip"  # merged feature file `features/<feature>.h5` when input=features
    # subtract the mean training frame feature (not in the release; for cheap runs on random-init
    # CLIP features, which share one large common direction that hides the differences)
    feature_center: bool = False
    max_words: int = Field(32, ge=3)
    max_frames: int = Field(12, ge=1)
    augment: bool = True  # video-consistent RandAugment (4 ops, magnitude 7) on training frames
    # heads
    temporal_layers: int = Field(4, ge=0)  # `num_hidden_layers`
    num_queries: int = Field(8, ge=1)  # `query_number`
    decoder_layers: int = Field(3, ge=1)  # `cross_att_layer`
    decoder_heads: int = Field(8, ge=1)
    decoder_dropout: float = Field(0.1, ge=0, lt=1)
    query_share: bool = True  # text and video use the same learnable queries
    decoder_share: bool = True  # `cross_att_share`: one decoder for both modalities
    temperature: float = Field(3.0, gt=0)  # `temp` (tau) of the global interaction
    local_weight: Fraction = 0.5  # `loss2_weight` (lambda)
    # losses
    alpha: NonNegative = 1e-4  # intra-diversity (IDL) weight
    beta: NonNegative = 0.005  # inter-consistency (ICL) diagonal weight (README; train_msrvtt.sh uses 0.02)
    idl_margin: NonNegative = 0.1
    icl_target: Fraction = 0.75
    # optimisation (BertAdam as released)
    lr: float = Field(1e-4, gt=0)
    coef_lr: float = Field(1e-3, gt=0)  # CLIP parameters train at lr * coef_lr
    train_token_embedding: bool = True  # false: keep CLIP's 49408x512 token table fixed (cheap CPU runs)
    weight_decay: float = Field(0.2, ge=0)
    warmup_proportion: float = Field(0.1, ge=0, le=1)
    max_logit_scale: float = Field(100.0, gt=0)  # exp(logit_scale) is clamped to this after each step
    # §7 quirks of the released code (defaults reproduce it; docs/glscl.md)
    gim_mask: Literal["after_softmax", "masked_softmax"] = "after_softmax"
    decoder_memory_mask: bool = False  # released: padded tokens and frames are attended to
    icl_normalizer: Literal["num_queries", "batch"] = "num_queries"
    query_init: Literal["uniform", "normal"] = "uniform"  # released: torch.rand, U[0,1)

    @model_validator(mode="after")
    def _consistent(self) -> GLSCLConfig:
        if self.max_words > self.context_length:
            raise ValueError(f"max_words ({self.max_words}) must be <= context_length ({self.context_length})")
        if self.max_frames > self.context_length:
            raise ValueError("max_frames must be <= context_length (frame positions come from CLIP's text)")
        if self.embed_dim % self.decoder_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by decoder_heads {self.decoder_heads}")
        return self


@MODELS.register("glscl", impl="models.glscl.model:GLSCL")
class GLSCLSpec:
    """What params validation, `vmr decode` and `vmr dag` know of GLSCL without importing it
    (nor torch): its Config and what it reads. `models.glscl.model.GLSCL` inherits both."""

    Config = GLSCLConfig

    @classmethod
    def needs(cls, cfg: GLSCLConfig, dataset) -> Needs:
        files: dict[str, str] = {}
        if cfg.source == "msrvtt":
            files |= {f"dataset.durations.{i}": p for i, p in enumerate(dataset.durations)}
        elif dataset.video_captions:
            files["dataset.video_captions"] = dataset.video_captions
        if cfg.weights:
            files["model.glscl.weights"] = cfg.weights
        if cfg.input == "features":
            return Needs(features=(cfg.feature,), files=files)
        return Needs(frames=glscl_protocol(), files=files)
