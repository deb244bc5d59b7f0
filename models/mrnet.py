"""MRNet: Maskable Retentive Network for video moment retrieval (Hu et al., ACM MM 2024).

A clean-room reimplementation of xian-sh/MRNet (`ret/modeling/ret_model/ret_model*.py`), described
in docs/mrnet.md. MRNet is MMN with two changes:

1. the query is a *frozen* 768-d sentence (or speech) feature computed offline
   (`pipeline/sentence_features.py`), one token per sentence;
2. a single-stream "TransRet" encoder runs over [the video's sentence tokens ; its N clip tokens]
   before MMN's 2D proposal map. Attention is "unlimited" in the language-related regions and a
   *maskable retention* in the video-to-video block: the pre-softmax logits are multiplied by
   gamma^|i-j| (diagonal 2, the official bidirectional sum) times I + (1-I)*sigmoid(W), a learnable
   N x N gate with an L1 sparsity loss.

Everything that differs between the official per-dataset model files (`ret_model.py` vs
`ret_model_tacos.py`) is a config value here; the official quirks are flags whose defaults
reproduce the code (see `Config`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

# -- the maskable retention mask ------------------------------------------------------------------


def decay_matrix(n: int, gamma: float, bidirectional: bool = True) -> Tensor:
    """D[i, j] = gamma^(i-j) for i >= j, else 0; bidirectional: D + D^T = gamma^|i-j|, diagonal 2.

    The diagonal of 2 is the official `D_DOUBLE` behaviour (the diagonal is counted from both
    halves); it is kept because it is what the published models were trained with.
    """
    idx = torch.arange(n)
    diff = idx[:, None] - idx[None, :]
    lower = torch.where(diff >= 0, gamma ** diff.clamp(min=0).double(), 0.0).float()
    return lower + lower.T if bidirectional else lower


def gate_matrix(logits: Tensor) -> tuple[Tensor, Tensor]:
    """The learnable gate I + (1-I)*sigmoid(W) and its off-diagonal part (what the L1 loss sees)."""
    eye = torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
    off_diagonal = (1.0 - eye) * torch.sigmoid(logits)
    return eye + off_diagonal, off_diagonal


def sparsity_loss(off_diagonal: Tensor) -> Tensor:
    """Mean over all N^2 entries of |(1-I)*sigmoid(W)| (the diagonal zeros are in the mean)."""
    return off_diagonal.abs().mean()


def joint_mask(video_block: Tensor, num_text: int) -> Tensor:
    """Embed the N x N video mask in a (T+N) x (T+N) mask of ones: text rows/columns stay unmasked."""
    n = video_block.shape[0]
    mask = video_block.new_ones(num_text + n, num_text + n)
    mask[num_text:, num_text:] = video_block
    return mask


# -- positions ------------------------------------------------------------------------------------


class XPos(nn.Module):
    """xPos rotary embedding (Sun et al. 2022, torchscale's variant), on the full d-dim vector.

    Pairs (x_2i, x_2i+1) are rotated by pos * 10000^(-i/(d/2)) and scaled by
    zeta_i^(pos/scale_base) with zeta_i = (2i + 0.4d)/(1.4d); keys use 1/scale (`downscale`), so
    q.k decays with the distance between positions.
    """

    def __init__(self, dim: int, scale_base: float = 512.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"xPos needs an even dimension, got {dim}")
        half = dim // 2
        self.scale_base = scale_base
        self.register_buffer("zeta", (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim), persistent=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(half) / half), persistent=False)

    def forward(self, x: Tensor, downscale: bool = False) -> Tensor:
        """x: (..., L, d) -> same shape."""
        pos = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        scale = self.zeta ** (pos[:, None] / self.scale_base)  # (L, d/2)
        if downscale:
            scale = 1.0 / scale
        angle = pos[:, None] * self.inv_freq  # (L, d/2)
        # Interleave so that entries 2i and 2i+1 share one angle and one scale.
        sin = (angle.sin() * scale).repeat_interleave(2, dim=-1)
        cos = (angle.cos() * scale).repeat_interleave(2, dim=-1)
        rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return x * cos + rotated * sin


def sine_positions(length: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR-style normalised 1-D sine positions (L, dim): position k+1 of L, scaled to (0, 2pi].

    Channels alternate sin/cos: channel c uses frequency temperature^(2*(c//2)/dim).
    """
    position = torch.arange(1, length + 1, dtype=torch.float32)
    position = position / (length + 1e-6) * (2 * math.pi)
    dim_t = temperature ** (2 * (torch.arange(dim) // 2) / dim)
    angles = position[:, None] / dim_t  # (L, dim)
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=-1).flatten(1)


# -- the TransRet encoder ------------------------------------------------------------------------

AttMode = Literal["all", "v", "trans", "no"]
MaskMode = Literal["both", "ret", "sparse", "no"]


class MaskableRetention(nn.Module):
    """One modality-specific attention block (the official `RetLayer`).

    `projection`:
      - "matrices" (official ret_model.py, ANet/Charades): six free d x d matrices
        W_{vid,txt}{Q,K,V} (init randn/d) applied after the positions, one output Linear;
      - "linear" (official ret_model_tacos.py): no W_* matrices; the attention has Linear Q, K, V
        and output layers.
    `no_softmax_weights` says what attention weights are when `att_softmax` is false:
      - "zeros" (official ret_model.py): the weights stay zero, so the block outputs only the
        output-layer bias (this is what the shipped Charades config does);
      - "logits": the masked logits themselves (official ret_model_tacos.py).
    """

    def __init__(
        self,
        dim: int,
        num_clips: int,
        heads: int = 8,
        gamma: float = 0.98,
        att_mode: AttMode = "all",
        mask_mode: MaskMode = "both",
        bidirectional_decay: bool = True,
        att_softmax: bool = True,
        att_dropout: float | None = None,
        projection: Literal["matrices", "linear"] = "matrices",
        no_softmax_weights: Literal["zeros", "logits"] = "zeros",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dim {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.num_clips = dim, heads, num_clips
        self.att_mode, self.mask_mode, self.projection = att_mode, mask_mode, projection
        self.att_softmax, self.no_softmax_weights = att_softmax, no_softmax_weights
        self.att_dropout = nn.Dropout(att_dropout) if att_dropout else nn.Identity()
        if projection == "matrices":
            for name in ("W_vid_Q", "W_vid_K", "W_vid_V", "W_txt_Q", "W_txt_K", "W_txt_V"):
                self.register_parameter(name, nn.Parameter(torch.randn(dim, dim) / dim))
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.out_proj = nn.Linear(dim, dim)
        self.xpos = XPos(dim)
        # The official code stores W as an Embedding(N*N, 1) with N(0, 1) init; a plain parameter
        # with the same init is equivalent (see `official_state_dict`).
        self.gate_logits = nn.Parameter(torch.randn(num_clips, num_clips))
        self.register_buffer("decay", decay_matrix(num_clips, gamma, bidirectional_decay), persistent=False)

    def video_mask(self) -> tuple[Tensor | None, Tensor]:
        """(the N x N multiplicative mask of the video block or None, this layer's sparsity loss)."""
        gate, off_diagonal = gate_matrix(self.gate_logits)
        zero = self.gate_logits.new_zeros(())
        if self.mask_mode == "no":
            return None, zero
        if self.mask_mode == "ret":
            return self.decay, zero
        if self.mask_mode == "sparse":
            return gate, sparsity_loss(off_diagonal)
        return self.decay * gate, sparsity_loss(off_diagonal)

    def _project(self, x: Tensor, name: str) -> Tensor:
        return x @ getattr(self, name) if self.projection == "matrices" else x

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Multi-head attention with a *multiplicative* logit mask. q, k, v: (L, d) -> (L, d)."""
        if self.projection == "linear":
            q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        length, d_head = q.shape[0], self.dim // self.heads
        q, k, v = (t.reshape(t.shape[0], self.heads, d_head).transpose(0, 1) for t in (q, k, v))
        logits = (q / math.sqrt(d_head)) @ k.transpose(-2, -1)  # (h, L, L)
        if mask is not None:
            logits = logits * mask  # element-wise: decays logits towards 0, never to -inf
        if self.att_softmax:
            weights = logits.softmax(dim=-1)
        elif self.no_softmax_weights == "zeros":
            weights = torch.zeros_like(logits)
        else:
            weights = logits
        out = self.att_dropout(weights) @ v  # (h, L, d_head)
        return self.out_proj(out.transpose(0, 1).reshape(length, self.dim))

    def forward(self, x: Tensor, num_text: int) -> tuple[Tensor, Tensor]:
        """x: (T+N, d), text tokens first. Returns (the block's output (T+N, d), sparsity loss)."""
        if x.shape[0] - num_text != self.num_clips:
            raise ValueError(f"expected {self.num_clips} video tokens, got {x.shape[0] - num_text}")
        video_mask, loss = self.video_mask()
        if self.att_mode == "no":
            return x, loss
        txt, vid = x[:num_text], x[num_text:]
        txt_pos = txt + sine_positions(num_text, self.dim).to(x)
        vid_q, vid_k = self.xpos(vid), self.xpos(vid, downscale=True)
        if self.att_mode == "trans":  # vanilla attention: no W matrices, no mask
            return self.attend(torch.cat([txt_pos, vid_q]), torch.cat([txt_pos, vid_k]), x, None), loss
        txt_v = self._project(txt, "W_txt_V")
        vid_q, vid_k = self._project(vid_q, "W_vid_Q"), self._project(vid_k, "W_vid_K")
        vid_v = self._project(vid, "W_vid_V")
        if self.att_mode == "v":  # video self-attention only; text tokens are just V-projected
            return torch.cat([txt_v, self.attend(vid_q, vid_k, vid_v, video_mask)]), loss
        q = torch.cat([self._project(txt_pos, "W_txt_Q"), vid_q])
        k = torch.cat([self._project(txt_pos, "W_txt_K"), vid_k])
        mask = None if video_mask is None else joint_mask(video_mask, num_text)
        return self.attend(q, k, torch.cat([txt_v, vid_v]), mask), loss


class TransRetLayer(nn.Module):
    """Pre-LN block: x + Drop(Ret(LN(x))), then + Drop(FFN(LN(.))) with FFN = Linear-GELU-Linear."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, **retention_kwargs):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.retention = MaskableRetention(dim, **retention_kwargs)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, num_text: int) -> tuple[Tensor, Tensor]:
        attended, loss = self.retention(self.norm1(x), num_text)
        x = x + self.drop1(attended)
        return x + self.drop2(self.ffn(self.norm2(x))), loss


class TransRet(nn.Module):
    """`layers` TransRet layers over [text ; video] and a final LayerNorm. Sparsity summed over layers."""

    def __init__(self, dim: int, layers: int, ffn_dim: int = 1024, dropout: float = 0.1, **retention_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(TransRetLayer(dim, ffn_dim, dropout, **retention_kwargs) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, text: Tensor, video: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """text (T, d), video (N, d) -> (text memory (T, d), video memory (N, d), sparsity loss)."""
        x, loss = torch.cat([text, video]), video.new_zeros(())
        for layer in self.layers:
            x, layer_loss = layer(x, text.shape[0])
            loss = loss + layer_loss
        x = self.norm(x)
        return x[: text.shape[0]], x[text.shape[0]:], loss
