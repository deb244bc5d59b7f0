"""Stage `decode`: raw videos -> frame store, for the sampling protocols of the enabled `features`
(less the imported ones) and of the models in `models` that train on pixels (their `needs().frames`).

Every protocol's plan is recorded; frames are written for those `decode.store_frames` keeps and for
the pixel-reading models (they read the frames every epoch); `vmr extract` replays the others."""

from __future__ import annotations

from pathlib import Path

import av
import decord

from extractors import EXTRACTORS
from models import MODELS
from pipeline.core.codedeps import stage_code
from pipeline.core.params import Params, ParamsError, require_files, subset
from pipeline.core.progress import log, make_progress
from pipeline.core.provenance import make_record, write_record
from pipeline.media.decode import decode_all, list_videos, stored_keys, unusable_videos
from stages.common import frame_models


def members(params: Params) -> list[str]:
    """The modules of the registry members whose code decides what decode keeps (named, not imported:
    decode never imports torch)."""
    return [m for f in params.extracted_features() for m in EXTRACTORS.modules(f)] + [
        m for name in frame_models(params) for m in MODELS.modules(name)]


def protocols_for(params: Params) -> list:
    protocols = [EXTRACTORS.spec(name)(EXTRACTORS.config(params, name)).protocol()
                 for name in params.extracted_features()]
    for name in frame_models(params):
        protocols.append(MODELS.spec(name).needs(MODELS.config(params, name), params.dataset).frames)
    return protocols


def stored_for(params: Params) -> set[str]:
    """Keys of the protocols whose frames decode writes."""
    features = [EXTRACTORS.spec(name)(EXTRACTORS.config(params, name)).protocol()
                for name in params.extracted_features()]
    readers = {MODELS.spec(name).needs(MODELS.config(params, name), params.dataset).frames.key
               for name in frame_models(params)}
    return stored_keys(features, params.decode.store_frames) | readers


def run(params: Params, source: str, **_: object) -> None:
    p, video_dir = params.decode, params.dataset.video_dir
    require_files(source, {"dataset.video_dir": video_dir})
    try:
        videos = list_videos(video_dir)
    except ValueError as e:
        raise ParamsError(f"{source}: key 'dataset.video_dir': {e}") from None
    if not videos:
        raise ParamsError(f"{source}: key 'dataset.video_dir': no video files in {video_dir}")
    protocols = protocols_for(params)

    with make_progress() as progress:
        bar = progress.add_task("decode", total=len(videos))
        summary = decode_all(
            videos,
            p.out_dir,
            protocols,
            workers=p.workers,
            timeout_s=p.timeout_s,
            recycle_after=p.recycle_after,
            backend=p.backend,
            on_result=lambda vid, status: progress.advance(bar),
            unusable=unusable_videos(video_dir),
            store_frames=stored_for(params),
        )
        progress.update(bar, completed=len(videos))

    record = make_record(
        "decode",
        subset(params, "decode", "dataset.video_dir", "features")
        | {"protocols": {pr.key: pr.as_dict() for pr in protocols}},
        inputs={"videos": video_dir},
        extra={"decoder": {"decord": decord.__version__, "pyav": av.__version__}},
        code=stage_code("decode", members(params)),
    )
    write_record(Path(p.out_dir), record)
    log(
        f"decode: {summary.total} videos, {summary.decoded} decoded, {summary.skipped} already done, "
        f"{len(summary.failed)} failed (see {Path(p.out_dir) / 'failures.json'})"
    )
    for vid, reason in sorted(summary.failed.items()):
        log(f"  failed {vid}: {reason}")
    if summary.failure_share > p.max_failure_share:
        raise SystemExit(
            f"decode: {len(summary.failed)}/{summary.total} videos failed "
            f"({summary.failure_share:.1%} > decode.max_failure_share={p.max_failure_share:g})"
        )
