"""CLIP ViT-B/32 image embeddings (512-d, projected CLS token, NOT L2-normalised).

Protocols (docs/features.md, reference feature_protocols.md 2a/2e/3.5):
- `sampling: clip_len` (default): HERO_Video_Feature_Extractor's ffmpeg `fps=1/clip_len` filter,
  emulated on decoder timestamps: one frame per clip_len seconds, taken near the MIDDLE of each window.
  clip_len 2 = QVHighlights (Moment-DETR/QD-DETR/MESM), clip_len 1 = Charades-STA SF+C (QD-DETR/MESM).
- `sampling: every_n`: CNM's ActivityNet CLIP "every 8 frames" (its code is unreleased; OpenAI defaults
  assumed).
- `preprocess: hero`: short side 224 bilinear (swscale-like, antialiased), centre crop 224,
  (x/255 - mean) / (std + 1e-8), fp16 weights on GPU. `preprocess: openai`: bicubic resize, no 1e-8.

The architecture is the image tower of open_clip's `ViT-B-32-quickgelu`: OpenAI's weights need
QuickGELU, and open_clip's plain 'ViT-B-32' silently builds nn.GELU. Only the image tower is built
(`visual.*`, OpenAI's names); with weights it is built on the meta device and the file's tensors
assigned, so no random init is paid for. Every official weights format is read by
`pipeline.nets.clip.read_clip_state_dict` (OpenAI's TorchScript archive or state dict, open_clip's
.bin / .safetensors / training checkpoints); their text-tower entries are not read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from extractors import EXTRACTORS
from extractors._base import Extractor, ExtractorConfig, SamplingProtocol
from pipeline.nets.checkpoints import check_state_dict
from pipeline.nets.clip import (
    IMAGE_MEAN,
    IMAGE_STD,
    fit_to_model,
    image_tower_state,
    image_tower_vit_b_32,
    read_clip_state_dict,
)

if TYPE_CHECKING:
    import torch


@EXTRACTORS.register("clip")
class ClipExtractor(Extractor):
    name = "clip"
    dim = 512
    meta_build = True

    class Config(ExtractorConfig):
        sampling: Literal["clip_len", "every_n"] = "clip_len"
        clip_len: float = Field(1.0, gt=0)  # seconds per feature (2: QVHighlights, 1: Charades SF+C)
        every_n: int = Field(8, ge=1)  # frames per feature with sampling: every_n (CNM)
        preprocess: Literal["hero", "openai"] = "hero"
        hero_short_video: bool = True  # (clip_len sampling only) HERO's fps rule for videos shorter than clip_len + 0.1 s
        fp16_on_gpu: bool = True  # HERO and clip.load run fp16 weights on CUDA
        batch_size: int = Field(64, ge=1)  # HERO's default

    def protocol(self) -> SamplingProtocol:
        c = self.config
        interp = "bilinear" if c.preprocess == "hero" else "bicubic"
        if c.sampling == "every_n":
            return SamplingProtocol(rule="every_n", every_n=c.every_n, interpolation=interp)
        return SamplingProtocol(
            rule="fps_filter",
            rate=1.0 / c.clip_len,
            interpolation=interp,
            hero_short_video=c.hero_short_video,
        )

    def build_model(self) -> torch.nn.Module:
        import torch

        torch.manual_seed(self.config.seed)
        return image_tower_vit_b_32().eval()

    def build_empty(self) -> torch.nn.Module:
        return image_tower_vit_b_32(device="meta").eval()

    def load_weights(self, model: torch.nn.Module, path: str, assign: bool = False) -> None:
        state = image_tower_state(read_clip_state_dict(path))
        check_state_dict(model, fit_to_model(state, model), path, assign=assign)

    def to_device(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        model = model.to(device)
        if device.type == "cuda" and self.config.fp16_on_gpu:
            model = model.half()
        return model

    def preprocess(self, units: torch.Tensor) -> torch.Tensor:
        import torch

        x = units.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(IMAGE_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD, device=x.device).view(1, 3, 1, 1)
        if self.config.preprocess == "hero":
            std = std + 1e-8  # HERO's Normalize adds it; a ~1e-7 relative change, kept for fidelity
        return (x - mean) / std

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        return model.visual(x.to(dtype))  # what open_clip's CLIP.encode_image returns
