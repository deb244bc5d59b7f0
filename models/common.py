"""Blocks shared by the 2D-proposal-map grounding models (MMN, and MRNet which reuses them).

Behaviour follows MCG-NJU/MMN (`mmn/modeling/mmn/{featpool,feat2d,proposal_conv,loss}.py`,
`mmn/data/datasets/{utils,evaluation}.py`); the code is our own. Shapes: B videos, D channels,
N clips, S sentences (of one video or of the whole batch), K valid proposals.

    FeatAvgPool                 Conv1d(1x1) + ReLU + AvgPool1d: (B, P, D_in) -> (B, D, N)
    sparse_proposal_mask        the valid-cell mask of the sparse 2D map and its diagonals
    SparseMaxPool               (B, D, N) -> (B, D, N, N) 2D proposal map by stacked max-pools
    ProposalConv                stacked masked 2D convs + the two 1x1 heads (contrastive, IoU)
    moment_to_iou2d             IoU of every cell's moment with a ground-truth moment
    proposal_moments            the (start, end) in seconds of every cell
    iou_scores / contrastive_scores   per-sentence score maps from the joint space
    scaled_iou_bce_loss         BCE of the IoU scores against min/max-scaled IoU targets
    mutual_matching_loss        MMN's video->text and text->video contrastive losses
    fuse_scores                 ((cos+1)/2)^pow * iou_score (inference)
    rank_moments                valid cells -> seconds -> NMS (pipeline.training.evaluation.nms) -> top windows
    grounding_recall_metrics    R@k,IoU@θ / mIoU / Best_R{k} of ranked windows (MMN protocol)
    train_wordpiece / wordpiece_from_vocab   the BERT-uncased WordPiece tokenizers of MMN's text
                                encoder and of the frozen query encoder (pipeline.text.sentence_features)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.training.evaluation import nms, recall_at_k, temporal_iou

# -- video side -----------------------------------------------------------------------------------


class FeatAvgPool(nn.Module):
    """(B, P, D_in) pre-clips -> (B, hidden, N) clips: 1x1 conv, ReLU, average pool (k, stride)."""

    def __init__(self, input_size: int, hidden_size: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(input_size, hidden_size, 1, 1)
        self.pool = nn.AvgPool1d(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x.transpose(1, 2)).relu())


def sparse_proposal_mask(num_clips: int, pooling_counts: Sequence[int]) -> tuple[torch.Tensor, list]:
    """The valid cells of the sparse 2D map, and the (rows, cols) of each filled diagonal in order.

    The main diagonal is always valid. Group g of `pooling_counts` fills its count of diagonals
    with stride 2^g: the offset grows by the stride each time and the start index takes every
    stride-th value. So [15] on N=16 is dense (136 cells) and [15, 8, 8] on N=64 gives 1104.
    """
    mask = torch.zeros(num_clips, num_clips, dtype=torch.bool, device="cpu")  # built on CPU, moved as a buffer
    idx = torch.arange(num_clips, device="cpu")
    mask[idx, idx] = True
    stride, offset, diagonals = 1, 0, []
    for count in pooling_counts:
        for _ in range(count):
            offset += stride
            rows = torch.arange(0, num_clips - offset, stride, device="cpu")
            cols = torch.arange(offset, num_clips, stride, device="cpu")
            mask[rows, cols] = True
            diagonals.append((rows, cols))
        stride *= 2
    return mask, diagonals


class SparseMaxPool(nn.Module):
    """Cell (i, j) = max over clips i..j, filled only on the sparse diagonals.

    Group 0 chains MaxPool1d(2, 1) (offsets 1, 2, ...); each later group starts with
    MaxPool1d(3, 2) (doubling the stride) followed by count-1 MaxPool1d(2, 1).
    """

    def __init__(self, pooling_counts: Sequence[int], num_clips: int):
        super().__init__()
        mask, self.diagonals = sparse_proposal_mask(num_clips, pooling_counts)
        self.register_buffer("mask2d", mask, persistent=False)
        poolers = [nn.MaxPool1d(2, 1) for _ in range(pooling_counts[0])]
        for count in pooling_counts[1:]:
            poolers += [nn.MaxPool1d(3, 2)] + [nn.MaxPool1d(2, 1) for _ in range(count - 1)]
        self.poolers = nn.ModuleList(poolers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, n = x.shape
        map2d = x.new_zeros(b, d, n, n)
        idx = torch.arange(n, device=x.device)
        map2d[:, :, idx, idx] = x
        for pooler, (rows, cols) in zip(self.poolers, self.diagonals, strict=True):
            x = pooler(x)
            map2d[:, :, rows.to(x.device), cols.to(x.device)] = x
        return map2d


def _mask_weight(mask: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Count the valid inputs under each output of `conv`: weight 1/count there, 0 elsewhere; the
    new mask is count > 0 (it grows with every layer)."""
    ones = torch.ones(1, 1, *conv.kernel_size, device=mask.device)
    count = torch.round(F.conv2d(mask.float(), ones, stride=conv.stride, padding=conv.padding,
                                 dilation=conv.dilation))
    weight = torch.where(count > 0, 1.0 / count.clamp(min=1), torch.zeros_like(count))
    return count > 0, weight


