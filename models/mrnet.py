"""MRNet: Maskable Retentive Network for video moment retrieval (Hu et al., ACM MM 2024).

A clean-room reimplementation of xian-sh/MRNet (`ret/modeling/ret_model/ret_model*.py`), described
in docs/mrnet.md. MRNet is MMN with two changes:

1. the query is a *frozen* 768-d sentence (or speech) feature computed offline
   (`pipeline/text/sentence_features.py`), one token per sentence;
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
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from models.common import (
    FeatAvgPool,
    ProposalConv,
    SparseMaxPool,
    contrastive_scores,
    fuse_scores,
    grounding_recall_metrics,
    iou_scores,
    moment_to_iou2d,
    mutual_matching_loss,
    rank_moments,
    scaled_iou_bce_loss,
    windows_from_predictions,
)
from models.specs.mrnet import AttMode, MaskMode, MRNetConfig, MRNetSpec, QueryOrder
from pipeline.core.params import Fraction, Positive
from pipeline.core.provenance import read_record, weights_record
from pipeline.media.features import FeatureFile, load_video
from pipeline.nets.checkpoints import WeightsError, torch_load
from pipeline.text.sentence_features import query_key, read_query_features
from pipeline.training.trainer import (
    DataContext,
    GroundingModel,
    Optimization,
    StepContext,
)

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
        gamma: Positive = 0.98,
        att_mode: AttMode = "all",
        mask_mode: MaskMode = "both",
        bidirectional_decay: bool = True,
        att_softmax: bool = True,
        att_dropout: Fraction | None = None,
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


# -- config ---------------------------------------------------------------------------------------


class VideoProjection(nn.Sequential):
    """The official `input_vid_proj`: [LN -> Dropout -> Linear -> ReLU] then [LN -> Dropout -> Linear]."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.5):
        super().__init__(
            nn.LayerNorm(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, dim), nn.ReLU(),
            nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, dim),
        )


OTHER_ORDER = {"gt_start": "text", "text": "gt_start"}


def query_order(moments: Sequence[tuple[float, float]], sentences: Sequence[str], order: QueryOrder) -> list[int]:
    """The order in which a video's queries enter the TransRet sequence (it matters: sine positions
    and joint attention). "gt_start": by ground-truth start, as the official data sets do at train
    AND test time (a test-label leak at inference); "text": by the sentence itself (honest)."""
    if order == "gt_start":
        return sorted(range(len(moments)), key=lambda i: moments[i][0])
    return sorted(range(len(sentences)), key=lambda i: (sentences[i], i))


# -- the model ------------------------------------------------------------------------------------


