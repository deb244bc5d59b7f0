"""Stage `feature_pca-<model>`: the PCA-reduced video features a model declares in `needs().pca`
(MRNet on TACoS: C3D 4096-d -> 500-d).

Reads: `features/<pca.source>.h5` and, for `fit_on: train`, the train split of `dataset` (which
videos the PCA is fitted on). Writes: `features/<name>.h5` with its provenance record in the
file's attrs.
"""

from __future__ import annotations

from pathlib import Path

from models import MODELS
from pipeline.core.codedeps import stage_code
from pipeline.core.params import Params, ParamsError, require_files, subset
from pipeline.core.progress import log
from pipeline.core.provenance import make_record
from pipeline.media.feature_pca import pca_feature_file
from pipeline.media.framestore import decoded_durations
from pipeline.text.annotations import load_dataset_split
from stages.common import duration_files


def run(params: Params, source: str, model: str, **_) -> None:
    if model not in MODELS:
        raise ParamsError(f"--model {model}: unknown model; expected one of {MODELS.names()}")
    spec = MODELS.get(model).needs(MODELS.config(params, model), params.dataset).pca
    if spec is None:
        raise ParamsError(f"--model {model}: the model reads no PCA-reduced features (nothing to reduce)")
    pca = spec.pca
    features = Path(params.merge.out_dir)
    src, out = features / f"{pca.source}.h5", features / f"{spec.name}.h5"
    if src == out:
        raise ParamsError(f"{source}: key 'model.{model}.{spec.config_keys[-1]}': must differ from the PCA "
                          f"source ({pca.source})")
    inputs = {f"features.{pca.source}": str(src)}
    if pca.fit_on == "train":
        inputs["dataset.splits.train"] = params.dataset.splits.get("train", "<no 'train' in dataset.splits>")
        inputs |= {key: str(path) for key, path in duration_files(params, source).items()}
    require_files(source, inputs)
    fit_videos = None if pca.fit_on == "all" else load_dataset_split(
        params.dataset, "train", decoded_durations(params.dataset, params.decode.out_dir)).video_ids()
    record = make_record(
        f"feature_pca-{model}",
        {**subset(params, "dataset"), f"model.{model}.{spec.config_keys[0]}": pca.model_dump(),
         f"model.{model}.{spec.config_keys[1]}": spec.name},
        inputs=inputs,
        code=stage_code("feature_pca", [MODELS.get(model)]),
    )
    info = pca_feature_file(src, out, fit_videos, pca.components, record)
    log(f"feature_pca-{model}: fitted on {info['fit_videos']} videos ({pca.fit_on}), wrote {info['videos']} -> {out}")
