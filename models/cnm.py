"""CNM: weakly supervised moment localisation with contrastive negative sample mining (AAAI'22).

A faithful re-implementation of the official minghangz/cnm model (spec: ../shared/reference/mesm_cnm.md,
part B). Training never sees a timestamp: a query is reconstructed from the video, and a learnable
Gaussian over time is pushed to the frames that make the reconstruction easiest.

    frames (B, N, D) --frame_fc-->  decoder1 (causal self-attn + cross-attn to words) --h[:, -1]--> fc_mask_gen
    words  (B, L+1, 300) --word_fc--> decoder2 (causal self-attn)                       -> (centre, width)
    Gaussian g over N/4 kept frames; masked words reconstructed three times (shared weights):
        positive: frames weighted by g; hard negative: the whole video; easy negative: weighted by 1 - g.

Each batch takes two optimisation steps (`CNM.train_step`):
  1. reconstructor: NLL(positive) + NLL(hard negative), every parameter but `fc_mask_gen`;
  2. generator: the intra-video contrastive (IVC) margin loss, `fc_mask_gen` only, on a fresh forward.
At inference the model stops after the mask generator: [max(c - w/2, 0), min(c + w/2, 1)] of the video.

Kept on purpose because the published numbers depend on them (each is also tested or documented):
- frames carry no positional encoding: the causal self-attention over frames is their only notion of time;
- the reconstruction loss covers positions 0..l of a sentence of l words, so a sentence shorter than the
  longest in its batch also learns to predict the padding id 0 after its last word (CNM's mask `[:, :-1]`);
- gradient clipping (norm 10) runs over every parameter holding a gradient, so the other step's stale,
  already-clipped gradients count in the norm exactly as in the official runner;
- Adam is fairseq's variant (eps added to sqrt(v) before bias correction), not torch.optim.Adam.
Parameter names equal the official state-dict keys, so the released `model-best.pt` files load as they are.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from models.specs.cnm import PROPOSAL_STRIDE, CNMConfig, CNMSpec
from pipeline.core.provenance import weights_record
from pipeline.media.features import FeatureFile, feature_statistics, load_video
from pipeline.nets.checkpoints import WeightsError, torch_load
from pipeline.text.vocab import load_glove_pkl, pos_tagger_name, pos_weights, word_tokenize
from pipeline.training.evaluation import MOMENT_THRESHOLDS, evaluate_moments
from pipeline.training.trainer import (
    DataContext,
    GroundingModel,
    Optimization,
    StepContext,
)

LABEL_SMOOTHING = 0.1  # cal_nll_loss's eps
MIN_WIDTH = 0.1  # the Gaussian's width is clamped below at 0.1 (of the whole video)
WORD_DIM = 300  # GloVe vectors from glove.pkl


# -- data: frames, words, batches ------------------------------------------------------------------


class Vocabulary:
    """CNM's view of a CPL-format glove.pkl: word vectors for all words, class ids for the most common.

    `glove` is the unpickled dict {w2id, id2vec, counter}. The reconstruction targets are the
    `counter.most_common(size)` words with ids 1..K in that order (0 is padding), so the head has K + 1
    classes; every other word is out of vocabulary and dropped from the query.
    """

    def __init__(self, glove: dict[str, Any], size: int):
        missing = {"w2id", "id2vec", "counter"} - set(glove)
        if missing:
            raise ValueError(f"glove.pkl: missing keys {sorted(missing)} (expected w2id, id2vec, counter)")
        self.w2id: dict[str, int] = glove["w2id"]
        self.id2vec: Sequence[np.ndarray] = glove["id2vec"]
        counter: Counter = glove["counter"]
        self.word_to_class = {w: i for i, (w, _) in enumerate(counter.most_common(size), start=1)}

    @property
    def num_classes(self) -> int:  # CNM's `vocab_size`: kept words + padding
        return len(self.word_to_class) + 1

    def vector(self, word: str) -> np.ndarray:
        return np.asarray(self.id2vec[self.w2id[word]], dtype=np.float32)


def encode_query(tokens: Sequence[str], pos_weights: Sequence[float], vocab: Vocabulary, query: str = "") -> dict[str, Any]:
    """Word tokens and their POS weights (2 content word, 1 otherwise) -> CNM's per-query inputs.

    Tokens are lower-cased and out-of-vocabulary words are dropped (not UNK-ed); a query left without
    words is an error naming it (the official code crashes on `words[0]`). The POS weights are CNM's
    masking preferences. `words_feat` starts with a placeholder slot that the model overwrites with its
    learnable start vector.
    """
    kept = [(t.lower(), float(w)) for t, w in zip(tokens, pos_weights, strict=True) if t.lower() in vocab.word_to_class]
    if not kept:
        raise ValueError(f"query {query!r}: no word left after dropping words outside the CNM vocabulary")
    words = [w for w, _ in kept]
    vectors = [vocab.vector(w) for w in words]
    return {
        "words_id": [vocab.word_to_class[w] for w in words],
        "words_feat": np.stack([vectors[0], *vectors]),
        "pos_weights": [w for _, w in kept],
    }


def collate(samples: Sequence[dict[str, Any]], max_num_words: int) -> dict[str, Any]:
    """Stack items {frames_feat (N, D), words_id, words_feat, pos_weights, qid, vid, duration} into a batch.

    Sentences are cut at `max_num_words`; `weights` are the softmax of the POS weights over each
    sentence's kept words (CNM's masking probabilities), zero on padding.
    """
    words_len = [min(len(s["words_id"]), max_num_words) for s in samples]
    L = max(words_len)
    words_feat = torch.zeros(len(samples), L + 1, samples[0]["words_feat"].shape[1])
    words_id = torch.zeros(len(samples), L, dtype=torch.long)
    weights = torch.zeros(len(samples), L)
    for i, (s, n) in enumerate(zip(samples, words_len, strict=True)):
        words_feat[i, : n + 1] = torch.as_tensor(s["words_feat"][: n + 1])
        words_id[i, :n] = torch.as_tensor(s["words_id"][:n])
        weights[i, :n] = torch.softmax(torch.as_tensor(s["pos_weights"][:n], dtype=torch.float64), 0).float()
    return {
        "frames_feat": torch.as_tensor(np.stack([s["frames_feat"] for s in samples])),
        "words_feat": words_feat,
        "words_id": words_id,
        "words_len": torch.as_tensor(words_len),
        "weights": weights,
        **{key: [s.get(key) for s in samples] for key in ("qid", "vid", "duration")},
    }


# -- network ---------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention in fairseq's parameter layout (packed q/k/v projection), batch-first.

    `key_weight` (B, Lk), when given, multiplies the attention probabilities over the keys (plus 1e-10)
    and each row is renormalised: CNM's Gaussian-weighted attention. torch's MultiheadAttention cannot
    re-weight after the softmax, hence this small module.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # fairseq's init; done in the official order so a seed gives the official initial weights
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, key_padding=None, causal=False, key_weight=None):
        B, Lq, D = query.shape
        Lk, H = key.shape[1], self.num_heads
        w_q, w_kv = self.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = self.in_proj_bias.split([D, 2 * D])
        q = F.linear(query, w_q, b_q) * (D // H) ** -0.5
        k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
        q, k, v = (t.reshape(B, -1, H, D // H).transpose(1, 2) for t in (q, k, v))

        scores = q @ k.transpose(-1, -2)  # (B, H, Lq, Lk)
        if causal:
            scores = scores + future_mask(Lq, Lk, scores.device)
        if key_padding is not None:
            scores = scores.masked_fill(key_padding[:, None, None, :], -1e30)
        probs = scores.float().softmax(dim=-1).type_as(scores)
        if key_weight is not None:
            probs = probs * (key_weight[:, None, None, :] + 1e-10)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        out = (probs @ v).transpose(1, 2).reshape(B, Lq, D)
        return self.out_proj(out)


def future_mask(num_queries: int, num_keys: int, device=None) -> torch.Tensor:
    """Additive causal mask: query t sees keys 0..t (-inf above the diagonal)."""
    return torch.full((num_queries, num_keys), float("-inf"), device=device).triu(1)


class DecoderLayer(nn.Module):
    """Post-LN layer: causal self-attention -> cross-attention (if a memory is given) -> ReLU FFN (2x)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.self_attn = Attention(dim, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = Attention(dim, num_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def _residual(self, x, y, norm):
        return norm(x + F.dropout(y, self.dropout, self.training))

    def forward(self, x, pad, memory=None, memory_pad=None, self_weight=None, memory_weight=None):
        x = self._residual(x, self.self_attn(x, x, pad, causal=True, key_weight=self_weight), self.self_attn_layer_norm)
        if memory is not None:
            y = self.encoder_attn(x, memory, memory_pad, key_weight=memory_weight)
            x = self._residual(x, y, self.encoder_attn_layer_norm)
        return self._residual(x, self.fc2(F.relu(self.fc1(x))), self.final_layer_norm)


class Decoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.decoder_layers = nn.ModuleList(DecoderLayer(dim, num_heads, dropout) for _ in range(num_layers))

    def forward(self, x, pad, memory=None, memory_pad=None, self_weight=None, memory_weight=None):
        for layer in self.decoder_layers:
            x = layer(x, pad, memory, memory_pad, self_weight, memory_weight)
        return x


class DualTransformer(nn.Module):
    """Two decoder stacks shared by the mask generator and the reconstructor.

    decoder1 is the video stack, decoder2 the text stack; which one is the query and which the memory
    depends on the direction.
    """

    def __init__(self, dim: int, num_heads: int, num_layers1: int, num_layers2: int, dropout: float):
        super().__init__()
        self.decoder1 = Decoder(num_layers1, dim, num_heads, dropout)
        self.decoder2 = Decoder(num_layers2, dim, num_heads, dropout)

    def generate(self, frames, frames_pad, words, words_pad):
        """Frames attend to the encoded words (CNM's decoding=1)."""
        words = self.decoder2(words, words_pad)
        return self.decoder1(frames, frames_pad, words, words_pad)

    def reconstruct(self, frames, frames_pad, words, words_pad, weight=None):
        """Masked words attend to the (Gaussian-weighted) frames (CNM's decoding=2)."""
        frames = self.decoder1(frames, frames_pad, self_weight=weight)
        return self.decoder2(words, words_pad, frames, frames_pad, memory_weight=weight)


def sinusoidal_positions(num_positions: int, dim: int) -> torch.Tensor:
    """fairseq/tensor2tensor sinusoids: [sin | cos] halves, frequencies 10000^(-i/(dim/2 - 1)), row 0 zero."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float)[:, None] * freq[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    table[0] = 0  # position 0 is fairseq's padding index
    return table


def gaussian_weights(center: torch.Tensor, width: torch.Tensor, num_frames: int, alpha: float) -> torch.Tensor:
    """exp(-alpha (t - c)^2 / max(w, 0.1)^2) at t = linspace(0, 1, num_frames): (B,) x (B,) -> (B, num_frames)."""
    t = torch.linspace(0, 1, num_frames, device=center.device)[None]
    width = width[:, None].clamp(min=MIN_WIDTH)
    return torch.exp(-alpha * (t - center[:, None]).pow(2) / width.pow(2))


def length_padding(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) lengths -> (B, size) bool, True on padding."""
    return torch.arange(size, device=lengths.device)[None] >= lengths[:, None]


def sample_masked_words(words_len: torch.Tensor, weights: torch.Tensor, size: int, generator=None) -> torch.Tensor:
    """Pick max(l // 3, 1) of the word slots 1..l per sentence, without replacement, with probability `weights`.

    Returns (B, size) bool. Slot 0 (the start token) is never masked. Sequential sampling without
    replacement, as numpy's `choice(replace=False, p=...)` in the official code.
    """
    masked = torch.zeros(len(words_len), size, dtype=torch.bool)
    for i, n in enumerate(words_len.tolist()):
        picks = torch.multinomial(weights[i, :n].detach().cpu().double(), max(n // 3, 1), False, generator=generator)
        masked[i, picks + 1] = True
    return masked.to(weights.device)


# -- losses ----------------------------------------------------------------------------------------


def smoothed_nll(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, eps: float = LABEL_SMOOTHING):
    """Label-smoothed NLL per sentence: (1-eps) nll + eps/K sum(-log p), averaged over the valid positions."""
    logp = logits.log_softmax(dim=-1)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    loss = (1 - eps) * nll - eps / logits.size(-1) * logp.sum(dim=-1)
    mask = mask.to(loss.dtype)
    return (loss * mask).sum(dim=-1) / mask.sum(dim=-1)


def reconstruction_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Step 1: mean NLL of the positive plus mean NLL of the hard negative (the whole video)."""
    loss = smoothed_nll(out["words_logit"], out["words_id"], out["words_mask"]).mean()
    if out.get("hard_neg_words_logit") is not None:
        loss = loss + smoothed_nll(out["hard_neg_words_logit"], out["words_id"], out["words_mask"]).mean()
    return loss


def ivc_loss(out: dict[str, torch.Tensor], beta_1: float, beta_2: float) -> torch.Tensor:
    """Step 2, intra-video contrast: the positive must reconstruct better than both negatives by a margin.

    mean(max(0, nll_pos - nll_hard + beta_1)) + mean(max(0, nll_pos - nll_easy + beta_2)).
    """
    nll = smoothed_nll(out["words_logit"], out["words_id"], out["words_mask"])
    if out.get("hard_neg_words_logit") is None:
        return nll.mean()
    hard = smoothed_nll(out["hard_neg_words_logit"], out["words_id"], out["words_mask"])
    easy = smoothed_nll(out["easy_neg_words_logit"], out["words_id"], out["words_mask"])
    return (nll - hard + beta_1).clamp(min=0).mean() + (nll - easy + beta_2).clamp(min=0).mean()




# -- optimisation ----------------------------------------------------------------------------------


class FairseqAdam(torch.optim.Optimizer):
    """Adam as vendored by CNM from fairseq, with CNM's gradient clipping folded into `step`.

    Update: p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), i.e. eps is added before the
    bias correction (torch.optim.Adam adds it after: a different effective eps early on). Weight decay is
    the coupled `p -= wd * lr * p` (0 in every published config).

    Clipping: the official runner clips the norm over *every* model parameter holding a gradient, which
    includes the other step's stale gradients. The shared trainer clips only the stepped optimiser's
    parameters, so CNM turns the trainer's clip off and clips here, over `clip_params`, just before the
    update (after any gradient sync or AMP unscale, like the trainer's own clip).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 clip_params: Iterable[nn.Parameter] = (), max_norm: float | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.clip_params, self.max_norm = list(clip_params), max_norm

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.clip_params if p.grad is not None], self.max_norm)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                if group["weight_decay"]:
                    p.add_(p, alpha=-group["weight_decay"] * group["lr"])
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)


def inverse_sqrt_lr(num_updates: int, lr: float, warmup_updates: int, warmup_init_lr: float) -> float:
    """fairseq's inverse_sqrt schedule: linear warm-up from warmup_init_lr, then lr * sqrt(warmup / n)."""
    if num_updates < warmup_updates:
        return warmup_init_lr + num_updates * (lr - warmup_init_lr) / warmup_updates
    return lr * math.sqrt(warmup_updates / num_updates)


# -- the model -------------------------------------------------------------------------------------



def tokenize(sentence: str) -> tuple[list[str], list[int]]:
    """nltk word tokens of a query and their POS weights, with the vocab stage's tokenizer and tagger
    (nltk's tagger when its data is installed, else the documented fallback: pipeline.text.vocab)."""
    tokens = word_tokenize(sentence)
    return tokens, pos_weights(tokens)


class CNMItems(Dataset):
    """One item per query: resampled frames plus the encoded query. Never carries a timestamp."""

    def __init__(self, queries, features: FeatureFile, vocab: Vocabulary, num_frames: int):
        self.features, self.num_frames = features, num_frames
        self.items = []
        for q in queries:
            try:
                encoded = encode_query(*tokenize(q.sentence), vocab, q.sentence)
            except ValueError as e:
                raise ValueError(f"{q.dataset} {q.split} query {q.qid} (video {q.video_id}): {e}") from None
            self.items.append({"qid": q.qid, "vid": q.video_id, "duration": float(q.duration), **encoded})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        # CNM reads the raw features (no L2 norm) and bin-averages them to exactly num_frames rows, with
        # bin edges computed by numpy in float64 (minghangz/cnm datasets/base.py `_sample_frame_features`)
        frames = load_video([self.features], item["vid"], l2norm=False, num_clips=self.num_frames,
                            edges_dtype="float64")
        return {**item, "frames_feat": frames}


class CNM(CNMSpec, GroundingModel):
    Config = CNMConfig
    manual_optimization = True  # two optimisers, two forward passes per batch

    def __init__(self, cfg: CNMConfig, data: DataContext | None = None, *, frame_dim: int | None = None,
                 num_classes: int | None = None):
        """Built from the data (feature file and glove.pkl), or from explicit sizes when `data` is None."""
        super().__init__(cfg, data)
        if data is not None:
            self.features = FeatureFile(data.feature_file(cfg.feature))
            self.vocab = Vocabulary(load_glove_pkl(Path(data.vocab_dir) / "glove.pkl"), cfg.vocab_size)
            frame_dim, num_classes = self.features.dim(), self.vocab.num_classes
        if frame_dim is None or num_classes is None:
            raise ValueError("CNM needs either a DataContext or both frame_dim and num_classes")
        H = cfg.hidden_size
        # creation order = the official one, so that a seed gives the official initial weights
        self.frame_fc = nn.Linear(frame_dim, H)
        self.word_fc = nn.Linear(WORD_DIM, H)
        self.mask_vec = nn.Parameter(torch.zeros(WORD_DIM))
        self.start_vec = nn.Parameter(torch.zeros(WORD_DIM))
        self.trans = DualTransformer(
            H, cfg.num_heads, cfg.num_decoder_layers1, cfg.num_decoder_layers2, cfg.transformer_dropout
        )
        self.fc_rec = nn.Linear(H, num_classes)
        self.fc_mask_gen = nn.Linear(H, 2)
        self.register_buffer("word_positions", sinusoidal_positions(cfg.max_num_words + 1, H), persistent=False)
        if cfg.standardize_features:  # saved with the weights, so evaluation uses the training statistics
            mean, std = np.zeros(frame_dim, np.float32), np.ones(frame_dim, np.float32)
            if data is not None:  # the raw frames, std + 1e-6
                train_videos = {q.video_id for q in data.queries("train")}
                mean, std = feature_statistics(self.features, train_videos, std_eps=1e-6)
            self.register_buffer("frame_mean", torch.from_numpy(mean))
            self.register_buffer("frame_std", torch.from_numpy(std))
        if cfg.weights is not None:
            load_official_checkpoint(self, cfg.weights, cfg.weights_sha256)

    # -- the network --

    def forward(self, frames_feat, words_feat, words_len, words_id=None, weights=None, generator=None):
        """frames (B, N, D), words (B, L+1, 300) with slot 0 a placeholder, words_len (B,) -> dict.

        Eval mode returns only the proposal (`center`, `width`, normalised). Training mode adds the word
        logits of the positive, hard-negative and easy-negative reconstructions and the loss mask.
        """
        B, N, _ = frames_feat.shape
        if self.cfg.standardize_features:
            frames_feat = (frames_feat - self.frame_mean) / self.frame_std
        frames = self.frame_fc(F.dropout(frames_feat, self.cfg.dropout, self.training))
        words_feat = torch.cat([self.start_vec.expand(B, 1, -1), words_feat[:, 1:]], dim=1)
        positions = self.word_positions[: words_feat.size(1)][None]
        words = self.word_fc(F.dropout(words_feat, self.cfg.dropout, self.training))
        words_pad = length_padding(words_len + 1, words.size(1))

        # every frame is real: CNM resamples each video to exactly max_num_frames
        h = self.trans.generate(frames, None, words + positions, words_pad)
        center, width = torch.sigmoid(self.fc_mask_gen(h[:, -1])).unbind(-1)
        width = width * self.cfg.max_width
        if not self.training:
            return {"center": center, "width": width}

        # the reconstructor sees every 4th frame, weighted by the Gaussian proposal
        props = frames[:, proposal_frame_indices(N)]
        gauss = gaussian_weights(center, width, props.size(1), self.cfg.alpha)

        # teacher-forced reconstruction: slot t holds word t (masked or not) and predicts word t + 1
        masked = sample_masked_words(words_len, weights, words.size(1), generator)
        mask_token = self.word_fc(self.mask_vec)
        masked_words = torch.where(masked[..., None], mask_token, words) + positions
        masked_words, rec_pad = masked_words[:, :-1], words_pad[:, :-1]

        out = {"center": center, "width": width, "gauss_weight": gauss, "words_id": words_id, "words_mask": ~rec_pad}
        out["words_logit"] = self.fc_rec(self.trans.reconstruct(props, None, masked_words, rec_pad, gauss))
        if self.cfg.use_negative:
            out["hard_neg_words_logit"] = self.fc_rec(self.trans.reconstruct(props, None, masked_words, rec_pad))
            easy = self.trans.reconstruct(props, None, masked_words, rec_pad, 1 - gauss)
            out["easy_neg_words_logit"] = self.fc_rec(easy)
        return out

    # The two parameter sets of the two-step update, fixed at build time as in the official runner.
    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.fc_mask_gen.parameters())

    def reconstructor_parameters(self) -> list[nn.Parameter]:
        generator = {id(p) for p in self.generator_parameters()}
        return [p for p in self.parameters() if id(p) not in generator]

    def _train_only(self, params: Iterable[nn.Parameter]) -> None:
        keep = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    # -- the trainer contract (pipeline.training.trainer) --

    def build_dataset(self, split: str, data: DataContext, train: bool) -> Dataset:
        return CNMItems(data.queries(split), self.features, self.vocab, self.cfg.max_num_frames)

    def collate(self, items: list) -> dict[str, Any]:
        return collate(items, self.cfg.max_num_words)

    def configure_optimizers(self) -> Optimization:
        cfg = self.cfg
        lr0 = inverse_sqrt_lr(0, cfg.lr, cfg.warmup_updates, cfg.warmup_init_lr)
        everything = list(self.parameters())
        optimisers = [
            FairseqAdam(params, lr=lr0, weight_decay=cfg.weight_decay, clip_params=everything, max_norm=cfg.clip_norm)
            for params in (self.reconstructor_parameters(), self.generator_parameters())
        ]

        def factor(num_updates: int) -> float:  # LambdaLR multiplies the base lr (cfg.lr) by this
            return inverse_sqrt_lr(num_updates, cfg.lr, cfg.warmup_updates, cfg.warmup_init_lr) / cfg.lr

        for opt in optimisers:
            for group in opt.param_groups:
                group["initial_lr"] = cfg.lr
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimisers]
        return Optimization(optimisers, schedulers, interval="step")

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """The reconstructor step, then the generator step on a fresh forward pass (the official order)."""
        inputs = {k: batch[k] for k in ("frames_feat", "words_feat", "words_len", "words_id", "weights")}
        try:
            self._train_only(self.reconstructor_parameters())
            rec = reconstruction_loss(self(**inputs))
            ctx.optimizer_step(rec, 0)
            self._train_only(self.generator_parameters())
            ivc = ivc_loss(self(**inputs), self.cfg.beta_1, self.cfg.beta_2)
            ctx.optimizer_step(ivc, 1)
        finally:
            self._train_only(self.parameters())
        return {"loss": rec.detach() + ivc.detach(), "rec": rec.detach(), "ivc": ivc.detach()}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any]) -> list[dict]:
        out = self(batch["frames_feat"], batch["words_feat"], batch["words_len"])
        windows = proposal_windows(out["center"], out["width"]).cpu().tolist()
        return [
            {"qid": qid, "vid": vid, "pred_relevant_windows": [[s * duration, e * duration, 1.0]]}
            for qid, vid, duration, (s, e) in zip(batch["qid"], batch["vid"], batch["duration"], windows, strict=True)
        ]

    def metrics(self, predictions: list[dict], queries: list) -> dict[str, float]:
        return cnm_metrics(predictions, queries)

    def weights_provenance(self) -> dict[str, str]:
        # CNM trains from scratch: no pretrained weights, only an optional official checkpoint
        record = {"pos_tagger": pos_tagger_name()}  # the masking preferences depend on it
        if self.cfg.weights is not None:
            record["cnm_checkpoint"] = weights_record(self.cfg.weights, self.cfg.weights_sha256)
        return record