class ProposalConv(nn.Module):
    """L stacked k x k convs over the 2D map (the first pads (k-1)L/2, so the map grows and shrinks
    back to N x N), each followed by BatchNorm, ReLU and the 1/count masked weight; then two 1x1
    heads to the joint space: (contrastive map, IoU map)."""

    def __init__(self, input_size: int, hidden_size: int, kernel_size: int, num_stack_layers: int,
                 output_size: int, mask2d: torch.Tensor):
        super().__init__()
        self.num_stack_layers = num_stack_layers
        self.register_buffer("mask2d", mask2d[None, None].clone(), persistent=False)
        first_padding = (kernel_size - 1) * num_stack_layers // 2
        self.convs = nn.ModuleList([nn.Conv2d(input_size, hidden_size, kernel_size, padding=first_padding)])
        self.bn = nn.ModuleList([nn.BatchNorm2d(hidden_size)])
        for _ in range(num_stack_layers - 1):
            self.convs.append(nn.Conv2d(hidden_size, hidden_size, kernel_size))
            self.bn.append(nn.BatchNorm2d(hidden_size))
        self.conv1x1_iou = nn.Conv2d(hidden_size, output_size, 1)
        self.conv1x1_contrastive = nn.Conv2d(hidden_size, output_size, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.mask2d
        for conv, bn in zip(self.convs, self.bn, strict=True):
            x = bn(conv(x)).relu()
            mask, weight = _mask_weight(mask, conv)
            x = x * weight
        return self.conv1x1_contrastive(x), self.conv1x1_iou(x)


# -- targets and scores ---------------------------------------------------------------------------


def proposal_moments(num_clips: int, duration: float) -> torch.Tensor:
    """(N, N, 2) seconds of every cell: [i * d / N, (j + 1) * d / N]."""
    idx = torch.arange(num_clips, dtype=torch.float32)
    starts = (idx * duration / num_clips)[:, None].expand(num_clips, num_clips)
    ends = ((idx + 1) * duration / num_clips)[None, :].expand(num_clips, num_clips)
    return torch.stack([starts, ends], dim=-1)


def moment_iou(candidates: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """1-D IoU of (..., 2) candidates with one (2,) moment; union = max end - min start."""
    inter = torch.minimum(candidates[..., 1], moment[1]) - torch.maximum(candidates[..., 0], moment[0])
    union = torch.maximum(candidates[..., 1], moment[1]) - torch.minimum(candidates[..., 0], moment[0])
    return inter.clamp(min=0) / union


def moment_to_iou2d(moment: torch.Tensor, num_clips: int, duration: float) -> torch.Tensor:
    """(N, N) IoU of every cell's moment (valid or not) with the ground truth."""
    return moment_iou(proposal_moments(num_clips, duration), moment)


def pairwise_moment_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(S, 2) x (T, 2) -> (S, T) IoU with the true union (length sum minus intersection)."""
    inter = (torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return inter / union


def iou_scores(map2d_iou: torch.Tensor, sent_feats_iou: Sequence[torch.Tensor], mask2d: torch.Tensor) -> list[torch.Tensor]:
    """Per video: (S_i, N, N) sigmoid(10 * cos(sentence, cell)) on valid cells, 0 elsewhere."""
    out = []
    for vid_map, sent in zip(map2d_iou, sent_feats_iou, strict=True):
        c, n, _ = vid_map.shape
        cos = F.normalize(sent, dim=1) @ F.normalize(vid_map, dim=0).reshape(c, -1)
        out.append((cos.reshape(-1, n, n) * 10).sigmoid() * mask2d)
    return out


def contrastive_scores(map2d: torch.Tensor, sent_feats: Sequence[torch.Tensor], mask2d: torch.Tensor) -> list[torch.Tensor]:
    """Per video: (S_i, N, N) cos(sentence, cell) on valid cells, 0 elsewhere (inference only)."""
    out = []
    for vid_map, sent in zip(map2d, sent_feats, strict=True):
        c, n, _ = vid_map.shape
        cos = F.normalize(sent, dim=1) @ F.normalize(vid_map, dim=0).reshape(c, -1)
        out.append(cos.reshape(-1, n, n) * mask2d)
    return out


def fuse_scores(contrastive: torch.Tensor, iou: torch.Tensor, power: float) -> torch.Tensor:
    """MMN inference score: ((cos + 1) / 2) ** power * iou_score."""
    return torch.pow(contrastive * 0.5 + 0.5, power) * iou


# -- losses ---------------------------------------------------------------------------------------


def scaled_iou_bce_loss(scores2d: torch.Tensor, ious2d: torch.Tensor, mask2d: torch.Tensor,
                        min_iou: float, max_iou: float) -> torch.Tensor:
    """BCE between the IoU scores and clamp((IoU - min) / (max - min), 0, 1), averaged over every
    valid cell of every sentence. scores2d, ious2d: (S, N, N)."""
    scores = scores2d.masked_select(mask2d)
    target = ((ious2d.masked_select(mask2d) - min_iou) / (max_iou - min_iou)).clamp(0, 1)
    # BCE in float32 outside autocast (autocast refuses binary_cross_entropy on half inputs)
    with torch.autocast(scores.device.type, enabled=False):
        return F.binary_cross_entropy(scores.float(), target.float())


def mutual_matching_loss(
    map2d: torch.Tensor,
    sent_feats: Sequence[torch.Tensor],
    ious2d: Sequence[torch.Tensor],
    moments: Sequence[torch.Tensor],
    mask2d: torch.Tensor,
    *,
    tau_video: float,
    tau_sent: float,
    margin: float,
    top_k: int,
    neg_iou: float,
    sent_removal_iou: float,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MMN's mutual matching contrastive losses (loss_vid, loss_sent) over one (per-rank) batch.

    map2d (B, C, N, N) contrastive map; per video i: sent_feats[i] (S_i, C), ious2d[i] (S_i, N, N),
    moments[i] (S_i, 2). v_p = the top_k cells by GT IoU of sentence k (normalised), s_j = every
    sentence of the batch (normalised).
    loss_vid: -log exp((v_p.s_k - m)/τv) / Σ_j exp((v_p.s_j - m[j=k])/τv) M_kj, where M_kj drops the
        other sentences of the same video whose GT IoU with k is >= sent_removal_iou.
    loss_sent: -log exp((v_p.s_k - m)/τs) / (that + Σ_q exp(s_k.v_q [IoU_kq < neg_iou]/τs) over the
        video's valid cells + Σ over every valid cell of the other videos + eps). Same-video cells
        with IoU >= neg_iou are zeroed before the exp, so each still adds exp(0) = 1 (as published).
    """
    def full(t: torch.Tensor) -> torch.Tensor:  # exp(x / tau) in half precision is too coarse
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    with torch.autocast(map2d.device.type, enabled=False):
        return _mutual_matching_loss(
            full(map2d), [full(s) for s in sent_feats], list(ious2d), list(moments), mask2d,
            tau_video=tau_video, tau_sent=tau_sent, margin=margin, top_k=top_k, neg_iou=neg_iou,
            sent_removal_iou=sent_removal_iou, eps=eps)


def _mutual_matching_loss(map2d, sent_feats, ious2d, moments, mask2d, *, tau_video, tau_sent, margin, top_k,
                          neg_iou, sent_removal_iou, eps):
    b, c = map2d.shape[:2]
    feats = F.normalize(map2d.masked_select(mask2d).reshape(b, c, -1), dim=1)  # B x C x K
    all_sent = F.normalize(torch.cat(list(sent_feats)), dim=1)  # S x C
    total = all_sent.shape[0]
    bounds = np.cumsum([0] + [len(s) for s in sent_feats])
    device = map2d.device

    dtype = map2d.dtype
    keep = torch.ones(total, total, device=device, dtype=dtype)  # M_kj
    for i, gt in enumerate(moments):
        lo, hi = bounds[i], bounds[i + 1]
        keep[lo:hi, lo:hi] = (pairwise_moment_iou(gt, gt) < sent_removal_iou).to(dtype)
    keep = (keep + torch.eye(total, device=device, dtype=dtype)).clamp(0, 1)  # the sentence itself always counts
    margins = torch.eye(total, device=device, dtype=dtype) * margin

    vid_pos, vid_neg, sent_pos, sent_neg = [], [], [], []
    for i, (sent, iou2d) in enumerate(zip(sent_feats, ious2d, strict=True)):
        feat = feats[i]  # C x K
        sent = F.normalize(sent, dim=1)
        iou1d = iou2d.masked_select(mask2d).reshape(sent.shape[0], -1)  # S_i x K
        top = torch.topk(iou1d, top_k, dim=-1).indices  # S_i x top_k
        selected = feat[:, top.reshape(-1)].reshape(c, -1, top_k).permute(1, 2, 0)  # S_i x top_k x C
        pos = torch.bmm(selected, sent.unsqueeze(2)).squeeze(2) - margin  # S_i x top_k
        vid_pos.append(pos)
        vid_neg.append((selected.reshape(-1, c) @ all_sent.t()).reshape(-1, top_k, total))
        same = (sent @ feat) * (iou1d < neg_iou).to(dtype)  # S_i x K
        others = feats[torch.arange(b, device=device) != i].transpose(0, 1).reshape(c, -1)
        other = sent @ others  # S_i x (B-1)K
        sent_pos.append(pos)
        sent_neg.append(torch.cat([pos.unsqueeze(2), same.unsqueeze(1).expand(-1, top_k, -1),
                                   other.unsqueeze(1).expand(-1, top_k, -1)], dim=2))
    v_pos = torch.cat(vid_pos).t() / tau_video  # top_k x S
    v_neg = (torch.cat(vid_neg).permute(1, 0, 2) - margins) / tau_video  # top_k x S x S
    loss_vid = -(v_pos - torch.log((torch.exp(v_neg) * keep).sum(dim=2))).mean()
    s_pos = torch.cat(sent_pos) / tau_sent
    s_neg = torch.cat(sent_neg) / tau_sent
    loss_sent = -(s_pos - torch.log(torch.exp(s_neg).sum(dim=2) + eps)).mean()
    return loss_vid, loss_sent


# -- decoding and metrics -------------------------------------------------------------------------


def rank_moments(score2d: torch.Tensor, mask2d: torch.Tensor, durations: Sequence[float] | np.ndarray,
                 nms_threshold: float, top_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score maps (Q, N, N) of Q queries (any videos) -> each query's best `top_n` windows after NMS.

    Candidates are the valid cells (MMN takes the nonzero cells of the score map, which are the
    valid cells in practice), in seconds of that query's video duration. Returns (windows
    (Q, top_n, 2), scores (Q, top_n), valid (Q, top_n)), best first; one vectorised NMS call.
    """
    n = score2d.shape[-1]
    # seconds exactly as MMN computes them (float32: [i, j + 1] * duration / N): NMS ties at IoU 0.5
    # are common on the grid, so the rounding of the candidates decides them
    rows, cols = torch.nonzero(mask2d.cpu(), as_tuple=True)
    grid = torch.stack([rows, cols + 1], dim=1).float()  # K x 2
    seconds = grid[None] * torch.tensor(np.asarray(durations), dtype=torch.float32)[:, None, None] / n
    moments = seconds.numpy().astype(np.float64)  # Q x K x 2
    cells = grid.numpy()
    scores = score2d[:, mask2d].float().cpu().numpy().astype(np.float64)  # Q x K
    k = cells.shape[0]
    kept, valid = nms(moments, scores, nms_threshold, top_k=top_n, chunk=max(1, (1 << 24) // (k * k)))
    # the kept windows' scores: distinct cells have distinct windows, so match them back
    match = np.all(np.isclose(kept[:, :, None, :], moments[:, None, :, :], rtol=0, atol=1e-9), axis=-1)
    index = match.argmax(axis=2)  # Q x top_n
    kept_scores = np.where(valid, np.take_along_axis(scores, index, axis=1), 0.0)
    return kept, kept_scores, valid


def grounding_recall_metrics(windows: np.ndarray, valid: np.ndarray, gt: np.ndarray, ks: Sequence[int],
                             thresholds: Sequence[float]) -> dict[str, float]:
    """MMN protocol on ranked windows (Q, K, 2): R@k,IoU@θ (hit if one of the first k valid windows
    has IoU >= θ), mIoU of the top-1 window and Best_R{k} (mean over θ), in %."""
    out = recall_at_k(windows, gt, ks, thresholds, valid)
    out["mIoU"] = float(100.0 * np.mean(np.where(valid[:, 0], temporal_iou(windows[:, 0], gt), 0.0)))
    for k in ks:
        out[f"Best_R{k}"] = float(np.mean([out[f"R@{k},IoU@{t}"] for t in thresholds]))
    return out


def windows_from_predictions(predictions: list[dict], queries: list, max_windows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-DETR predictions matched to annotation queries by qid -> (windows, valid, gt)."""
    by_qid = {p["qid"]: p for p in predictions}
    windows = np.zeros((len(queries), max_windows, 2))
    valid = np.zeros((len(queries), max_windows), dtype=bool)
    for i, q in enumerate(queries):
        pred = by_qid.get(q.qid)
        if pred is None:
            raise KeyError(f"no prediction for query {q.qid!r} (video {q.video_id})")
        w = np.asarray([x[:2] for x in pred["pred_relevant_windows"][:max_windows]], dtype=np.float64).reshape(-1, 2)
        windows[i, : len(w)] = w
        valid[i, : len(w)] = True
    gt = np.asarray([q.moment for q in queries], dtype=np.float64)
    return windows, valid, gt
