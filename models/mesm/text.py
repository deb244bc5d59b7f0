"""MESM's text side: the frozen encoders (CLIP ViT-B/32's text tower, GloVe tables), the
`*_tokenized_count.txt` readers, and `MesmTokenizer` (ids, POS weights and masked-word labels
in MESM's three text setups)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.core.provenance import sha256_file, weights_record
from pipeline.nets import clip
from pipeline.nets.checkpoints import WeightsError, check_state_dict
from pipeline.text import vocab
from pipeline.text.vocab import load_glove_pkl, read_glove_text


def build_clip_text_tower() -> nn.Module:
    """CLIP ViT-B/32's text transformer (width 512, 12 layers, 8 heads, context 77, 49408 tokens) via
    open_clip, with QuickGELU as OpenAI's weights need. Its state dict uses OpenAI's key names."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = CLIPTextCfg(context_length=clip.CONTEXT_LENGTH, vocab_size=clip.VOCAB_SIZE, width=512, heads=8, layers=12)
    return _build_text_tower(512, cfg, quick_gelu=True)


def load_clip_text_checkpoint(tower: nn.Module, path: str, expected_sha256: str | None = None) -> str:
    """Load MESM's `clip_text_encoder.pth`: OpenAI CLIP's state dict without `visual.*` (OpenAI's
    `input_resolution`, `context_length`, `vocab_size` entries are dropped if present), strictly.

    Returns the file's sha256 (checked against `expected_sha256` when given).
    """
    digest = weights_record(path, expected_sha256)
    state = clip.read_clip_state_dict(path)
    foreign = sorted(k for k in state if k.startswith("visual.") or k == "logit_scale")
    if foreign:
        raise WeightsError(f"{path}: not a CLIP text-encoder state dict (MESM loads it strictly); "
                           f"unexpected keys {foreign[:3]}... (drop the visual part and logit_scale)")
    check_state_dict(tower, clip.fit_to_model(state, tower), path)
    return digest


class ClipTextEncoder(nn.Module):
    """Token features of CLIP's text tower before the projection (ln_final output), first
    `max_words_l` positions. The attention is causal, so running the tower on those positions only
    gives exactly the first `max_words_l` outputs of the full 77-token pass, at a fraction of the cost.
    fp16 on CUDA (as MESM's convert_weights), fp32 on CPU."""

    def __init__(self, max_words_l: int):
        super().__init__()
        self.tower = build_clip_text_tower()
        self.max_words_l = max_words_l

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids[:, : self.max_words_l]
        t = self.tower
        with torch.autocast("cuda", dtype=torch.float16, enabled=ids.is_cuda):
            x = t.token_embedding(ids) + t.positional_embedding[: ids.shape[1]]
            x = t.transformer(x, attn_mask=t.attn_mask[: ids.shape[1], : ids.shape[1]])
            return t.ln_final(x).float()


class GloveTableEncoder(nn.Module):
    """A frozen lookup table of GloVe vectors, row 0 = padding (zeros).

    `trainable_shape=True` keeps it an nn.Embedding whose weights count as (frozen) parameters, as
    MESM's GloVe-txt encoder; otherwise a buffer, as MESM's glove.pkl path (the dataset hands the
    vectors over and the model has no text-encoder parameters)."""

    def __init__(self, vectors: Tensor, as_parameter: bool):
        super().__init__()
        if as_parameter:
            self.emb = nn.Embedding.from_pretrained(vectors, freeze=True, padding_idx=None)
        else:
            self.register_buffer("table", vectors)

    def forward(self, ids: Tensor) -> Tensor:
        return self.emb(ids) if hasattr(self, "emb") else F.embedding(ids, self.table)


