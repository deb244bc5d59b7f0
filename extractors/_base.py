"""The extractor interface: how a feature extractor plugs into decode -> extract -> merge.

An extractor is a class registered in `extractors.EXTRACTORS` (see `extractors/clip.py`):

    @EXTRACTORS.register("clip")
    class ClipExtractor(Extractor):
        name = "clip"
        dim = 512
        class Config(ExtractorConfig): ...        # validated from params `extractors.clip`

It declares five things, and the pipeline does everything else (decoding, batching across videos,
devices, AMP, sharding, atomic writes, resume, provenance):

1. `protocol()` -> `SamplingProtocol`: which frames the decode stage keeps (a rate rule on the
   source timestamps) and how they are resized/cropped. Decode reads every video ONCE and writes,
   per distinct protocol of the enabled extractors, a uint8 array (N, H, W, 3) RGB of the kept frames
   plus, per kept frame, its source timestamp `pts` and the time `window` (start, end) in seconds
   that the frame stands for. Two extractors with equal protocols share the frames.
2. `group(frames, windows)` -> (units, unit_windows): turns the N kept frames of one video into the
   T inputs of the model, one per output feature. Frame-wise extractors (CLIP, VGG) keep the default
   (one frame = one unit). Snippet-level extractors override it: e.g. SlowFast takes frames at 30 fps
   and returns (T, 32, H, W, 3) clips of 2 s; C3D returns 16-frame clips with stride 8; I3D can
   return one (1, N, H, W, 3) "unit" for the whole video and emit several features per unit. Units stay uint8 on the
   CPU; `unit_windows` is (R, 2) float64 seconds, one (start, end) per OUTPUT ROW (the feature
   timestamps written next to the .npy); R = T unless `embed` gives several rows per unit.
3. `build_model()` -> nn.Module: the architecture with seeded random init (no downloads ever).
   Build only what `embed` uses (CLIP: the image tower).
4. `load_weights(model, path, assign=False)`: load one official checkpoint format from a local file;
   raise `WeightsError` naming the file and the missing/unexpected keys (`torch_load`,
   `unwrap_state_dict` and `check_state_dict` do so). The caller checks sha256 and records it (or
   "random" when no weights are configured) in the provenance. `build_loaded(path)` is what the
   stages call with weights: extractors that set `meta_build` are built on the meta device (no random
   init to pay for, no memory) and `load_weights(..., assign=True)` puts the file's tensors in place.
5. `preprocess(units)` then `embed(model, x)`: `preprocess` gets a uint8 batch (B, ..., H, W, 3)
   already on the model's device and returns the float input (value range, mean/std, channel order,
   layout); `embed` returns (B, D) features, or (B, k, D) for k rows per unit (rows are kept in
   order). Units of one video go through the model in batches of `batch_size` gathered across videos
   (a batch is flushed early when the next unit's shape differs). Both run under `torch.inference_mode()` and, on CUDA,
   autocast (`Config.amp`); on CPU everything is fp32. The same code runs on CPU and GPU.

Outputs are then float32 (T, D) per video, whatever the compute dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import Field

from pipeline.core.params import Section

# The protocol and the video facts live with the selection rules in pipeline/media/sampling.py
# (torch-free, so decode workers start fast); they are part of this interface and re-exported here.
from pipeline.media.sampling import Rule, SamplingProtocol, VideoInfo  # noqa: F401

# Likewise the weights helpers every `load_weights` uses (shared with the models, so they live in
# pipeline/nets/checkpoints.py).
from pipeline.nets.checkpoints import (  # noqa: F401
    WeightsError,
    check_state_dict,
    short_reason,
    torch_load,
    unwrap_state_dict,
)

if TYPE_CHECKING:  # an extractor's module never imports torch at its top: `vmr decode` and params
    import torch  # validation read its Config and protocol without paying for torch's import


class ExtractorConfig(Section):
    """Fields every extractor accepts under `extractors.<name>` in params.yaml."""

    weights: str | None = None  # local checkpoint path; None -> seeded random init, "random" in provenance
    weights_sha256: str | None = None  # if set, the file must have this digest
    batch_size: int = Field(32, ge=1)  # units per forward pass, gathered across videos
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # autocast on CUDA (ignored on CPU: fp32 there)
    seed: int = 0  # seeds the random init when no weights are given
    threads: int = Field(0, ge=0)  # torch CPU threads for the model (0: leave torch's default)


class Extractor(ABC):
    """Base class of every extractor; see the module docstring for the contract."""

    name: ClassVar[str]
    dim: ClassVar[int]
    Config: ClassVar[type[ExtractorConfig]] = ExtractorConfig
    # build_loaded builds on the meta device: load_weights(assign=True) sets every tensor of the model
    meta_build: ClassVar[bool] = False

    def __init__(self, config: ExtractorConfig | None = None):
        self.config = config if config is not None else self.Config()

    # -- what decode must produce --------------------------------------------------------------
    @abstractmethod
    def protocol(self) -> SamplingProtocol: ...

    def group(
        self, frames: np.ndarray, windows: np.ndarray, video: VideoInfo | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) uint8 frames + (N, 2) windows -> (T, ...) units + (T, 2) windows.

        `video` (native fps, stream duration) is passed by the extract stage; frame-wise
        extractors ignore it, snippet-level ones whose rules depend on it (SlowFast/HERO) require it.
        """
        return frames, windows

    # -- model ----------------------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> torch.nn.Module: ...

    @abstractmethod
    def load_weights(self, model: torch.nn.Module, path: str, assign: bool = False) -> None: ...

    def build_loaded(self, path: str) -> torch.nn.Module:
        """The model with the weights of `path`. With `meta_build`, the random init `build_model`
        would do (seconds for CLIP or VGG) is skipped: the model is built on the meta device and the
        file's tensors are assigned to it; anything the file did not set is an error, never garbage."""
        if not self.meta_build:
            model = self.build_model()
            self.load_weights(model, path)
            return model
        model = self.build_empty()
        self.load_weights(model, path, assign=True)
        unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if unset:
            raise WeightsError(f"{path}: left {len(unset)} tensors of {type(self).__name__} unset: {unset[:5]}")
        return model

    def build_empty(self) -> torch.nn.Module:
        """The architecture on the meta device (no memory, no init), for `build_loaded` to fill. Override
        to pass `device="meta"` to the layers where the network allows: `with torch.device("meta")`
        intercepts every torch call in Python, and its first scalar product imports torch._dynamo."""
        import torch

        with torch.device("meta"):
            return self.build_model()

    def to_device(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """Move the model (override to change its dtype, e.g. fp16 weights on GPU)."""
        return model.to(device)

    @abstractmethod
    def preprocess(self, units: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    # -- shared helpers -------------------------------------------------------------------------
    def describe(self) -> dict:
        """What provenance records about this extractor (besides the weights digest)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "protocol": self.protocol().as_dict(),
            "config": self.config.model_dump(exclude={"device", "threads", "batch_size"}),
        }
