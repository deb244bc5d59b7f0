"""MESM (Liu et al., AAAI'24): modal-enhanced semantic modeling on a DETR-style moment retriever.

A faithful re-implementation of lntzm/MESM (commit 8501bde), written from its description in
`../shared/reference/mesm_cnm.md` part A. This module holds the registered model: its Config (the
`model.mesm` section of params.yaml), the trainer contract, MESM's decoding of the network's
output into windows and its evaluation. The network is in `network.py` (blocks in `layers.py`),
the matcher and losses in `criterion.py`, the text encoders and tokenizer in `text.py`, the
dataset and collate in `data.py`.

Batching follows MESM: one dataset item is one video with all its queries; the model batch is the
total number of queries (`num_clips[g]` queries for video group g, in order).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from models.mesm.criterion import MESMCriterion
from models.mesm.data import MesmVideoDataset, collate_groups
from models.mesm.network import MESMNet
from models.mesm.spans import span_cxw_to_xx
from models.mesm.text import MesmTokenizer, build_text_encoder
from models.specs.mesm import MESMConfig, MESMSpec
from pipeline.core.progress import log
from pipeline.media.features import FeatureFile, feature_statistics
from pipeline.training.distributed import Dist
from pipeline.training.evaluation import evaluate_moment_detr
from pipeline.training.evaluation import temporal_iou as interval_iou
from pipeline.training.trainer import (
    DataContext,
    EvalData,
    GroundingModel,
    Optimization,
    StepContext,
)

# How far model.mesm.clip_len may be from the feature file's own seconds per row. MESM's VGG config
# writes 1/6 s as 0.17 (2% off); a wrong setting is off by a factor (1 s features, 2 s config).
CLIP_LEN_TOLERANCE = 0.05


class MESM(MESMSpec, GroundingModel):
    """MESM under the shared trainer. Defaults: the published Charades-STA C+SF / CLIP config;
    the other published settings are `profiles/mesm_*.yaml`."""

    def __init__(self, cfg: MESMConfig, data: DataContext):
        super().__init__(cfg, data)
        self.files = [FeatureFile(data.feature_file(name)) for name in cfg.features]
        check_clip_len(cfg.clip_len, self.files)
        text = build_text_encoder(cfg, data.vocab_dir, data.seed)
        self.tokenizer = MesmTokenizer(cfg.text_encoder, str(data.vocab_dir), cfg.vocab_size, cfg.max_words_l,
                                       text.glove_pkl)
        self.provenance = {"text_encoder": text.provenance, "pos_tagger": self.tokenizer.pos_tagger}
        vid_dim = sum(f.dim() for f in self.files) + (2 if cfg.use_tef else 0)
        self.net = MESMNet(
            text.encoder, vid_dim, text.dim, self.tokenizer.num_classes,
            hidden_dim=cfg.hidden_dim, nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
            input_dropout=cfg.input_dropout, n_input_proj=cfg.n_input_proj, enc_layers=cfg.enc_layers,
            dec_layers=cfg.dec_layers, t2v_layers=cfg.t2v_layers, num_recfw_layers=cfg.num_recfw_layers,
            num_recss_layers=cfg.num_recss_layers, num_queries=cfg.num_queries, max_words_l=cfg.max_words_l,
            share_mlp=cfg.share_mlp, use_txt_pos=cfg.use_txt_pos, normalize_txt=cfg.normalize_txt,
            rec_fw=cfg.rec_fw, rec_ss=cfg.rec_ss, ss_video="group_concat" if cfg.layout == "qvhighlights" else "query",
            sentence_from_normalized_words=cfg.text_encoder == "glove_pkl",
            official_mask_order=cfg.official_mask_order,
        )
        self.criterion = MESMCriterion(
            cost_span=cfg.set_cost_span, cost_giou=cfg.set_cost_giou, cost_class=cfg.set_cost_class,
            loss_span=cfg.loss_span_coef, loss_giou=cfg.loss_giou_coef, loss_label=cfg.loss_label_coef,
            loss_saliency=cfg.loss_saliency_coef, loss_rec_fw=cfg.loss_recfw_coef, loss_rec_ss=cfg.loss_recss_coef,
            eos_coef=cfg.eos_coef, rank_coef=cfg.rank_coef, use_triplet=cfg.use_triplet,
            saliency_margin=cfg.saliency_margin, iou_gamma=cfg.iou_gamma, recss_tau=cfg.recss_tau,
            multi_window=cfg.layout == "qvhighlights", rec_fw=cfg.rec_fw, rec_ss=cfg.rec_ss,
        )
        if cfg.standardize_video:
            train_videos = {q.video_id for q in data.queries("train")}
            mean, std = feature_statistics(self.files, train_videos, l2norm=cfg.normalize_video, two_pass=True,
                                           min_std=1e-6)
            self.register_buffer("video_mean", torch.from_numpy(mean))
            self.register_buffer("video_std", torch.from_numpy(std))

    # -- contract --------------------------------------------------------------------------------

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

    def predict_all(self, data: EvalData, batch_size: int, env: Dist, num_workers: int) -> list[dict] | None:
        note = batching_note(self.cfg.official_mask_order, len(data.primary), batch_size)
        if note and note not in _NOTED:  # once per process: `vmr predict` rebuilds the model per video
            _NOTED.add(note)
            log(note)
        return super().predict_all(data, batch_size, env, num_workers)

    def metrics(self, predictions: list[dict], queries: list) -> dict[str, float]:
        return mesm_metrics(predictions, queries, self.cfg.r1_thresholds, self.cfg.length_ranges,
                            clip_len=self.cfg.clip_len)

    def weights_provenance(self) -> dict[str, str]:
        return dict(self.provenance)


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


_NOTED: set[str] = set()


def batching_note(official_mask_order: bool, videos: int, batch_size: int) -> str | None:
    """What to tell the user about MESM's batch dependence (docs/mesm.md, "Batch dependence").

    As released, the cross-attention mask is read across the samples of a batch: a query's scores
    move a little with the other videos of its batch, and only then. A batch of one video (`vmr
    predict`, `eval_batch_size: 1`) is not affected; it gives what `official_mask_order: false` gives.
    """
    if not official_mask_order:
        return None
    if videos > 1 and batch_size > 1:
        return (f"note: MESM as released (model.mesm.official_mask_order: true): {batch_size} videos per batch, and "
                "a query's scores depend slightly on the other videos of its batch (the released attention mask "
                "is read across samples); eval_batch_size 1 or official_mask_order false at training time removes it "
                "(docs/mesm.md, Batch dependence)")
    if videos == 1:
        return ("note: MESM: each video's queries run as one batch, which released MESM's batch dependence does "
                "not touch; `vmr evaluate` with eval_batch_size > 1 can score the same query slightly "
                "differently (docs/mesm.md, Batch dependence)")
    return None


def mesm_metrics(predictions: list[dict], queries: list, r1_thresholds, length_ranges, clip_len: float) -> dict[str, float]:
    """Moment-DETR standalone_eval semantics (pipeline.training.evaluation): R1@θ and mIoU of the top-1 window
    (best-matching GT window), mAP over IoU 0.5:0.05:0.95 with up to 10 windows, per length bucket;
    HL-mAP / HIT@1 when saliency scores and QVH annotations are present."""

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
    ious = [max(float(interval_iou(np.array(p["pred_relevant_windows"][0][:2]), np.array(w))) for w in g["relevant_windows"])
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


def check_clip_len(clip_len: float, files: list[FeatureFile]) -> None:
    """Fail when `clip_len` disagrees with the seconds per row a feature file records.

    Files without row times (made by hand, or merged without extract's sidecars) cannot be checked
    and the config is trusted; -1 (TACoS) indexes frames by normalised time and has no seconds.
    """
    if clip_len == -1:
        return
    for f in files:
        seconds = f.seconds_per_row()
        if seconds is not None and abs(clip_len - seconds) > CLIP_LEN_TOLERANCE * seconds:
            raise ValueError(
                f"model.mesm.clip_len is {clip_len} s but {f.path} has a feature row every {seconds:.4g} s "
                f"(its row windows); set model.mesm.clip_len to match the features, or use features "
                f"extracted at {clip_len} s per row")
