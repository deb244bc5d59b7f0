"""GLSCL's data: (caption, video) pairs, CLIP tokens and video clips.

Pairs come from `pipeline.text.annotations` (no parsing here):
- `video_captions` (the synthetic default): one caption per video from the dataset's
  `{vid: caption}` file; a split's videos are those of `dataset.splits[split]` (64 train / 16 test).
- `msrvtt`: `dataset.splits` name CLIP4Clip's files. A .json split = every `MSRVTT_data.json`
  caption (file order) of a video in the csv `dataset.durations[0]` (`MSRVTT_train.9k.csv`: 180,000
  pairs); a .csv split = the 1k-A `MSRVTT_JSFUSION_test.csv` (1,000 pairs, one per video).

Video clips follow GLSCL's protocol (1 frame per second, at most `max_frames` kept with
`linspace(0, n-1, max_frames)` truncated to int, zero padding + mask):
- `FeatureClips`: rows of a merged feature file `features/<name>.h5` (CLIP frame embeddings at
  1 per second), for training the heads on frozen features. The file's own row times (the
  `windows` merge records from `vmr extract`) must say 1 s per row; a file without them is
  trusted, with a note in the log;
- `FrameClips`: uint8 frames of the decode stage's frame store, 224 centre crop, CLIP
  normalisation and, for training, RandAugment applied identically to every frame of a clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from models.specs.glscl import FRAMES_PER_SECOND, glscl_protocol
from pipeline.core.progress import log
from pipeline.media.features import FeatureFile
from pipeline.media.framestore import FrameStore
from pipeline.nets.clip import IMAGE_MEAN, IMAGE_STD, text_ids
from pipeline.text.annotations import load_split

Pair = tuple[Any, str, str]  # (qid, video id, caption)


# -- text -------------------------------------------------------------------------------------------


def tokenize(caption: str, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP4Clip's text input: <SOT> + BPE truncated to max_words-2 + <EOT>, zero-padded; mask 1 on tokens."""
    ids = text_ids(caption, max_words)
    out = torch.zeros(max_words, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids)
    return out, (out > 0).long()


# -- pairs ------------------------------------------------------------------------------------------


def retrieval_pairs(cfg: Any, data: Any, split: str) -> list[Pair]:
    """The (qid, video id, caption) pairs of a split, for the source named by `cfg.source`."""

    if cfg.source == "msrvtt":
        dataset = data.dataset
        if split not in dataset.splits:
            raise ValueError(f"params dataset.splits has no '{split}' (have {sorted(dataset.splits)})")
        path = Path(dataset.splits[split])
        if path.suffix == ".json":  # MSRVTT_data.json: the captions of the videos in durations[0]'s csv
            queries = load_split(path, "msrvtt_json", dataset=dataset.name, split=split, durations=dataset.durations)
        else:  # MSRVTT_JSFUSION_test.csv (1k-A)
            queries = load_split(path, "msrvtt_csv", dataset=dataset.name, split=split)
        return [(q.qid, q.video_id, q.sentence) for q in queries]

    path = data.dataset.video_captions
    if not path:
        raise ValueError("model.glscl.source is 'video_captions' but params dataset.video_captions is not set")
    captions = {q.video_id: q.sentence for q in load_split(path, "video_captions", split=split)}
    videos = list(dict.fromkeys(q.video_id for q in data.queries(split)))  # split membership, file order
    missing = [v for v in videos if v not in captions]
    if missing:
        raise ValueError(f"{path}: no caption for {len(missing)} video(s) of split '{split}', e.g. {missing[:3]}")
    return [(vid, vid, captions[vid]) for vid in videos]


# -- video ------------------------------------------------------------------------------------------


def keep_uniformly(n: int, max_frames: int) -> np.ndarray:
    """Indices of the frames kept: all if n <= max_frames, else GLSCL's linspace (first and last kept)."""
    if n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames, dtype=int)


def _pad(frames: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = frames.new_zeros((max_frames, *frames.shape[1:]))
    out[: len(frames)] = frames
    mask = torch.zeros(max_frames, dtype=torch.long)
    mask[: len(frames)] = 1
    return out, mask


def check_one_frame_per_second(features: FeatureFile) -> None:
    """GLSCL takes each feature row for one frame per second: refuse a file whose rows say otherwise."""
    seconds = features.seconds_per_row()
    if seconds is None:
        log(f"{features.path}: no row times in the feature file; "
            f"assuming GLSCL's {1 / FRAMES_PER_SECOND:g} s per row")
    elif abs(seconds - 1 / FRAMES_PER_SECOND) > 1e-3:
        raise ValueError(
            f"{features.path}: its rows are {seconds:g} s apart, but GLSCL reads frame features at "
            f"{FRAMES_PER_SECOND:g} per second (model.glscl.input: features, model.glscl.feature: "
            f"{features.path.stem}); extract them at {1 / FRAMES_PER_SECOND:g} s per row "
            "(e.g. extractors.clip.clip_len: 1)")


class FeatureClips:
    """Frozen per-frame features of a merged HDF5 file (one (T, D) array per video id, 1 per second)."""

    def __init__(self, path: str | Path, max_frames: int, center: np.ndarray | None = None):
        self.features = FeatureFile(path)  # opens the file lazily, once per worker process
        self.max_frames, self.center = max_frames, center
        check_one_frame_per_second(self.features)

    def __call__(self, vid: str) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features[vid]
        if feats.ndim != 2 or len(feats) == 0:
            raise ValueError(f"{self.features.path}: '{vid}' has shape {feats.shape}, expected (T>0, D)")
        feats = feats[keep_uniformly(len(feats), self.max_frames)]
        if self.center is not None:
            feats = feats - self.center
        return _pad(torch.from_numpy(feats), self.max_frames)


class FrameClips:
    """Decoded frames -> [max_frames, 3, S, S] CLIP-normalised tensors (+ mask)."""

    def __init__(self, frames_dir: str | Path, max_frames: int, size: int = 224, augment: bool = False,
                 seed: int = 0):
        self.frames_dir, self.max_frames, self.size = Path(frames_dir), max_frames, size
        self.augment, self.seed, self._calls = augment, seed, 0

    def load_uint8(self, vid: str) -> np.ndarray:
        """(n, H, W, 3) uint8 frames at 1 fps from the decode stage's frame store."""

        return np.asarray(FrameStore(self.frames_dir).load(vid, glscl_protocol().key).frames)

    def transform(self, frames: np.ndarray) -> torch.Tensor:
        from torchvision.transforms import v2

        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T,3,H,W] uint8
        x = v2.functional.resize(x, self.size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        x = v2.functional.center_crop(x, self.size)
        if self.augment:
            # A [T,3,H,W] tensor is one "image batch" to v2 transforms: the same ops and magnitudes hit
            # every frame, which is the released video-consistent RandAugment (timm rand-m7-n4-mstd0.5;
            # torchvision's op set and fixed magnitude are the closest maintained equivalent; its tensor
            # affine ops support bilinear, not the released bicubic).
            x = v2.RandAugment(num_ops=4, magnitude=7, interpolation=v2.InterpolationMode.BILINEAR)(x)
        x = x.float().div_(255.0)
        return v2.functional.normalize(x, list(IMAGE_MEAN), list(IMAGE_STD))

    def __call__(self, vid: str) -> tuple[torch.Tensor, torch.Tensor]:
        frames = self.load_uint8(vid)
        if len(frames) == 0:
            raise ValueError(f"{self.frames_dir}: no decoded frames for video '{vid}'")
        frames = frames[keep_uniformly(len(frames), self.max_frames)]
        return _pad(self.transform(frames), self.max_frames)



# -- datasets ---------------------------------------------------------------------------------------


class PairDataset(Dataset):
    """Training items: one (caption, video) pair each."""

    def __init__(self, pairs: list[Pair], clips, max_words: int):
        self.pairs, self.clips, self.max_words = pairs, clips, max_words

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        _, vid, caption = self.pairs[i]
        ids, text_mask = tokenize(caption, self.max_words)
        video, video_mask = self.clips(vid)
        return {"ids": ids, "text_mask": text_mask, "video": video, "video_mask": video_mask}


class TextDataset(Dataset):
    def __init__(self, pairs: list[Pair], max_words: int):
        self.pairs, self.max_words = pairs, max_words

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        qid, vid, caption = self.pairs[i]
        ids, mask = tokenize(caption, self.max_words)
        return {"qid": qid, "vid": vid, "text": caption, "ids": ids, "mask": mask}


class VideoDataset(Dataset):
    def __init__(self, videos: list[str], clips):
        self.videos, self.clips = videos, clips

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        video, mask = self.clips(self.videos[i])
        return {"vid": self.videos[i], "video": video, "mask": mask}

