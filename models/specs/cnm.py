"""CNM's spec: its Config and `needs()`, torch free (see `models/specs/__init__.py`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from models import MODELS
from pipeline.core.params import NonNegative, Positive
from pipeline.training.spec import Needs, TrainConfig

PROPOSAL_STRIDE = 4  # the reconstructor sees max_num_frames // 4 evenly spaced frames


class CNMConfig(TrainConfig):
    """`model.cnm` in params.yaml. Defaults are the official ActivityNet CLIP config."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)  # queries
    eval_batch_size: int = Field(128, ge=1)
    grad_clip: Positive | None = None  # must stay null: CNM clips in its optimisers (see clip_norm)
    select_metric: str = "mIoU"  # CNM keeps the epoch with the best mIoU
    feature: str = "clip"  # features/<feature>.h5 holds the frame features
    # Not in CNM (False reproduces it): z-score every feature channel with the mean/std over the
    # training videos' frames (no labels involved). Features with a large shared component (e.g. a
    # randomly initialised CLIP on the synthetic set) otherwise drown the frame-to-frame changes.
    standardize_features: bool = False
    vocab_size: int = Field(8000, ge=1)  # reconstruction targets: the most common words of glove.pkl
    max_num_words: int = Field(20, ge=1)
    max_num_frames: int = Field(200, ge=PROPOSAL_STRIDE)  # every video is resampled to exactly this
    hidden_size: int = Field(256, ge=2)
    num_heads: int = Field(4, ge=1)
    num_decoder_layers1: int = Field(3, ge=1)  # video stack
    num_decoder_layers2: int = Field(3, ge=1)  # text stack
    dropout: float = Field(0.1, ge=0, lt=1)  # on the raw frame and word features
    transformer_dropout: float = Field(0.1, ge=0, lt=1)
    alpha: float = Field(5.0, gt=0)  # Gaussian sharpness: 5 ActivityNet, 5.5 Charades
    max_width: float = Field(1.0, gt=0, le=1)  # 1 ActivityNet, 0.45 Charades
    use_negative: bool = True  # hard/easy negatives; False leaves plain reconstruction
    beta_1: NonNegative = 0.1  # IVC margin against the hard negative
    beta_2: NonNegative = 0.15  # IVC margin against the easy negative
    lr: float = Field(4e-4, gt=0)  # both optimisers
    warmup_updates: int = Field(400, ge=1)
    warmup_init_lr: float = Field(1e-7, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_norm: float = Field(10.0, gt=0)  # over all parameters holding a gradient, as the official runner
    weights: str | None = None  # an official CNM checkpoint (model-best.pt) to start from
    weights_sha256: str | None = None

    @model_validator(mode="after")
    def _checks(self) -> CNMConfig:
        if self.grad_clip is not None:
            raise ValueError("grad_clip must be null for CNM: it clips in its optimisers, use clip_norm")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


@MODELS.register("cnm", impl="models.cnm:CNM")
class CNMSpec:
    """What params validation, `vmr decode` and `vmr dag` know of CNM without importing it
    (nor torch): its Config and what it reads. `models.cnm.CNM` inherits both."""

    Config = CNMConfig

    @classmethod
    def needs(cls, cfg: CNMConfig, dataset) -> Needs:
        return Needs(features=(cfg.feature,), vocab=("glove.pkl",),
                     files={"model.cnm.weights": cfg.weights} if cfg.weights is not None else {})
