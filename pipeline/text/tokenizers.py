"""Tokenizers shared by the stages and the models: one rule each, in one place.

- `train_wordpiece` / `wordpiece_from_vocab`: the BERT-style uncased WordPiece tokenizer of MMN's text
  encoder and of the frozen DistilBERT query encoder (`pipeline.text.sentence_features`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_from_vocab(vocab_file: Path):
    """DistilBERT's uncased WordPiece tokenizer from a vocab.txt (lower-case, accents stripped)."""
    return BertWordPieceTokenizer(str(vocab_file), lowercase=True)._tokenizer


def train_wordpiece(sentences: list[str], vocab_size: int, setting: str = "vocab_size"):
    """A BERT-style uncased WordPiece tokenizer whose vocabulary is learnt from `sentences`.

    `tokenizers`' WordPiece trainer is not deterministic across processes (hash-map order breaks
    ties between equally frequent merges: 9 of 128 tokens differed between two runs on the synthetic
    set), and a model's vocabulary must be. So the vocabulary is chosen by a fixed rule on the text as
    BERT's own normaliser and pre-tokeniser (from `tokenizers`) split it: the special tokens, every
    character both as a word start and as a ## piece (so nothing is [UNK]), then whole words by
    descending count (ties alphabetical) up to `vocab_size`. `setting` names it in the error when
    `vocab_size` cannot even hold the special tokens and characters.
    """
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = Counter(w for s in sentences for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(s)))
    chars = sorted({c for w in words for c in w})
    vocab = SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    taken = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in taken:
            vocab.append(word)
            taken.add(word)
    if len(vocab) > vocab_size:
        raise ValueError(f"{setting} {vocab_size} < the {len(vocab)} special tokens and characters "
                         "of the training sentences")
    return BertWordPieceTokenizer({t: i for i, t in enumerate(vocab)}, lowercase=True)._tokenizer
