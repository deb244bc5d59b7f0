"""Vocabulary files in the seeds' exact formats, GloVe vectors, and POS weights for masked words.

API (stable)
------------
    word_tokenize(text) -> [str]          nltk's NLTKWordTokenizer (see "nltk data" below)
    simple_tokenize(text) -> [str]        MESM's count tokenizer: lower, punctuation -> space, split

    clip_token_counts(sentences, max_pieces=14) -> Counter[token id]   CLIP BPE ids
                                           (`pipeline.nets.clip`; SOT/EOT never counted)
    format_clip_counts(counter) -> text   `token_id count` lines, count-descending (MESM
                                           CLIP_tokenized_count.txt; ties: first appearance)
    glove_word_counts(sentences) -> Counter[word]
    format_glove_counts(counter) -> text  `word vocab_id count` lines, count-descending; vocab ids
                                           alphabetical from 2 (<PAD>=0, <UNK>=1)  (MESM
                                           GloVe_tokenized_count.txt)
    read_glove_text(path, dim, words=None) -> {word: float32 (dim,)}   GloVe text format
    build_glove_pkl(sentences, glove) -> {"w2id", "id2vec", "counter"}  CPL's glove.pkl:
        lower-cased NLTKWordTokenizer tokens that GloVe knows, counted (`counter`), ids in order of
        first appearance after <PAD>=0 (`w2id`), `id2vec` a list of float32 vectors, zeros at 0.
    write_glove_pkl(path, obj)            atomic; pickle protocol 3 naming `numpy.core.multiarray`
                                           so numpy 1.x (the seeds' environments) loads it too
    load_glove_pkl(path) -> dict          restricted unpickler: only dict/list/Counter/ndarray of
                                           numbers are accepted, anything else is GlovePickleError
    pos_weights(tokens) -> [2 | 1]        2 for NN*/VB*/JJ*/RB* tags, else 1 (CNM/MESM)
    pos_tagger_name() -> str              which tagger pos_weights uses (for provenance)

nltk data
---------
`nltk.word_tokenize` needs the punkt sentence splitter and `pos_tag` the perceptron tagger; neither
can be installed here. Tokenising uses `NLTKWordTokenizer` directly: the only difference from
`word_tokenize` is that a period in the middle of a query ("opens the door. then ...") stays
attached to its word, as punkt would otherwise split the query into sentences first. POS weights
use nltk's tagger when its data is installed; otherwise a closed-class word list (determiners,
prepositions, pronouns, conjunctions, particles, numbers, punctuation -> 1, everything else -> 2),
and `pos_tagger_name()` says which was used so stages record it in provenance.
"""

from __future__ import annotations

import io
import os
import pickle
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import write_bytes
from pipeline.core.errors import VmrError
from pipeline.nets.clip import bpe_tokenizer

PAD, UNK = "<PAD>", "<UNK>"


# -- tokenizers -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _nltk_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    return _nltk_tokenizer().tokenize(text)


_PUNCTUATION_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})


def simple_tokenize(text: str) -> list[str]:
    return text.lower().translate(_PUNCTUATION_TO_SPACE).split()


# -- tokenized count files (MESM) -------------------------------------------------------------


def clip_token_counts(sentences: Iterable[str], max_pieces: int = 14) -> Counter:
    """BPE ids per sentence, truncated to `max_pieces` (MESM: max_words_l 16 minus SOT/EOT)."""
    tok = bpe_tokenizer()
    counts: Counter = Counter()
    for s in sentences:
        counts.update(tok.encode(s)[:max_pieces])
    return counts


def format_clip_counts(counts: Counter) -> str:
    return "".join(f"{token} {n}\n" for token, n in counts.most_common())


