"""MESM's data: one dataset item per video (all its queries), GT frame indices, saliency and
triplet targets, and the collate that turns video groups into the model batch of queries.

Video features come from `pipeline.media.features.load_video` with MESM's conventions: per-frame
L2 norm, several files truncated to the shortest and concatenated, QVHighlights cut to
`max_video_l` rows, else average-pooled to `max_video_l` when longer, TEF appended.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models.mesm.spans import pad_groups, span_xx_to_cxw
from models.mesm.text import MesmTokenizer
from pipeline.media.features import FeatureFile, load_video


def qvh_saliency_targets(clip_ids, scores, length: int, rng: np.random.Generator) -> tuple[Tensor, list[int], list[int]]:
    """QVHighlights: summed 3-annotator scores per clip (0..12) and the triplet's clip indices:
    [hardest positive, a random relevant clip] and [weakest relevant clip, a random irrelevant clip]."""
    agg = np.asarray(scores).sum(1)
    label = np.zeros(max(length, max(clip_ids) + 1))
    label[list(clip_ids)] = agg
    label = label[:length]
    order = np.argsort(agg, kind="stable")
    hard_pos, hard_neg = [min(clip_ids[order[-1]], length - 1)], [min(clip_ids[order[0]], length - 1)]
    pool = sorted(set(range(length)) - set(clip_ids))
    if pool:
        easy_pos, easy_neg = [int(rng.choice(clip_ids))], [int(rng.choice(pool))]
    else:  # no irrelevant clip: repeat the hard ones (as Moment-DETR)
        easy_pos, easy_neg = hard_pos, hard_neg
    return torch.from_numpy(label).float(), hard_pos + easy_pos, hard_neg + easy_neg


class MesmVideoDataset(torch.utils.data.Dataset):
    """Items = one video group: the video's features and all its queries (sorted by start), as MESM's
    `_gather_data_by_video_id`; with `max_gather_size > 0` (TACoS) a video's queries are shuffled
    once and split into chunks of at most that many."""

    def __init__(self, queries, files: list[FeatureFile], tokenizer: MesmTokenizer, cfg, train: bool, seed: int,
                 standardize: tuple[np.ndarray, np.ndarray] | None = None):
        self.files, self.tokenizer, self.cfg, self.train = files, tokenizer, cfg, train
        self.standardize = standardize
        self.qvh = cfg.layout == "qvhighlights"
        self.rng = np.random.default_rng(seed)
        groups: dict[str, list] = {}
        for q in queries:
            if train and not q.moments:
                continue
            key = q.video_id.rsplit("_", 2)[0] if self.qvh else q.video_id
            groups.setdefault(key, []).append(q)
        self.tokens = {q.qid: tokenizer(q.sentence) for qs in groups.values() for q in qs}
        order_key = (lambda q: float(q.video_id.rsplit("_", 2)[1])) if self.qvh else (
            lambda q: q.moment[0] if q.moments else 0.0)
        self.items: list[list] = []
        for qs in groups.values():
            if cfg.max_gather_size > 0 and train:
                qs = [qs[i] for i in self.rng.permutation(len(qs))]
                chunks = [qs[i : i + cfg.max_gather_size] for i in range(0, len(qs), cfg.max_gather_size)]
            else:
                chunks = [qs]
            self.items += [sorted(c, key=order_key) for c in chunks]

    def __len__(self) -> int:
        return len(self.items)

    def _video(self, vid: str) -> Tensor:
        """MESM's frames (see the module docstring); `standardize` is this project's option."""
        cfg = self.cfg
        x = load_video(self.files, vid, truncate=cfg.max_video_l if self.qvh else None, l2norm=cfg.normalize_video,
                       standardize=self.standardize, max_len=cfg.max_video_l, tef=cfg.use_tef,
                       edges_dtype="float32")  # sample_video_feat: torch float32 bin edges
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def _frames(self, q, length: int) -> tuple[int, int]:
        """MESM's GT frame indices: int(t / clip_len), or int(t / duration * L) with clip_len = -1."""
        st, ed = q.moment
        if self.cfg.clip_len == -1:
            s, e = int(st / q.duration * length), int(ed / q.duration * length)
        else:
            s, e = int(st / self.cfg.clip_len), int(ed / self.cfg.clip_len)
        e = min(e, length - 1)
        return min(s, e), e

    def __getitem__(self, index: int) -> list[dict]:
        cfg, out, videos = self.cfg, [], {}
        for q in self.items[index]:
            if q.video_id not in videos:
                videos[q.video_id] = self._video(q.video_id)
            video = videos[q.video_id]
            length = len(video)
            rec = {"qid": q.qid, "vid": q.video_id, "duration": float(q.duration), "video": video,
                   "tokens": self.tokens[q.qid]}
            if q.moments:
                if self.qvh:
                    windows = list(q.moments)
                    if len(windows) > cfg.max_windows:
                        windows = [windows[i] for i in self.rng.permutation(len(windows))[: cfg.max_windows]]
                    rec["norm_moment"] = torch.tensor(windows, dtype=torch.float32) / (length * cfg.clip_len)
                    label, pos, neg = qvh_saliency_targets(list(q.relevant_clip_ids), q.saliency_scores, length, self.rng)
                    rec.update(saliency_label=label, clip_mask=label != 0, pos_idx=pos, neg_idx=neg)
                else:
                    rec["norm_moment"] = torch.tensor(q.moment, dtype=torch.float32) / float(q.duration)
                    s, e = self._frames(q, length)
                    mask = torch.zeros(length, dtype=torch.bool)
                    mask[s : e + 1] = True
                    inside, outside = np.arange(s, e + 1), np.r_[np.arange(0, s), np.arange(e + 1, length)]
                    n = cfg.contra_samples
                    if len(outside) == 0:  # the moment covers the whole video (MESM would fail here)
                        outside = inside
                    rec.update(clip_mask=mask,
                               pos_idx=self.rng.choice(inside, n, replace=len(inside) < n).tolist(),
                               neg_idx=self.rng.choice(outside, n, replace=len(outside) < n).tolist())
            out.append(rec)
        return out


