"""Stage `merge-<feature>`: `merge.npy_dir`/<feature>/ -> `merge.out_dir`/<feature>.h5."""

from __future__ import annotations

import json
from pathlib import Path

from extractors import EXTRACTORS
from pipeline.core.codedeps import stage_code
from pipeline.core.params import Params, ParamsError, require_files, subset
from pipeline.core.progress import log, make_progress
from pipeline.core.provenance import make_record, read_record
from pipeline.media.h5merge import export_npz, merge_to_hdf5


def run(params: Params, source: str, feature: str, **_: object) -> None:
    if feature in params.imports:  # merging would overwrite the imported file
        raise ParamsError(f"{source}: key 'imports.{feature}': '{feature}' is imported; "
                          f"its file comes from `vmr import-features --name {feature}`")
    p = params.merge
    src = Path(p.npy_dir) / feature
    require_files(source, {"merge.npy_dir": str(src)})
    dim = EXTRACTORS.get(feature).dim if feature in EXTRACTORS else None
    out = Path(p.out_dir) / f"{feature}.h5"
    upstream = _upstream_record(src)
    record = make_record(
        f"merge-{feature}",
        subset(params, "merge"),
        inputs={"features": str(src)},
        weights=upstream.get("weights"),
        extra={"extractor": upstream.get("extractor"), "decoder": upstream.get("decoder")},
        code=stage_code("merge", [EXTRACTORS.get(feature)] if feature in EXTRACTORS else []),
    )
    with make_progress() as progress:
        bar = progress.add_task(f"merge {feature}", total=None)
        summary = merge_to_hdf5(  # a MergeError names the file: the CLI prints it, exit 2
            src, out, dtype=p.dtype, compression=p.compression, layout=p.layout, dim=dim,
            provenance=record, progress=lambda: progress.advance(bar),
        )
    log(f"merge {feature}: {summary.videos} videos, dim {summary.dim}, {summary.total_rows} rows -> {out}")
    if p.export_npz_dir:
        n = export_npz(out, Path(p.export_npz_dir) / feature)
        log(f"merge {feature}: exported {n} .npz files to {Path(p.export_npz_dir) / feature}")


def _upstream_record(src: Path) -> dict:
    """The extract record: `provenance.json`, or the shard records of a sharded run (weights merged)."""
    record = read_record(src)
    if record is not None:
        return record
    shards = sorted(src.glob("shard-*-of-*.prov.json"))
    if not shards:
        return {}
    records = [json.loads(p.read_text()) for p in shards]
    merged = dict(records[0])
    merged["weights"] = {k: v for r in records for k, v in (r.get("weights") or {}).items()}
    return merged