def glove_word_counts(sentences: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for s in sentences:
        counts.update(simple_tokenize(s))
    return counts


def glove_vocab_ids(words: Iterable[str]) -> dict[str, int]:
    """MESM's Vocabulary: <PAD>=0, <UNK>=1, then the words in alphabetical order."""
    return {PAD: 0, UNK: 1, **{w: i for i, w in enumerate(sorted(set(words)), start=2)}}


def format_glove_counts(counts: Counter) -> str:
    ids = glove_vocab_ids(counts)
    return "".join(f"{w} {ids[w]} {n}\n" for w, n in counts.most_common())


# -- GloVe vectors ----------------------------------------------------------------------------


class GloveError(VmrError, ValueError):
    """A malformed GloVe text file (names file and line)."""


def read_glove_text(path: str | os.PathLike, dim: int = 300, words: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Vectors of a GloVe text file (`word v1 ... v_dim` per line), only for `words` when given.

    Words may contain spaces in some GloVe releases (840B), so the vector is the last `dim` fields.
    The first occurrence of a word wins, as in a dict built while reading.
    """
    wanted = None if words is None else set(words)
    vectors: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) < dim + 1:
                if not line.strip():
                    continue
                raise GloveError(f"{path}:{lineno}: expected a word and {dim} numbers, got {len(parts) - 1} fields")
            word = " ".join(parts[:-dim])
            if (wanted is not None and word not in wanted) or word in vectors:
                continue
            try:
                vectors[word] = np.asarray(parts[-dim:], dtype=np.float32)
            except ValueError:
                raise GloveError(f"{path}:{lineno}: word {word!r}: vector is not {dim} numbers") from None
    return vectors


def build_glove_pkl(sentences: Iterable[str], glove: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """CPL's glove.pkl from sentences (in order: CPL counted train then test) and GloVe vectors."""
    counter: Counter = Counter()
    w2id: dict[str, int] = {PAD: 0}
    dim = len(next(iter(glove.values()))) if glove else 300
    id2vec: list[np.ndarray] = [np.zeros(dim, dtype=np.float32)]
    for sentence in sentences:
        for word in word_tokenize(sentence.lower()):
            if word not in glove:  # words GloVe lacks (typos) are neither counted nor given an id
                continue
            counter[word] += 1
            if word not in w2id:
                w2id[word] = len(id2vec)
                id2vec.append(np.asarray(glove[word], dtype=np.float32))
    return {"w2id": w2id, "id2vec": id2vec, "counter": counter}


class _Numpy1Pickler(pickle._Pickler):  # the pure-Python pickler lets us name globals
    """Writes numpy 2's `numpy._core.*` globals under their numpy 1 name `numpy.core.*` (numpy 2
    still resolves that name), so the file loads in the seeds' numpy 1.x environments."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            self.write(pickle.GLOBAL + module.replace("numpy._core", "numpy.core").encode() + b"\n"
                       + (name or obj.__qualname__).encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def dumps_glove_pkl(obj: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    _Numpy1Pickler(buf, protocol=3).dump(dict(obj))
    return buf.getvalue()


def write_glove_pkl(path: str | os.PathLike, obj: Mapping[str, Any]) -> None:
    write_bytes(path, dumps_glove_pkl(obj))


class GlovePickleError(VmrError, pickle.UnpicklingError):
    """glove.pkl holds something other than the CPL structure (or code to run)."""


# the only globals the format needs; numpy 1 and numpy 2 module paths of the array rebuilder
_ALLOWED_GLOBALS = {
    ("collections", "Counter"): Counter,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): None,
    ("numpy._core.multiarray", "_reconstruct"): None,
}


class _GloveUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise GlovePickleError(f"{self.source}: refusing to load '{module}.{name}': a glove.pkl holds only "
                                   "dicts, lists, Counter and float arrays")
        if module.endswith("multiarray"):
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        return _ALLOWED_GLOBALS[(module, name)]


def load_glove_pkl(path: str | os.PathLike) -> dict[str, Any]:
    """Load a CPL glove.pkl without executing arbitrary code, and check its structure."""
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            obj = _GloveUnpickler(fh, str(path)).load()
        except GlovePickleError:
            raise
        except Exception as e:  # truncated or corrupt stream
            raise GlovePickleError(f"{path}: not a readable pickle: {e}") from None
    if not isinstance(obj, dict) or set(obj) != {"w2id", "id2vec", "counter"}:
        raise GlovePickleError(f"{path}: expected a dict with keys w2id, id2vec, counter")
    w2id, id2vec, counter = obj["w2id"], obj["id2vec"], obj["counter"]
    if not isinstance(w2id, dict) or not isinstance(id2vec, list) or not isinstance(counter, Counter):
        raise GlovePickleError(f"{path}: w2id must be a dict, id2vec a list and counter a Counter")
    for i, v in enumerate(id2vec):
        if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or v.ndim != 1:
            raise GlovePickleError(f"{path}: id2vec[{i}] is not a 1-d float array")
    if sorted(w2id.values()) != list(range(len(id2vec))):
        raise GlovePickleError(f"{path}: w2id ids must be exactly 0..{len(id2vec) - 1}")
    return obj


# -- POS weights ------------------------------------------------------------------------------

# Closed-class English words (tags DT, PDT, WDT, IN, TO, CC, PRP, PRP$, WP, WP$, EX, MD, RP, POS):
# the words nltk's tagger would give weight 1. Everything else (nouns, verbs incl. auxiliaries,
# adjectives, adverbs) gets 2, as NN/VB/JJ/RB tags do.
_CLOSED_CLASS = frozenset(
    """a an the this that these those some any each every either neither no all both half such what which
    whatever whichever of in on at by for with from into onto to toward towards about above across after
    against along among around as before behind below beneath beside besides between beyond but despite
    down during except inside like near off out outside over past since through throughout till under
    underneath until up upon via within without and or nor so yet because if while although though
    whether than i me my mine myself you your yours yourself he him his himself she her hers herself it
    its itself we us our ours ourselves they them their theirs themselves who whom whose someone
    somebody something anyone anybody anything everyone everybody everything nobody nothing one there
    can could may might must shall should will would 's ' 'd 'll""".split()
)


@lru_cache(maxsize=1)
def _nltk_tagger_available() -> bool:
    try:
        import nltk

        nltk.pos_tag(["a"])
        return True
    except LookupError:
        return False


def pos_tagger_name() -> str:
    if _nltk_tagger_available():
        import nltk

        return f"nltk {nltk.__version__} pos_tag"
    return "fallback: closed-class word list (nltk tagger data not installed)"


def pos_weights(tokens: Sequence[str]) -> list[int]:
    """2 for content words (NN/VB/JJ/RB tags), 1 for the rest."""
    if _nltk_tagger_available():
        import nltk

        return [2 if any(t in tag for t in ("NN", "VB", "JJ", "RB")) else 1 for _, tag in nltk.pos_tag(list(tokens))]
    return [1 if (w.lower() in _CLOSED_CLASS or not any(c.isalpha() for c in w)) else 2 for w in tokens]
