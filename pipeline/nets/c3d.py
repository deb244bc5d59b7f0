"""C3D (Tran et al., Sports-1M) with the module names of the common PyTorch port's `c3d.pickle`.

The extractor (`extractors/c3d.py`) imports this module only when it builds the network, so that
reading its config and protocol does not import torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class C3D(nn.Module):
    """C3D with `c3d.pickle`'s module names; `features(x, layer)` returns post-ReLU fc6 or fc7."""

    def __init__(self, num_classes: int = 487):
        super().__init__()
        conv = lambda i, o: nn.Conv3d(i, o, kernel_size=3, padding=1)  # noqa: E731
        self.conv1 = conv(3, 64)
        self.pool1 = nn.MaxPool3d((1, 2, 2), (1, 2, 2))
        self.conv2 = conv(64, 128)
        self.pool2 = nn.MaxPool3d(2, 2)
        self.conv3a, self.conv3b = conv(128, 256), conv(256, 256)
        self.pool3 = nn.MaxPool3d(2, 2)
        self.conv4a, self.conv4b = conv(256, 512), conv(512, 512)
        self.pool4 = nn.MaxPool3d(2, 2)
        self.conv5a, self.conv5b = conv(512, 512), conv(512, 512)
        self.pool5 = nn.MaxPool3d(2, 2, padding=(0, 1, 1))
        self.fc6 = nn.Linear(8192, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        self.dropout = nn.Dropout(0.5)

    def conv_trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = self.pool3(F.relu(self.conv3b(F.relu(self.conv3a(x)))))
        x = self.pool4(F.relu(self.conv4b(F.relu(self.conv4a(x)))))
        x = self.pool5(F.relu(self.conv5b(F.relu(self.conv5a(x)))))
        return x

    def features(self, x: torch.Tensor, layer: str = "fc6") -> torch.Tensor:
        """(B, 3, 16, 112, 112) -> (B, 4096) post-ReLU fc6 or fc7."""
        x = self.conv_trunk(x)
        if x.shape[1:] != (512, 1, 4, 4):
            raise ValueError(
                f"C3D expects 3x16x112x112 snippets; input {tuple(x.shape)} at pool5 is not 512x1x4x4"
            )
        x = F.relu(self.fc6(x.flatten(1)))
        if layer == "fc6":
            return x
        if layer != "fc7":
            raise ValueError(f"C3D feature layer must be 'fc6' or 'fc7', got {layer!r}")
        return F.relu(self.fc7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.dropout(self.features(x, "fc7")))


class C3DFeatures(nn.Module):
    """C3D plus an optional PCA (`components`, `mean`, e.g. `extractors.c3d.PCAProjection`), as one
    module: `forward` maps snippets to (B, D) features."""

    def __init__(self, layer: str, pca=None):
        super().__init__()
        self.net = C3D()
        self.layer = layer
        if pca is not None:
            self.register_buffer("pca_components", torch.as_tensor(pca.components, dtype=torch.float64))
            self.register_buffer("pca_mean", torch.as_tensor(pca.mean, dtype=torch.float64))
        self.pca = pca is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, 112, 112), F a multiple of 16 -> (B, D): fc of each 16-frame unit, averaged."""
        b, c, f, h, w = x.shape
        if f % 16:
            raise ValueError(f"C3D snippets must be a multiple of 16 frames, got {f}")
        units = x.view(b, c, f // 16, 16, h, w).transpose(1, 2).reshape(b * (f // 16), c, 16, h, w)
        feats = self.net.features(units, self.layer).view(b, f // 16, -1).float().mean(dim=1)
        if self.pca:
            # float64 outside autocast: the projection is cheap and must not lose precision
            with torch.autocast(device_type=x.device.type, enabled=False):
                feats = ((feats.double() - self.pca_mean) @ self.pca_components).float()
        return feats
