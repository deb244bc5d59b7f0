"""C3D (Sports-1M) fc6/fc7 features, with the key layout of the widely used `c3d.pickle` port.

Network: 8 convolutions (3x3x3, pad 1) and 5 pools, fc6/fc7 4096-d, fc8 487 Sports-1M classes;
input 3 x 16 x 112 x 112. `c3d.pickle` is a plain state dict (`conv1.weight` ... `fc8.bias`) and
loads strictly. Features are post-ReLU (Caffe's fc6-1/fc7-1 blobs were post-ReLU: in-place ReLU).

Preprocessing (recorded in provenance), Caffe's: every native frame resized once to 128x171 (HxW)
with OpenCV's bilinear `cv2.resize` (Caffe's `cv::resize`; decode does it, from the native-size
frame), centre crop 112 at (8, 29), channels in BGR order, minus a mean on the 0..255 scale. By
default the mean is per channel: the channel means of the Sports-1M mean volume (BGR 90.2516,
97.6570, 101.4083; the common PyTorch ports round them to [90, 98, 102]). With `mean_file` it is
that volume itself, per pixel, 3 x 16 x 128 x 171 (Caffe's `sport1m_train16_128_mean.binaryproto`,
or the `.npy` cube the Keras/TensorFlow ports converted it to): frame f of each 16-frame unit minus
mean frame f, cropped where the frames are (Caffe's TEST-phase centre crop), scale 1; only this
gives the Caffe model's exact input.

Protocols:
- `clips16`: 16-frame snippets every 8 frames (the ActivityNet challenge protocol; also ViGA's TACoS
  fc6 alternative); optional PCA to 500-d with the official `PCA_activitynet_v1-3.hdf5`.
- `tall64`: TALL windows as 2D-TAN reads them: 64 frames, stride 12, (N - 64) // 12 + 1 windows.
- `tall128`: TALL windows as VSLNet/MESM read them: 128 frames, stride 25, over N - 16 frames.
  A window vector is the mean of fc6 over its non-overlapping 16-frame units (TALL's pooling is
  not in its repository; this is the documented assumption).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

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
from extractors._snippets import c3d_plan, center_crop, make_units
from pipeline.core.provenance import sha256_file, weights_record
from pipeline.nets.caffe_blob import BlobProtoError, read_blob_proto

if TYPE_CHECKING:  # imported where used: `vmr decode` reads this module without torch
    import torch

C3D_FEATURE_DIM = 4096
# Channel means (B, G, R) of Caffe's Sports-1M mean volume (sport1m_train16_128_mean), computed in
# float64 over its 16 x 128 x 171 pixels from the Keras port's converted cube (docs/snippet_extractors.md).
C3D_MEAN_BGR = (90.25164677, 97.65700354, 101.40833461)
C3D_MEAN_VOLUME_SHAPE = (1, 3, 16, 128, 171)  # sport1m_train16_128_mean: (num, BGR, frames, H, W)
C3D_FRAME_SIZE, C3D_CROP = (128, 171), 112


# -- ActivityNet PCA ------------------------------------------------------------------------------


class PCAProjection:
    """The ActivityNet challenge PCA (`PCA_activitynet_v1-3.hdf5`: `U`, `S`, `x_mean`).

    y = (x - x_mean) @ U[:, :dim]: principal directions are U's columns (4096 x K), no whitening
    (S is read and checked, not applied).
    """

    def __init__(self, U: np.ndarray, S: np.ndarray, x_mean: np.ndarray, dim: int = 500, source: str = "PCA"):
        U, S, x_mean = np.asarray(U, np.float64), np.asarray(S, np.float64), np.asarray(x_mean, np.float64).reshape(-1)
        if U.ndim != 2 or U.shape[0] != x_mean.shape[0]:
            raise WeightsError(f"{source}: 'U' must be (D, K) with D = len(x_mean) = {x_mean.shape[0]}, got {U.shape}")
        if dim > U.shape[1] or S.reshape(-1).shape[0] < dim:
            raise WeightsError(f"{source}: asked for {dim} components, file has U {U.shape}, S {S.shape}")
        self.components = U[:, :dim]
        self.mean = x_mean
        self.dim = dim

    @classmethod
    def from_file(cls, path: str, dim: int = 500) -> PCAProjection:
        import h5py

        with h5py.File(path, "r") as f:
            missing = [k for k in ("U", "S", "x_mean") if k not in f]
            if missing:
                raise WeightsError(f"{path}: PCA file lacks keys {missing} (expected U, S, x_mean)")
            return cls(f["U"][()], f["S"][()], f["x_mean"][()], dim=dim, source=path)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"PCA expects {self.mean.shape[0]}-d features, got {x.shape[-1]}")
        return ((x.astype(np.float64) - self.mean) @ self.components).astype(np.float32)


def read_mean_cube(path: str) -> np.ndarray:
    """The Sports-1M mean volume as the Keras/TensorFlow C3D ports ship it (`train01_16_128_171_mean.npy`:
    (3, 16, 128, 171), BGR, float64 holding Caffe's float32 values) as float32, the dtype Caffe subtracts in.
    """
    try:
        volume = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BlobProtoError(f"{path}: not a readable .npy mean cube ({err})") from err
    if not np.issubdtype(volume.dtype, np.floating):
        raise BlobProtoError(f"{path}: C3D mean cube must hold floats, got {volume.dtype}")
    return volume.astype(np.float32)  # lossless for the converted cube: its values are Caffe's float32s


@EXTRACTORS.register("c3d")
class C3DExtractor(Extractor):
    """C3D (Sports-1M) fc6/fc7, 4096-d (500-d with the ActivityNet PCA)."""

    name = "c3d"
    dim = C3D_FEATURE_DIM

    class Config(ExtractorConfig):
        protocol: Literal["clips16", "tall64", "tall128"] = "clips16"
        stride: int = Field(8, ge=1)  # clips16: frames between snippet starts
        tail: Literal["pad", "drop"] = "pad"  # clips16: last partial snippet padded, or dropped
        layer: Literal["fc6", "fc7"] = "fc6"  # TALL/TACoS: fc6; ActivityNet: fc7 (+ PCA 500)
        channel_order: Literal["bgr", "rgb"] = "bgr"  # Caffe C3D was trained on BGR
        mean: tuple[float, float, float] = C3D_MEAN_BGR  # per channel, in `channel_order`, 0..255 scale
        # Caffe's per-pixel mean volume (sport1m_train16_128_mean.binaryproto, or the ports' (3, 16, 128,
        # 171) .npy cube); replaces `mean` when set
        mean_file: str | None = None
        mean_file_sha256: str | None = None
        pca: str | None = None  # ActivityNet PCA_activitynet_v1-3.hdf5 (U, S, x_mean)
        pca_sha256: str | None = None
        pca_dim: int = Field(500, ge=1)
        batch_size: int = Field(8, ge=1)

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.pca:
            self.dim = self.config.pca_dim
        self._mean_volumes: dict[torch.device, torch.Tensor] = {}  # `mean_file`, read once per device

    def protocol(self) -> SamplingProtocol:
        # Every native frame resized once to 128x171 by OpenCV (Caffe's cv::resize), cropped 112.
        return SamplingProtocol(rule="all", short_side=0, size=C3D_FRAME_SIZE, crop=C3D_CROP, resizer="opencv")

    def plan(self, num_frames: int):
        c = self.config
        return c3d_plan(num_frames, c.protocol, c.stride, c.tail)

    def group(self, frames, windows, video: VideoInfo | None = None):
        plan = self.plan(len(frames))
        return make_units(frames, plan.snippets), plan.row_windows(windows)

    def build_model(self) -> torch.nn.Module:
        import torch

        from pipeline.nets.c3d import C3DFeatures

        torch.manual_seed(self.config.seed)
        pca = None
        if self.config.pca:
            weights_record(self.config.pca, self.config.pca_sha256, "PCA file")  # raises on a digest mismatch
            pca = PCAProjection.from_file(self.config.pca, self.config.pca_dim)
        return C3DFeatures(self.config.layer, pca).eval()

    def load_weights(self, model: torch.nn.Module, path: str) -> None:
        check_state_dict(model.net, unwrap_state_dict(torch_load(path), path), path)

    def preprocess(self, units: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (B, F, 112, 112, 3) -> (B, 3, F, 112, 112), channel order of the weights, minus mean."""
        import torch

        x = units.float()
        if self.config.channel_order == "bgr":
            x = x.flip(-1)
        if not self.config.mean_file:
            return (x - torch.tensor(self.config.mean, device=x.device)).permute(0, 4, 1, 2, 3)
        b, f = x.shape[:2]
        if f % 16:
            raise ValueError(f"C3D snippets must be a multiple of 16 frames, got {f}")
        # frame f of every 16-frame unit minus mean frame f (float32, as Caffe computes it)
        x = x.reshape(b, f // 16, 16, *x.shape[2:]) - self.mean_volume(x.device)
        return x.view(b, f, *x.shape[3:]).permute(0, 4, 1, 2, 3)

    def mean_volume(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """`mean_file` as (16, 112, 112, 3) float32 in `channel_order`, cropped as the frames are."""
        import torch

        device = torch.device(device)
        if device not in self._mean_volumes:
            self._mean_volumes[device] = self._load_mean_volume().to(device)
        return self._mean_volumes[device]

    def _load_mean_volume(self) -> torch.Tensor:
        import torch

        path = self.config.mean_file
        volume = read_mean_cube(path) if str(path).endswith(".npy") else read_blob_proto(path)
        if volume.shape == C3D_MEAN_VOLUME_SHAPE[1:]:  # the ports' .npy cube has no `num` axis
            volume = volume[None]
        if volume.shape != C3D_MEAN_VOLUME_SHAPE:
            raise BlobProtoError(
                f"{path}: C3D mean volume must be (num, channels, length, height, width) = "
                f"{C3D_MEAN_VOLUME_SHAPE} (Caffe's sport1m_train16_128_mean), got {volume.shape}"
            )
        frames = torch.from_numpy(volume[0]).permute(1, 2, 3, 0)  # (16, 128, 171, 3), BGR as stored
        if self.config.channel_order == "rgb":
            frames = frames.flip(-1)
        # the same crop as the frames (no resize: already 128x171), i.e. Caffe's TEST-phase offsets
        return center_crop(frames, C3D_CROP).contiguous()

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def describe(self) -> dict:
        out = super().describe()
        if self.config.pca:
            out["pca_sha256"] = sha256_file(self.config.pca)
        if self.config.mean_file:
            # checked like weights, and read now: a bad file fails before any video is extracted
            out["mean_file_sha256"] = weights_record(self.config.mean_file, self.config.mean_file_sha256,
                                                     "C3D mean file")
            self.mean_volume()
        out["plan"] = self.plan(10_000).info
        return out
