"""Features of new videos, made with a checkpoint's recipe by the pipeline's own decode, extract and
merge code, and cached per video by content.

A cache entry is `<cache_dir>/<recipe digest>-<device type>/<video sha256>/`: `<feature>.h5` per feature file the
model reads (a merged HDF5 of the one video, with its merge record), and `video.json` (the id inside
the files, the duration, how it was made). Entries are built in a temporary directory and renamed
into place, so a killed run leaves no half entry. Decode records each video's plan in a temporary
frame store (deleted after extraction) and stores no frame: extraction replays the plan from the
video (pipeline/media/replay.py). A cached video needs neither decode nor extraction again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import h5py
import torch

from extractors import EXTRACTORS
from pipeline.core.atomic import atomic_path, write_json
from pipeline.core.errors import VmrError
from pipeline.core.progress import log, make_progress, track
from pipeline.core.provenance import sha256_file
from pipeline.media.decode import decode_all
from pipeline.media.extract import extract_videos
from pipeline.media.feature_pca import apply_pca, fit_pca
from pipeline.media.features import FeatureFile
from pipeline.media.framestore import FrameStore
from pipeline.media.h5merge import merge_to_hdf5
from pipeline.media.replay import ReplaySource
from pipeline.predict.recipe import FeatureRecipe, Recipe
from stages.extract import build as build_extractor_model

ENTRY_RECORD = "video.json"
WORK_PREFIX = ".tmp-work-"  # + <host>.<pid>. : the process that owns it, so a later run knows it dead


def remove_stale_work(cache_dir: Path) -> int:
    """Delete the work folders (decoded frames) that killed runs left in any entry directory of the
    cache; returns how many. Only those of dead processes on this host: another predict or serve
    may be working beside us, and a cache shared over NFS holds other hosts' folders in flight."""
    host, removed = socket.gethostname(), 0
    for work in Path(cache_dir).glob(f"*/{WORK_PREFIX}*"):
        owner = work.name.removeprefix(WORK_PREFIX).rsplit(".", 2)  # host, pid, random part
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or _alive(int(owner[1])):
            continue
        shutil.rmtree(work, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class VideoError(VmrError):
    """A video that cannot be read (missing, not a video, undecodable)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("VMR_CACHE_DIR") or Path.home() / ".cache" / "vmr" / "predict")


@dataclasses.dataclass
class CachedVideo:
    path: Path  # the video file
    sha256: str
    video_id: str  # its key inside the entry's feature files
    duration: float
    entry: Path  # the cache entry directory

    def feature_file(self, name: str) -> Path:
        return self.entry / f"{name}.h5"


@dataclasses.dataclass
class Counters:
    decoded: int = 0  # videos decoded (each at most once per batch, never when cached)
    extracted: int = 0  # videos whose features were computed
    cache_hits: int = 0


class FeatureCache:
    """`get(paths)` -> a `CachedVideo` per path: from the cache, or decoded and extracted (in one batch)."""

    def __init__(self, recipe: Recipe, cache_dir: Path, device: torch.device):
        self.recipe = recipe
        # CPU and GPU (AMP) features differ in the last bits: one cache per device type
        self.root = Path(cache_dir) / f"{recipe.digest}-{device.type}"
        self.device = device
        remove_stale_work(cache_dir)
        self.counters = Counters()
        self._models: dict[str, tuple[Any, torch.nn.Module, str]] = {}  # extractor name -> (extractor, model, weights)
        self._sha: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: a second query skips hashing
        self._pca: dict[str, tuple] = {}

    # -- identity -----------------------------------------------------------------------------------

    def video_sha256(self, path: Path) -> str:
        try:
            st = path.stat()
        except OSError as e:
            raise VideoError(f"{path}: cannot read the video ({e.strerror or e})") from None
        if not path.is_file():
            raise VideoError(f"{path}: not a video file")
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._sha:
            self._sha[key] = sha256_file(path)
        return self._sha[key]

    def _load(self, path: Path, sha: str) -> CachedVideo | None:
        entry = self.root / sha
        rec = entry / ENTRY_RECORD
        if not rec.is_file():
            return None
        meta = json.loads(rec.read_text())
        return CachedVideo(path, sha, meta["video_id"], float(meta["duration"]), entry)

    # -- the batch ----------------------------------------------------------------------------------

    def get(self, paths: list[Path]) -> list[CachedVideo]:
        """One CachedVideo per path, in order; the missing ones are made in one decode + extract run."""
        shas = [self.video_sha256(Path(p)) for p in paths]
        found: dict[str, CachedVideo] = {}
        todo: dict[str, Path] = {}
        for p, sha in zip(paths, shas, strict=True):
            cached = found.get(sha) or self._load(Path(p), sha)
            if cached is not None:
                self.counters.cache_hits += sha not in found
                found[sha] = cached
            else:
                todo.setdefault(sha, Path(p))
        if todo:
            found |= self._make(todo)
        return [dataclasses.replace(found[sha], path=Path(p)) for p, sha in zip(paths, shas, strict=True)]

    def _make(self, videos: dict[str, Path]) -> dict[str, CachedVideo]:
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{socket.gethostname()}.{os.getpid()}.", dir=self.root))
        try:
            ids = {sha: sha[:16] for sha in videos}
            extractors = {f.extractor: self._extractor(f) for f in self.recipe.features}
            store = ReplaySource(FrameStore(work / "frames"), {ids[sha]: path for sha, path in videos.items()})
            by_backend: dict[str, list[FeatureRecipe]] = {}
            for f in self.recipe.features:
                by_backend.setdefault(f.decode_backend, []).append(f)
            for backend, recipes in by_backend.items():
                protocols = [extractors[f.extractor][0].protocol() for f in recipes]
                with make_progress() as progress:
                    bar = progress.add_task(f"decode ({backend})", total=len(videos))
                    summary = decode_all({ids[sha]: path for sha, path in videos.items()}, store.root, protocols,
                                         workers=1, backend=backend, on_result=lambda *_, bar=bar: progress.advance(bar),
                                         store_frames="none")
                self.counters.decoded += summary.decoded
                if summary.failed:
                    sha = next(s for s in videos if ids[s] in summary.failed)
                    raise VideoError(f"{videos[sha]}: cannot decode the video: {summary.failed[ids[sha]]}")
            out = {}
            for sha, path in track(videos.items(), "extract"):
                vid = ids[sha]
                record = store.read_record(vid) or {}
                entry_tmp = work / f"entry-{sha}"
                entry_tmp.mkdir()
                for f in self.recipe.features:
                    self._extract_one(f, extractors[f.extractor], store, vid, work, entry_tmp)
                duration = float(record.get("duration") or record.get("stream_duration") or 0.0)
                write_json(entry_tmp / ENTRY_RECORD, {"video_id": vid, "duration": duration, "sha256": sha,
                                                      "file": path.name, "recipe": self.recipe.digest,
                                                      "decode": {k: record.get(k) for k in ("decoder", "codec",
                                                                                              "native_fps")}})
                entry = self.root / sha
                try:
                    os.rename(entry_tmp, entry)  # atomic; fails when the entry exists
                except OSError:
                    if not (entry / ENTRY_RECORD).is_file():
                        raise
                    # made meanwhile by another process from the same inputs: keep that one
                self.counters.extracted += 1
                out[sha] = CachedVideo(path, sha, vid, duration, entry)
            return out
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _extract_one(self, f: FeatureRecipe, ext: tuple, store: ReplaySource, vid: str, work: Path,
                     entry: Path) -> None:
        extractor, model, weights = ext
        npy_dir = work / "npy" / f"{f.extractor}-{vid}"
        summary = extract_videos(extractor, model, self.device, store, [vid], npy_dir, weights)
        if summary.failed:
            raise VideoError(f"{store.videos[vid]}: cannot decode the video: {summary.failed[vid]}")
        merged = entry / f"{f.extractor}.h5" if f.pca else entry / f"{f.name}.h5"
        merge_to_hdf5(npy_dir, merged, dtype=f.merge.get("dtype", "float32"),
                      compression=f.merge.get("compression", "none"), layout=f.merge.get("layout", "flat"),
                      dim=extractor.dim, provenance={"stage": "predict",
                                                     "recipe": json.loads(json.dumps(dataclasses.asdict(f), default=str)),
                                                     "weights": {f.extractor: weights}})
        if f.pca:
            mean, components = self._pca_basis(f)
            with atomic_path(entry / f"{f.name}.h5") as tmp, h5py.File(tmp, "w") as out:
                out.create_dataset(vid, data=apply_pca(FeatureFile(merged)[vid], mean, components))
            merged.unlink()

    def _pca_basis(self, f: FeatureRecipe) -> tuple:
        """The PCA the training features were reduced with, refitted from the recorded source file
        (the fit is deterministic: same rows, same basis)."""
        if f.name not in self._pca:
            src = FeatureFile(f.pca.source_file)
            with h5py.File(f.pca.source_file, "r") as h5:
                videos = sorted(h5.keys())
            fit = videos if f.pca.fit_videos is None else sorted(set(f.pca.fit_videos) & set(videos))
            mean, components, _ = fit_pca((src[v] for v in fit), f.pca.components)
            self._pca[f.name] = (mean, components)
        return self._pca[f.name]

    def _extractor(self, f: FeatureRecipe) -> tuple[Any, torch.nn.Module, str]:
        """The extractor of the recipe, built as the extract stage builds it (same seed, same weights)."""
        if f.extractor not in self._models:
            cls = EXTRACTORS.get(f.extractor)
            located = {"weights": str(f.weights_file)} if f.weights_file else {}  # found from any cwd
            config = cls.Config.model_validate({**f.config, **located, "device": str(self.device)})
            extractor = cls(config)
            key = extractor.protocol().key
            if f.protocol_key is not None and key != f.protocol_key:
                raise VmrError(f"extractor '{f.extractor}': the rebuilt sampling protocol {key} differs from "
                               f"the recorded {f.protocol_key} (extractor code changed since training?)")
            torch.manual_seed(config.seed)
            model, weights = build_extractor_model(extractor)
            if f.weights not in ("unknown", weights):
                log(f"WARNING: extractor '{f.extractor}': weights {weights} differ from the training features' "
                    f"{f.weights} (--allow-recipe-mismatch)")
            self._models[f.extractor] = (extractor, extractor.to_device(model, self.device), weights)
        return self._models[f.extractor]
