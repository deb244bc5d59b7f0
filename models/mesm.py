"""MESM (Liu et al., AAAI'24): modal-enhanced semantic modeling on a DETR-style moment retriever.

A faithful re-implementation of lntzm/MESM (commit 8501bde), written from its description in
`../shared/reference/mesm_cnm.md` part A. In forward order:

    frozen text encoder (CLIP text tower / GloVe)
    -> input projections (video, words)            sine positions for frames, none for words
    -> FW-MESM enhance encoder (frames attend to words)
    -> SS-MESM segment-sentence reconstructor      (a "recon" token prepended to the words)
    -> text-to-video aligner (frames attend to [recon; words])
    -> DETR encoder (with a global token) + conditional/DAB decoder with anchor refinement
    -> heads: foreground class, span (cx, w), saliency; a second pass with another video's sentence

and, while training, the masked-word reconstruction pass (FW) whose logits feed `loss_rec_fw`.

Batching follows MESM: one dataset item is one video with all its queries; the model batch is the
total number of queries (`num_clips[g]` queries for video group g, in order).

The module is split into: building blocks, the network (`MESMNet`), the matcher and losses
(`MESMCriterion`), decoding, the text encoders, and the data side (features, tokens, collate).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from models import MODELS
from pipeline.trainer import DataContext, GroundingModel, Optimization, StepContext, TrainConfig

# -- span helpers ---------------------------------------------------------------------------------


def span_cxw_to_xx(spans: Tensor) -> Tensor:
    return torch.stack([spans[..., 0] - 0.5 * spans[..., 1], spans[..., 0] + 0.5 * spans[..., 1]], dim=-1)


def span_xx_to_cxw(spans: Tensor) -> Tensor:
    return torch.stack([spans.sum(-1) * 0.5, spans[..., 1] - spans[..., 0]], dim=-1)


def temporal_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of (N, 2) and (M, 2) [st, ed] spans."""
    inter = (torch.min(a[:, None, 1], b[:, 1]) - torch.max(a[:, None, 0], b[:, 0])).clamp(min=0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0]) - inter
    return inter / union, union


