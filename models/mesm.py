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
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from models import MODELS
from pipeline.params import Section

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
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [out_dim]))

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

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: Optional[nn.Module] = None):
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

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_pad: Optional[Tensor] = None) -> Tensor:
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
    ):
        super().__init__()
        self.text_encoder = text_encoder
        for p in self.text_encoder.parameters():
            p.requires_grad_(False)
        d = hidden_dim
        self.hidden_dim, self.normalize_txt, self.use_txt_pos = d, normalize_txt, use_txt_pos
        self.rec_fw, self.rec_ss, self.ss_video = rec_fw, rec_ss, ss_video

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
        sent = [sentence[s : s + n] for s, n in zip(starts, num_clips)]
        sentences, sentences_mask = pad_groups(torch.cat([g for g, n in zip(sent, num_clips) for _ in range(n)]),
                                               [n for n in num_clips for _ in range(n)])
        if self.ss_video == "query":  # Charades, CG, CD, TACoS: the query's own (raw) video
            return video_feat, video_mask, sentences, sentences_mask
        # QVHighlights: all clips of one YouTube video, concatenated, for every query of the group
        videos = [torch.cat([video_feat[s + i][video_mask[s + i]] for i in r]) for s, r in zip(starts, rows)]
        lengths = [len(v) for v, n in zip(videos, num_clips) for _ in range(n)]
        video, mask = pad_groups(torch.cat([v for v, n in zip(videos, num_clips) for _ in range(n)]), lengths)
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
        b = video_feat.shape[0]

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
            "aux_outputs": [{"pred_logits": c, "pred_spans": s} for c, s in zip(logits[:-1], spans[:-1])],
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


def mask_words(words_mask: Tensor, weight: Optional[Tensor], generator: Optional[torch.Generator] = None) -> Tensor:
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


def sample_outclass_negatives(num_clips: list[int], device=None, generator: Optional[torch.Generator] = None) -> Tensor:
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
    neg_scores: Optional[Tensor],
    video_mask: Tensor,
    labels: Tensor,
    rank_coef: float,
    tau: float = 0.5,
    triplet: Optional[tuple[Tensor, Tensor, float]] = None,
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
        loss = loss + (-torch.log(1.0 - torch.sigmoid(neg_scores)) * mask).sum(1).mean()
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

    def match(self, outputs: dict, targets: dict):
        if self.multi_window:
            return match_hungarian(outputs, targets["norm_span"], targets["norm_moment"], self.costs)
        return match_top1(outputs, targets["norm_span"], targets["norm_moment"], self.costs)

    def _matched(self, outputs, targets, indices):
        """(query rows, prediction indices), matched predicted spans and their target spans/moments."""
        if self.multi_window:
            rows = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
            cols = torch.cat([src for src, _ in indices])
            tgt = torch.cat([t[j] for t, (_, j) in zip(targets["norm_span"], indices)])
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
        total = sum(v * self.weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] for k, v in losses.items())
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
