"""MESM's matcher and losses: the DETR matching cost (top-1 against the query's own GT, or
Hungarian over QVHighlights' windows), span L1 / gIoU / foreground class, the saliency loss
(negative pair, rank contrastive, triplet), the FW masked-word NLL and the SS-MESM contrastive
loss, weighted and summed by `MESMCriterion`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from models.mesm.spans import generalized_temporal_iou, span_cxw_to_xx


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


