"""I3D features: Inception-v1 I3D (1024-d, the grounding papers' network) and pytorchvideo's i3d_r50.

`InceptionI3d` is written here so that its state-dict keys and shapes are exactly those of
piergiaj's `rgb_imagenet.pt` (400 classes) and `rgb_charades.pt` (157 classes): both files load
with `strict=True`. Convolutions and max pools pad "TF-SAME" at run time (the extra pixel goes at
the back), batch norm uses eps 1e-3, and the features are Mixed_5c followed by
AvgPool3d([2, 7, 7], stride 1): one 1024-d vector per 8 input frames (T' = ceil(T/8) - 1).

Protocols (docs/snippet_extractors.md):
- `lgi`: piergiaj's `extract_features.py`, the source of LGI's `i3d_finetuned` Charades features
  (reused by CNM/CPL/QD-DETR): 24 fps, the whole video in one pass (chunked as piergiaj did above
  1600 frames), one feature per 8 frames.
- `vslnet`: VSLNet's `prepare/extract_charades.py`: 24 fps, 24-frame windows (the last one
  right-aligned, the very last frame never used), two features per window = 2/s.

`i3d_r50` (pytorchvideo `I3D_8x8_R50.pyth`) is a ResNet-50 I3D with 2048-d features: a different
network, NOT interchangeable with the Inception features above.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from extractors import EXTRACTORS
from extractors._base import (
    Extractor,
    ExtractorConfig,
    SamplingProtocol,
    VideoInfo,
    WeightsError,
    check_state_dict,
    torch_load,
    unwrap_state_dict,
)
from extractors._snippets import i3d_plan, i3d_resize_crop, make_units, windows_plan

if TYPE_CHECKING:  # imported where used: `vmr decode` reads this module without torch
    import torch

I3D_FEATURE_DIM = 1024
I3D_R50_FEATURE_DIM = 2048


def read_i3d_state_dict(model: torch.nn.Module, path: str) -> dict:
    """piergiaj's `rgb_imagenet.pt` / `rgb_charades.pt` (plain state dicts) for a strict load.

    The class count is read from the file (`logits.conv3d.weight`) and the model's head replaced to
    match, so both official files load. Files saved by PyTorch < 0.4 have no BatchNorm
    `num_batches_tracked` counters; those (bookkeeping, not weights) are filled with zeros.
    """
    import torch

    state = unwrap_state_dict(torch_load(path), path)
    if "logits.conv3d.weight" not in state:
        raise WeightsError(f"{path}: not an InceptionI3d state dict (no 'logits.conv3d.weight' key)")
    num_classes = state["logits.conv3d.weight"].shape[0]
    if model.logits.conv3d.out_channels != num_classes:
        model.replace_logits(num_classes)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    return state


def output_steps(num_frames: int) -> int:
    """Features one InceptionI3d pass gives for `num_frames` frames: ceil(T/8) - 1."""
    return math.ceil(num_frames / 8) - 1


# -- extractors -----------------------------------------------------------------------------------


@EXTRACTORS.register("i3d")
class I3DExtractor(Extractor):
    """Inception-v1 I3D, 1024-d; protocol `lgi` (3 features/s) or `vslnet` (2 features/s)."""

    name = "i3d"
    dim = I3D_FEATURE_DIM

    class Config(ExtractorConfig):
        protocol: Literal["lgi", "vslnet"] = "lgi"
        fps: float = Field(24.0, gt=0)  # both protocols decode at 24 fps
        window: int = Field(24, ge=9)  # vslnet: frames per window (--strides)
        chunk: int = Field(1600, ge=64)  # lgi: longest single pass, piergiaj's 1600
        crop: int = Field(224, ge=32)  # 224 (upscale below crop + 2 = 226); smaller only for tests
        num_classes: int = Field(157, ge=1)  # head of the random-init model (weights set their own)
        # lgi passes are whole videos of different lengths: one per batch
        batch_size: int = Field(1, ge=1)

        @model_validator(mode="after")
        def _one_video_per_lgi_batch(self):
            if self.protocol == "lgi" and self.batch_size != 1:
                raise ValueError("protocol lgi runs each whole video as one pass: batch_size must be 1")
            return self

    def protocol(self) -> SamplingProtocol:
        # Native-size frames: piergiaj upscales only frames whose short side is below 226 and
        # otherwise centre-crops 224 from the full frame, which a short-side resize cannot express.
        return SamplingProtocol(rule="fps_filter", rate=self.config.fps, short_side=0, crop=0)

    def plan(self, num_frames: int):
        c = self.config
        return i3d_plan(num_frames, c.protocol, c.window, c.chunk)

    def group(self, frames, windows, video: VideoInfo | None = None):
        plan = self.plan(len(frames))
        crop = self.config.crop
        transform = lambda f: i3d_resize_crop(f, min_side=crop + 2, crop=crop)  # noqa: E731
        return make_units(frames, plan.snippets, transform), plan.row_windows(windows)

    def build_model(self) -> torch.nn.Module:
        import torch

        from pipeline.nets.i3d import InceptionI3d

        torch.manual_seed(self.config.seed)
        return InceptionI3d(num_classes=self.config.num_classes).eval()

    def load_weights(self, model: torch.nn.Module, path: str) -> None:
        check_state_dict(model, read_i3d_state_dict(model, path), path)

    def preprocess(self, units: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, 224, 224, 3) RGB -> (B, 3, T, 224, 224) in [-1, 1]: (x / 255) * 2 - 1."""
        return units.permute(0, 4, 1, 2, 3).float().div_(255.0).mul_(2).sub_(1)

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.extract_features(x).transpose(1, 2)  # (B, rows, 1024), rows in time order


@EXTRACTORS.register("i3d_r50")
class I3DR50Extractor(Extractor):
    """pytorchvideo's ResNet-50 I3D (`I3D_8x8_R50.pyth`), 2048-d: NOT the Inception I3D above."""

    name = "i3d_r50"
    dim = I3D_R50_FEATURE_DIM

    class Config(ExtractorConfig):
        fps: float = Field(30.0, gt=0)
        num_frames: int = Field(8, ge=1)  # frames per snippet (8x8: 8 frames ...)
        sampling_rate: int = Field(8, ge=1)  # ... every 8th frame: one feature per 64 frames
        size: int = Field(224, ge=32)  # short side and centre crop
        batch_size: int = Field(8, ge=1)

    def protocol(self) -> SamplingProtocol:
        c = self.config
        return SamplingProtocol(rule="fps_filter", rate=c.fps, short_side=c.size, crop=c.size)

    def plan(self, num_frames: int):
        return windows_plan(num_frames, self.config.num_frames, self.config.sampling_rate)

    def group(self, frames, windows, video: VideoInfo | None = None):
        plan = self.plan(len(frames))
        return make_units(frames, plan.snippets), plan.row_windows(windows)

    def build_model(self) -> torch.nn.Module:
        import torch

        from pipeline.nets.i3d import build_i3d_r50

        torch.manual_seed(self.config.seed)
        return build_i3d_r50().eval()

    def load_weights(self, model: torch.nn.Module, path: str) -> None:
        check_state_dict(model, unwrap_state_dict(torch_load(path), path), path)

    def preprocess(self, units: torch.Tensor) -> torch.Tensor:
        x = units.permute(0, 4, 1, 2, 3).float().div_(255.0)
        return (x - 0.45) / 0.225

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        from pipeline.nets.i3d import i3d_r50_features

        return i3d_r50_features(model, x)
