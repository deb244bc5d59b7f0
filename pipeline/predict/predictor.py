"""`Predictor`: a trained checkpoint asked about new videos, with the features its training read.

    p = Predictor.from_checkpoint("runs/mmn/best.pt")
    p.predict("my.mp4", ["a person opens a door"], top_k=5)   # -> one record per query

The model runs through its own prediction path (`eval_data` -> `predict_step`, as `vmr evaluate`):
for each video, a `PredictionData` (a `DataContext` whose only split holds the given queries, each
with a placeholder window over the whole video) points the model at the cached features of that
video. The recipe comes from the checkpoint's provenance (pipeline/predict/recipe.py); a recipe that
cannot be reproduced is refused (`RecipeMismatch`) unless `allow_recipe_mismatch`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import h5py
import torch

from models import MODELS
from pipeline.core.errors import VmrError
from pipeline.core.params import DatasetParams
from pipeline.core.progress import log
from pipeline.media.extract import resolve_device
from pipeline.predict.features import CachedVideo, FeatureCache, VideoError, default_cache_dir
from pipeline.predict.recipe import FeatureRecipe, Recipe, read_recipe
from pipeline.text.annotations import Query, load_dataset_split
from pipeline.text.sentence_features import (
    encode_sentences,
    load_text_encoder,
    query_key,
    write_query_features,
)
from pipeline.training.distributed import Dist
from pipeline.training.trainer import DataContext, load_for_evaluation, predict

SPLIT = "predict"


class PredictError(VmrError):
    """Bad input to prediction: a missing checkpoint, an empty query, a checkpoint of another model."""


class RecipeMismatch(PredictError):
    """The checkpoint's features cannot be made again as they were made for training."""


@dataclasses.dataclass(frozen=True)
class PredictionData(DataContext):
    """A DataContext with one split, `predict`, holding the queries asked about one video. Every
    split name a model asks for answers with them: models that derive statistics from the train
    split at construction (MESM, CNM) overwrite them with the checkpoint's buffers."""

    asked: tuple = ()

    @property
    def splits(self) -> list[str]:
        return [SPLIT]

    def queries(self, split: str) -> list:
        return list(self.asked)


@dataclasses.dataclass(frozen=True)
class SearchData(PredictionData):
    """Search: the `predict` split holds one query record per searched video; `train` is the real
    training split (a retrieval model may derive statistics from its videos when it reads a split)."""

    train: tuple = ()

    @property
    def splits(self) -> list[str]:
        return [SPLIT, "train"]

    def queries(self, split: str) -> list:
        return list(self.train if split == "train" else self.asked)