def proposal_frame_indices(num_frames: int) -> torch.Tensor:
    """The num_frames // 4 frames the reconstructor sees: linspace(0, N - 1, N // 4), truncated."""
    return torch.linspace(0, num_frames - 1, num_frames // PROPOSAL_STRIDE).long()


def proposal_windows(center: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """(B,) centre and width -> (B, 2) normalised [start, end], clipped to the video."""
    return torch.stack([(center - width / 2).clamp(min=0), (center + width / 2).clamp(max=1)], dim=-1)


def cnm_metrics(predictions: list[dict], queries: list) -> dict[str, float]:
    """CNM's evaluation: IoU of the top-1 window, R@1 at IoU 0.1/0.3/0.5/0.7/0.9 and mIoU (in %)."""
    by_qid = {p["qid"]: p for p in predictions}
    top1 = np.asarray([by_qid[q.qid]["pred_relevant_windows"][0][:2] for q in queries], dtype=np.float64)
    gt = np.asarray([q.moment for q in queries], dtype=np.float64)
    return evaluate_moments(top1[:, None], None, gt, ks=(1,), thresholds=MOMENT_THRESHOLDS["cnm"])


def load_official_checkpoint(model: CNM, path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint of the official code: {num_updates, config, model_parameters}.

    The state-dict keys are the official ones, so loading is strict; a shape mismatch (a different
    feature size or vocabulary) is an error naming the file and the keys.
    """
    weights_record(path, sha256)  # raises on a sha256 mismatch
    state = torch_load(str(path))
    if not isinstance(state, dict) or "model_parameters" not in state:
        raise WeightsError(f"{path}: not an official CNM checkpoint (expected a dict with 'model_parameters')")
    params = state["model_parameters"]
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(params)), sorted(set(params) - set(ours))
    wrong = [f"{k} {tuple(params[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
             if k in params and params[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: does not fit this CNM config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatches {wrong[:5]}")
    model.load_state_dict(params)
    return state
