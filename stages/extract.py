"""Stage `extract-<feature>`: frame store -> `merge.npy_dir`/<feature>/<vid>.npy (+ .json timestamps)."""

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


def build(extractor) -> tuple[torch.nn.Module, str]:
    """The model with its weights loaded (no random init paid for first, see `Extractor.build_loaded`)
    or with its seeded random init, and the weights record."""
    cfg = extractor.config
    record = weights_record(cfg.weights, cfg.weights_sha256)  # checks sha256 before loading
    model = extractor.build_model() if cfg.weights is None else extractor.build_loaded(cfg.weights)
    return model.eval(), record


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
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model, weights = build(extractor)
    model = extractor.to_device(model, device)

    out_dir = Path(params.merge.npy_dir) / feature
    with make_progress() as progress:
        bar = progress.add_task(f"extract {feature} [{index}/{count}]", total=len(ids))
        summary = extract_videos(
            extractor, model, device, store, ids, out_dir, weights,
            all_video_ids=all_ids, progress=lambda: progress.advance(bar),
        )
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
            "device_type": device.type,
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
        f"{summary.skipped} already done; {summary.units} units in {summary.seconds_model:.1f} s of model time"
    )
