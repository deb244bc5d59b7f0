"""CLIP's image tower (ViT-B/32 as OpenAI released it), written out here rather than taken from open_clip.

Why not open_clip, which builds this very network: importing open_clip costs ~4 s (it pulls in
torchvision and transformers for its other models), a fixed cost of every `vmr extract` run that
dominates short ones. This file is the image half only, ~60 lines, with OpenAI's parameter names,
so every official weights file loads into it (`visual.*` of the whole model).

Its seeded random init draws the same numbers in the same order as open_clip's `VisionTransformer`
(modules are created in the same order with the same default inits), so features on random weights
are byte-identical to those of the whole open_clip model's `encode_image`; the tests check both.
`device="meta"` builds it with no memory and no init, for weights to be assigned to
(`ClipExtractor.build_empty`); passed to each layer rather than set with `with torch.device("meta")`,
whose Python-level interception imports torch._dynamo on the first scalar product (seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """OpenAI's GELU approximation; their weights were trained with it (not nn.GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input's dtype (fp16 activations with fp16 weights on GPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, device: str | None = None):
        super().__init__()
        self.ln_1 = LayerNorm(width, device=device)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True, device=device)
        self.ln_2 = LayerNorm(width, device=device)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width, device=device))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, device: str | None = None):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, device) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """Image (B, 3, S, S) -> (B, output_dim): the class token after the last block, normalised and projected."""

    def __init__(self, image_size: int = 224, patch_size: int = 32, width: int = 768, layers: int = 12,
                 heads: int = 12, output_dim: int = 512, device: str | None = None):
        super().__init__()
        grid = image_size // patch_size

        def embedding(*shape: int) -> nn.Parameter:  # N(0, 1/width), or nothing at all on the meta device
            empty = device == "meta"
            return nn.Parameter(torch.empty(shape, device=device) if empty else width**-0.5 * torch.randn(shape))

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False, device=device)
        self.class_embedding = embedding(width)
        self.positional_embedding = embedding(grid * grid + 1, width)
        self.ln_pre = LayerNorm(width, device=device)
        self.transformer = Transformer(width, layers, heads, device)
        self.ln_post = LayerNorm(width, device=device)
        self.proj = embedding(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid*grid, width): one token per patch
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj
