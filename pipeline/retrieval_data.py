"""Text-video retrieval data for GLSCL: (caption, video) pairs, CLIP tokens and video clips.

Pairs come from `pipeline.annotations` (no parsing here):
- `video_captions` (the synthetic default): one caption per video from the dataset's
  `{vid: caption}` file; a split's videos are those of `dataset.splits[split]` (64 train / 16 test).
- `msrvtt`: `dataset.splits` name CLIP4Clip's files. A .json split = every `MSRVTT_data.json`
  caption (file order) of a video in the csv `dataset.durations[0]` (`MSRVTT_train.9k.csv`: 180,000
  pairs); a .csv split = the 1k-A `MSRVTT_JSFUSION_test.csv` (1,000 pairs, one per video).

Video clips follow GLSCL's protocol (1 frame per second, at most `max_frames` kept with
`linspace(0, n-1, max_frames)` truncated to int, zero padding + mask):
- `FeatureClips`: rows of a merged feature file `features/<name>.h5` (CLIP frame embeddings at
  1 per second), for training the heads on frozen features;
- `FrameClips`: uint8 frames of the decode stage's frame store, 224 centre crop, CLIP
  normalisation and, for training, RandAugment applied identically to every frame of a clip.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Pair = tuple[Any, str, str]  # (qid, video id, caption)


# -- text -------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer  # CLIP's BPE, shipped with open_clip

    return SimpleTokenizer()


def tokenize(caption: str, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP4Clip's text input: <SOT> + BPE truncated to max_words-2 + <EOT>, zero-padded; mask 1 on tokens."""
    tok = _tokenizer()
    ids = [tok.sot_token_id, *tok.encode(caption)[: max_words - 2], tok.eot_token_id]
    out = torch.zeros(max_words, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids)
    return out, (out > 0).long()


# -- pairs ------------------------------------------------------------------------------------------


def retrieval_pairs(cfg: Any, data: Any, split: str) -> list[Pair]:
    """The (qid, video id, caption) pairs of a split, for the source named by `cfg.source`."""
    from pipeline.annotations import load_split

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


class FeatureClips:
    """Frozen per-frame features of a merged HDF5 file (one (T, D) dataset per video id)."""

    def __init__(self, path: str | Path, max_frames: int, center: np.ndarray | None = None):
        self.path, self.max_frames, self.center = Path(path), max_frames, center
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: feature file not found (run `vmr extract` and `vmr merge`)")
        self._file = None  # opened lazily, once per worker process

    @staticmethod
    def mean_feature(path: str | Path, videos: list[str]) -> np.ndarray:
        """Mean frame feature over `videos` (float64 sums, so the order of videos does not matter)."""
        import h5py

        with h5py.File(path, "r") as f:
            total = sum(np.asarray(f[v], dtype=np.float64).sum(0) for v in videos)
            count = sum(f[v].shape[0] for v in videos)
        return (total / count).astype(np.float32)

    def __call__(self, vid: str) -> tuple[torch.Tensor, torch.Tensor]:
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        if vid not in self._file:
            raise KeyError(f"{self.path}: no features for video '{vid}'")
        feats = np.asarray(self._file[vid], dtype=np.float32)
        if feats.ndim != 2 or len(feats) == 0:
            raise ValueError(f"{self.path}: '{vid}' has shape {feats.shape}, expected (T>0, D)")
        feats = feats[keep_uniformly(len(feats), self.max_frames)]
        if self.center is not None:
            feats = feats - self.center
        return _pad(torch.from_numpy(feats), self.max_frames)

    def __getstate__(self):  # h5py handles do not pickle (DataLoader workers)
        return {**self.__dict__, "_file": None}


class FrameClips:
    """Decoded frames -> [max_frames, 3, S, S] CLIP-normalised tensors (+ mask)."""

    def __init__(self, frames_dir: str | Path, max_frames: int, size: int = 224, augment: bool = False,
                 seed: int = 0):
        self.frames_dir, self.max_frames, self.size = Path(frames_dir), max_frames, size
        self.augment, self.seed, self._calls = augment, seed, 0

    def load_uint8(self, vid: str) -> np.ndarray:
        """(n, H, W, 3) uint8 frames at 1 fps from the decode stage's frame store."""
        from pipeline.framestore import FrameStore

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
        return v2.functional.normalize(x, list(CLIP_MEAN), list(CLIP_STD))

    def __call__(self, vid: str) -> tuple[torch.Tensor, torch.Tensor]:
        frames = self.load_uint8(vid)
        if len(frames) == 0:
            raise ValueError(f"{self.frames_dir}: no decoded frames for video '{vid}'")
        frames = frames[keep_uniformly(len(frames), self.max_frames)]
        return _pad(self.transform(frames), self.max_frames)


def glscl_protocol():
    """GLSCL's frames: one per second, the first at or after each whole second (the released decord
    stride round(fps) from frame 0), short side 224 bicubic, centre crop 224."""
    from pipeline.sampling import SamplingProtocol

    return SamplingProtocol(rule="uniform", rate=1.0, short_side=224, crop=224, interpolation="bicubic")


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
        return {"qid": qid, "vid": vid, "ids": ids, "mask": mask}


class VideoDataset(Dataset):
    def __init__(self, videos: list[str], clips):
        self.videos, self.clips = videos, clips

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        video, mask = self.clips(self.videos[i])
        return {"vid": self.videos[i], "video": video, "mask": mask}

