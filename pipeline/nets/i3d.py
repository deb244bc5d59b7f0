"""The I3D networks: piergiaj's Inception-v1 I3D (TF 'SAME' padding, 1024-d) and pytorchvideo's i3d_r50.

The extractors (`extractors/i3d.py`) import this module only when they build a network, so that
reading their config and protocol does not import torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