def read_tokenized_count(path: str, column: int, limit: int, cast: Callable = int) -> list:
    """The first `limit` entries of a *_tokenized_count.txt (sorted by count) in one column:
    CLIP: `<token_id> <count>`; GloVe: `<word> <vocab_id> <count>`."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(out) == limit:
                break
            parts = line.split()
            if len(parts) <= column:
                raise ValueError(f"{path}:{lineno}: expected at least {column + 1} columns, got {line!r}")
            out.append(cast(parts[column]))
    return out


class TextSetup(NamedTuple):
    encoder: nn.Module  # frozen: token ids (B, Lw) -> word features (B, Lw, dim)
    dim: int
    glove_pkl: dict | None  # the unpickled glove.pkl the tokenizer also needs (glove_pkl only)
    provenance: str  # the weights' sha256 or "random", for the run's provenance


def build_text_encoder(cfg, vocab_dir: str | Path, seed: int) -> TextSetup:
    """The frozen text encoder `cfg.text_encoder` names (cfg: `MESM.Config`).

    clip       CLIP's text tower, from `text_weights` (MESM's clip_text_encoder.pth) or random init
    glove_pkl  the vectors of `vocab_dir/glove.pkl` (CPL format), a buffer as in MESM
    glove_txt  a GloVe text file over the Vocabulary of GloVe_tokenized_count.txt; words without a
               vector share one random <UNK> vector (seeded)
    """
    if cfg.text_encoder == "clip":
        enc = ClipTextEncoder(cfg.max_words_l)
        if cfg.text_weights:
            digest = load_clip_text_checkpoint(enc.tower, cfg.text_weights, cfg.text_weights_sha256)
        else:
            digest = weights_record(None)
        return TextSetup(enc, 512, None, digest)

    if cfg.text_encoder == "glove_pkl":
        path = f"{vocab_dir}/glove.pkl"
        glove = load_glove_pkl(path)  # a restricted unpickler: plain data only
        vectors = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in glove["id2vec"]]))
        return TextSetup(GloveTableEncoder(vectors, as_parameter=False), vectors.shape[1], glove,
                         f"glove.pkl sha256 {sha256_file(path)}")

    if not cfg.glove_file:
        raise ValueError("model.mesm.glove_file: text_encoder 'glove_txt' needs a GloVe text file")
    vocab_words = sorted(set(read_tokenized_count(f"{vocab_dir}/GloVe_tokenized_count.txt", 0, 10**9, cast=str)))
    found = read_glove_text(cfg.glove_file, cfg.glove_dim, words=vocab_words)
    unk = torch.randn(cfg.glove_dim, generator=torch.Generator().manual_seed(seed))
    rows = [torch.zeros(cfg.glove_dim), unk] + [torch.from_numpy(found[w]) if w in found else unk for w in vocab_words]
    return TextSetup(GloveTableEncoder(torch.stack(rows), as_parameter=True), cfg.glove_dim, None,
                     f"{cfg.glove_file} sha256 {sha256_file(cfg.glove_file)}")


class Tokens(NamedTuple):
    ids: list[int]  # CLIP token ids / GloVe vocabulary ids (0 = padding)
    weights: list[int]  # POS weights (0 for CLIP's SOT/EOT)
    labels: list[int]  # masked-word class per token
    unknown: list[bool]  # token outside the kept vocabulary of `vocab_size` words


class MesmTokenizer:
    """Sentence -> Tokens, in one of MESM's three text setups.

    clip       open_clip's BPE (the same cleaning and merges as MESM's tokenizer), cut to max_words_l - 2
               pieces, [SOT] + pieces + [EOT]; labels from the first V lines of CLIP_tokenized_count.txt,
               then <unknown>=V, <start>=V+1, <end>=V+2 (V+3 classes).
    glove_pkl  nltk word tokens, lower-cased, words missing from glove.pkl's w2id dropped; labels from
               counter.most_common(V), <unknown>=V (V+1 classes).
    glove_txt  nltk word tokens, lower-cased; ids of the Vocabulary of GloVe_tokenized_count.txt words
               (<PAD>=0, <UNK>=1, then sorted words); labels from its first V lines, <unknown>=V.
    """

    def __init__(self, kind: str, vocab_dir: str, vocab_size: int, max_words_l: int, glove_pkl: dict | None = None):

        self.kind, self.vocab_size, self.max_words_l = kind, vocab_size, max_words_l
        # MESM's POS weights (2 for NN/VB/JJ/RB tags, else 1); pipeline.text.vocab falls back to a
        # closed-class word list when nltk's tagger data is absent and names the rule it used.
        self.pos_weights, self.pos_tagger = vocab.pos_weights, vocab.pos_tagger_name()
        if kind == "clip":
            self.bpe = clip.bpe_tokenizer()
            kept = read_tokenized_count(f"{vocab_dir}/CLIP_tokenized_count.txt", 0, vocab_size)
            self.num_classes = vocab_size + 3
        else:
            self.word_tokenize = vocab.word_tokenize  # nltk's NLTKWordTokenizer (no punkt data here)
            self.num_classes = vocab_size + 1
            if kind == "glove_pkl":
                self.w2id = glove_pkl["w2id"]
                kept = [w for w, _ in glove_pkl["counter"].most_common(vocab_size)]
            else:
                count_file = f"{vocab_dir}/GloVe_tokenized_count.txt"
                vocab_words = read_tokenized_count(count_file, 0, 10**9, cast=str)
                self.w2id = {"<PAD>": 0, "<UNK>": 1} | {w: i + 2 for i, w in enumerate(sorted(set(vocab_words)))}
                kept = read_tokenized_count(count_file, 1, vocab_size)
        self.label_of = {k: i for i, k in enumerate(kept)}

    def _label(self, key) -> tuple[int, bool]:
        return (self.label_of[key], False) if key in self.label_of else (self.vocab_size, True)

    def __call__(self, sentence: str) -> Tokens:
        if self.kind == "clip":
            ids = self.bpe.encode(sentence)[: self.max_words_l - 2]
            pieces = [self.bpe.decoder[i].replace("</w>", "") for i in ids]
            weights = [0] + self.pos_weights(pieces) + [0] if pieces else [0, 0]
            labelled = [self._label(i) for i in ids]
            labels = [self.vocab_size + 1] + [lab for lab, _ in labelled] + [self.vocab_size + 2]
            unknown = [False] + [unk for _, unk in labelled] + [False]
            return Tokens([clip.SOT_ID] + ids + [clip.EOT_ID], weights, labels, unknown)
        words = [w.lower() for w in self.word_tokenize(sentence)]
        weights = self.pos_weights(words) if words else []
        if self.kind == "glove_pkl":  # words without a vector are dropped (MESM's NLTKTokenizerWithFeature)
            keep = [i for i, w in enumerate(words) if w in self.w2id]
            words, weights = [words[i] for i in keep], [weights[i] for i in keep]
            ids = [self.w2id[w] for w in words]
            key = words
        else:
            ids = [self.w2id.get(w, 1) for w in words]
            key = ids
        ids, weights, key = ids[: self.max_words_l], weights[: self.max_words_l], key[: self.max_words_l]
        labelled = [self._label(k) for k in key]
        return Tokens(ids, weights, [lab for lab, _ in labelled], [unk for _, unk in labelled])


