"""Stage `decode`: raw videos -> frame store, for the sampling protocols of the enabled `features`."""

from __future__ import annotations

from pathlib import Path

from pipeline.decode import decode_all, list_videos
from pipeline.params import Params, ParamsError, require_files, subset
from pipeline.progress import log, make_progress
from pipeline.provenance import make_record, write_record


def protocols_for(params: Params, source: str = "params.yaml") -> list:
    from extractors import EXTRACTORS
    from models import MODELS

    protocols = [EXTRACTORS.get(name)(params.extractor_config(name)).protocol() for name in params.features]
    # Models trained on pixels (GLSCL end to end) declare their own frame protocol.
    for i, name in enumerate(params.decode.model_frames):
        model = MODELS.get(name) if name in MODELS else None
        if model is None or not hasattr(model, "frame_protocol"):
            raise ParamsError(f"{source}: key 'decode.model_frames.{i}': '{name}' is not a model that "
                              "reads decoded frames")
        protocols.append(model.frame_protocol())
    return protocols


def run(params: Params, source: str, **_: object) -> None:
    p = params.decode
    require_files(source, {"decode.video_dir": p.video_dir})
    try:
        videos = list_videos(p.video_dir)
    except ValueError as e:
        raise ParamsError(f"{source}: key 'decode.video_dir': {e}") from None
    if not videos:
        raise ParamsError(f"{source}: key 'decode.video_dir': no video files in {p.video_dir}")
    protocols = protocols_for(params, source)

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
        )
        progress.update(bar, completed=len(videos))

    record = make_record(
        "decode",
        subset(params, "decode", "features")
        | {"protocols": {pr.key: pr.as_dict() for pr in protocols}},
        inputs={"videos": p.video_dir},
        extra={"decoder": _decoder_versions()},
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


def _decoder_versions() -> dict[str, str]:
    import av
    import decord

    return {"decord": decord.__version__, "pyav": av.__version__}
