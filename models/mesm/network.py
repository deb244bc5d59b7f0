"""MESMNet, the network on frozen text features, in forward order:

    frozen text encoder (CLIP text tower / GloVe)
    -> input projections (video, words)            sine positions for frames, none for words
    -> FW-MESM enhance encoder (frames attend to words)
    -> SS-MESM segment-sentence reconstructor      (a "recon" token prepended to the words)
    -> text-to-video aligner (frames attend to [recon; words])
    -> DETR encoder (with a global token) + conditional/DAB decoder with anchor refinement
    -> heads: foreground class, span (cx, w), saliency; a second pass with another video's sentence

and, while training, the masked-word reconstruction pass (FW) whose logits feed `loss_rec_fw`.
Also the two samplers of that forward: which words are masked and which foreign sentence each
query gets as its negative.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.mesm.layers import (
    MLP,
    CrossAttentionEncoder,
    CrossAttentionLayer,
    DetrTransformer,
    LinearLayer,
    SegmentSentenceReconstructor,
    input_projection,
    sine_positions,
)
from models.mesm.spans import inverse_sigmoid, pad_groups


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
        official_mask_order: bool = True,
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

        order = official_mask_order  # see CrossAttentionLayer
        self.enhance_encoder = CrossAttentionEncoder(
            CrossAttentionLayer(d, nheads, dim_feedforward, dropout, two_mlp=not share_mlp, official_mask_order=order),
            num_recfw_layers,
        )
        self.t2v_encoder = CrossAttentionEncoder(
            CrossAttentionLayer(d, nheads, dim_feedforward, dropout, official_mask_order=order), t2v_layers
        )
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
                d, nheads, dim_feedforward, dropout, input_dropout, num_recss_layers, official_mask_order=order
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
            video = self.enhance_encoder(video, vid_pos, words, self.txt_positions(words), ~words_mask, ~video_mask)
        encoded = self.t2v_encoder(video, vid_pos, expanded, self.txt_positions(expanded), ~expanded_mask, ~video_mask)
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
        out = self.enhance_encoder(words, self.txt_positions(words), frames, frames_pos, ~frames_mask, ~words_mask,
                                   is_mlm=True)
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


