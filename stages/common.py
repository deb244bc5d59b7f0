"""What several stages read alike: which models decode keeps frames for, and where the queries'
video durations come from (csv files, or decode's records when `dataset.durations` is empty)."""

from __future__ import annotations

from pathlib import Path

from models import MODELS
from pipeline.core.params import Params, ParamsError
from pipeline.media.framestore import durations_path


def frame_models(params: Params) -> list[str]:
    """The models of `models` that read decoded frames themselves (asked of their specs: no model,
    nor torch, is imported)."""
    return [m for m in params.models if MODELS.spec(m).needs(MODELS.config(params, m), params.dataset).frames]


def decodes_videos(params: Params) -> bool:
    """Whether the pipeline decodes `dataset.video_dir` at all: an extracted (not imported) feature
    or a model that reads frames. The same rule makes `vmr dag` write a `decode` stage."""
    return bool(params.extracted_features() or frame_models(params))


def duration_files(params: Params, source: str = "params") -> dict[str, Path]:
    """Where the queries' video durations come from, for formats that need them: the csv files of
    `dataset.durations`, or decode's records of the videos when that is empty. Refused when the
    records would have no maker: every feature imported and no model reading frames means no video
    is decoded (importing usually means there are no videos), so the durations must come from a file."""
    d = params.dataset
    if d.durations_from_decode:
        if not decodes_videos(params):
            raise ParamsError(
                f"{source}: key 'dataset.durations': empty, so the durations would come from decode's records "
                f"({durations_path(params.decode.out_dir)}), but no video is decoded (every feature of `features` "
                "is imported and no model reads frames): set dataset.durations to the csv files with each "
                "video's duration (Charades_v1 csv: columns `id` and `length` in seconds)")
        return {"dataset.durations (empty: decode's records)": durations_path(params.decode.out_dir)}
    if d.format == "charades_sta":
        return {f"dataset.durations.{i}": Path(p) for i, p in enumerate(d.durations)}
    return {}
