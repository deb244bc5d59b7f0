"""SlowFast 8x8 R50 features (2304-d = pooled slow 2048 ‖ fast 256), HERO's protocol.

HERO_Video_Feature_Extractor made the QVHighlights (Moment-DETR, QD-DETR, MESM, UMT) and Charades
SF+C SlowFast features: frames at 30 fps (FFmpeg fps filter), short side 224, centre crop 224,
snippets of `clip_len` seconds (2 for QVHighlights, 1 for Charades), 32 fast frames per snippet from
its start with HERO's floor(source fps) span quirk, slow = fast[0,4,8,13,17,22,26,31],
(x/255 - 0.45) / (0.225 + 1e-8); the output is the concatenated average-pooled pathways before
the projection. See `extractors._snippets.hero_slowfast_plan` and docs/snippet_extractors.md.

The network is pytorchvideo's `create_slowfast` as `slowfast_r50` builds it (34.57 M parameters
with the 400-class head). Weights, from a local file:
- pytorchvideo `SLOWFAST_8x8_R50.pyth` (`{"model_state": state_dict}`), loaded strictly;
- PySlowFast's Caffe2 `SLOWFAST_8x8_R50.pkl` (`{"blobs": {name: ndarray}}`), the file HERO used,
  converted by `caffe2_to_pytorchvideo`: every model tensor must come from a blob and every blob
  must land somewhere (training state such as `*_momentum`, `lr`, `model_iter` excepted).
"""

from __future__ import annotations

import pickle
import re
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator

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
from extractors._snippets import (
    hero_slowfast_plan,
    make_units,
    slow_positions,
    video_info_from_frames,
)

SLOWFAST_DIM = 2304
MEAN, STD = 0.45, 0.225
STAGE_DEPTHS = {2: 3, 3: 4, 4: 6, 5: 3}  # residual blocks per stage, ResNet-50

if TYPE_CHECKING:  # imported where used: `vmr decode` reads this module without torch
    import torch


def build_slowfast_r50() -> torch.nn.Module:
    from pytorchvideo.models.hub.slowfast import slowfast_r50

    return slowfast_r50(pretrained=False).eval()


def slowfast_features(model: torch.nn.Module, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
    """[slow (B,3,8,H,W), fast (B,3,32,H,W)] -> (B, 2304): each pathway's last stage averaged over
    time and space, concatenated slow first. At 224x224 this is exactly the head's
    AvgPool3d([8,7,7]) / AvgPool3d([32,7,7]) (PoolConcatPathway); smaller inputs still work."""
    import torch

    x = [slow, fast]
    for block in model.blocks[:5]:  # stem + res2..res5, with the fast->slow fusions
        x = block(x)
    return torch.cat([p.mean(dim=(2, 3, 4)) for p in x], dim=1)


# -- Caffe2 (PySlowFast model zoo .pkl) -> pytorchvideo ------------------------------------------

_BN_PARTS = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_TRAINING_STATE = re.compile(r"(_momentum$|^lr$|^model_iter$)")


def caffe2_key(blob: str) -> str:
    """The pytorchvideo `slowfast_r50` state-dict key of one Caffe2 blob of SLOWFAST_8x8_R50.pkl.

    Caffe2 names: `t_` prefix = fast pathway; `conv1`/`res_conv1_bn` = stem; `resS_I_branch2{a,b,c}`
    / `resS_I_branch1` = block I of stage S; fast->slow lateral convs are `t_pool1_subsample` (after
    the stem) and `t_resS_<last>_branch2c_bn_subsample` (after stage S); `pred` = classifier.
    Suffixes: `_w` weight, `_b` bias, `_bn_{s,b,rm,riv}` BN scale, shift, running mean, var.
    Raises KeyError for a name outside this scheme.
    """
    fast, name = (1, blob[2:]) if blob.startswith("t_") else (0, blob)

    def bn(part: str) -> str:
        return _BN_PARTS[part]

    if m := re.fullmatch(r"(?:pool1|res(\d)_(\d+)_branch2c_bn)_subsample_(w|bn_(s|b|rm|riv))", name):
        if not fast:
            raise KeyError(blob)
        stage = int(m.group(1)) if m.group(1) else 1
        if m.group(1) and (stage not in (2, 3, 4) or int(m.group(2)) != STAGE_DEPTHS[stage] - 1):
            raise KeyError(blob)  # laterals follow the LAST block of res2..res4 only
        base = f"blocks.{stage - 1}.multipathway_fusion"
        return f"{base}.conv_fast_to_slow.weight" if m.group(3) == "w" else f"{base}.norm.{bn(m.group(4))}"
    if name == "conv1_w":
        return f"blocks.0.multipathway_blocks.{fast}.conv.weight"
    if m := re.fullmatch(r"res_conv1_bn_(s|b|rm|riv)", name):
        return f"blocks.0.multipathway_blocks.{fast}.norm.{bn(m.group(1))}"
    if m := re.fullmatch(r"res(\d)_(\d+)_branch(1|2[abc])_(w|bn_(s|b|rm|riv))", name):
        stage, block, branch = int(m.group(1)), int(m.group(2)), m.group(3)
        if stage not in STAGE_DEPTHS or block >= STAGE_DEPTHS[stage] or (branch == "1" and block != 0):
            raise KeyError(blob)
        base = f"blocks.{stage - 1}.multipathway_blocks.{fast}.res_blocks.{block}"
        if branch == "1":
            layer, norm = f"{base}.branch1_conv", f"{base}.branch1_norm"
        else:
            layer, norm = f"{base}.branch2.conv_{branch[1]}", f"{base}.branch2.norm_{branch[1]}"
        return f"{layer}.weight" if m.group(4) == "w" else f"{norm}.{bn(m.group(5))}"
    if not fast and name in ("pred_w", "pred_b"):
        return "blocks.6.proj." + ("weight" if name == "pred_w" else "bias")
    raise KeyError(blob)


def read_caffe2_blobs(path: str) -> dict[str, np.ndarray]:
    """The blobs of a Caffe2 model-zoo pickle (`{"blobs": {...}}`, or the bare blob dict).

    These are Python-2-era pickles of numpy arrays, read with encoding latin1; only load files
    whose sha256 you trust (set `weights_sha256`), as with any pickle.
    """
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except Exception as e:
        raise WeightsError(f"{path}: not a readable Caffe2 pickle ({type(e).__name__}: {e})") from None
    blobs = obj.get("blobs", obj) if isinstance(obj, dict) else None
    if not isinstance(blobs, dict) or not blobs:
        raise WeightsError(f"{path}: expected a dict with a 'blobs' dict of arrays")
    return blobs


def caffe2_to_pytorchvideo(blobs: dict[str, np.ndarray], model: torch.nn.Module, path: str) -> dict:
    """Convert every blob; unknown names, shape mismatches and model tensors left without a blob
    are errors naming the file (a partial load would silently give wrong features)."""
    import torch

    own = model.state_dict()
    state, unknown, wrong = {}, [], []
    for name, value in blobs.items():
        if _TRAINING_STATE.search(name):
            continue
        try:
            key = caffe2_key(name)
        except KeyError:
            unknown.append(name)
            continue
        tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if key not in own or tuple(tensor.shape) != tuple(own[key].shape):
            wrong.append(f"{name} -> {key}: blob {tuple(tensor.shape)} vs model "
                         f"{tuple(own[key].shape) if key in own else 'absent'}")
            continue
        state[key] = tensor
    # BatchNorm's step counter is bookkeeping, not a weight: Caffe2 has no such blob.
    for key, value in own.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
    missing = sorted(set(own) - set(state))
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} blobs outside the SlowFast R50 naming scheme {sorted(unknown)[:5]}")
    if wrong:
        problems.append(f"{len(wrong)} blobs with the wrong shape {wrong[:3]}")
    if missing:
        problems.append(f"{len(missing)} model tensors without a blob {missing[:5]}")
    if problems:
        raise WeightsError(f"{path}: Caffe2 SlowFast conversion failed: " + "; ".join(problems))
    return state


