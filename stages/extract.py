"""Stage `extract-<feature>`: frame store -> `merge.npy_dir`/<feature>/<vid>.npy (+ .json timestamps).

Frames the store does not hold (`decode.store_frames`) are decoded again from `dataset.video_dir` by
replaying decode's recorded plan (pipeline/media/replay.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from extractors import EXTRACTORS
from pipeline.core.atomic import write_json
from pipeline.core.codedeps import stage_code
from pipeline.core.params import Params, ParamsError, require_files, subset
from pipeline.core.progress import log, make_progress
from pipeline.core.provenance import make_record, read_record, weights_record, write_record
from pipeline.media.extract import extract_videos, parse_shard, resolve_device, shard_of
from pipeline.media.framestore import FrameStore
from pipeline.media.replay import ReplaySource


def build(extractor) -> tuple[torch.nn.Module, str]:
    """The model with its weights loaded (no random init paid for first, see `Extractor.build_loaded`)
    or with its seeded random init, and the weights record."""
    cfg = extractor.config
    record = weights_record(cfg.weights, cfg.weights_sha256)  # checks sha256 before loading
    model = extractor.build_model() if cfg.weights is None else extractor.build_loaded(cfg.weights)
    return model.eval(), record


def load_model(extractor, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The seeded build on `device`: the same model in every process that loads it (Ray actors too)."""
    torch.manual_seed(extractor.config.seed)
    model, record = build(extractor)
    return extractor.to_device(model, device), record


def run(params: Params, source: str, feature: str, shard: str | None = None, **_: object) -> None:
    if feature not in EXTRACTORS:
        raise ParamsError(f"--feature {feature}: unknown extractor; expected one of {EXTRACTORS.names()}")
    config = EXTRACTORS.config(params, feature)
    extractor = EXTRACTORS.get(feature)(config)
    store_dir = params.decode.out_dir
    require_files(
        source,
        {
            "decode.out_dir": str(Path(store_dir) / "manifest.json"),
            f"extractors.{feature}.weights": config.weights,
        },
    )
    try:
        index, count = parse_shard(shard)
    except ValueError as e:
        raise ParamsError(str(e)) from None

    store = FrameStore(store_dir)
    # stored frames are read, the others replayed from the videos (decode.store_frames)
    frames = ReplaySource(store, params.dataset.video_dir, timeout_s=params.decode.timeout_s)
    key = extractor.protocol().key
    all_ids = store.video_ids(key)
    if not all_ids:
        raise ParamsError(
            f"{store_dir}: no decoded frames for protocol {key} of '{feature}': run `vmr decode` with "
            f"'{feature}' in `features`"
        )
    ids = shard_of(all_ids, index, count)
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(params.merge.npy_dir) / feature
    engine = _run_on_ray if params.extract.engine == "ray" else _run_here
    with make_progress() as progress:
        bar = progress.add_task(f"extract {feature} [{index}/{count}]", total=len(ids))
        summary, weights, facts = engine(
            params, source, extractor, frames, ids, out_dir, all_ids, progress=lambda: progress.advance(bar))
    decode_record = read_record(store.root)
    record = make_record(
        f"extract-{feature}",
        subset(params, "decode.out_dir", "merge.npy_dir") | {f"extractors.{feature}": config.model_dump()},
        inputs={"frames": store_dir},
        weights={feature: weights},
        extra={
            "extractor": extractor.describe(),
            "decoder": None if decode_record is None else decode_record.get("decoder"),
            "shard": [index, count],
            "failed": dict(sorted(summary.failed.items())),
            "engine": params.extract.engine,
            **facts,
            "torch": torch.__version__,
        },
        code=stage_code("extract", [EXTRACTORS.get(feature)]),
    )
    if count == 1:
        write_record(out_dir, record)
    else:  # one record per shard; `.prov.json` names are left out of directory digests
        write_json(out_dir / f"shard-{index}-of-{count}.prov.json", record)
    log(
        f"extract {feature}: shard {index}/{count}: {summary.videos} videos, {summary.computed} computed, "
        f"{summary.skipped} already done, {len(summary.failed)} failed; {summary.units} units in "
        f"{summary.seconds_model:.1f} s of model time"
    )
    for vid, reason in sorted(summary.failed.items()):
        log(f"  failed {vid}: {reason}")
    share = len(summary.failed) / summary.videos if summary.videos else 0.0
    if share > params.decode.max_failure_share:
        raise SystemExit(
            f"extract {feature}: {len(summary.failed)}/{summary.videos} videos could not be replayed "
            f"({share:.1%} > decode.max_failure_share={params.decode.max_failure_share:g})"
        )


def _run_here(params, source, extractor, frames, ids, out_dir, all_ids, progress):
    """The local engine: the model in this process. -> (summary, weights record, provenance facts)."""
    device = resolve_device(extractor.config.device)
    model, weights = load_model(extractor, device)
    summary = extract_videos(extractor, model, device, frames, ids, out_dir, weights,
                             all_video_ids=all_ids, progress=progress)
    return summary, weights, {"device_type": device.type}


def _run_on_ray(params, source, extractor, frames, ids, out_dir, all_ids, progress):
    """The Ray engine (docs/cluster.md): decode tasks on CPU workers, the model in actors."""
    try:
        import ray
    except ImportError:
        raise ParamsError(
            f"{source}: key 'extract.engine': 'ray' needs Ray, which is not installed: "
            f"pip install -e '.[ray]' (or set extract.engine: local)"
        ) from None
    from pipeline.media.ray_engine import RayOptions, extract_videos_ray

    cfg = extractor.config
    # checked here once; each actor checks that its copy of the file is the same
    weights = weights_record(cfg.weights, cfg.weights_sha256)
    # the same paths for workers on other nodes; each decode task replays its video's plan itself
    frames = ReplaySource(Path(frames.root).resolve(), Path(params.dataset.video_dir).resolve(),
                          timeout_s=params.decode.timeout_s)
    summary, device_types = extract_videos_ray(
        extractor, load_model, weights, frames, ids, out_dir, RayOptions(**params.ray.model_dump()),
        all_video_ids=all_ids, progress=progress,
    )
    facts = {"device_type": ",".join(device_types), "ray": {"version": ray.__version__, "actors": params.ray.actors}}
    return summary, weights, facts
