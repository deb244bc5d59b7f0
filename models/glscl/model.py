"""GLSCL: Global-Local Semantic Consistent Learning for text-video retrieval (Zhang et al., TIP 2025).

A clean-room reimplementation of the released code (zchoi/GLSCL, a fork of DiCoSA); the facts it
follows are in `docs/glscl.md` and the spec `../shared/reference/glscl.md`. In short:

    frames --CLIP ViT (CLS)--> F0 [B,T,D] --4-layer temporal transformer (init: CLIP text blocks 0-3)--> F = F0 + TT(F0+P)
    caption --CLIP text--> all token features H [A,L,D] and the EOT feature c [A,D]

    global (parameter-free):  v_ab = sum_t softmax_t(<c_a, f_bt> / tau) m_bt f_bt ;  S_g = cos(c_a, v_ab)
    local (shared):            U_b = Dec(Q, F_b), W_a = Dec(Q, H_a) (Nq learnable queries, one 3-layer decoder)
                               S_l = mean_q cos(W_aq, U_bq)
    score = S_g + lambda * S_l ;  loss = symmetric InfoNCE(exp(logit_scale) * score) + IDL + ICL

The released code's quirks are flags whose defaults reproduce it (`Config`, section "§7 quirks").
Inference encodes each text and each video once (`encode_text` / `encode_video`) and scores
pairs in blocks with `similarity`, which has no learned weights. The items come from `data.py`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from models.glscl.data import (
    FeatureClips,
    FrameClips,
    PairDataset,
    TextDataset,
    VideoDataset,
    retrieval_pairs,
)
from models.specs.glscl import GLSCLConfig, GLSCLSpec
from pipeline.core.params import NonNegative
from pipeline.core.provenance import weights_record
from pipeline.media.features import feature_statistics
from pipeline.nets.checkpoints import check_state_dict
from pipeline.nets.clip import (
    VOCAB_SIZE,
    fit_to_model,
    read_clip_state_dict,
    without_image_tower,
)
from pipeline.training.evaluation import evaluate_retrieval
from pipeline.training.trainer import (
    DataContext,
    Optimization,
    RetrievalModel,
    RetrievalResult,
    StepContext,
)

# -- building blocks --------------------------------------------------------------------------------


def _clip_tower(cfg: Any, with_visual: bool) -> nn.Module:
    """An open_clip CLIP with OpenAI's QuickGELU (the OpenAI weights were trained with it)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width,
                                 patch_size=cfg.patch_size, image_size=cfg.image_size),
        text_cfg=CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                             width=cfg.text_width, heads=max(1, cfg.text_width // 64), layers=cfg.text_layers),
        quick_gelu=True,
    )
    if not with_visual:
        model.visual = None  # frozen precomputed frame features: the image tower is never run
    return model


class _TemporalTransformer(nn.Module):
    """CLIP-style pre-LN blocks over frames; block names match CLIP's text `resblocks` so they load from it."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        from open_clip.transformer import QuickGELU, ResidualAttentionBlock

        self.heads = heads
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, act_layer=QuickGELU, batch_first=True) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The released code masks padded frames as keys with an additive -1e6 (not -inf).
        additive = (1.0 - mask.to(x.dtype))[:, None, :] * -1e6  # [B,1,T]
        additive = additive.expand(-1, x.shape[1], -1).repeat_interleave(self.heads, dim=0)
        for block in self.resblocks:
            x = block(x, attn_mask=additive)
        return x


def _init_like_dicosa(module: nn.Module) -> None:
    """DiCoSA's `init_weights`: N(0, 0.02) for Linear/Embedding weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, 0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()
    if isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()
    if isinstance(module, nn.MultiheadAttention):  # its in_proj is a bare Parameter, not a Linear
        module.in_proj_weight.data.normal_(0.0, 0.02)
        module.in_proj_bias.data.zero_()


# -- distributed --------------------------------------------------------------------------------------