class MRNet(MRNetSpec, GroundingModel):
    """MRNet on top of MMN's blocks (models/common.py). Items are videos with all their queries."""

    def __init__(self, cfg: MRNetConfig, data: DataContext):
        super().__init__(cfg, data)
        if cfg.num_pre_clips % cfg.num_clips:
            raise ValueError(f"model.mrnet: num_pre_clips {cfg.num_pre_clips} is not a multiple of num_clips {cfg.num_clips}")
        self.featpool = FeatAvgPool(cfg.input_size, cfg.featpool_hidden, cfg.pool_kernel, cfg.num_pre_clips // cfg.num_clips)
        self.video_proj = VideoProjection(cfg.featpool_hidden, cfg.dim, cfg.input_dropout)
        # The official text "encoder" holds two Linear(768 -> d); only the second (fc_out2) is used.
        # The unused layers are kept so the parameter count and the checkpoint keys match the official model.
        self.query_proj = nn.Linear(cfg.query_dim, cfg.dim)
        self.query_proj_unused = nn.Linear(cfg.query_dim, cfg.dim)
        self.transret = TransRet(
            cfg.dim, cfg.trans_layers, cfg.ffn_dim, cfg.dropout, num_clips=cfg.num_clips, heads=cfg.heads,
            gamma=cfg.gamma, att_mode=cfg.att_mode, mask_mode=cfg.mask_mode,
            bidirectional_decay=cfg.bidirectional_decay, att_softmax=cfg.att_softmax, att_dropout=cfg.att_dropout,
            projection=cfg.projection, no_softmax_weights=cfg.no_softmax_weights,
        )
        self.feat2d = SparseMaxPool(cfg.pooling_counts, cfg.num_clips)
        self.proposal_conv = ProposalConv(cfg.dim, cfg.predictor_hidden, cfg.predictor_kernel, cfg.predictor_layers,
                                          cfg.dim, self.feat2d.mask2d)
        # `text_out`: Linear(d, d) fc_out1 gives the IoU-branch sentence feature; the contrastive branch
        # uses the TransRet text memory directly. fc_out2 and the LayerNorm are unused (official).
        self.text_out_iou = nn.Linear(cfg.dim, cfg.dim)
        self.text_out_unused = nn.ModuleDict({"fc": nn.Linear(cfg.dim, cfg.dim), "norm": nn.LayerNorm(cfg.dim)})
        self._query_file = data.feature_file(cfg.query_feature)
        self._video_file = data.feature_file(cfg.feature)
        self._init_weights = None
        if cfg.init_weights:

            self._init_weights = weights_record(cfg.init_weights, cfg.init_weights_sha256)
            self.load_state_dict(load_official_checkpoint(cfg.init_weights, cfg))

    # -- data -------------------------------------------------------------------------------------

    def build_dataset(self, split: str, data: DataContext, train: bool) -> Dataset:
        # Training always uses the official order (by ground-truth start); the test order is a flag.
        order = "gt_start" if train else self.cfg.test_query_order
        return VideoQueries(data.queries(split), self._video_file, self._query_file, self.cfg, order)

    def collate(self, items: list[dict]) -> dict:
        batch = {key: [item[key] for item in items] for key in items[0]}
        batch["feats"] = torch.stack(batch["feats"])
        return batch

    # -- forward ----------------------------------------------------------------------------------

    def encode(self, batch: dict) -> dict:
        """Per video: TransRet over [its query tokens ; its clips], then MMN's 2D map and heads."""
        clips = self.video_proj(self.featpool(batch["feats"]).transpose(1, 2))  # (B, N, d)
        text_memory, video_memory, sparsity = [], [], clips.new_zeros(())
        for video, queries in zip(clips, batch["queries"], strict=True):  # query counts differ per video
            text, vid, loss = self.transret(self.query_proj(queries), video)
            text_memory.append(text)
            video_memory.append(vid)
            sparsity = sparsity + loss  # summed over layers and videos, as the official loop does
        map2d = self.feat2d(torch.stack(video_memory).transpose(1, 2))  # (B, d, N, N)
        map_contrastive, map_iou = self.proposal_conv(map2d)
        # IoU branch: text_out's Linear on the text memory; contrastive branch: the memory itself.
        scores = iou_scores(map_iou, [self.text_out_iou(t) for t in text_memory], self.feat2d.mask2d)
        return {"text": text_memory, "map_contrastive": map_contrastive, "iou_scores": scores, "sparsity": sparsity}

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, Tensor]:
        cfg, mask = self.cfg, self.feat2d.mask2d
        out = self.encode(batch)
        loss_iou = scaled_iou_bce_loss(torch.cat(out["iou_scores"]), torch.cat(batch["iou2d"]), mask,
                                       cfg.min_iou, cfg.max_iou)
        loss_vid, loss_sent = mutual_matching_loss(
            out["map_contrastive"], out["text"], batch["iou2d"], batch["moments"], mask,
            tau_video=cfg.tau_video, tau_sent=cfg.tau_sent, margin=cfg.margin, top_k=cfg.top_k,
            neg_iou=cfg.neg_video_iou, sent_removal_iou=cfg.sent_removal_iou,
        )
        loss_vid, loss_sent = loss_vid * cfg.contrastive_weight, loss_sent * cfg.contrastive_weight
        loss_sp = out["sparsity"] * cfg.sparse_weight
        return {"loss": total_loss(loss_iou, loss_vid, loss_sent, loss_sp, ctx.epoch, cfg, ctx.world_size),
                "loss_iou": loss_iou.detach(), "loss_vid": loss_vid.detach(), "loss_sent": loss_sent.detach(),
                "loss_sp": loss_sp.detach()}

    @torch.no_grad()
    def predict_step(self, batch: dict) -> list[dict]:
        """Windows per query in the configured test order; with `report_both_orders`, also the
        windows obtained with the other order under `pred_relevant_windows_<order>_order`."""
        cfg = self.cfg
        preds = self._predict(batch)
        if cfg.report_both_orders:
            other = dict(batch)
            for key in ("queries", "qids", "moments", "iou2d"):
                other[key] = [values[perm] if torch.is_tensor(values) else [values[i] for i in perm]
                              for values, perm in zip(batch[key], batch["other_order"], strict=True)]
            key = f"pred_relevant_windows_{OTHER_ORDER[cfg.test_query_order]}_order"
            by_qid = {p["qid"]: p["pred_relevant_windows"] for p in self._predict(other)}
            for p in preds:
                p[key] = by_qid[p["qid"]]
        return preds

    def _predict(self, batch: dict) -> list[dict]:
        cfg, mask = self.cfg, self.feat2d.mask2d
        out = self.encode(batch)
        contrastive = contrastive_scores(out["map_contrastive"], out["text"], mask)
        score2d = torch.cat([fuse_scores(c, i, cfg.score_pow) for c, i in zip(contrastive, out["iou_scores"], strict=True)])
        durations = [d for d, qids in zip(batch["duration"], batch["qids"], strict=True) for _ in qids]
        windows, scores, valid = rank_moments(score2d, mask, durations, cfg.nms_thresh, cfg.num_predictions)
        vids = [v for v, qids in zip(batch["vid"], batch["qids"], strict=True) for _ in qids]
        qids = [q for qids in batch["qids"] for q in qids]
        return [
            {"qid": qid, "vid": vid,
             "pred_relevant_windows": [[round(float(s), 4), round(float(e), 4), round(float(c), 6)]
                                       for (s, e), c, ok in zip(windows[q], scores[q], valid[q], strict=True) if ok]}
            for q, (qid, vid) in enumerate(zip(qids, vids, strict=True))
        ]

    def metrics(self, predictions: list[dict], queries: list) -> dict[str, float]:
        """MRNet's protocol: R@{1,5} at `thresholds` (after NMS, hit if IoU >= θ), top-1 mIoU, Best_R{k};
        the same under "<order>_order/" for the other test query order when predicted."""
        windows, valid, gt = windows_from_predictions(predictions, queries, max_windows=5)
        out = grounding_recall_metrics(windows, valid, gt, (1, 5), self.cfg.thresholds)
        other = OTHER_ORDER[self.cfg.test_query_order] + "_order"
        if predictions and f"pred_relevant_windows_{other}" in predictions[0]:
            renamed = [{**p, "pred_relevant_windows": p[f"pred_relevant_windows_{other}"]} for p in predictions]
            windows, valid, gt = windows_from_predictions(renamed, queries, max_windows=5)
            out |= {f"{other}/{k}": v for k, v in grounding_recall_metrics(windows, valid, gt, (1, 5), self.cfg.thresholds).items()}
        return out

    # -- optimisation -----------------------------------------------------------------------------

    def configure_optimizers(self) -> Optimization:
        # Official: AdamW(0.9, 0.99, wd 1e-5); the "bert" group is empty in MRNet (no BERT parameters).
        opt = torch.optim.AdamW(self.parameters(), lr=self.cfg.lr, betas=(0.9, 0.99), weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.cfg.milestones, gamma=0.1)
        return Optimization(optimizers=[opt], schedulers=[sched], interval="epoch")

    def weights_provenance(self) -> dict[str, str]:

        record = read_record(self._query_file) or {}
        out = {"query_encoder": record.get("weights", {}).get("query_encoder", "unknown")}
        if self._init_weights:
            out["init_weights"] = self._init_weights
        return out


