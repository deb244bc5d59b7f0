"""Stage `feature_pca`: PCA-reduced video features for MRNet (TACoS C3D 4096-d -> 500-d).

Reads: `features/<model.mrnet.video_pca.source>.h5` and, for `fit_on: train`, the train split of
`dataset` (which videos the PCA is fitted on). Writes: `features/<model.mrnet.feature>.h5` with its
provenance record in the file's attrs.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.params import Params, ParamsError, require_files, subset
from pipeline.progress import log

CODE = ("pipeline/feature_pca.py", "pipeline/features.py", "stages/feature_pca.py")


def run(params: Params, source: str, **_) -> None:
    from pipeline.annotations import load_dataset_split
    from pipeline.feature_pca import pca_feature_file
    from pipeline.provenance import make_record

    cfg = params.model_config_of("mrnet")
    pca = cfg.video_pca
    if pca is None:
        raise ParamsError(f"{source}: key 'model.mrnet.video_pca': not set (nothing to reduce)")
    features = Path(params.merge.out_dir)
    src, out = features / f"{pca.source}.h5", features / f"{cfg.feature}.h5"
    if src == out:
        raise ParamsError(f"{source}: key 'model.mrnet.feature': must differ from video_pca.source ({pca.source})")
    inputs = {f"features.{pca.source}": str(src)}
    if pca.fit_on == "train":
        inputs["dataset.splits.train"] = params.dataset.splits.get("train", "<no 'train' in dataset.splits>")
    require_files(source, inputs)
    fit_videos = None if pca.fit_on == "all" else load_dataset_split(params.dataset, "train").video_ids()
    record = make_record(
        "feature_pca",
        {**subset(params, "dataset"), "model.mrnet.video_pca": pca.model_dump(), "model.mrnet.feature": cfg.feature},
        inputs=inputs,
        code=CODE,
    )
    info = pca_feature_file(src, out, fit_videos, pca.components, record)
    log(f"feature_pca: fitted on {info['fit_videos']} videos ({pca.fit_on}), wrote {info['videos']} -> {out}")