def all_gather_local_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` over ranks; the gradient flows back only into this rank's own slice.

    This is the released code's `AllGather` (its backward returns `grad[rank*B:(rank+1)*B]` with no
    all-reduce): every rank computes the same loss on the global batch, and DDP averages gradients.
    With one process it is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t  # keep the autograd edge for the local slice only
    return torch.cat(parts, dim=0)


# -- the model ------------------------------------------------------------------------------------


class GLSCL(GLSCLSpec, RetrievalModel):
    def __init__(self, cfg: GLSCLConfig | None = None, data: DataContext | None = None):
        cfg = cfg or GLSCLConfig()
        super().__init__(cfg, data)
        self.cfg = cfg
        self._data = data
        d = cfg.embed_dim
        self.clip = _clip_tower(cfg, with_visual=cfg.input == "frames")
        if self.clip.visual is not None:  # frozen in the released code
            self.clip.visual.conv1.weight.requires_grad_(False)
        self.clip.token_embedding.weight.requires_grad_(cfg.train_token_embedding)

        # temporal module (`seqTransf`): positions + CLIP-style blocks, initialised from CLIP's text side
        self.frame_position_embeddings = nn.Embedding(cfg.context_length, d)
        self.temporal = _TemporalTransformer(d, cfg.temporal_layers, max(1, d // 64))
        self.frame_position_embeddings.apply(_init_like_dicosa)
        self.temporal.apply(_init_like_dicosa)

        # local interaction: learnable queries and PyTorch-default post-LN decoders (the released code
        # creates them after its DiCoSA init, so they keep their own init)
        init = torch.rand if cfg.query_init == "uniform" else (lambda *s: torch.randn(*s) * 0.02)
        self.video_queries = nn.Parameter(init(cfg.num_queries, d))  # `spatial_queries`
        self.text_queries = nn.Parameter(init(cfg.num_queries, d))  # `noun_queries` (unused when shared)
        self.text_decoder = self._decoder()  # `transformer_decoder_noun`: both modalities when shared
        self.video_decoder = self._decoder()  # `transformer_decoder_spatial` (unused when shared)

        self._weights = weights_record(cfg.weights, cfg.weights_sha256)
        if cfg.weights is not None:
            self.load_clip_weights(cfg.weights)
        self._init_temporal_from_clip_text()

    def _decoder(self) -> nn.TransformerDecoder:
        c = self.cfg
        layer = nn.TransformerDecoderLayer(c.embed_dim, c.decoder_heads, dim_feedforward=4 * c.embed_dim,
                                           dropout=c.decoder_dropout, batch_first=True)
        return nn.TransformerDecoder(layer, num_layers=c.decoder_layers)

    @torch.no_grad()
    def _init_temporal_from_clip_text(self) -> None:
        """Copy CLIP's text positional embedding and its first text blocks (the released 'init trick')."""
        if self.cfg.text_width != self.cfg.embed_dim:
            return  # shapes differ (cheap configs): keep the DiCoSA random init
        n = self.frame_position_embeddings.weight.shape[0]
        self.frame_position_embeddings.weight.copy_(self.clip.positional_embedding[:n])
        for i, block in enumerate(self.temporal.resblocks[: self.cfg.text_layers]):
            block.load_state_dict(self.clip.transformer.resblocks[i].state_dict())

    def load_clip_weights(self, path: str) -> None:
        """Load OpenAI's `ViT-B-32.pt` (TorchScript archive as downloaded, or its state dict) into `clip`."""
        state = read_clip_state_dict(path)
        if self.clip.visual is None:  # frozen features: the image tower is not built
            state = without_image_tower(state)
        check_state_dict(self.clip, fit_to_model(state, self.clip), path)

    def weights_provenance(self) -> dict[str, str]:
        return {"clip": self._weights}

    # -- optimisation -------------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """BertAdam groups as released: CLIP at lr*coef_lr; only names containing 'bias' skip decay.

        (The released no-decay list names 'LayerNorm.weight', which no module here is called, so
        LayerNorm weights are decayed; we reproduce that.)
        """
        c = self.cfg
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault((name.startswith("clip."), "bias" in name), []).append(p)
        return [
            {"params": ps, "lr": c.lr * (c.coef_lr if is_clip else 1.0),
             "weight_decay": 0.0 if no_decay else c.weight_decay}
            for (is_clip, no_decay), ps in sorted(groups.items())
        ]

    def configure_optimizers(self) -> Optimization:
        c = self.cfg
        steps = math.ceil(len(self._train_pairs()) / c.batch_size) * c.epochs
        optimizer = BertAdam(self.param_groups(), lr=c.lr, max_grad_norm=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step / max(1, steps), c.warmup_proportion))
        return Optimization([optimizer], [schedule], interval="step")

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the learnable temperature after every optimiser step: exp(logit_scale) <= 100."""
        self.clip.logit_scale.clamp_(max=math.log(self.cfg.max_logit_scale))

    def on_after_optimizer_step(self, index: int) -> None:
        self.after_step()

    # -- encoders -----------------------------------------------------------------------------------

    def encode_text_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP text with a causal + key-padding mask -> (all token features [A,L,D], EOT feature [A,D])."""
        clip, L = self.clip, ids.shape[1]
        x = clip.token_embedding(ids) + clip.positional_embedding[:L]
        heads = clip.transformer.resblocks[0].attn.num_heads
        causal = torch.full((L, L), float("-inf"), device=ids.device).triu_(1)
        pad = torch.zeros(mask.shape, device=ids.device).masked_fill_(mask == 0, float("-inf"))[:, None, :]
        x = clip.transformer(x, attn_mask=(causal[None] + pad).repeat_interleave(heads, dim=0))
        hidden = clip.ln_final(x) @ clip.text_projection
        eot = hidden[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]  # EOT has the largest id
        return hidden, eot

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """[B,T,3,H,W] normalised frames -> per-frame CLIP image embeddings (CLS, ln_post, proj) [B,T,D]."""
        if self.clip.visual is None:
            raise ValueError("model.glscl.input is 'features': this model has no image tower")
        b, t = frames.shape[:2]
        return self.clip.visual(frames.flatten(0, 1)).view(b, t, -1)

    def temporal_module(self, f0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """F = F0 + TT(F0 + P) (`seqTransf`)."""
        pos = self.frame_position_embeddings.weight[: f0.shape[1]]
        return f0 + self.temporal(f0 + pos, mask)

    def encode_video_input(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f0 = self.frame_embeddings(video) if video.dim() == 5 else video  # [B,T,D]: frozen features
        return self.temporal_module(f0.float(), mask)

    def local_concepts(self, memory: torch.Tensor, mask: torch.Tensor, modality: str) -> torch.Tensor:
        """Nq query outputs of the (shared) decoder over a memory, each row L2-normalised: [N,Nq,D]."""
        c = self.cfg
        queries = self.video_queries if (modality == "video" or c.query_share) else self.text_queries
        decoder = self.text_decoder if (modality == "text" or c.decoder_share) else self.video_decoder
        key_padding = (mask == 0) if c.decoder_memory_mask else None
        out = decoder(queries.expand(memory.shape[0], -1, -1), memory, memory_key_padding_mask=key_padding)
        return F.normalize(out, dim=-1)

    # -- pairwise scores (no learned weights) -------------------------------------------------------

    def global_score(self, eot: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Text-conditioned frame pooling, S_g[a,b] = cos(c_a, sum_t w_abt f_bt): [A,D],[B,T,D],[B,T] -> [A,B]."""
        logits = torch.einsum("ad,btd->abt", eot, frames) / self.cfg.temperature
        mask = mask.to(frames.dtype)
        if self.cfg.gim_mask == "after_softmax":  # released: softmax over all T slots, then zero the padding
            weights = logits.softmax(dim=-1) * mask[None]
        else:
            weights = logits.masked_fill(mask[None] == 0, float("-inf")).softmax(dim=-1)
        pooled = torch.einsum("abt,btd->abd", weights, frames)
        return torch.einsum("ad,abd->ab", F.normalize(eot, dim=-1), F.normalize(pooled, dim=-1))

    @staticmethod
    def local_score(text_concepts: torch.Tensor, video_concepts: torch.Tensor) -> torch.Tensor:
        """S_l[a,b] = mean_q <W_aq, U_bq> of normalised query outputs (query q meets only query q)."""
        return torch.einsum("aqd,bqd->ab", text_concepts, video_concepts) / text_concepts.shape[1]

    def pair_scores(self, eot, text_concepts, frames, mask, video_concepts) -> torch.Tensor:
        """The final score S_g + lambda * S_l of every (text, video) pair: [A,B]."""
        return (self.global_score(eot, frames, mask)
                + self.cfg.local_weight * self.local_score(text_concepts, video_concepts))

    # -- retrieval contract: encode each side once, score blocks of pairs ---------------------------

    def encode_text(self, batch: dict) -> dict:
        tokens, eot = self.encode_text_tokens(batch["ids"], batch["mask"])
        texts = {"text": list(batch["text"])} if "text" in batch else {}  # the dataset's batches carry it
        return {"qid": list(batch["qid"]), "vid": list(batch["vid"]), **texts,
                "emb": (eot, self.local_concepts(tokens, batch["mask"], "text"))}

    def encode_video(self, batch: dict) -> dict:
        frames = self.encode_video_input(batch["video"], batch["mask"])
        return {"vid": list(batch["vid"]),
                "emb": (frames, batch["mask"].to(frames.dtype), self.local_concepts(frames, batch["mask"], "video"))}

    def similarity(self, text_emb: tuple, video_emb: tuple) -> torch.Tensor:
        eot, text_concepts = text_emb
        frames, mask, video_concepts = video_emb
        return self.pair_scores(eot, text_concepts, frames, mask, video_concepts).float()

    def metrics(self, result: RetrievalResult) -> dict[str, float]:
        """CLIP4Clip's R@1/5/10/50, MdR, MnR both ways (shared evaluator), as "t2v_R1", "v2t_MdR", ..."""
        sim = _ground_truth_on_diagonal(result).numpy().astype(np.float32)  # float32: the tie test is exact
        return {f"{direction}_{name.replace('@', '')}": value
                for direction, table in evaluate_retrieval(sim).items() for name, value in table.items()}

    # -- training -----------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor,
                video_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss of a batch of pairs (text i belongs to video i), computed on the batch of ALL ranks."""
        tokens, eot = self.encode_text_tokens(ids, text_mask)
        frames = self.encode_video_input(video, video_mask)
        # every rank sees the global batch; the pairwise head then runs on all of it (as released)
        tokens, eot, frames, text_mask, video_mask = (
            all_gather_local_grad(t) for t in (tokens, eot, frames, text_mask, video_mask))
        text_concepts = self.local_concepts(tokens, text_mask, "text")
        video_concepts = self.local_concepts(frames, video_mask, "video")
        scores = self.pair_scores(eot, text_concepts, frames, video_mask, video_concepts)
        nce = contrastive_loss(scores * self.clip.logit_scale.exp())
        idl = self.cfg.alpha * intra_diversity_loss(video_concepts, self.cfg.idl_margin)
        icl = inter_consistency_loss(video_concepts, text_concepts, self.cfg.beta, self.cfg.icl_target,
                                     self.cfg.icl_normalizer)
        return {"loss": nce + idl + icl, "nce": nce.detach(), "idl": idl.detach(), "icl": icl.detach()}

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        return self(batch["ids"], batch["text_mask"], batch["video"], batch["video_mask"])

    # -- data ---------------------------------------------------------------------------------------

    def _pairs(self, split: str) -> list[tuple[Any, str, str]]:
        """(qid, video id, caption) of a split, in file order."""
        if self._data is None:
            raise ValueError("GLSCL was built without a DataContext: no data to read")
        if self.cfg.vocab_size < VOCAB_SIZE:
            raise ValueError(f"model.glscl.vocab_size {self.cfg.vocab_size}: CLIP's BPE tokenizer needs {VOCAB_SIZE}")
        return retrieval_pairs(self.cfg, self._data, split)

    def _train_pairs(self) -> list:
        return self._pairs("train")

    def _video_source(self, data: DataContext, train: bool):
        if self.cfg.input == "features":
            path = data.feature_file(self.cfg.feature)
            center = None
            if self.cfg.feature_center:  # the mean training frame feature (float64 sums)
                center, _ = feature_statistics(path, {vid for _, vid, _ in self._pairs("train")})
            return FeatureClips(path, self.cfg.max_frames, center=center)
        return FrameClips(data.frames_dir, self.cfg.max_frames, self.cfg.image_size,
                          augment=train and self.cfg.augment, seed=data.seed)

    def build_dataset(self, split: str, data: DataContext, train: bool) -> Dataset:
        self._data = data
        return PairDataset(self._pairs(split), self._video_source(data, train), self.cfg.max_words)

    def build_eval_datasets(self, split: str, data: DataContext) -> tuple[Dataset, Dataset]:
        self._data = data
        pairs = self._pairs(split)
        videos = list(dict.fromkeys(vid for _, vid, _ in pairs))  # first-appearance order
        return TextDataset(pairs, self.cfg.max_words), VideoDataset(videos, self._video_source(data, False))


def _ground_truth_on_diagonal(result: RetrievalResult) -> torch.Tensor:
    """Reorder the video columns so that text i's video is column i (single-caption test sets)."""
    column = {vid: j for j, vid in enumerate(result.video_vids)}
    if len(result.text_vids) != len(column) or set(result.text_vids) != set(column):
        raise ValueError("GLSCL metrics expect exactly one caption per test video "
                         f"({len(result.text_vids)} captions, {len(column)} videos)")
    return result.similarity[:, [column[v] for v in result.text_vids]]


# -- optimiser ------------------------------------------------------------------------------------


class BertAdam(torch.optim.Optimizer):
    """The released optimiser (pytorch-pretrained-bert's BertAdam): Adam with no bias correction,
    each tensor's gradient clipped to `max_grad_norm`, and decoupled weight decay added to the step.
    Written here because torch.optim has no variant without bias correction; the schedule is a
    separate LambdaLR (`warmup_cosine`)."""

    def __init__(self, params, lr: float, b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6,
                 weight_decay: NonNegative = 0.0, max_grad_norm: float = 1.0):
        super().__init__(params, dict(lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["next_m"] = torch.zeros_like(p)
                    state["next_v"] = torch.zeros_like(p)
                grad = p.grad
                if group["max_grad_norm"] > 0:
                    torch.nn.utils.clip_grad_norm_(p, group["max_grad_norm"])
                m, v = state["next_m"], state["next_v"]
                m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
                v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update += group["weight_decay"] * p
                p.add_(update, alpha=-group["lr"])
        return loss


def warmup_cosine(x: float, warmup: float = 0.002) -> float:
    """The released schedule's multiplier at training progress x = step / total steps."""
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


# -- losses -------------------------------------------------------------------------------------------


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with diagonal targets: (CE(rows) + CE(columns)) / 2."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def intra_diversity_loss(concepts: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """IDL (the code's `Inter_Diversity`): push a modality's queries apart.

    G = batch mean of the [Nq,Nq] query Gram matrices; a hinge on every off-diagonal G_ij against both
    G_ii and G_jj, each averaged over Nq(Nq-1) pairs (the released `margin_ranking_loss`, both ways).
    """
    gram = torch.einsum("bqd,bkd->bqk", concepts, concepts).mean(0)
    n = gram.shape[0]
    diag = gram.diagonal()
    off = ~torch.eye(n, dtype=torch.bool, device=gram.device)
    rows = (margin + gram - diag[:, None]).clamp(min=0)[off].sum()
    cols = (margin + gram - diag[None, :]).clamp(min=0)[off].sum()
    return (rows + cols) / max(1, n * (n - 1))


def inter_consistency_loss(video: torch.Tensor, text: torch.Tensor, beta: float, target: float = 0.75,
                           normalizer: str = "num_queries") -> torch.Tensor:
    """ICL (the code's `Intra_Consistency`): align the paired text and video concepts.

    MSE between the batch-mean concepts, plus beta * sum_q (C_qq - target)^2 with
    C = sum_b U_b W_b^T / Nq as released (`normalizer="batch"` divides by B instead).
    """
    cross = torch.einsum("bqd,bkd->qk", video, text)
    cross = cross / (video.shape[1] if normalizer == "num_queries" else video.shape[0])
    diagonal = (cross.diagonal() - target).pow(2).sum()
    return F.mse_loss(video.mean(0), text.mean(0)) + beta * diagonal
