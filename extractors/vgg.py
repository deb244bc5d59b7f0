"""VGG16 fc7 (4096-d) per frame, torchvision architecture and ImageNet preprocessing.

Protocol: frames at `fps` (FFmpeg fps-filter rule by default), short side 256 bilinear, centre crop 224,
ImageNet mean/std; fc7 = classifier[:5] (post-ReLU, as Caffe's in-place ReLU blobs) or classifier[:4].

Charades-STA "VGG" features of 2D-TAN / MMN / MESM are NOT ImageNet VGG16: they are the official
Charades `Charades_v1_features_rgb` fc7 of the RGB stream of a two-stream VGG16 fine-tuned on Charades
(8 fps per the Charades site; MESM/UMT use clip_len 0.17). ImageNet weights give features of a different
network. To reproduce them, convert the Charades two-stream RGB checkpoint to a torchvision state dict;
accepted weights files:
- a torchvision state dict (`vgg16-397923af.pth`), classifier with 1000 outputs;
- a Charades two-stream RGB checkpoint in torchvision naming (gsig/charades-algorithms PyTorch
  `{'epoch', 'arch', 'state_dict', 'mAP', 'optimizer'}`, or a bare state dict converted from the Torch7
  `twostream_rgb.t7`): classifier.6 with 157 outputs, `features.module.` / `module.` prefixes of
  DataParallel accepted. The last layer is not used for fc7, so its size may be anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from extractors import EXTRACTORS
from extractors._base import (
    Extractor,
    ExtractorConfig,
    SamplingProtocol,
    WeightsError,
    check_state_dict,
    short_reason,
    unwrap_state_dict,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

if TYPE_CHECKING:  # imported where used: `vmr decode` reads this module without torch
    import torch


@EXTRACTORS.register("vgg")
class VggExtractor(Extractor):
    name = "vgg"
    dim = 4096
    meta_build = True  # 138 M parameters: their random init costs seconds that loaded weights replace

    class Config(ExtractorConfig):
        fps: float = Field(8.0, gt=0)  # Charades official features: 8 fps
        sampling: Literal["fps_filter", "uniform"] = "fps_filter"
        fc7: Literal["post_relu", "pre_relu"] = "post_relu"
        num_classes: int | None = Field(None, ge=1)  # size of classifier.6 in the file (None: from file)

    def protocol(self) -> SamplingProtocol:
        return SamplingProtocol(
            rule=self.config.sampling, rate=self.config.fps, short_side=256, crop=224,
            interpolation="bilinear",
        )

    def build_model(self) -> torch.nn.Module:
        import torch
        import torchvision

        torch.manual_seed(self.config.seed)
        return torchvision.models.vgg16(weights=None, num_classes=self.config.num_classes or 1000).eval()

    def load_weights(self, model: torch.nn.Module, path: str, assign: bool = False) -> None:
        import torch

        state = read_vgg_state_dict(path)
        fc8 = state.get("classifier.6.weight")
        if fc8 is not None and fc8.shape[0] != model.classifier[6].out_features:
            if self.config.num_classes is not None:
                raise WeightsError(
                    f"{path}: classifier.6 has {fc8.shape[0]} outputs but extractors.vgg.num_classes is "
                    f"{self.config.num_classes}"
                )
            # fc8 is not part of fc7 features: resize the head to what the file holds (157 for Charades)
            model.classifier[6] = torch.nn.Linear(4096, fc8.shape[0], device=model.classifier[6].weight.device)
        check_state_dict(model, state, path, assign=assign)

    def preprocess(self, units: torch.Tensor) -> torch.Tensor:
        import torch

        x = units.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        import torch

        h = torch.flatten(model.avgpool(model.features(x)), 1)
        head = model.classifier[:5] if self.config.fc7 == "post_relu" else model.classifier[:4]
        return head(h)


def read_vgg_state_dict(path: str) -> dict[str, torch.Tensor]:
    """torchvision-named VGG16 tensors from a bare state dict or a charades-algorithms checkpoint."""
    obj = _load_checkpoint(path)
    state = unwrap_state_dict(obj, path)
    # charades-algorithms wraps `features` in DataParallel when not starting from ImageNet weights
    return {k.replace("features.module.", "features."): v for k, v in state.items()}


def _load_checkpoint(path: str) -> object:
    """torch.load with weights_only; training checkpoints may hold numpy scalars (e.g. 'mAP')."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:
        import numpy as np

        try:  # allow numpy scalars only, never arbitrary classes
            with torch.serialization.safe_globals(
                [np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType]
            ):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise WeightsError(
                f"{path}: not a readable torch checkpoint ({short_reason(first)})"
            ) from None
