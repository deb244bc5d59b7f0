"""What a model declares to the pipeline without being built: its config and what it reads.

`TrainConfig` (fields every model Config has) and `Needs` (the inputs a model reads) live here, torch
free, because params validation, `vmr decode` and `vmr dag` read every model's Config and `needs()`
(through the models' specs, `models/specs/`) and must not pay for importing torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from pipeline.core.params import Count, Positive, Section
from pipeline.media.feature_pca import VideoPCAConfig
from pipeline.media.sampling import SamplingProtocol
from pipeline.text.query_config import QueryEncoderConfig


class TrainConfig(Section):
    """Fields every model Config has. Subclass it and override the defaults with the seed's."""

    seed: int | None = None  # None: the top-level params `seed`
    epochs: Count = 1
    batch_size: Count = 8  # global, in dataset items
    eval_batch_size: Count = 16  # per rank
    grad_clip: Positive | None = None  # max global L2 grad norm; None: no clipping
    eval_every: Count = 1  # epochs between evaluations on the selection split
    eval_from: Count = 1  # first epoch evaluated (the seeds' SKIP_TEST + 1)
    select_metric: str = "R@1,IoU@0.5"  # key of metrics() maximised by model selection


@dataclasses.dataclass(frozen=True)
class QueryFeatures:
    """Query features a frozen encoder computes once per sentence (stage `query_features-<model>`)."""

    name: str  # written to features/<name>.h5
    encoder: QueryEncoderConfig
    config_keys: tuple[str, ...]  # the model's config keys they derive from (the stage's params)


@dataclasses.dataclass(frozen=True)
class ReducedFeatures:
    """A PCA-reduced feature file (stage `feature_pca-<model>`): features/<pca.source>.h5 -> <name>.h5."""

    name: str
    pca: VideoPCAConfig
    config_keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a model reads besides the annotation splits. The DAG (`pipeline.dag`), the decode stage,
    the input checks and the provenance all follow it, so each model's stages depend on exactly this."""

    features: tuple[str, ...] = ()  # merged feature files, features/<name>.h5 (a PCA target included)
    query_features: QueryFeatures | None = None
    pca: ReducedFeatures | None = None
    frames: SamplingProtocol | None = None  # frames decode keeps for this model (trained on pixels)
    vocab: tuple[str, ...] = ()  # files the vocab stage writes (vocab/<name>)
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)  # other files, by params key