def generalized_temporal_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise gIoU (Rezatofighi et al.) of [st, ed] spans: IoU - (hull - union) / hull."""
    a, b = a.float(), b.float()
    iou, union = temporal_iou(a, b)
    hull = (torch.max(a[:, None, 1], b[:, 1]) - torch.min(a[:, None, 0], b[:, 0])).clamp(min=0)
    return iou - (hull - union) / hull


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def pad_groups(values: Tensor, lengths: list[int]) -> tuple[Tensor, Tensor]:
    """Split `values` (sum(lengths), ...) into consecutive chunks and zero-pad them: (n, max_len, ...), mask."""
    n, longest = len(lengths), max(lengths)
    out = values.new_zeros((n, longest) + tuple(values.shape[1:]))
    mask = torch.zeros(n, longest, dtype=torch.bool, device=values.device)
    for i, chunk in enumerate(torch.split(values, lengths)):
        out[i, : len(chunk)] = chunk
        mask[i, : len(chunk)] = True
    return out, mask


# -- building blocks ------------------------------------------------------------------------------


class MLP(nn.Module):
    """`num_layers` linears with ReLU between them (DETR's box head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [out_dim], strict=False))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class LinearLayer(nn.Module):
    """LayerNorm -> Dropout -> Linear -> optional ReLU (Moment-DETR's input projection unit)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, relu: bool):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(self.dropout(self.norm(x)))
        return F.relu(x) if self.relu else x


def input_projection(in_dim: int, hidden: int, n_layers: int, dropout: float) -> nn.Sequential:
    """`n_layers` LinearLayers; every one but the last ends in a ReLU."""
    dims = [in_dim] + [hidden] * n_layers
    return nn.Sequential(*(LinearLayer(dims[i], hidden, dropout, relu=i < n_layers - 1) for i in range(n_layers)))


def sine_positions(mask: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """1-D DETR sine encoding of frame positions: cumsum of the valid mask normalised to (0, 2pi].

    Returns (B, L, dim) with sin/cos interleaved (even channels sin, odd cos).
    """
    pos = mask.cumsum(1, dtype=torch.float32)
    pos = pos / (pos[:, -1:] + 1e-6) * 2 * math.pi
    i = torch.arange(dim, dtype=torch.float32, device=mask.device)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="trunc") / dim)
    x = pos[:, :, None] / freq
    return torch.stack((x[:, :, 0::2].sin(), x[:, :, 1::2].cos()), dim=3).flatten(2)


def anchor_sine_embedding(anchors: Tensor, dim: int) -> Tensor:
    """Sine embedding of (center, width) anchors (..., 2) -> (..., dim): dim/2 channels for each."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=anchors.device)
    freq = 10000 ** (2 * torch.div(i, 2, rounding_mode="trunc") / half)
    parts = []
    for k in range(2):
        x = anchors[..., k, None] * 2 * math.pi / freq
        parts.append(torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


class FeedForward(nn.Module):
    """Linear -> PReLU -> Dropout -> Linear (MESM uses one learnable PReLU per block)."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: nn.Module | None = None):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = activation if activation is not None else nn.PReLU()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class CrossAttentionLayer(nn.Module):
    """MESM's T2V layer: the query sequence attends to a key/value sequence, then a post-norm FFN.

    x = q + drop(attn(q + pos_q, kv + pos_kv, kv)); x = x + drop(FFN(LN1(x))); LN2(x).
    With `two_mlp` (TACoS, share_MLP=false) the masked-word pass uses its own FFN and norms.
    MESM also passes an attn_mask blocking (padded query x padded key) pairs; the key padding mask
    already blocks every padded key, so that mask changes nothing and is omitted here.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, two_mlp: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout2 = nn.Dropout(dropout)
        if two_mlp:
            # the second FFN shares the layer's PReLU, as in MESM
            self.mlm_ffn = FeedForward(d_model, dim_feedforward, dropout, activation=self.ffn.activation)
            self.mlm_norm1, self.mlm_norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.mlm_dropout2 = nn.Dropout(dropout)
        self.two_mlp = two_mlp

    def forward(self, query, query_pos, kv, kv_pos, kv_pad, is_mlm: bool = False) -> Tensor:
        q = query if query_pos is None else query + query_pos
        k = kv if kv_pos is None else kv + kv_pos
        x = query + self.dropout1(self.attn(q, k, kv, key_padding_mask=kv_pad, need_weights=False)[0])
        if is_mlm and self.two_mlp:
            x = x + self.mlm_dropout2(self.mlm_ffn(self.mlm_norm1(x)))
            return self.mlm_norm2(x)
        x = x + self.dropout2(self.ffn(self.norm1(x)))
        return self.norm2(x)


class CrossAttentionEncoder(nn.Module):
    def __init__(self, layer: CrossAttentionLayer, num_layers: int, xavier: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        if xavier:  # T2VEncoder re-initialises its matrices; the SS reconstructor keeps torch defaults
            for p in self.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, query, query_pos, kv, kv_pos, kv_pad, is_mlm: bool = False) -> Tensor:
        for layer in self.layers:
            query = layer(query, query_pos, kv, kv_pos, kv_pad, is_mlm)
        return query


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; positions are added to queries and keys."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, pad: Tensor) -> Tensor:
        qk = x + pos
        x = self.norm1(x + self.dropout1(self.attn(qk, qk, x, key_padding_mask=pad, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class ProjectionFreeAttention(nn.Module):
    """Multi-head attention without input projections (Conditional DETR): q/k/v arrive projected.

    q, k have `embed_dim` channels, v has `vdim`; the output goes through `out_proj` (vdim -> vdim).
    """

    def __init__(self, embed_dim: int, nhead: int, vdim: int, dropout: float):
        super().__init__()
        self.nhead, self.dropout = nhead, dropout
        self.scale = (embed_dim // nhead) ** -0.5
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_pad: Tensor | None = None) -> Tensor:
        b, lq, _ = q.shape
        heads = lambda t: t.reshape(b, t.shape[1], self.nhead, -1).transpose(1, 2)  # noqa: E731
        scores = (heads(q) * self.scale) @ heads(k).transpose(-1, -2)
        if key_pad is not None:
            scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (weights @ heads(v)).transpose(1, 2).reshape(b, lq, -1)
        return self.out_proj(out)


class DecoderLayer(nn.Module):
    """Conditional-DETR decoder layer with separate content/position projections.

    Cross-attention concatenates per head [content, sine(anchor)] for queries and [content, pos]
    for keys, so q/k have 2*d channels. The query position is added only in the first layer.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, first: bool):
        super().__init__()
        lin = lambda: nn.Linear(d_model, d_model)  # noqa: E731
        self.sa_qcontent_proj, self.sa_qpos_proj = lin(), lin()
        self.sa_kcontent_proj, self.sa_kpos_proj, self.sa_v_proj = lin(), lin(), lin()
        self.self_attn = ProjectionFreeAttention(d_model, nhead, d_model, dropout)
        self.norm1, self.dropout1 = nn.LayerNorm(d_model), nn.Dropout(dropout)
        self.ca_qcontent_proj, self.ca_kcontent_proj = lin(), lin()
        self.ca_qpos_proj = lin() if first else None  # keep_query_pos=False: only layer 0 owns it
        self.ca_kpos_proj, self.ca_v_proj, self.ca_qpos_sine_proj = lin(), lin(), lin()
        self.cross_attn = ProjectionFreeAttention(2 * d_model, nhead, d_model, dropout)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout)
        self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.nhead = nhead

    def forward(self, tgt, memory, memory_pad, pos, query_pos, query_sine) -> Tensor:
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt))))

        q, k, k_pos = self.ca_qcontent_proj(tgt), self.ca_kcontent_proj(memory), self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q, k = q + self.ca_qpos_proj(query_pos), k + k_pos
        b, nq, d = q.shape
        per_head = lambda t: t.reshape(t.shape[0], t.shape[1], self.nhead, -1)  # noqa: E731
        q = torch.cat([per_head(q), per_head(self.ca_qpos_sine_proj(query_sine))], dim=3).reshape(b, nq, 2 * d)
        k = torch.cat([per_head(k), per_head(k_pos)], dim=3).reshape(b, k.shape[1], 2 * d)
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(q, k, self.ca_v_proj(memory), memory_pad)))
        return self.norm3(tgt + self.dropout3(self.ffn(tgt)))


class AnchorDecoder(nn.Module):
    """DAB-style decoder: (center, width) anchors refined layer by layer by its own span MLP."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, first=i == 0) for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, d_model, 2)
        self.bbox_embed = MLP(d_model, d_model, 2, 3)  # not tied to the model's span head
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0)
        self.ref_anchor_head = MLP(d_model, d_model, 1, 2)
        self.d_model = d_model

    def forward(self, memory, memory_pad, pos, anchors_unsigmoid) -> tuple[Tensor, Tensor]:
        """Returns the normed output of every layer (layers, B, Q, d) and its input anchors (layers, B, Q, 2)."""
        ref = anchors_unsigmoid.sigmoid()
        output = memory.new_zeros(ref.shape[0], ref.shape[1], self.d_model)
        hs, refs = [], []
        for i, layer in enumerate(self.layers):
            refs.append(ref)
            sine = anchor_sine_embedding(ref, self.d_model)
            query_pos = self.ref_point_head(sine)
            if i > 0:
                sine = sine * self.query_scale(output)
            # width-modulated attention: scale by a predicted width over the anchor width
            sine = sine * (self.ref_anchor_head(output).sigmoid()[..., 0] / ref[..., 1]).unsqueeze(-1)
            output = layer(output, memory, memory_pad, pos, query_pos, sine)
            ref = (self.bbox_embed(output) + inverse_sigmoid(ref)).sigmoid().detach()
            hs.append(self.norm(output))
        return torch.stack(hs), torch.stack(refs)


class DetrTransformer(nn.Module):
    """Encoder over [global token; frames] and the anchor decoder over the frame memory."""

    def __init__(self, d_model, nhead, enc_layers, dec_layers, dim_feedforward, dropout):
        super().__init__()
        layer = EncoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.encoder = nn.ModuleList(copy.deepcopy(layer) for _ in range(enc_layers))
        self.decoder = AnchorDecoder(d_model, nhead, dim_feedforward, dropout, dec_layers)
        for p in self.parameters():  # as MESM: this also overrides the zero init of bbox_embed's weight
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, pad, pos, anchors, global_token, global_pos):
        # The global token is concatenated with the *padding* value (MESM quirk): frames cannot
        # attend to it, but it attends to the frames.
        pad = torch.cat([torch.ones_like(pad[:, :1]), pad], dim=1)
        x = torch.cat([global_token, src], dim=1)
        pos = torch.cat([global_pos, pos], dim=1)
        for layer in self.encoder:
            x = layer(x, pos, pad)
        memory_global, memory = x[:, 0], x[:, 1:]
        anchors = anchors.unsqueeze(0).expand(src.shape[0], -1, -1)
        hs, refs = self.decoder(memory, pad[:, 1:], pos[:, 1:], anchors)
        return hs, refs, memory, memory_global


class SegmentSentenceReconstructor(nn.Module):
    """SS-MESM: reconstruct each query's sentence from the video and the other sentences of its video.

    Query i of a group sees the group's sentences with its own slot replaced by a learnable token;
    the sentences attend to the video (no positions) and the output at that slot, L2-normalised,
    is the "recon" feature.
    """

    def __init__(self, hidden: int, nhead: int, dim_feedforward: int, dropout: float, input_dropout: float, num_layers: int):
        super().__init__()
        self.masked_sent_token = nn.Parameter(torch.zeros(hidden))
        layer = CrossAttentionLayer(hidden, nhead, dim_feedforward, dropout)
        self.recon = CrossAttentionEncoder(layer, num_layers, xavier=False)
        # MESM computes this projection and does not use it in the final loss ("ablation"); it is
        # kept so that the parameter set is the official one.
        self.output_sent_proj = nn.Sequential(
            LinearLayer(hidden, hidden, input_dropout, relu=True), LinearLayer(hidden, hidden, input_dropout, relu=False)
        )

    def forward(self, video, video_mask, sentences, sentences_mask, num_clips: list[int]) -> Tensor:
        slot = torch.zeros_like(sentences_mask)
        row = 0
        for n in num_clips:
            slot[row + torch.arange(n), torch.arange(n)] = True
            row += n
        sentences = torch.where(slot.unsqueeze(-1), self.masked_sent_token.expand_as(sentences), sentences)
        out = self.recon(sentences, None, video, None, ~video_mask)
        return F.normalize(out[slot], dim=-1)


# -- the network ----------------------------------------------------------------------------------


class MESMNet(nn.Module):
    """The MESM network on already-encoded text.

    `text_encoder` maps token ids (B, Lw) to features (B, Lw, txt_dim) and is frozen; it is an
    attribute of the model (as in MESM, so the parameter count includes it) but stays in eval mode.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        vid_dim: int,
        txt_dim: int,
        num_word_classes: int,
        hidden_dim: int = 256,
        nheads: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        input_dropout: float = 0.5,
        n_input_proj: int = 2,
        enc_layers: int = 2,
        dec_layers: int = 2,
        t2v_layers: int = 2,
        num_recfw_layers: int = 2,
        num_recss_layers: int = 4,
        num_queries: int = 10,
        max_words_l: int = 16,
        share_mlp: bool = True,
        use_txt_pos: bool = False,
        normalize_txt: bool = True,
        rec_fw: bool = True,
        rec_ss: bool = True,
        ss_video: Literal["query", "group_concat"] = "query",
        sentence_from_normalized_words: bool = False,
    ):
        super().__init__()
        self.text_encoder = text_encoder
        for p in self.text_encoder.parameters():
            p.requires_grad_(False)
        d = hidden_dim
        self.hidden_dim, self.normalize_txt, self.use_txt_pos = d, normalize_txt, use_txt_pos
        self.rec_fw, self.rec_ss, self.ss_video = rec_fw, rec_ss, ss_video
        # the sentence feature is the mean of the raw word features (CLIP, GloVe txt) or of the
        # L2-normalised ones (glove.pkl: MESM's post_process_text), then normalised
        self.sentence_from_normalized_words = sentence_from_normalized_words

        self.input_vid_proj = input_projection(vid_dim, d, n_input_proj, input_dropout)
        self.input_txt_proj = input_projection(txt_dim, d, n_input_proj, input_dropout)
        # MESM always builds the trainable text position table (max_words_l + 1 with the recon token),
        # even with use_txt_pos=false where it is never called.
        self.txt_pos_embed = nn.Embedding(max_words_l + 1 if rec_ss else max_words_l, d)
        self.txt_pos_norm = nn.LayerNorm(d)
        self.txt_pos_dropout = nn.Dropout(input_dropout)

        self.enhance_encoder = CrossAttentionEncoder(
            CrossAttentionLayer(d, nheads, dim_feedforward, dropout, two_mlp=not share_mlp), num_recfw_layers
        )
        self.t2v_encoder = CrossAttentionEncoder(CrossAttentionLayer(d, nheads, dim_feedforward, dropout), t2v_layers)
        self.transformer = DetrTransformer(d, nheads, enc_layers, dec_layers, dim_feedforward, dropout)
        self.global_rep_token = nn.Parameter(torch.randn(d))
        self.global_rep_pos = nn.Parameter(torch.randn(d))
        self.query_embed = nn.Embedding(num_queries, 2)  # un-sigmoided (center, width) anchors

        self.class_embed = nn.Linear(d, 2)  # index 0 = foreground, 1 = background
        self.span_embed = MLP(d, d, 2, 3)
        self.saliency_proj1 = nn.Linear(d, d)
        self.saliency_proj2 = nn.Linear(d, d)

        if rec_fw:
            self.masked_token = nn.Parameter(torch.zeros(txt_dim))
            self.unknown_token = nn.Parameter(torch.zeros(txt_dim))
            self.output_txt_proj = nn.Sequential(
                LinearLayer(d, d, input_dropout, relu=True), nn.Linear(d, num_word_classes)
            )
        if rec_ss:
            self.ss_reconstructor = SegmentSentenceReconstructor(
                d, nheads, dim_feedforward, dropout, input_dropout, num_recss_layers
            )

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()  # frozen: no dropout, no statistics
        return self

    # -- text ----------------------------------------------------------------------------------

    def encode_text(self, words_id: Tensor, words_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Frozen word features (B, Lw, Dt), zero on padding, and the sentence feature (B, Dt)."""
        with torch.no_grad():
            words = self.text_encoder(words_id).float()
        words = words.masked_fill(~words_mask.unsqueeze(-1), 0)
        if self.normalize_txt and self.sentence_from_normalized_words:
            words = F.normalize(words, dim=-1, eps=1e-5)  # MESM's glove.pkl path normalises first
        sentence = words.sum(1) / words_mask.sum(1, keepdim=True)
        if self.normalize_txt:
            words, sentence = F.normalize(words, dim=-1, eps=1e-5), F.normalize(sentence, dim=-1, eps=1e-5)
        return words, sentence

    def txt_positions(self, words: Tensor) -> Tensor:
        if not self.use_txt_pos:
            return torch.zeros_like(words)
        ids = torch.arange(words.shape[1], device=words.device)
        return self.txt_pos_dropout(self.txt_pos_norm(words + self.txt_pos_embed(ids)))

    # -- passes --------------------------------------------------------------------------------

    def _align_and_detect(self, video, video_mask, vid_pos, words, words_mask, expanded, expanded_mask):
        """enhance (frames<-words) -> t2v (frames<-[recon; words]) -> DETR; returns its outputs."""
        if self.rec_fw:
            video = self.enhance_encoder(video, vid_pos, words, self.txt_positions(words), ~words_mask)
        encoded = self.t2v_encoder(video, vid_pos, expanded, self.txt_positions(expanded), ~expanded_mask)
        b = video.shape[0]
        token = self.global_rep_token.expand(b, 1, -1)
        token_pos = self.global_rep_pos.expand(b, 1, -1)
        hs, refs, memory, memory_global = self.transformer(
            encoded, ~video_mask, vid_pos, self.query_embed.weight, token, token_pos
        )
        saliency = (self.saliency_proj1(memory) * self.saliency_proj2(memory_global).unsqueeze(1)).sum(-1)
        return hs, refs, saliency / math.sqrt(self.hidden_dim), video

    def _ss_inputs(self, video_feat, video_mask, sentence, num_clips):
        """The reconstructor's video (B, Lv', Dv) and per-query group sentences (B, n_max, Dt)."""
        rows = [torch.arange(n) for n in num_clips]
        starts = np.cumsum([0] + num_clips[:-1]).tolist()
        sent = [sentence[s : s + n] for s, n in zip(starts, num_clips, strict=False)]
        sentences, sentences_mask = pad_groups(torch.cat([g for g, n in zip(sent, num_clips, strict=False) for _ in range(n)]),
                                               [n for n in num_clips for _ in range(n)])
        if self.ss_video == "query":  # Charades, CG, CD, TACoS: the query's own (raw) video
            return video_feat, video_mask, sentences, sentences_mask
        # QVHighlights: all clips of one YouTube video, concatenated, for every query of the group
        videos = [torch.cat([video_feat[s + i][video_mask[s + i]] for i in r]) for s, r in zip(starts, rows, strict=False)]
        lengths = [len(v) for v, n in zip(videos, num_clips, strict=False) for _ in range(n)]
        video, mask = pad_groups(torch.cat([v for v, n in zip(videos, num_clips, strict=False) for _ in range(n)]), lengths)
        return video, mask, sentences, sentences_mask

    def forward(self, batch: dict, negatives: bool = True) -> dict:
        """`batch`: num_clips (list[int]), video_feat (B, Lv, Dv), video_mask, words_id, words_mask,
        and for training with FW: words_weight, unknown_mask, clip_mask.

        `negatives=False` skips the negative-sentence pass (it only feeds the saliency loss).
        """
        num_clips = [int(n) for n in batch["num_clips"]]
        video_feat, video_mask = batch["video_feat"], batch["video_mask"]
        words_feat, sentence = self.encode_text(batch["words_id"], batch["words_mask"])
        words_mask = batch["words_mask"]

        projed_video = self.input_vid_proj(video_feat)
        projed_words = self.input_txt_proj(words_feat)
        vid_pos = sine_positions(video_mask, self.hidden_dim)

        if self.rec_ss:
            ss_video, ss_video_mask, sentences, sentences_mask = self._ss_inputs(video_feat, video_mask, sentence, num_clips)
            recon = self.ss_reconstructor(
                self.input_vid_proj(ss_video), ss_video_mask, self.input_txt_proj(sentences), sentences_mask, num_clips
            )
            expanded = torch.cat([recon.unsqueeze(1), projed_words], dim=1)
            expanded_mask = torch.cat([torch.ones_like(words_mask[:, :1]), words_mask], dim=1)
        else:
            expanded, expanded_mask = projed_words, words_mask

        hs, refs, saliency, enhanced = self._align_and_detect(
            projed_video, video_mask, vid_pos, projed_words, words_mask, expanded, expanded_mask
        )
        logits = self.class_embed(hs)
        spans = (self.span_embed(hs) + inverse_sigmoid(refs)).sigmoid()
        out = {
            "pred_logits": logits[-1],
            "pred_spans": spans[-1],
            "aux_outputs": [{"pred_logits": c, "pred_spans": s} for c, s in zip(logits[:-1], spans[:-1], strict=False)],
            "saliency_scores": saliency,
            "projed_video_feat": projed_video,
            "expanded_words_feat": expanded,
            "expanded_words_mask": expanded_mask,
        }

        if negatives and len(num_clips) > 1:
            # Negative pass (QD-DETR): every query gets a sentence of another video in the batch.
            neg = sample_outclass_negatives(num_clips, device=video_feat.device)
            neg_expanded, neg_expanded_mask = expanded[neg], expanded_mask[neg]
            skip = 1 if self.rec_ss else 0  # the enhance encoder sees the words without the recon token
            _, _, neg_saliency, _ = self._align_and_detect(
                projed_video, video_mask, vid_pos, neg_expanded[:, skip:], neg_expanded_mask[:, skip:],
                neg_expanded, neg_expanded_mask,
            )
            out["neg_saliency_scores"] = neg_saliency
            out["neg_index"] = neg
        # With a single video in the batch there is no foreign sentence; MESM would crash here, we
        # drop the negative terms of the saliency loss for that batch instead.

        if self.rec_fw and self.training and "words_label" in batch:
            out["recfw_words_logit"] = self._masked_word_logits(
                projed_words, words_mask, projed_video, vid_pos, batch["clip_mask"],
                batch["unknown_mask"], batch["words_weight"],
            )
            out["words_mask"] = words_mask
        return out

    def _masked_word_logits(self, projed_words, words_mask, projed_video, vid_pos, clip_mask, unknown_mask, weight):
        """FW-MESM: masked words (queries) attend to the GT frames (keys) through the enhance encoder."""
        unknown = self.input_txt_proj(self.unknown_token.view(1, 1, -1))
        words = torch.where(unknown_mask.unsqueeze(-1), unknown, projed_words)
        masked = mask_words(words_mask, weight)
        words = torch.where(masked.unsqueeze(-1), self.input_txt_proj(self.masked_token.view(1, 1, -1)), words)
        lengths = clip_mask.sum(1).tolist()
        frames, frames_mask = pad_groups(projed_video[clip_mask], lengths)
        frames_pos, _ = pad_groups(vid_pos[clip_mask], lengths)
        out = self.enhance_encoder(words, self.txt_positions(words), frames, frames_pos, ~frames_mask, is_mlm=True)
        return self.output_txt_proj(out)


def mask_words(words_mask: Tensor, weight: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
    """Pick max(l // 3, 1) of the l valid words of each sentence (l > 1), without replacement, with
    probability proportional to `weight` (POS weights: 2 for nouns/verbs/adjectives/adverbs, else 1)."""
    masked = torch.zeros_like(words_mask)
    lengths = words_mask.sum(1).tolist()
    for i, length in enumerate(lengths):
        if length <= 1:
            continue
        p = weight[i, :length].float().cpu() if weight is not None else torch.ones(length)
        if p.sum() <= 0:
            p = torch.ones(length)
        picks = torch.multinomial(p / p.sum(), max(length // 3, 1), replacement=False, generator=generator)
        masked[i, picks.to(masked.device)] = True
    return masked


def sample_outclass_negatives(num_clips: list[int], device=None, generator: torch.Generator | None = None) -> Tensor:
    """For every query, the index of a random query of a *different* video group in the batch."""
    total, picks, start = sum(num_clips), [], 0
    for n in num_clips:
        others = torch.cat([torch.arange(0, start), torch.arange(start + n, total)])
        for _ in range(n):
            picks.append(others[torch.randint(len(others), (1,), generator=generator)])
        start += n
    return torch.cat(picks).to(device)


# -- matching and losses --------------------------------------------------------------------------


@torch.no_grad()
def match_cost(pred_logits, pred_spans, tgt_spans, tgt_moments, cost_span, cost_giou, cost_class) -> Tensor:
    """DETR cost of every (query prediction, target span): (B*Q, T), lower is better.

    cost = cost_span * L1(cx, w) - cost_giou * gIoU(st, ed) - cost_class * p(foreground).
    """
    prob = pred_logits.flatten(0, 1).softmax(-1)[:, :1]
    spans = pred_spans.flatten(0, 1)
    giou = generalized_temporal_iou(span_cxw_to_xx(spans), tgt_moments)
    return cost_span * torch.cdist(spans, tgt_spans, p=1) - cost_giou * giou - cost_class * prob


@torch.no_grad()
def match_top1(outputs: dict, norm_span: Tensor, norm_moment: Tensor, costs: tuple[float, float, float]) -> Tensor:
    """Single GT per query (every dataset but QVHighlights): the prediction with the lowest cost
    against the query's own GT. Returns (B,) query indices."""
    b, q = outputs["pred_spans"].shape[:2]
    cost = match_cost(outputs["pred_logits"], outputs["pred_spans"], norm_span, norm_moment, *costs)
    own = cost.view(b, q, b)[torch.arange(b), :, torch.arange(b)]  # (B, Q): query row vs its own GT
    return own.argmin(dim=1)


@torch.no_grad()
def match_hungarian(outputs: dict, spans: list[Tensor], moments: list[Tensor], costs) -> list[tuple[Tensor, Tensor]]:
    """Several GT windows per query (QVHighlights): per-query optimal assignment (scipy)."""
    b, q = outputs["pred_spans"].shape[:2]
    cost = match_cost(outputs["pred_logits"], outputs["pred_spans"], torch.cat(spans), torch.cat(moments), *costs)
    cost = cost.view(b, q, -1).cpu()
    out = []
    for i, c in enumerate(cost.split([len(s) for s in spans], -1)):
        rows, cols = linear_sum_assignment(c[i])
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def label_smoothed_nll(logits: Tensor, labels: Tensor, mask: Tensor, eps: float = 0.1) -> Tensor:
    """(1 - eps) * NLL + eps / K * sum_k(-log p_k), averaged over the valid tokens of each sentence,
    then over sentences. Every valid token counts, not only the masked ones (as MESM)."""
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = (1 - eps) * nll + eps / logp.shape[-1] * (-logp.sum(-1))
    loss = loss.masked_fill(~mask, 0).sum(-1) / mask.sum(-1)
    return loss.mean()


def saliency_loss(
    scores: Tensor,
    neg_scores: Tensor | None,
    video_mask: Tensor,
    labels: Tensor,
    rank_coef: float,
    tau: float = 0.5,
    triplet: tuple[Tensor, Tensor, float] | None = None,
) -> Tensor:
    """MESM's saliency loss: negative-pair + rank-contrastive (+ triplet).

    - neg pair: per query sum over valid frames of -log(1 - sigmoid(neg score)), mean over queries;
    - rank contrastive over [positive pass; negative pass] (negative half labelled 0): for each
      threshold r = 1..11 with any positive in the batch, -mean log-softmax (temperature tau) over
      the slots with label >= r, rows without positives zeroed, mean over queries; the sum over r is
      divided by rank_coef;
    - triplet (pos_idx, neg_idx, margin): sum of hinge(margin + s_neg - s_pos) / (N * pairs) * 2.
    Without a negative pass (a batch of one video) the negative terms are left out.
    """
    mask = video_mask.float()
    labels = labels.float()
    loss = scores.new_zeros(())
    if neg_scores is not None:
        # -log(1 - sigmoid(x)) == -logsigmoid(-x), written stably (fp16 under AMP)
        loss = loss + (-F.logsigmoid(-neg_scores.float()) * mask).sum(1).mean()
        all_scores = torch.cat([scores, neg_scores], dim=1)
        labels = torch.cat([labels, torch.zeros_like(labels)], dim=1)
        mask = mask.repeat(1, 2)
    else:
        all_scores = scores
    all_scores = mask * all_scores + (1.0 - mask) * -1e3
    rank = scores.new_zeros(())
    for r in range(1, 12):
        pos = labels >= r
        if not pos.any():
            continue
        logits = all_scores / tau
        logits = logits - logits.max(dim=1, keepdim=True)[0]
        log_prob = logits - torch.log(logits.exp().sum(1, keepdim=True) + 1e-6)
        mean_pos = (pos * log_prob * mask).sum(1) / (pos.sum(1) + 1e-6)
        rank = rank + (-mean_pos * (pos.sum(1) > 0)).mean()
    loss = loss + rank / rank_coef
    if triplet is not None:
        pos_idx, neg_idx, margin = triplet
        rows = torch.arange(len(scores), device=scores.device)[:, None]
        hinge = (margin + scores[rows, neg_idx] - scores[rows, pos_idx]).clamp(min=0)
        loss = loss + hinge.sum() / (len(scores) * pos_idx.shape[1]) * 2
    return loss


def segment_sentence_loss(
    clip_feat: Tensor, words_feat: Tensor, moments: Tensor, num_clips: list[int], gamma: float, tau: float
) -> Tensor:
    """SS-MESM supervised contrastive loss between GT-segment features and sentence features.

    Positives: pairs of queries of the same video whose moments have gIoU >= gamma (self included);
    every other query in the batch is a negative. Loss = -mean over positives of the row log-softmax
    of cos / tau, averaged over queries.
    """
    blocks = [generalized_temporal_iou(m, m) for m in torch.split(moments, num_clips)]
    positive = torch.block_diag(*blocks) >= gamma
    sim = F.normalize(clip_feat, dim=-1) @ F.normalize(words_feat, dim=-1).T / tau
    sim = sim - sim.max(dim=1, keepdim=True)[0]
    log_prob = sim - torch.log(sim.exp().sum(1, keepdim=True) + 1e-6)
    return (-(positive * log_prob).sum(1) / (positive.sum(1) + 1e-6)).mean()


class MESMCriterion(nn.Module):
    """All MESM losses with their weights. `targets` keys (model batch of B queries):

    norm_span (B, 2) cxw and norm_moment (B, 2) xx in [0, 1] (or, multi-window, lists of (n_i, 2)),
    video_mask, clip_mask (B, Lv) bool, saliency_label (B, Lv) optional (QVH 0..12 scores),
    pos_idx / neg_idx (B, pairs) for the triplet term, words_label (B, Lw) for FW, num_clips.
    """

    def __init__(
        self,
        cost_span: float = 10,
        cost_giou: float = 1,
        cost_class: float = 4,
        loss_span: float = 10,
        loss_giou: float = 1,
        loss_label: float = 4,
        loss_saliency: float = 4,
        loss_rec_fw: float = 0.1,
        loss_rec_ss: float = 0.1,
        eos_coef: float = 0.1,
        rank_coef: float = 12,
        use_triplet: bool = False,
        saliency_margin: float = 0.2,
        iou_gamma: float = 0.9,
        recss_tau: float = 0.5,
        multi_window: bool = False,
        rec_fw: bool = True,
        rec_ss: bool = True,
    ):
        super().__init__()
        self.costs = (cost_span, cost_giou, cost_class)
        self.weights = {"loss_span": loss_span, "loss_giou": loss_giou, "loss_label": loss_label,
                        "loss_saliency": loss_saliency}
        if rec_fw:
            self.weights["loss_rec_fw"] = loss_rec_fw
        if rec_ss:
            self.weights["loss_rec_ss"] = loss_rec_ss
        self.rank_coef, self.use_triplet, self.margin = rank_coef, use_triplet, saliency_margin
        self.iou_gamma, self.recss_tau, self.multi_window = iou_gamma, recss_tau, multi_window
        self.register_buffer("class_weight", torch.tensor([1.0, eos_coef]))

    def weight_of(self, key: str) -> float:
        """Weight of a loss; auxiliary-layer keys ("loss_span_0") share their base loss's weight."""
        base, _, layer = key.rpartition("_")
        return self.weights[base] if layer.isdigit() else self.weights[key]

    def match(self, outputs: dict, targets: dict):
        if self.multi_window:
            return match_hungarian(outputs, targets["norm_span"], targets["norm_moment"], self.costs)
        return match_top1(outputs, targets["norm_span"], targets["norm_moment"], self.costs)

    def _matched(self, outputs, targets, indices):
        """(query rows, prediction indices), matched predicted spans and their target spans/moments."""
        if self.multi_window:
            rows = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
            cols = torch.cat([src for src, _ in indices])
            tgt = torch.cat([t[j] for t, (_, j) in zip(targets["norm_span"], indices, strict=False)])
            return rows, cols, tgt, span_cxw_to_xx(tgt)
        rows = torch.arange(len(indices), device=indices.device)
        return rows, indices, targets["norm_span"], targets["norm_moment"]

    def span_label_losses(self, outputs: dict, targets: dict) -> dict:
        indices = self.match(outputs, targets)
        rows, cols, tgt_spans, tgt_moments = self._matched(outputs, targets, indices)
        src = outputs["pred_spans"][rows, cols]
        giou = torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), tgt_moments))
        logits = outputs["pred_logits"]
        classes = torch.ones(logits.shape[:2], dtype=torch.long, device=logits.device)  # background
        classes[rows, cols] = 0
        label = F.cross_entropy(logits.transpose(1, 2), classes, self.class_weight.to(logits.device), reduction="none")
        return {
            "loss_span": F.l1_loss(src, tgt_spans, reduction="none").mean(),
            "loss_giou": (1 - giou).mean(),
            "loss_label": label.mean(),  # a plain mean of the class-weighted terms, as MESM
        }

    def forward(self, outputs: dict, targets: dict) -> tuple[dict, Tensor]:
        losses = self.span_label_losses(outputs, targets)
        labels = targets.get("saliency_label")
        if labels is None:
            labels = targets["clip_mask"].float()
        triplet = (targets["pos_idx"], targets["neg_idx"], self.margin) if self.use_triplet else None
        losses["loss_saliency"] = saliency_loss(
            outputs["saliency_scores"], outputs.get("neg_saliency_scores"), targets["video_mask"], labels,
            self.rank_coef, triplet=triplet,
        )
        if "loss_rec_fw" in self.weights and "recfw_words_logit" in outputs:
            losses["loss_rec_fw"] = label_smoothed_nll(
                outputs["recfw_words_logit"], targets["words_label"], outputs["words_mask"]
            )
        if "loss_rec_ss" in self.weights:
            clip_mask = targets["clip_mask"].unsqueeze(-1).float()
            clip_feat = (outputs["projed_video_feat"] * clip_mask).sum(1) / clip_mask.sum(1)
            words_mask = outputs["expanded_words_mask"].unsqueeze(-1).float()
            words_feat = (outputs["expanded_words_feat"] * words_mask).sum(1) / words_mask.sum(1)
            moments = targets["norm_moment"]
            if self.multi_window:  # a query's moment is [min, max] over its windows
                moments = torch.stack([torch.stack([m.min(), m.max()]) for m in moments])
            losses["loss_rec_ss"] = segment_sentence_loss(
                clip_feat, words_feat, moments, [int(n) for n in targets["num_clips"]], self.iou_gamma, self.recss_tau
            )
        # auxiliary decoder layers: span, gIoU and label losses with the same weights
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.span_label_losses(aux, targets).items()})
        total = sum(v * self.weight_of(k) for k, v in losses.items())
        return losses, total


# -- decoding -------------------------------------------------------------------------------------


@torch.no_grad()
def decode_predictions(outputs: dict, duration: Tensor, video_mask: Tensor, clip_len: float, max_ts_val: float) -> list[dict]:
    """MESM decoding: all queries' windows (no NMS) sorted by foreground probability.

    Windows are cxw -> [st, ed] times the duration, rounded to 4 decimals, clamped to
    [0, max_ts_val] and, unless clip_len == -1, rounded to a multiple of clip_len. Per-frame saliency
    scores are truncated to the valid length.
    """
    scores = outputs["pred_logits"].softmax(-1)[..., 0]
    windows = span_cxw_to_xx(outputs["pred_spans"]) * duration[:, None, None]
    saliency = outputs["saliency_scores"]
    lengths = video_mask.sum(1).tolist()
    results = []
    for i in range(len(scores)):
        order = scores[i].argsort(descending=True)
        win = torch.round(windows[i, order] * 1e4) / 1e4
        win = win.clamp(0, max_ts_val)
        if clip_len != -1:
            win = torch.round(win / clip_len) * clip_len
        results.append({
            "windows": win.tolist(),
            "scores": [round(float(s), 4) for s in scores[i, order]],
            "saliency": saliency[i, : int(lengths[i])].tolist(),
        })
    return results


# -- text encoders (frozen) -----------------------------------------------------------------------

CLIP_SOT, CLIP_EOT, CLIP_CONTEXT = 49406, 49407, 77


def build_clip_text_tower() -> nn.Module:
    """CLIP ViT-B/32's text transformer (width 512, 12 layers, 8 heads, context 77, 49408 tokens) via
    open_clip, with QuickGELU as OpenAI's weights need. Its state dict uses OpenAI's key names."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = CLIPTextCfg(context_length=CLIP_CONTEXT, vocab_size=49408, width=512, heads=8, layers=12)
    return _build_text_tower(512, cfg, quick_gelu=True)


def load_clip_text_checkpoint(tower: nn.Module, path: str, expected_sha256: str | None = None) -> str:
    """Load MESM's `clip_text_encoder.pth`: OpenAI CLIP's state dict without `visual.*` (a plain dict of
    tensors; `input_resolution`, `context_length`, `vocab_size` are dropped if present), strictly.

    Returns the file's sha256 (checked against `expected_sha256` when given).
    """
    from pipeline.provenance import weights_record

    digest = weights_record(path, expected_sha256)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    foreign = sorted(k for k in state if k.startswith("visual.") or k == "logit_scale")
    if foreign:
        raise ValueError(f"{path}: not a CLIP text-encoder state dict (MESM loads it strictly); "
                         f"unexpected keys {foreign[:3]}... (drop the visual part and logit_scale)")
    missing, unexpected = tower.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match CLIP ViT-B/32's text tower: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return digest


class ClipTextEncoder(nn.Module):
    """Token features of CLIP's text tower before the projection (ln_final output), first
    `max_words_l` positions. The attention is causal, so running the tower on those positions only
    gives exactly the first `max_words_l` outputs of the full 77-token pass, at a fraction of the cost.
    fp16 on CUDA (as MESM's convert_weights), fp32 on CPU."""

    def __init__(self, max_words_l: int):
        super().__init__()
        self.tower = build_clip_text_tower()
        self.max_words_l = max_words_l

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids[:, : self.max_words_l]
        t = self.tower
        with torch.autocast("cuda", dtype=torch.float16, enabled=ids.is_cuda):
            x = t.token_embedding(ids) + t.positional_embedding[: ids.shape[1]]
            x = t.transformer(x, attn_mask=t.attn_mask[: ids.shape[1], : ids.shape[1]])
            return t.ln_final(x).float()


class GloveTableEncoder(nn.Module):
    """A frozen lookup table of GloVe vectors, row 0 = padding (zeros).

    `trainable_shape=True` keeps it an nn.Embedding whose weights count as (frozen) parameters, as
    MESM's GloVe-txt encoder; otherwise a buffer, as MESM's glove.pkl path (the dataset hands the
    vectors over and the model has no text-encoder parameters)."""

    def __init__(self, vectors: Tensor, as_parameter: bool):
        super().__init__()
        if as_parameter:
            self.emb = nn.Embedding.from_pretrained(vectors, freeze=True, padding_idx=None)
        else:
            self.register_buffer("table", vectors)

    def forward(self, ids: Tensor) -> Tensor:
        return self.emb(ids) if hasattr(self, "emb") else F.embedding(ids, self.table)


def read_tokenized_count(path: str, column: int, limit: int, cast: Callable = int) -> list:
    """The first `limit` entries of a *_tokenized_count.txt (sorted by count) in one column:
    CLIP: `<token_id> <count>`; GloVe: `<word> <vocab_id> <count>`."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(out) == limit:
                break
            parts = line.split()
            if len(parts) <= column:
                raise ValueError(f"{path}:{lineno}: expected at least {column + 1} columns, got {line!r}")
            out.append(cast(parts[column]))
    return out


# -- tokenization and POS weights -----------------------------------------------------------------

class Tokens(NamedTuple):
    ids: list[int]  # CLIP token ids / GloVe vocabulary ids (0 = padding)
    weights: list[int]  # POS weights (0 for CLIP's SOT/EOT)
    labels: list[int]  # masked-word class per token
    unknown: list[bool]  # token outside the kept vocabulary of `vocab_size` words


class MesmTokenizer:
    """Sentence -> Tokens, in one of MESM's three text setups.

    clip       open_clip's BPE (the same cleaning and merges as MESM's tokenizer), cut to max_words_l - 2
               pieces, [SOT] + pieces + [EOT]; labels from the first V lines of CLIP_tokenized_count.txt,
               then <unknown>=V, <start>=V+1, <end>=V+2 (V+3 classes).
    glove_pkl  nltk word tokens, lower-cased, words missing from glove.pkl's w2id dropped; labels from
               counter.most_common(V), <unknown>=V (V+1 classes).
    glove_txt  nltk word tokens, lower-cased; ids of the Vocabulary of GloVe_tokenized_count.txt words
               (<PAD>=0, <UNK>=1, then sorted words); labels from its first V lines, <unknown>=V.
    """

    def __init__(self, kind: str, vocab_dir: str, vocab_size: int, max_words_l: int, glove_pkl: dict | None = None):
        from pipeline import vocab

        self.kind, self.vocab_size, self.max_words_l = kind, vocab_size, max_words_l
        # MESM's POS weights (2 for NN/VB/JJ/RB tags, else 1); pipeline.vocab falls back to a
        # closed-class word list when nltk's tagger data is absent and names the rule it used.
        self.pos_weights, self.pos_tagger = vocab.pos_weights, vocab.pos_tagger_name()
        if kind == "clip":
            self.bpe = vocab.clip_tokenizer()
            kept = read_tokenized_count(f"{vocab_dir}/CLIP_tokenized_count.txt", 0, vocab_size)
            self.num_classes = vocab_size + 3
        else:
            self.word_tokenize = vocab.word_tokenize  # nltk's NLTKWordTokenizer (no punkt data here)
            self.num_classes = vocab_size + 1
            if kind == "glove_pkl":
                self.w2id = glove_pkl["w2id"]
                kept = [w for w, _ in glove_pkl["counter"].most_common(vocab_size)]
            else:
                count_file = f"{vocab_dir}/GloVe_tokenized_count.txt"
                vocab_words = read_tokenized_count(count_file, 0, 10**9, cast=str)
                self.w2id = {"<PAD>": 0, "<UNK>": 1} | {w: i + 2 for i, w in enumerate(sorted(set(vocab_words)))}
                kept = read_tokenized_count(count_file, 1, vocab_size)
        self.label_of = {k: i for i, k in enumerate(kept)}

    def _label(self, key) -> tuple[int, bool]:
        return (self.label_of[key], False) if key in self.label_of else (self.vocab_size, True)

    def __call__(self, sentence: str) -> Tokens:
        if self.kind == "clip":
            ids = self.bpe.encode(sentence)[: self.max_words_l - 2]
            pieces = [self.bpe.decoder[i].replace("</w>", "") for i in ids]
            weights = [0] + self.pos_weights(pieces) + [0] if pieces else [0, 0]
            labelled = [self._label(i) for i in ids]
            labels = [self.vocab_size + 1] + [lab for lab, _ in labelled] + [self.vocab_size + 2]
            unknown = [False] + [unk for _, unk in labelled] + [False]
            return Tokens([CLIP_SOT] + ids + [CLIP_EOT], weights, labels, unknown)
        words = [w.lower() for w in self.word_tokenize(sentence)]
        weights = self.pos_weights(words) if words else []
        if self.kind == "glove_pkl":  # words without a vector are dropped (MESM's NLTKTokenizerWithFeature)
            keep = [i for i, w in enumerate(words) if w in self.w2id]
            words, weights = [words[i] for i in keep], [weights[i] for i in keep]
            ids = [self.w2id[w] for w in words]
            key = words
        else:
            ids = [self.w2id.get(w, 1) for w in words]
            key = ids
        ids, weights, key = ids[: self.max_words_l], weights[: self.max_words_l], key[: self.max_words_l]
        labelled = [self._label(k) for k in key]
        return Tokens(ids, weights, [lab for lab, _ in labelled], [unk for _, unk in labelled])


# -- data: one item per video (all its queries), MESM's collate ----------------------------------


def load_mesm_video(files: list, vid: str, max_video_l: int, use_tef: bool, normalize: bool, truncate_first: bool,
                    standardize: tuple[np.ndarray, np.ndarray] | None = None) -> Tensor:
    """MESM's video loading: per-frame L2 norm, several files truncated to the shortest and
    concatenated, (QVH: cut to max_video_l) else average-pooled to max_video_l when longer (bin edges
    round(i*T/max_l) clamped to T-1, as MESM's sample_video_feat), then TEF [i/L, (i+1)/L].
    `standardize` = (mean, std) per channel, applied after the concatenation (our option, off in
    MESM's settings)."""
    from pipeline.features import add_tef, average_to_clips, l2_normalize

    arrays = [f[vid] for f in files]
    if truncate_first:
        arrays = [a[:max_video_l] for a in arrays]
    if normalize:
        arrays = [l2_normalize(a) for a in arrays]
    length = min(len(a) for a in arrays)
    x = np.concatenate([a[:length] for a in arrays], axis=1)
    if standardize is not None:
        x = (x - standardize[0]) / standardize[1]
    if len(x) > max_video_l:
        x = average_to_clips(x, max_video_l)
    if use_tef:
        x = add_tef(x)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


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

    def __init__(self, queries, files, tokenizer: MesmTokenizer, cfg, train: bool, seed: int, standardize=None):
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
                videos[q.video_id] = load_mesm_video(self.files, q.video_id, cfg.max_video_l, cfg.use_tef,
                                                     cfg.normalize_video, self.qvh, self.standardize)
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


# -- the registered model (trainer contract, pipeline/trainer.py) ---------------------------------


@MODELS.register("mesm")
class MESM(GroundingModel):
    """MESM under the shared trainer. Defaults: the published Charades-STA C+SF / CLIP config;
    the other published settings are `profiles/mesm_*.yaml`."""

    class Config(TrainConfig):
        # training (MESM's runner: AdamW, StepLR per epoch, grad-norm clip 0.1; batch = video groups)
        seed: int | None = 2019
        epochs: int = 200
        batch_size: int = 12
        eval_batch_size: int = 30
        grad_clip: float | None = 0.1
        select_metric: str = "mAP"  # MESM's stop_score (mAP for Charades, mIoU for CG / TACoS)
        lr: float = Field(2e-4, gt=0)
        weight_decay: float = Field(1e-4, ge=0)
        lr_drop: int = Field(400, ge=1)
        lr_gamma: float = 0.5
        # data
        features: list[str] = Field(default_factory=lambda: ["clip", "slowfast"])
        layout: Literal["single", "qvhighlights"] = "single"  # one GT moment per query / QVH windows + scores
        clip_len: float = 1.0  # seconds per feature; -1: indices from normalised times (TACoS)
        max_video_l: int = Field(194, ge=1)
        max_words_l: int = Field(16, ge=3)
        use_tef: bool = True
        normalize_video: bool = True
        # Not in MESM (off in every published profile): per-channel standardisation of the video
        # features with statistics of the training videos, kept in the state dict. Random-init CLIP
        # features (the synthetic default) share one dominant direction (frame cosine > 0.98).
        standardize_video: bool = False
        normalize_txt: bool = True
        contra_samples: int = Field(2, ge=1)
        max_gather_size: int = -1  # TACoS: 10 queries per item
        max_windows: int = Field(5, ge=1)
        max_ts_val: float = 150
        # text
        text_encoder: Literal["clip", "glove_pkl", "glove_txt"] = "clip"
        text_weights: str | None = None  # clip: clip_text_encoder.pth; None = random init (recorded)
        text_weights_sha256: str | None = None
        glove_file: str | None = None  # glove_txt: a GloVe text file (glove.6B.300d.txt)
        glove_dim: int = Field(300, ge=1)
        vocab_size: int = Field(1111, ge=1)
        # network
        hidden_dim: int = Field(256, ge=8)
        nheads: int = Field(8, ge=1)
        dim_feedforward: int = Field(1024, ge=1)
        dropout: float = Field(0.1, ge=0, lt=1)
        input_dropout: float = Field(0.5, ge=0, lt=1)
        n_input_proj: int = Field(2, ge=1, le=3)
        enc_layers: int = Field(2, ge=1)
        dec_layers: int = Field(2, ge=1)
        t2v_layers: int = Field(2, ge=1)
        num_recfw_layers: int = Field(2, ge=1)
        num_recss_layers: int = Field(4, ge=1)
        num_queries: int = Field(10, ge=1)
        share_mlp: bool = True
        use_txt_pos: bool = False
        rec_fw: bool = True
        rec_ss: bool = True
        # losses and matching
        set_cost_span: float = 10
        set_cost_giou: float = 1
        set_cost_class: float = 4
        loss_span_coef: float = 10
        loss_giou_coef: float = 1
        loss_label_coef: float = 4
        loss_saliency_coef: float = 4
        loss_recfw_coef: float = 0.1
        loss_recss_coef: float = 0.1
        eos_coef: float = 0.1
        rank_coef: float = 12
        use_triplet: bool = False
        saliency_margin: float = 0.2
        iou_gamma: float = 0.9
        recss_tau: float = 0.5
        # evaluation
        r1_thresholds: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7])
        length_ranges: dict[str, tuple[float, float]] = Field(
            default_factory=lambda: {"short": (0, 10), "middle": (10, 30), "long": (30, 150), "full": (0, 150)})

    def __init__(self, cfg: Config, data: DataContext):
        super().__init__(cfg, data)
        from pipeline.features import FeatureFile

        self.files = [FeatureFile(data.feature_file(name)) for name in cfg.features]
        self.provenance: dict[str, str] = {}
        text_encoder, txt_dim, glove_pkl = self._text_encoder(cfg, data)
        self.tokenizer = MesmTokenizer(cfg.text_encoder, str(data.vocab_dir), cfg.vocab_size, cfg.max_words_l, glove_pkl)
        self.provenance["pos_tagger"] = self.tokenizer.pos_tagger
        vid_dim = sum(f.dim() for f in self.files) + (2 if cfg.use_tef else 0)
        self.net = MESMNet(
            text_encoder, vid_dim, txt_dim, self.tokenizer.num_classes,
            hidden_dim=cfg.hidden_dim, nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
            input_dropout=cfg.input_dropout, n_input_proj=cfg.n_input_proj, enc_layers=cfg.enc_layers,
            dec_layers=cfg.dec_layers, t2v_layers=cfg.t2v_layers, num_recfw_layers=cfg.num_recfw_layers,
            num_recss_layers=cfg.num_recss_layers, num_queries=cfg.num_queries, max_words_l=cfg.max_words_l,
            share_mlp=cfg.share_mlp, use_txt_pos=cfg.use_txt_pos, normalize_txt=cfg.normalize_txt,
            rec_fw=cfg.rec_fw, rec_ss=cfg.rec_ss, ss_video="group_concat" if cfg.layout == "qvhighlights" else "query",
            sentence_from_normalized_words=cfg.text_encoder == "glove_pkl",
        )
        self.criterion = MESMCriterion(
            cost_span=cfg.set_cost_span, cost_giou=cfg.set_cost_giou, cost_class=cfg.set_cost_class,
            loss_span=cfg.loss_span_coef, loss_giou=cfg.loss_giou_coef, loss_label=cfg.loss_label_coef,
            loss_saliency=cfg.loss_saliency_coef, loss_rec_fw=cfg.loss_recfw_coef, loss_rec_ss=cfg.loss_recss_coef,
            eos_coef=cfg.eos_coef, rank_coef=cfg.rank_coef, use_triplet=cfg.use_triplet,
            saliency_margin=cfg.saliency_margin, iou_gamma=cfg.iou_gamma, recss_tau=cfg.recss_tau,
            multi_window=cfg.layout == "qvhighlights", rec_fw=cfg.rec_fw, rec_ss=cfg.rec_ss,
        )
        self.seed = data.seed
        if cfg.standardize_video:
            mean, std = self._video_statistics(data)
            self.register_buffer("video_mean", mean)
            self.register_buffer("video_std", std)

    def _video_statistics(self, data: DataContext) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std of the (L2-normalised, concatenated) frames of the training videos."""
        vids = sorted({q.video_id for q in data.queries("train")})
        frames = np.concatenate([
            load_mesm_video(self.files, v, 10**9, False, self.cfg.normalize_video, False).numpy() for v in vids
        ])
        mean, std = frames.mean(0, dtype=np.float64), frames.std(0, dtype=np.float64)
        return torch.from_numpy(mean).float(), torch.from_numpy(np.maximum(std, 1e-6)).float()
    def _text_encoder(self, cfg: Config, data: DataContext) -> tuple[nn.Module, int, dict | None]:
        if cfg.text_encoder == "clip":
            enc = ClipTextEncoder(cfg.max_words_l)
            if cfg.text_weights:
                self.provenance["text_encoder"] = load_clip_text_checkpoint(enc.tower, cfg.text_weights, cfg.text_weights_sha256)
            else:
                from pipeline.provenance import weights_record

                self.provenance["text_encoder"] = weights_record(None)
            return enc, 512, None
        from pipeline.provenance import sha256_file

        if cfg.text_encoder == "glove_pkl":
            from pipeline.vocab import load_glove_pkl

            path = f"{data.vocab_dir}/glove.pkl"
            vocab = load_glove_pkl(path)  # a restricted unpickler: plain data only
            vectors = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in vocab["id2vec"]]))
            self.provenance["text_encoder"] = f"glove.pkl sha256 {sha256_file(path)}"
            return GloveTableEncoder(vectors, as_parameter=False), vectors.shape[1], vocab
        # glove_txt: a frozen embedding over the Vocabulary of GloVe_tokenized_count.txt
        if not cfg.glove_file:
            raise ValueError("model.mesm.glove_file: text_encoder 'glove_txt' needs a GloVe text file")
        words = read_tokenized_count(f"{data.vocab_dir}/GloVe_tokenized_count.txt", 0, 10**9, cast=str)
        vocab_words = sorted(set(words))
        from pipeline.vocab import read_glove_text

        found = read_glove_text(cfg.glove_file, cfg.glove_dim, words=vocab_words)
        unk = torch.randn(cfg.glove_dim, generator=torch.Generator().manual_seed(data.seed))
        rows = [torch.zeros(cfg.glove_dim), unk] + [torch.from_numpy(found[w]) if w in found else unk for w in vocab_words]
        self.provenance["text_encoder"] = f"{cfg.glove_file} sha256 {sha256_file(cfg.glove_file)}"
        return GloveTableEncoder(torch.stack(rows), as_parameter=True), cfg.glove_dim, None

    # -- contract --------------------------------------------------------------------------------

    @classmethod
    def input_files(cls, cfg: Config, data: DataContext) -> dict[str, Path]:
        files = {f"features.{name}": Path(data.feature_file(name)) for name in cfg.features}
        vocab = Path(data.vocab_dir)
        if cfg.text_encoder == "clip":
            files["vocab.CLIP_tokenized_count"] = vocab / "CLIP_tokenized_count.txt"
            if cfg.text_weights:
                files["model.mesm.text_weights"] = Path(cfg.text_weights)
        elif cfg.text_encoder == "glove_pkl":
            files["vocab.glove_pkl"] = vocab / "glove.pkl"
        else:
            files["vocab.GloVe_tokenized_count"] = vocab / "GloVe_tokenized_count.txt"
            if cfg.glove_file:
                files["model.mesm.glove_file"] = Path(cfg.glove_file)
        return files

    def build_dataset(self, split: str, data: DataContext, train: bool) -> MesmVideoDataset:
        stats = (self.video_mean.cpu().numpy(), self.video_std.cpu().numpy()) if self.cfg.standardize_video else None
        return MesmVideoDataset(data.queries(split), self.files, self.tokenizer, self.cfg, train, data.seed, stats)

    def collate(self, items: list) -> dict:
        return collate_groups(items)

    def configure_optimizers(self) -> Optimization:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, self.cfg.lr_drop, gamma=self.cfg.lr_gamma)
        return Optimization(optimizers=[opt], schedulers=[sched], interval="epoch")

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, Tensor]:
        outputs = self.net(batch)
        losses, total = self.criterion(outputs, batch)
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}

    @torch.no_grad()
    def predict_step(self, batch: dict) -> list[dict]:
        outputs = self.net(batch, negatives=False)
        decoded = decode_predictions(outputs, batch["duration"], batch["video_mask"], self.cfg.clip_len, self.cfg.max_ts_val)
        return [
            {"qid": qid, "vid": vid,
             "pred_relevant_windows": [w + [s] for w, s in zip(d["windows"], d["scores"], strict=False)],
             "pred_saliency_scores": d["saliency"]}
            for qid, vid, d in zip(batch["qid"], batch["vid"], decoded, strict=False)
        ]

    def metrics(self, predictions: list[dict], queries: list) -> dict[str, float]:
        return mesm_metrics(predictions, queries, self.cfg.r1_thresholds, self.cfg.length_ranges,
                            clip_len=self.cfg.clip_len)

    def weights_provenance(self) -> dict[str, str]:
        return dict(self.provenance)


def mesm_metrics(predictions: list[dict], queries: list, r1_thresholds, length_ranges, clip_len: float) -> dict[str, float]:
    """Moment-DETR standalone_eval semantics (pipeline.evaluation): R1@θ and mIoU of the top-1 window
    (best-matching GT window), mAP over IoU 0.5:0.05:0.95 with up to 10 windows, per length bucket;
    HL-mAP / HIT@1 when saliency scores and QVH annotations are present."""
    from pipeline.evaluation import evaluate_moment_detr, temporal_iou

    labelled = [q for q in queries if q.moments]
    gts = []
    for q in labelled:
        g = {"qid": q.qid, "duration": q.duration, "relevant_windows": [list(m) for m in q.moments]}
        if q.saliency_scores is not None:
            g.update(relevant_clip_ids=list(q.relevant_clip_ids), saliency_scores=[list(s) for s in q.saliency_scores])
        gts.append(g)
    by_qid = {p["qid"]: p for p in predictions}
    preds = [by_qid[g["qid"]] for g in gts]
    if gts and "saliency_scores" not in gts[0]:
        preds = [{k: v for k, v in p.items() if k != "pred_saliency_scores"} for p in preds]
    thresholds = sorted(set(np.round(np.arange(0.5, 0.96, 0.05), 2).tolist()) | set(r1_thresholds))
    result = evaluate_moment_detr(preds, gts, thresholds=thresholds, length_ranges=length_ranges,
                                  clip_length=clip_len if clip_len > 0 else 2.0)
    out: dict[str, float] = {}
    full = result.get("full", {})
    for t in r1_thresholds:  # MESM's R1@θ, named as the shared evaluator names R@1
        out[f"R@1,IoU@{t}"] = float(full["MR-R1"][str(t)])
    # mIoU of the top-1 window against the GT window it overlaps best (MESM's "miou")
    ious = [max(float(temporal_iou(np.array(p["pred_relevant_windows"][0][:2]), np.array(w))) for w in g["relevant_windows"])
            for p, g in zip(preds, gts, strict=False)]
    out["mIoU"] = round(100.0 * float(np.mean(ious)), 2)
    out["mAP"] = float(full["MR-mAP"]["average"])
    out["mAP@0.5"], out["mAP@0.75"] = float(full["MR-mAP"]["0.5"]), float(full["MR-mAP"]["0.75"])
    for name in length_ranges:
        if name != "full" and name in result:
            out[f"mAP-{name}"] = float(result[name]["MR-mAP"]["average"])
    for key, value in result["brief"].items():
        if key.startswith("HL-"):
            out[key] = float(value)
    return out