# -- the extractor ----------------------------------------------------------------------------------


@EXTRACTORS.register("slowfast")
class SlowFastExtractor(Extractor):
    name = "slowfast"
    dim = SLOWFAST_DIM

    class Config(ExtractorConfig):
        clip_len: float = Field(2.0, gt=0)  # seconds per feature: 2 QVHighlights, 1 Charades SF+C
        target_fps: int = Field(30, ge=1)  # HERO --target_framerate
        size: int = Field(224, ge=32)  # short side and crop (HERO: 224)
        weights_format: Literal["auto", "pyth", "caffe2"] = "auto"  # auto: .pkl -> caffe2, else pyth
        batch_size: int = Field(8, ge=1)

        @field_validator("clip_len")
        @classmethod
        def _whole_frames(cls, v: float) -> float:
            if abs(v * 30 - round(v * 30)) > 1e-9:
                raise ValueError("clip_len * target_fps must be a whole number of frames")
            return v

    def protocol(self) -> SamplingProtocol:
        c = self.config
        return SamplingProtocol(rule="fps_filter", rate=float(c.target_fps), short_side=c.size, crop=c.size)

    def plan(self, num_frames: int, video: VideoInfo):
        c = self.config
        return hero_slowfast_plan(num_frames, video.fps, video.duration, c.clip_len, c.target_fps)

    def group(self, frames, windows, video: VideoInfo | None = None):
        video = video or video_info_from_frames(frames)
        if video is None or not video.fps:
            raise ValueError("slowfast (HERO protocol) needs the video's native fps and stream duration: "
                             "call group(frames, windows, video=VideoInfo(...))")
        plan = self.plan(len(frames), video)
        # row k stands for the snippet [k, k+1) * clip_len, as Moment-DETR/MESM read it (padding included)
        starts = np.arange(len(plan.snippets), dtype=np.float64) * self.config.clip_len
        return make_units(frames, plan.snippets), np.stack([starts, starts + self.config.clip_len], axis=1)

    def build_model(self) -> torch.nn.Module:
        import torch

        torch.manual_seed(self.config.seed)
        return build_slowfast_r50()

    def load_weights(self, model: torch.nn.Module, path: str) -> None:
        fmt = self.config.weights_format
        if fmt == "caffe2" or (fmt == "auto" and str(path).endswith(".pkl")):
            state = caffe2_to_pytorchvideo(read_caffe2_blobs(path), model, path)
        else:
            state = unwrap_state_dict(torch_load(path), path)
        check_state_dict(model, state, path)

    def preprocess(self, units: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 32, H, W, 3) -> float (B, 3, 32, H, W) normalised as HERO (std + 1e-8)."""
        x = units.permute(0, 4, 1, 2, 3).float().div_(255.0)
        return (x - MEAN) / (STD + 1e-8)

    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        import torch

        slow = x[:, :, torch.as_tensor(slow_positions(x.shape[2]), device=x.device)]
        return slowfast_features(model, slow, x)
