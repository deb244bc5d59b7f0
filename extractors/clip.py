"""CLIP ViT-B/32 image embeddings (512-d, projected CLS token, NOT L2-normalised).

Protocols (docs/features.md, reference feature_protocols.md 2a/2e/3.5):
- `sampling: clip_len` (default): HERO_Video_Feature_Extractor's ffmpeg `fps=1/clip_len` filter,
  emulated on decoder timestamps: one frame per clip_len seconds, taken near the MIDDLE of each window.
  clip_len 2 = QVHighlights (Moment-DETR/QD-DETR/MESM), clip_len 1 = Charades-STA SF+C (QD-DETR/MESM).
- `sampling: every_n`: CNM's ActivityNet CLIP "every 8 frames" (its code is unreleased; OpenAI defaults
  assumed).
- `preprocess: hero`: short side 224 bilinear (swscale-like, antialiased), centre crop 224,
  (x/255 - mean) / (std + 1e-8), fp16 weights on GPU. `preprocess: openai`: bicubic resize, no 1e-8.

The architecture is open_clip's `ViT-B-32-quickgelu`: OpenAI's weights need QuickGELU, and open_clip's
plain 'ViT-B-32' silently builds nn.GELU. Weights formats accepted from a local path:
- the OpenAI TorchScript archive `ViT-B-32.pt` (what `clip.load(jit=True)` reads),
- an OpenAI-layout state dict (`clip.load(jit=False)`, `torch.save(model.state_dict())`),
- open_clip files: `open_clip_pytorch_model.bin` / `.safetensors` / training checkpoints
  `{"state_dict": ..., "epoch": ...}` with or without a DataParallel `module.` prefix.
"""

from __future__ import annotations

import warnings
import zipfile
from typing import Literal

import torch
from pydantic import Field

from extractors import EXTRACTORS
from extractors._base import (
    Extractor,
    ExtractorConfig,
    SamplingProtocol,
    WeightsError,
    check_state_dict,
    torch_load,
    unwrap_state_dict,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Integer metadata the OpenAI TorchScript model keeps in its state dict; not parameters.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


@EXTRACTORS.register("clip")
class ClipExtractor(Extractor):
    name = "clip"
    dim = 512

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
        import open_clip

        torch.manual_seed(self.config.seed)
        # full CLIP (text tower included) so that every key of the official files has a home
        model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
        return model.eval()

    def load_weights(self, model: torch.nn.Module, path: str) -> None:
        state = read_clip_state_dict(path)
        # open_clip stores logit_scale as a 0-d tensor; some files keep shape (1,)
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        own = model.state_dict()
        state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
        check_state_dict(model, state, path)

    def to_device(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        model = model.to(device)
        if device.type == "cuda" and self.config.fp16_on_gpu:
            model = model.half()
        return model

    def preprocess(self, units: torch.Tensor) -> torch.Tensor:
        x = units.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
        if self.config.preprocess == "hero":
            std = std + 1e-8  # HERO's Normalize adds it; a ~1e-7 relative change, kept for fidelity
        return (x - mean) / std

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        return model.encode_image(x.to(dtype))


def read_clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    """State dict (OpenAI key layout = open_clip CLIP layout) from any supported CLIP file."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors ships with open_clip's deps
            raise WeightsError(f"{path}: reading .safetensors needs the safetensors package") from e
        try:
            return dict(load_file(path, device="cpu"))
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's file is TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                scripted = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise WeightsError(f"{path}: not a readable TorchScript archive ({e})") from None
        state = dict(scripted.state_dict())
        for key in OPENAI_META_KEYS:
            state.pop(key, None)
        return state
    state = unwrap_state_dict(torch_load(path), path)
    for key in OPENAI_META_KEYS:
        state.pop(key, None)
    return state


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zips with a `code/` folder; torch.save zips have only data.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.startswith("code/") for n in zf.namelist())
