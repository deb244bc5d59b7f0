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
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

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

I3D_FEATURE_DIM = 1024
I3D_R50_FEATURE_DIM = 2048


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding for one dimension: (front, back), the odd pixel at the back."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    t, h, w = x.shape[-3:]
    pt, ph, pw = (_same_pad(s, k, st) for s, k, st in zip((t, h, w), kernel, stride, strict=True))
    # F.pad lists the last dimension first; zeros are what piergiaj pads pools with too (inputs
    # of every pool are post-ReLU, so zero padding never wins a max over a real value < 0).
    return F.pad(x, (*pw, *ph, *pt))


class Unit3D(nn.Module):
    """Conv3d (TF-SAME, no bias unless asked) + BatchNorm(eps 1e-3) + ReLU; keys `conv3d`, `bn`."""

    def __init__(self, in_ch: int, out_ch: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 batch_norm: bool = True, activation: bool = True, bias: bool = False):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv3d = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(out_ch, eps=1e-3, momentum=0.01) if batch_norm else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches (1x1 | 1x1->3x3 | 1x1->3x3 | pool->1x1) concatenated on channels."""

    def __init__(self, in_ch: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = widths
        self.b0 = Unit3D(in_ch, c0)
        self.b1a = Unit3D(in_ch, c1a)
        self.b1b = Unit3D(c1a, c1b, kernel=(3, 3, 3))
        self.b2a = Unit3D(in_ch, c2a)
        self.b2b = Unit3D(c2a, c2b, kernel=(3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_ch, c3)
        self.out_channels = c0 + c1b + c2b + c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


# (name, in_channels, branch widths) of the Inception blocks, as in the I3D paper / DeepMind's release.
_INCEPTION = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """Inception-v1 I3D with piergiaj's module names (so his state dicts load strictly)."""

    def __init__(self, num_classes: int = 400, in_channels: int = 3):
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [
            ("Conv3d_1a_7x7", Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))),
            ("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64)),
            ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
            ("MaxPool3d_3a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
        ]
        for name in ("Mixed_3b", "Mixed_3c"):
            layers.append((name, InceptionBlock(*_INCEPTION[name])))
        layers.append(("MaxPool3d_4a_3x3", MaxPool3dSame((3, 3, 3), (2, 2, 2))))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            layers.append((name, InceptionBlock(*_INCEPTION[name])))
        layers.append(("MaxPool3d_5a_2x2", MaxPool3dSame((2, 2, 2), (2, 2, 2))))
        for name in ("Mixed_5b", "Mixed_5c"):
            layers.append((name, InceptionBlock(*_INCEPTION[name])))
        # Registered as attributes (not a Sequential) so the keys are `Mixed_5c.b0.conv3d.weight`.
        self.endpoints = [name for name, _ in layers]
        for name, module in layers:
            self.add_module(name, module)
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)
        self.logits = self._make_logits(num_classes)

    @staticmethod
    def _make_logits(num_classes: int) -> Unit3D:
        return Unit3D(1024, num_classes, batch_norm=False, activation=False, bias=True)

    def replace_logits(self, num_classes: int) -> None:
        """A new classifier (e.g. 157 Charades classes), as piergiaj does before loading rgb_charades.pt."""
        self.logits = self._make_logits(num_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.endpoints:
            x = getattr(self, name)(x)
        return x

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, 224, 224) in [-1, 1] -> (B, 1024, ceil(T/8) - 1): Mixed_5c + AvgPool3d([2,7,7])."""
        if x.shape[2] <= 8:
            raise ValueError(f"I3D needs more than 8 frames per pass (got {x.shape[2]}): the [2,7,7] pool has nothing to pool")
        x = self.trunk(x)
        # At 224x224 Mixed_5c is 7x7 and this is exactly AvgPool3d([2, 7, 7], stride 1); pooling the
        # whole spatial map keeps smaller test inputs usable.
        x = F.avg_pool3d(x, (2, x.shape[3], x.shape[4]), stride=1)
        return x.flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-time-step class logits (B, classes, T'), as piergiaj's model returns them."""
        x = self.logits(self.dropout(self.avg_pool(self.trunk(x))))
        return x.squeeze(3).squeeze(3)


def read_i3d_state_dict(model: InceptionI3d, path: str) -> dict:
    """piergiaj's `rgb_imagenet.pt` / `rgb_charades.pt` (plain state dicts) for a strict load.

    The class count is read from the file (`logits.conv3d.weight`) and the model's head replaced to
    match, so both official files load. Files saved by PyTorch < 0.4 have no BatchNorm
    `num_batches_tracked` counters; those (bookkeeping, not weights) are filled with zeros.
    """
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


# -- pytorchvideo i3d_r50 --------------------------------------------------------------------------


def build_i3d_r50() -> nn.Module:
    """pytorchvideo's ResNet-50 I3D (8x8, Kinetics-400 head), randomly initialised."""
    from pytorchvideo.models.hub.resnet import i3d_r50

    return i3d_r50(pretrained=False)


def i3d_r50_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 8, H, W) normalised -> (B, 2048): res5 output averaged over time and space.

    For 224x224 input this equals the head's AvgPool3d((4, 7, 7)); the projection is skipped.
    """
    for block in model.blocks[:-1]:
        x = block(x)
    return x.mean(dim=(2, 3, 4))


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
        torch.manual_seed(self.config.seed)
        return build_i3d_r50().eval()

    def load_weights(self, model: torch.nn.Module, path: str) -> None:
        check_state_dict(model, unwrap_state_dict(torch_load(path), path), path)

    def preprocess(self, units: torch.Tensor) -> torch.Tensor:
        x = units.permute(0, 4, 1, 2, 3).float().div_(255.0)
        return (x - 0.45) / 0.225

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return i3d_r50_features(model, x)