def total_loss(loss_iou: Tensor, loss_vid: Tensor, loss_sent: Tensor, loss_sp: Tensor, epoch: int, cfg, world_size: int = 1) -> Tensor:
    """The official schedule: full weight while epoch <= only_iou, then x0.01 on everything but the
    IoU loss; the sparsity term is added a second time when it is >= loss_ratio * batch * weight
    (`sparsity_count_twice`, on by default as in the official trainer)."""
    scale = 1.0 if epoch <= cfg.only_iou else 0.01
    loss = loss_iou + scale * (loss_sent + loss_vid + loss_sp)
    overall_min = cfg.loss_ratio * (cfg.batch_size // max(world_size, 1)) * cfg.sparse_weight
    if cfg.sparsity_count_twice and loss_sp.item() >= overall_min:
        loss = loss + scale * loss_sp
    return loss


# -- the official checkpoint format ---------------------------------------------------------------

_OFFICIAL_RENAMES = [  # (official key pattern, ours); applied in order, first match wins
    (r"input_vid_proj\.(\d+)\.LayerNorm\.", lambda m: f"video_proj.{4 * int(m[1])}."),
    (r"input_vid_proj\.(\d+)\.net\.1\.", lambda m: f"video_proj.{4 * int(m[1]) + 2}."),
    (r"text_encoder\.fc_out2\.", "query_proj."),
    (r"text_encoder\.fc_out1\.", "query_proj_unused."),
    (r"text_out\.fc_out1\.", "text_out_iou."),
    (r"text_out\.fc_out2\.", "text_out_unused.fc."),
    (r"text_out\.layernorm\.", "text_out_unused.norm."),
    (r"trans_ret\.rets\.(\d+)\.learn_vid_ret\.weight", lambda m: f"transret.layers.{m[1]}.retention.gate_logits"),
    (r"trans_ret\.rets\.(\d+)\.(W_\w+)", lambda m: f"transret.layers.{m[1]}.retention.{m[2]}"),
    (r"trans_ret\.ffns\.(\d+)\.", lambda m: f"transret.layers.{m[1]}.ffn."),
    (r"trans_ret\.layer_norms_1\.(\d+)\.", lambda m: f"transret.layers.{m[1]}.norm1."),
    (r"trans_ret\.layer_norms_2\.(\d+)\.", lambda m: f"transret.layers.{m[1]}.norm2."),
    (r"trans_ret\.norm\.", "transret.norm."),
    (r"(featpool|proposal_conv)\.", lambda m: f"{m[1]}."),
]


def official_state_dict(state: dict[str, Tensor], cfg: MRNet.Config) -> dict[str, Tensor]:
    """Map an official `RET` state dict (xian-sh/MRNet, either model file) onto this module's keys.

    The official attention keeps its Linear layers in `self_attn.linears`: one (output) in
    ret_model.py, four (Q, K, V, output) in ret_model_tacos.py; the gate W is an Embedding(N*N, 1);
    xPos's `scale` buffer is recomputed here (checked, then dropped).
    """
    import re

    attention = ["out_proj"] if cfg.projection == "matrices" else ["q_proj", "k_proj", "v_proj", "out_proj"]
    zeta = XPos(cfg.dim).zeta
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if m := re.fullmatch(r"trans_ret\.rets\.(\d+)\.xpos\.scale", key):
            if not torch.allclose(value.float().cpu(), zeta):
                raise ValueError(f"official checkpoint: {key} does not match xPos for dim {cfg.dim}")
            continue
        if m := re.fullmatch(r"trans_ret\.rets\.(\d+)\.self_attn\.linears\.(\d+)\.(weight|bias)", key):
            if int(m[2]) >= len(attention):
                raise ValueError(f"official checkpoint: {key}: projection '{cfg.projection}' has {len(attention)} "
                                 "attention Linear layers (ret_model_tacos.py checkpoints need projection: linear)")
            out[f"transret.layers.{m[1]}.retention.{attention[int(m[2])]}.{m[3]}"] = value
            continue
        for pattern, repl in _OFFICIAL_RENAMES:
            if m := re.match(pattern, key):
                new = repl(m) if callable(repl) else repl
                out[new + key[m.end():]] = value
                break
        else:
            raise ValueError(f"official checkpoint: unexpected key {key!r}")
        if new.endswith("gate_logits"):
            out[new] = value.reshape(cfg.num_clips, cfg.num_clips)
    return out


def load_official_checkpoint(path: str | Path, cfg: MRNet.Config) -> dict[str, Tensor]:
    """Read an official checkpoint (torch.save of {"model": state_dict, "optimizer", "scheduler",
    "epoch"} by MmnCheckpointer, or a bare state dict) and return our state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: MRNet checkpoint not found (model.mrnet.init_weights)")
    blob = torch_load(str(path))
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict or a dict with a 'model' state dict")
    try:
        return official_state_dict(state, cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


class VideoQueries(Dataset):
    """One item per video: its clip features and all its queries in the given order."""

    def __init__(self, queries: Sequence, video_file, query_file, cfg: MRNet.Config, order: QueryOrder):
        self.cfg, self.order = cfg, order
        self.video_file = FeatureFile(video_file)
        self.query_table = read_query_features(query_file)
        self.query_file = query_file
        by_video: dict[str, list] = {}
        for q in queries:
            by_video.setdefault(q.video_id, []).append(q)
        self.videos = list(by_video.items())
        missing = [q.sentence for q in queries if query_key(q.sentence) not in self.query_table]
        if missing:
            raise KeyError(f"{query_file}: no query feature for {len(missing)} sentences, e.g. {missing[0]!r} "
                           f"(re-run `vmr sentence-features` for these splits)")

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict:
        cfg = self.cfg
        vid, queries = self.videos[index]
        queries = [queries[i] for i in query_order([q.moment for q in queries], [q.sentence for q in queries], self.order)]
        # positions of the same queries in the other order, for reporting both at test time
        other = query_order([q.moment for q in queries], [q.sentence for q in queries], OTHER_ORDER[self.order])
        duration = float(queries[0].duration)
        feats = load_video([self.video_file], vid, l2norm=True, num_clips=cfg.num_pre_clips,
                           edges_dtype="float32")  # MMN's avgfeats: torch float32 bin edges
        moments = torch.tensor([q.moment for q in queries], dtype=torch.float32)
        return {
            "vid": vid,
            "duration": duration,
            "qids": [q.qid for q in queries],
            "feats": torch.from_numpy(feats),
            "queries": torch.from_numpy(np.stack([self.query_table[query_key(q.sentence)] for q in queries])),
            "moments": moments,
            "iou2d": torch.stack([moment_to_iou2d(m, cfg.num_clips, duration) for m in moments]),
            "other_order": other,
        }
