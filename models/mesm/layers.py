"""MESM's building blocks: input projections, sine positions, the cross-attention layers of the
FW/T2V encoders, the DETR encoder and the conditional / DAB anchor decoder, and the SS-MESM
segment-sentence reconstructor. `network.MESMNet` wires them together."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.mesm.spans import inverse_sigmoid


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

    MESM also passes an `attn_mask` blocking (padded query x padded key) pairs, built per sample and
    expanded to the heads with `.repeat(nhead, 1, 1)`: head-major, while PyTorch reads the (B * nhead)
    rows batch-major, so row b * nhead + h gets the mask of sample (b * nhead + h) mod B. In a batch of
    mixed lengths a sample's heads thus see other samples' padding. The published numbers came from
    that, so `official_mask_order` (default) reproduces it; with it off the mask is ordered correctly,
    which changes nothing (the key padding mask already blocks every padded key) and is skipped.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, two_mlp: bool = False,
                 official_mask_order: bool = True):
        super().__init__()
        self.nhead, self.official_mask_order = nhead, official_mask_order
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

    def forward(self, query, query_pos, kv, kv_pos, kv_pad, query_pad=None, is_mlm: bool = False) -> Tensor:
        q = query if query_pos is None else query + query_pos
        k = kv if kv_pos is None else kv + kv_pos
        mask = None
        if self.official_mask_order and query_pad is not None:
            mask = (query_pad.unsqueeze(2) & kv_pad.unsqueeze(1)).repeat(self.nhead, 1, 1)  # as released
        x = query + self.dropout1(self.attn(q, k, kv, key_padding_mask=kv_pad, attn_mask=mask, need_weights=False)[0])
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

    def forward(self, query, query_pos, kv, kv_pos, kv_pad, query_pad=None, is_mlm: bool = False) -> Tensor:
        for layer in self.layers:
            query = layer(query, query_pos, kv, kv_pos, kv_pad, query_pad, is_mlm)
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

    def __init__(self, hidden: int, nhead: int, dim_feedforward: int, dropout: float, input_dropout: float, num_layers: int,
                 official_mask_order: bool = True):
        super().__init__()
        self.masked_sent_token = nn.Parameter(torch.zeros(hidden))
        layer = CrossAttentionLayer(hidden, nhead, dim_feedforward, dropout, official_mask_order=official_mask_order)
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
        out = self.recon(sentences, None, video, None, ~video_mask, ~sentences_mask)
        return F.normalize(out[slot], dim=-1)