def pad_stack(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-pad (L_i, ...) tensors to (N, max L, ...) and return the valid mask."""
    return pad_groups(torch.cat(seqs), [len(s) for s in seqs])


def collate_groups(items: list[list[dict]]) -> dict:
    """MESM's collate: the model batch is every query of every video group, the video repeated per query."""
    recs = [r for group in items for r in group]
    video, video_mask = pad_stack([r["video"] for r in recs])
    width = max(1, max(len(r["tokens"].ids) for r in recs))
    pad = lambda key, dtype: torch.tensor(  # noqa: E731
        [list(getattr(r["tokens"], key)) + [0] * (width - len(r["tokens"].ids)) for r in recs], dtype=dtype)
    batch = {
        "num_clips": torch.tensor([len(g) for g in items]),
        "video_feat": video, "video_mask": video_mask,
        "words_id": pad("ids", torch.long), "words_weight": pad("weights", torch.long),
        "words_label": pad("labels", torch.long), "unknown_mask": pad("unknown", torch.bool),
        "duration": torch.tensor([r["duration"] for r in recs]),
        "qid": [r["qid"] for r in recs], "vid": [r["vid"] for r in recs],
    }
    batch["words_mask"] = batch["words_id"] != 0
    # A sentence with no token left (glove.pkl drops words without a vector) keeps one zero word so
    # that attention has a key; MESM would divide by zero there.
    batch["words_mask"][~batch["words_mask"].any(1), 0] = True
    if "norm_moment" in recs[0]:
        moments = [r["norm_moment"] for r in recs]
        if moments[0].dim() == 2:  # several windows per query (QVH)
            batch["norm_moment"] = moments
            batch["norm_span"] = [span_xx_to_cxw(m) for m in moments]
            batch["saliency_label"] = pad_stack([r["saliency_label"] for r in recs])[0]
        else:
            batch["norm_moment"] = torch.stack(moments)
            batch["norm_span"] = span_xx_to_cxw(batch["norm_moment"])
        batch["clip_mask"] = pad_stack([r["clip_mask"] for r in recs])[0]
        batch["pos_idx"] = torch.tensor([r["pos_idx"] for r in recs])
        batch["neg_idx"] = torch.tensor([r["neg_idx"] for r in recs])
    return batch