class Predictor:
    def __init__(self, recipe: Recipe, *, allow_recipe_mismatch: bool = False, cache_dir: str | Path | None = None,
                 device: str = "cpu"):
        if recipe.mismatches and not allow_recipe_mismatch:
            raise RecipeMismatch(f"{recipe.checkpoint}: the features cannot be made as for training: "
                                 + "; ".join(recipe.mismatches) + " (--allow-recipe-mismatch to go on anyway)")
        for m in recipe.mismatches:
            log(f"WARNING: recipe mismatch, overridden: {m}")
        for note in recipe.notes:
            log(f"note: {note}")
        if recipe.missing:
            raise RecipeMismatch(f"{recipe.checkpoint}: {recipe.missing} cannot be made or found here ("
                                 + "; ".join(recipe.mismatches) + "), and nothing can stand in for them, "
                                 "even with --allow-recipe-mismatch")
        self.recipe = recipe
        self.cls = MODELS.get(recipe.model)
        self.device = resolve_device(device)
        for f in recipe.features:
            if f.device_type and f.device_type != self.device.type:
                log(f"note: the training '{f.name}' features were extracted on {f.device_type}, these on "
                    f"{self.device.type}: expect differences in the last bits (AMP, kernels)")
        self.cache = FeatureCache(recipe, Path(cache_dir) if cache_dir else default_cache_dir(), self.device)
        self._scratch = Path(tempfile.mkdtemp(prefix="vmr-predict-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._scratch, True)
        self._model: tuple[str, Any] | None = None  # (video sha256, model built on its features)
        self._query_encoder = None
        # one call at a time (a web server may call from several threads): the kept model, the cache
        # counters and the scratch files are shared
        self._lock = threading.RLock()

    @classmethod
    def from_checkpoint(cls, path: str | Path, allow_recipe_mismatch: bool = False, cache_dir: str | Path | None = None,
                        device: str = "cpu", model: str | None = None,
                        fallback: dict[str, FeatureRecipe] | None = None) -> Predictor:
        """`model`: the model kind the caller expects (a checkpoint of another kind is refused).
        `fallback`: feature recipes used where the checkpoint's cannot be read (a recorded mismatch)."""
        path = Path(path)
        if not path.is_file():
            raise PredictError(f"{path}: checkpoint not found")
        try:
            recipe = read_recipe(path, model, fallback)
        except ValueError as e:
            raise PredictError(str(e)) from None
        return cls(recipe, allow_recipe_mismatch=allow_recipe_mismatch, cache_dir=cache_dir, device=device)

    # -- the contract ---------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.recipe.model

    @property
    def checkpoint_sha256(self) -> str:
        return self.recipe.checkpoint_sha256

    @property
    def task(self) -> str:
        return self.cls.task

    @property
    def counters(self):
        """decoded / extracted / cache_hits so far (pipeline/predict/features.py `Counters`)."""
        return self.cache.counters

    def predict(self, video: str | Path, queries: list[str], top_k: int = 5) -> list[dict]:
        """One record per query, in input order: the ranked moments of `video` (seconds, best first)."""
        return self.predict_many([(video, queries)], top_k)[0]

    def predict_many(self, jobs: list[tuple[str | Path, list[str]]], top_k: int = 5) -> list[list[dict]]:
        """`predict` for several videos; the uncached ones are decoded and extracted in one batch."""
        if self.task != "grounding":
            raise PredictError(f"model '{self.model_name}' ranks videos (retrieval): use search, not predict")
        if top_k < 1:
            raise PredictError(f"--top-k must be at least 1, got {top_k}")
        for _, queries in jobs:
            check_queries(queries)
        with self._lock:
            videos = self.cache.get([Path(v) for v, _ in jobs])
            return [self._ground(v, queries, top_k) for v, (_, queries) in zip(videos, jobs, strict=True)]

    def thumbnail(self, video_path: str | Path, seconds: float, width: int = 160) -> bytes:
        return thumbnail(video_path, seconds, width)

    # -- retrieval ------------------------------------------------------------------------------------

    def search(self, videos: list[str | Path], query: str, top_k: int | None = None) -> list[dict]:
        """Videos ranked for `query` by a retrieval model (GLSCL): [{"video", "video_sha256", "score"}]."""
        if self.task != "retrieval":
            raise PredictError(f"model '{self.model_name}' is a grounding model: use predict, not search")
        check_queries([query])
        with self._lock:
            cached = self.cache.get([Path(v) for v in videos])
            scores = self._retrieve(cached, query)
        ranked = sorted(zip(cached, scores, strict=True), key=lambda vs: -vs[1])[: top_k or len(cached)]
        return [{"video": str(v.path), "video_sha256": v.sha256, "duration": v.duration, "query": query,
                 "score": round(float(s), 6), **self._identity()} for v, s in ranked]

    # -- internals ------------------------------------------------------------------------------------

    def _identity(self) -> dict:
        out = {"model": self.model_name, "checkpoint": str(self.recipe.checkpoint),
               "checkpoint_sha256": self.checkpoint_sha256}
        if self.recipe.mismatches:
            out["recipe_mismatch"] = list(self.recipe.mismatches)
        return out

    def _context(self, video: CachedVideo, asked: tuple) -> PredictionData:
        """The model's view of one video: its cached feature files, linked into a private directory."""
        features = self._scratch / video.sha256
        features.mkdir(exist_ok=True)
        for f in self.recipe.features:
            link = features / f"{f.name}.h5"
            if not link.exists():
                link.symlink_to(video.feature_file(f.name).resolve())
        return PredictionData(
            dataset=DatasetParams.model_validate(self.recipe.dataset) if self.recipe.dataset else DatasetParams(),
            features_dir=features, vocab_dir=self.recipe.vocab_dir or features, frames_dir=features / "frames",
            run_dir=features / "run", seed=self.recipe.seed, asked=asked)

    def _network(self, video: CachedVideo, data: PredictionData):
        """The model built on this video's features (kept while the next call asks about the same video)."""
        if self._model is None or self._model[0] != video.sha256:
            self._model = None  # free the previous one first
            net, _ = load_for_evaluation(self.cls, self.recipe.checkpoint, data, self.device)
            self._model = (video.sha256, net)
        return self._model[1]

    def _ground(self, video: CachedVideo, queries: list[str], top_k: int) -> list[dict]:
        asked = tuple(Query(dataset="predict", split=SPLIT, video_id=video.video_id, duration=video.duration,
                            moments=((0.0, video.duration),), sentence=q, qid=i) for i, q in enumerate(queries))
        data = self._context(video, asked)
        if self.recipe.query is not None:  # MRNet: the queries through the frozen encoder, as in training
            self._write_query_features(data, queries)
        net = self._network(video, data)
        env = Dist(rank=0, world_size=1, device=self.device)
        try:  # the model's own checks of a query (e.g. CNM: no word of it in the vocabulary)
            eval_data = net.eval_data(SPLIT, data)
        except (ValueError, KeyError) as e:
            raise PredictError(f"{video.path}: {e}") from None
        preds = predict(net, eval_data, max(1, len(queries)), env)
        by_qid = {p["qid"]: p for p in preds}
        out = []
        for i, q in enumerate(queries):
            windows = by_qid[i]["pred_relevant_windows"][:top_k]
            out.append({"video": str(video.path), "video_sha256": video.sha256, "duration": video.duration,
                        "query": q,
                        "moments": [{"start": round(float(s), 3), "end": round(float(e), 3),
                                     "score": round(float(c), 6)} for s, e, c in windows],
                        **self._identity()})
        return out

    def _write_query_features(self, data: PredictionData, queries: list[str]) -> None:
        spec = self.recipe.query
        if self._query_encoder is None:
            encoder = spec.encoder
            # the same construction as stage query_features: seeded random init + vocabulary of the
            # train sentences, or the recorded encoder directory
            torch.manual_seed(spec.seed)
            self._query_encoder = load_text_encoder(encoder.get("encoder_dir"), spec.train_sentences, seed=spec.seed)
        tokenizer, encoder = self._query_encoder
        keys = sorted({query_key(q) for q in queries})
        features = encode_sentences(keys, tokenizer, encoder, spec.encoder.get("batch_size", 32))
        write_query_features(Path(data.features_dir) / f"{spec.name}.h5", keys, features)

    def _retrieve(self, videos: list[CachedVideo], query: str) -> list[float]:
        """Scores of `videos` for `query` through the model's own retrieval path (`eval_data` ->
        `encode_text` / `encode_video` / `similarity`). GLSCL reads, besides the split's videos, the
        training videos (the mean frame feature it removes): the split's feature file links to both,
        and the captions file gives each searched video the query as its caption."""
        cfg = self.cls.Config.model_validate(self.recipe.model_config)
        if getattr(cfg, "source", None) != "video_captions" or getattr(cfg, "input", None) != "features":
            raise PredictError(f"search supports retrieval models trained on feature files with captions "
                               f"(model.{self.model_name}.source: video_captions, input: features)")
        dataset = DatasetParams.model_validate(self.recipe.dataset)
        train = load_dataset_split(dataset, "train")
        train_ids = sorted({q.video_id for q in train})
        root = Path(tempfile.mkdtemp(prefix="search-", dir=self._scratch))
        for f in self.recipe.features:
            if f.path is None:
                raise RecipeMismatch(f"the training feature file '{f.name}' is not on this machine: "
                                     "search needs its training videos")
            # HDF5 external links: one file that reads the training rows and each searched video's
            # cached rows in place (nothing copied)
            with h5py.File(root / f"{f.name}.h5", "w") as h5:
                for vid in train_ids:
                    h5[vid] = h5py.ExternalLink(str(Path(f.path).resolve()), vid)
                for v in videos:
                    if v.video_id not in h5:
                        h5[v.video_id] = h5py.ExternalLink(str(v.feature_file(f.name).resolve()), v.video_id)
        captions = json.loads(Path(dataset.video_captions).read_text())
        captions |= {v.video_id: query for v in videos}
        (root / "captions.json").write_text(json.dumps(captions))
        unique = list({v.video_id: v for v in videos}.values())
        asked = tuple(Query(dataset="predict", split=SPLIT, video_id=v.video_id, duration=v.duration, moments=(),
                            sentence=query, qid=v.video_id) for v in unique)
        data = SearchData(dataset=dataset.model_copy(update={"video_captions": str(root / "captions.json")}),
                          features_dir=root, vocab_dir=self.recipe.vocab_dir or root, frames_dir=root / "frames",
                          run_dir=root / "run", seed=self.recipe.seed, asked=asked, train=tuple(train))
        net, _ = load_for_evaluation(self.cls, self.recipe.checkpoint, data, self.device)
        env = Dist(rank=0, world_size=1, device=self.device)
        result = predict(net, net.eval_data(SPLIT, data), net.cfg.eval_batch_size, env)
        column = {vid: j for j, vid in enumerate(result.video_vids)}
        row = result.similarity[0]  # every text is the query
        return [float(row[column[v.video_id]]) for v in videos]


def check_queries(queries: list[str]) -> None:
    if not queries:
        raise PredictError("no query given (--query TEXT or --queries FILE)")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise PredictError(f"query {i + 1} is empty")


def thumbnail(video_path: str | Path, seconds: float, width: int = 160) -> bytes:
    """One JPEG of the frame shown at `seconds` (the first frame at or after it), `width` pixels wide.

    `seconds` counts from the FILE start, the time zero of decode (pipeline/media/decode.py) and so of
    every moment: an MPEG-TS file typically starts at 1.4 s of its clock, and the frame for a moment
    at t is the one at t + that start."""
    import av

    try:
        with av.open(str(video_path)) as container:
            stream = container.streams.video[0]
            tb = float(stream.time_base)
            target = seconds + (container.start_time / 1e6 if container.start_time is not None else 0.0)
            container.seek(max(0, int(target / tb)), stream=stream, backward=True)
            image = None
            for frame in container.decode(stream):  # frames an edit list discards do not come out
                image = frame.to_image()
                if frame.pts is None or frame.pts * tb >= target - 1e-3:
                    break
    except (av.FFmpegError, IndexError, OSError) as e:
        raise VideoError(f"{video_path}: cannot read a frame at {seconds:.2f} s ({e})") from None
    if image is None:
        raise VideoError(f"{video_path}: no frame at {seconds:.2f} s")
    height = max(1, round(image.height * width / image.width))
    buf = io.BytesIO()
    image.convert("RGB").resize((width, height)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()
