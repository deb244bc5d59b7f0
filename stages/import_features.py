"""Stage `import_features-<name>`: the published file `imports.<name>.path` -> `merge.out_dir`/<name>.h5.

Video features become a flat vmr feature file with row windows (FeatureFile reads them like merged
ones); per-query features (QVHighlights clip_text_features) become a query feature file keyed by qid.
The record's root is the published file's sha256, marked "published, not re-extracted".
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.codedeps import stage_code
from pipeline.core.errors import ChecksumError
from pipeline.core.params import Params, ParamsError, require_files, subset
from pipeline.core.progress import log, make_progress
from pipeline.core.provenance import make_record
from pipeline.media.importers import (
    LAYOUTS,
    PUBLISHED,
    import_video_features,
    read_published_queries,
    resolve,
)
from pipeline.text.sentence_features import write_query_features

PUBLISHED_NOTE = "published, not re-extracted"


def run(params: Params, source: str, name: str, **_: object) -> None:
    if name not in params.imports:
        raise ParamsError(f"{source}: --name {name}: no such key under 'imports' "
                          f"(imported names: {sorted(params.imports) or 'none'})")
    spec = resolve(name, params.imports[name])
    require_files(source, {f"imports.{name}.path": spec.path})
    out = Path(params.merge.out_dir) / f"{name}.h5"
    record = make_record(  # hashes the published file or folder: the root of the lineage
        f"import_features-{name}",
        subset(params, f"imports.{name}", "merge.out_dir", "merge.compression"),
        inputs={"published": spec.path},
        extra={"raw": True, "published": {"note": PUBLISHED_NOTE, **spec.as_record(),
                                          "release": PUBLISHED[spec.published].note if spec.published else None}},
        code=stage_code("import_features"),
    )
    expected = params.imports[name].sha256
    digest = record["inputs"]["published"]["sha256"]
    if expected and digest != expected.lower():
        raise ChecksumError(f"imports.{name}.path {spec.path}: sha256 {digest} does not match the expected {expected}")
    with make_progress() as progress:
        bar = progress.add_task(f"import {name}", total=None)
        if LAYOUTS[spec.layout].per == "query":
            qids, pooled, tokens = read_published_queries(spec, progress=lambda: progress.advance(bar))
            record["published"] |= {"queries": len(qids), "dim": int(pooled.shape[1])}
            write_query_features(out, qids, pooled, record, tokens=tokens)
            log(f"import {name}: {len(qids)} queries x {pooled.shape[1]} ({spec.layout}) -> {out}")
            return
        summary = import_video_features(spec, out, params.merge.compression, provenance=record,
                                        progress=lambda: progress.advance(bar))
    log(f"import {name}: {summary.items} videos, dim {summary.dim}, {summary.rows} rows ({summary.dtype}), "
        f"{spec.seconds_per_row:.4g} s per row ({spec.row_times_from}) -> {out}")
