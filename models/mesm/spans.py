"""Span arithmetic shared by MESM's network, losses and data: (center, width) <-> [start, end],
temporal IoU / gIoU, the clamped inverse sigmoid of the anchor refinement, and group padding."""

from __future__ import annotations

import torch
from torch import Tensor


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


