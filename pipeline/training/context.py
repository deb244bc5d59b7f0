"""`DataContext`: where a model finds its data (built from params by the stages, read by the models).

Torch free, apart from the trainer, because `vmr dag` builds one per model to list its inputs and must
not import torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import h5py

from pipeline.core.errors import VmrError
from pipeline.core.progress import log
from pipeline.media.framestore import decoded_durations
from pipeline.text.annotations import load_dataset_split
from pipeline.training.spec import Needs

_QUERY_CACHE: dict[tuple, list] = {}


@dataclasses.dataclass(frozen=True)
class DataContext:
    """Where a model finds its data. Built by the trainer from params; models never read params."""

    dataset: Any  # pipeline.core.params.DatasetParams
    features_dir: Path
    vocab_dir: Path
    frames_dir: Path
    run_dir: Path
    seed: int
    # feature files every query's video must be in (the model's `needs().features`); a query whose
    # video is missing fails up front, or is skipped and counted under `dataset.on_error: skip`
    video_features: tuple[str, ...] = ()

    @property
    def splits(self) -> list[str]:
        return list(self.dataset.splits)

    def feature_file(self, name: str) -> Path:
        return Path(self.features_dir) / f"{name}.h5"

    def input_files(self, needs: Needs) -> dict[str, Path]:
        """{role: path} of every file `needs` names (checked before any work, hashed into provenance)."""
        files = {f"features.{name}": self.feature_file(name) for name in needs.features}
        if needs.query_features is not None:
            files[f"features.{needs.query_features.name}"] = self.feature_file(needs.query_features.name)
        if needs.frames is not None:
            files["decode.out_dir"] = Path(self.frames_dir)
        files |= {f"vocab.{name}": Path(self.vocab_dir) / name for name in needs.vocab}
        files |= {role: Path(path) for role, path in needs.files.items()}
        return files

    def queries(self, split: str) -> list:
        """The parsed, cleaned `pipeline.text.annotations.Query` records of a split (cached)."""
        key = (self.dataset.model_dump_json(), split, self.features_dir, self.frames_dir, self.video_features)
        if key not in _QUERY_CACHE:
            durations = decoded_durations(self.dataset, self.frames_dir)  # None: the dataset has its own
            _QUERY_CACHE[key] = self._with_features(list(load_dataset_split(self.dataset, split, durations)), split)
        return _QUERY_CACHE[key]

    def _with_features(self, queries: list, split: str) -> list:
        for name in self.video_features:
            path = self.feature_file(name)
            if not path.is_file():
                continue  # the stage's input check names the missing file
            with h5py.File(path, "r") as f:
                present = set(f.keys())
            missing = sorted({q.video_id for q in queries} - present)
            if not missing:
                continue
            where = f"split '{split}' ({self.dataset.splits[split]})"
            if self.dataset.on_error != "skip":
                raise MissingVideoError(
                    f"{where}: {len(missing)} video(s) have no features in {path}, e.g. '{missing[0]}' "
                    "(decode failed for them, or the annotation names another video set); "
                    "set dataset.on_error: skip to leave their queries out")
            before = len(queries)
            queries = [q for q in queries if q.video_id in present]
            log(f"WARNING: {where}: skipped {before - len(queries)} queries of {len(missing)} video(s) "
                f"without features in {path} (dataset.on_error: skip), e.g. '{missing[0]}'")
        return queries


class MissingVideoError(VmrError):
    """An annotation names a video that a feature file the model reads does not hold."""
