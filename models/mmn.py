"""MMN: Mutual Matching Network for temporal grounding (Wang et al., AAAI 2022).

A clean-room reimplementation of the behaviour of MCG-NJU/MMN (see ../shared/reference/mmn_mrnet.md
§0-1): per-video samples holding every sentence of the video; features L2-normalised and averaged
to NUM_PRE_CLIPS, pooled to N clips, a sparse 2D proposal map, stacked masked 2D convs, two 1x1
heads into a joint space with a DistilBERT sentence encoder (mean over all non-pad tokens, then
LayerNorm and two Linear heads), the scaled-IoU BCE loss plus the mutual-matching contrastive loss
with cross-video negatives, and inference by ((cos+1)/2)^pow * iou_score, then NMS.

Text encoder: a local Hugging Face DistilBERT directory (`text_encoder`, weights checked against
`text_encoder_sha256` when given), or, with none, a randomly initialised DistilBERT-shaped encoder
(`text_dim`, `text_layers`, ...) with a WordPiece vocabulary learnt from the training sentences
(BERT's normaliser and pre-tokeniser from `tokenizers`; see `train_wordpiece` for why the vocabulary
rule is ours), recorded as `weights: random`. The tokenizer travels in the state dict (extra state),
so evaluation rebuilds exactly the trained model.

Deviations from the official code (none changes the maths): CPU works (masks are buffers); all
sentences of a batch go through the text encoder in one padded call (MMN pads per video; with the
attention mask the outputs are the same); NMS is the shared vectorised one (stable sort on ties);
the candidates are the valid cells (MMN: the nonzero cells of the score map, equal in practice).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

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
from models.specs.mmn import MMNConfig, MMNSpec
from pipeline.core.provenance import weights_record
from pipeline.media.features import FeatureFile, load_video
from pipeline.text.tokenizers import train_wordpiece, wordpiece_from_vocab
from pipeline.training.trainer import (
    DataContext,
    GroundingModel,
    Optimization,
    StepContext,
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# -- text -----------------------------------------------------------------------------------------




class TextEncoder(nn.Module):
    """DistilBERT -> mean over every non-pad token ([CLS] and [SEP] included) -> LayerNorm ->
    fc_out1 (IoU branch) and fc_out2 (contrastive branch)."""

    def __init__(self, bert: nn.Module, dim: int, joint_size: int):
        super().__init__()
        self.bert = bert  # the name matters: parameters with "bert" get lr x 0.1 and the freeze
        self.layernorm = nn.LayerNorm(dim)
        self.fc_out1 = nn.Linear(dim, joint_size)
        self.fc_out2 = nn.Linear(dim, joint_size)

    def forward(self, tokens: torch.Tensor, wordlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] < wordlens[:, None]).float()
        hidden = self.bert(input_ids=tokens, attention_mask=mask)[0]  # S x L x dim
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / wordlens.unsqueeze(-1).to(hidden.dtype)
        pooled = self.layernorm(pooled)
        return self.fc_out2(pooled), self.fc_out1(pooled)  # (contrastive, iou)


# -- data -----------------------------------------------------------------------------------------


class VideoSentences(torch.utils.data.Dataset):
    """One item per video: its features and every (cleaned) sentence with its GT and IoU map."""

    def __init__(self, queries: list, files: list[FeatureFile], tokenizer, cfg: MMN.Config):
        self.files, self.cfg = files, cfg
        self.videos: list[dict] = []
        by_video: dict[str, list] = {}
        for q in queries:
            by_video.setdefault(q.video_id, []).append(q)
        for vid, qs in by_video.items():
            duration = float(qs[0].duration)
            moments = torch.tensor([q.moment for q in qs], dtype=torch.float32)
            encodings = tokenizer.encode_batch([q.sentence for q in qs])
            self.videos.append({
                "vid": vid,
                "duration": duration,
                "qids": [q.qid for q in qs],
                "moments": moments,
                "iou2d": torch.stack([moment_to_iou2d(m, cfg.num_clips, duration) for m in moments]),
                "tokens": [torch.tensor(e.ids[: cfg.max_tokens], dtype=torch.long) for e in encodings],
            })

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        v = self.videos[i]
        feats = load_video(self.files, v["vid"], l2norm=self.cfg.l2norm, num_clips=self.cfg.num_pre_clips,
                           edges_dtype="float32")  # avgfeats: torch float32 bin edges
        return {**v, "feats": torch.from_numpy(feats)}


def collate_videos(items: list[dict]) -> dict:
    tokens = [t for it in items for t in it["tokens"]]
    return {
        "feats": torch.stack([it["feats"] for it in items]),
        "tokens": pad_sequence(tokens, batch_first=True, padding_value=0),
        "wordlens": torch.tensor([len(t) for t in tokens], dtype=torch.long),
        "num_sentences": [len(it["tokens"]) for it in items],
        "iou2d": [it["iou2d"] for it in items],
        "moments": [it["moments"] for it in items],
        "durations": [it["duration"] for it in items],
        "qids": [it["qids"] for it in items],
        "vids": [it["vid"] for it in items],
    }


def moment_detr_lines(qids, vids, windows, scores, valid) -> list[dict]:
    """Moment-DETR prediction lines: the valid windows of each query, best first."""
    return [{"qid": q, "vid": v, "pred_relevant_windows": [
        [round(float(a), 4), round(float(b), 4), round(float(c), 6)] for (a, b), c in zip(w[m], s[m], strict=True)]}
        for q, v, w, s, m in zip(qids, vids, windows, scores, valid, strict=True)]


# -- the model ------------------------------------------------------------------------------------


class MMN(MMNSpec, GroundingModel):
    def __init__(self, cfg: MMNConfig, data: DataContext):
        super().__init__(cfg, data)
        if cfg.num_pre_clips % cfg.num_clips:
            raise ValueError(f"model.mmn: num_pre_clips {cfg.num_pre_clips} must be a multiple of num_clips {cfg.num_clips}")
        self.feature_files = [FeatureFile(data.feature_file(f)) for f in cfg.features]
        input_size = cfg.input_size or sum(f.dim() for f in self.feature_files)
        self.featpool = FeatAvgPool(input_size, cfg.feat_hidden, cfg.pool_kernel, cfg.num_pre_clips // cfg.num_clips)
        self.feat2d = SparseMaxPool(cfg.pooling_counts, cfg.num_clips)
        self.proposal_conv = ProposalConv(cfg.feat_hidden, cfg.pred_hidden, cfg.pred_kernel, cfg.pred_layers,
                                          cfg.joint_size, self.feat2d.mask2d)
        bert, dim = self._build_bert(cfg, data)
        self.text_encoder = TextEncoder(bert, dim, cfg.joint_size)
        self._epoch = 1

    # text encoder and tokenizer ------------------------------------------------------------------

    def _build_bert(self, cfg: MMNConfig, data: DataContext) -> tuple[nn.Module, int]:
        from transformers import DistilBertConfig, DistilBertModel

        if cfg.text_encoder:
            path = Path(cfg.text_encoder)
            weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"model.mmn.text_encoder: {path} holds none of {WEIGHT_FILES}")
            self._weights = weights_record(weights, cfg.text_encoder_sha256)
            bert = DistilBertModel.from_pretrained(str(path))
            self.tokenizer = wordpiece_from_vocab(path / "vocab.txt")
            return bert, bert.config.dim
        self._weights = weights_record(None)
        sentences = [q.sentence for q in data.queries("train")] if "train" in data.splits else []
        self.tokenizer = train_wordpiece(sentences, cfg.vocab_size, "model.mmn.vocab_size")
        config = DistilBertConfig(vocab_size=cfg.vocab_size, dim=cfg.text_dim, n_layers=cfg.text_layers,
                                  n_heads=cfg.text_heads, hidden_dim=cfg.text_ffn,
                                  max_position_embeddings=max(512, cfg.max_tokens), pad_token_id=0)
        return DistilBertModel(config), cfg.text_dim

    def get_extra_state(self) -> dict:
        return {"tokenizer": self.tokenizer.to_str()}

    def set_extra_state(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(state["tokenizer"])

    def weights_provenance(self) -> dict[str, str]:
        return {"text_encoder": self._weights}

    # data ----------------------------------------------------------------------------------------

    def build_dataset(self, split: str, data: DataContext, train: bool) -> VideoSentences:
        return VideoSentences(data.queries(split), self.feature_files, self.tokenizer, self.cfg)

    def collate(self, items: list[dict]) -> dict:
        return collate_videos(items)

    # forward ---------------------------------------------------------------------------------------

    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """(contrastive map, IoU map) (B, C, N, N) and per-video sentence features of both heads."""
        map2d = self.feat2d(self.featpool(batch["feats"]))
        map2d, map2d_iou = self.proposal_conv(map2d)
        sent, sent_iou = self.text_encoder(batch["tokens"], batch["wordlens"])
        sizes = batch["num_sentences"]
        return map2d, map2d_iou, list(sent.split(sizes)), list(sent_iou.split(sizes))

    def on_train_epoch_start(self, epoch: int) -> None:
        self._epoch = epoch
        for p in self.text_encoder.bert.parameters():
            p.requires_grad_(epoch > self.cfg.freeze_bert)

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        cfg, mask = self.cfg, self.feat2d.mask2d
        map2d, map2d_iou, sent, sent_iou = self.encode(batch)
        scores = iou_scores(map2d_iou, sent_iou, mask)
        loss_iou = scaled_iou_bce_loss(torch.cat(scores), torch.cat(batch["iou2d"]), mask, cfg.min_iou, cfg.max_iou)
        loss_vid, loss_sent = mutual_matching_loss(
            map2d, sent, batch["iou2d"], batch["moments"], mask,
            tau_video=cfg.tau_video, tau_sent=cfg.tau_sent, margin=cfg.margin, top_k=cfg.top_k,
            neg_iou=cfg.neg_iou, sent_removal_iou=cfg.sent_removal_iou)
        loss_vid, loss_sent = loss_vid * cfg.contrastive_weight, loss_sent * cfg.contrastive_weight
        # after ONLY_IOU epochs the contrastive terms are down-weighted x0.01 (not removed)
        factor = 1.0 if ctx.epoch <= cfg.only_iou else 0.01
        loss = loss_iou + (loss_sent + loss_vid) * factor
        return {"loss": loss, "loss_iou": loss_iou.detach(), "loss_vid": loss_vid.detach(),
                "loss_sent": loss_sent.detach()}

    def configure_optimizers(self) -> Optimization:
        cfg = self.cfg
        bert = [p for n, p in self.named_parameters() if "bert" in n]
        base = [p for n, p in self.named_parameters() if "bert" not in n]
        opt = torch.optim.AdamW([{"params": base}, {"params": bert, "lr": cfg.lr * cfg.bert_lr_scale}],
                                lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
        return Optimization([opt], [sched], interval="epoch")

    # inference -------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_maps(self, batch: dict) -> list[torch.Tensor]:
        """Per video: (S_i, N, N) fused scores ((cos+1)/2)^pow * iou_score."""
        mask = self.feat2d.mask2d
        map2d, map2d_iou, sent, sent_iou = self.encode(batch)
        ious = iou_scores(map2d_iou, sent_iou, mask)
        cons = contrastive_scores(map2d, sent, mask)
        return [fuse_scores(c.float(), i.float(), self.cfg.score_pow) for c, i in zip(cons, ious, strict=True)]

    def predict_step(self, batch: dict) -> list[dict]:
        maps = self.score_maps(batch)
        durations = [d for d, m in zip(batch["durations"], maps, strict=True) for _ in range(len(m))]
        qids = [q for qs in batch["qids"] for q in qs]
        vids = [v for v, m in zip(batch["vids"], maps, strict=True) for _ in range(len(m))]
        windows = rank_moments(torch.cat(maps), self.feat2d.mask2d, durations, self.cfg.nms_threshold,
                               self.cfg.num_windows)
        return moment_detr_lines(qids, vids, *windows)

    def random_predictions(self, queries: list, seed: int) -> list[dict]:
        """Random proposals from MMN's own candidates: uniform random scores over the valid cells,
        then the same NMS and decoding as the model."""
        gen = torch.Generator().manual_seed(seed)
        mask = self.feat2d.mask2d.cpu()
        score2d = torch.rand((len(queries), *mask.shape), generator=gen) * mask
        windows = rank_moments(score2d, mask, [float(q.duration) for q in queries], self.cfg.nms_threshold,
                               self.cfg.num_windows)
        return moment_detr_lines([q.qid for q in queries], [q.video_id for q in queries], *windows)

    def metrics(self, predictions: list[dict], queries: list) -> dict[str, float]:
        windows, valid, gt = windows_from_predictions(predictions, queries, max(self.cfg.recall_ks))
        return grounding_recall_metrics(windows, valid, gt, self.cfg.recall_ks, self.cfg.iou_thresholds)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


