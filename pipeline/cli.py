"""`vmr`: one command per DVC stage, each runnable alone with `--params` and `--set` overrides.

Commands are thin: load and validate params (exit 2 with one clear message on any problem), then
call the stage module in `stages/`. Each command imports its own stage inside the function: the
stages pull in torch and decord, which `vmr --help` and the other commands should not pay for.
These are plain imports, so readers and `pipeline.core.codedeps` still see the graph.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from extractors import EXTRACTORS
from models import MODELS
from pipeline.core.errors import USER_OS_ERRORS, VmrError, os_error_message
from pipeline.core.params import Params, ParamsError, load_params


class _ReportingGroup(TyperGroup):
    """Every command's bad input (a `VmrError`) or machine state (a read-only folder, a full disk)
    ends in one `error:` line and exit code 2, never a traceback; anything else is a bug and keeps it."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VmrError as e:
            _fail(str(e))
        except OSError as e:
            if not _is_user_os_error(e):
                raise
            _fail(os_error_message(e))


def _is_user_os_error(e: OSError) -> bool:
    if e.errno in USER_OS_ERRORS:
        return True
    # h5py reports HDF5's failures as a bare OSError whose text carries the system error
    return any(s in str(e) for s in ("No space left", "Read-only file system", "Permission denied",
                                     "File name too long"))


app = typer.Typer(
    cls=_ReportingGroup,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="vmr: raw videos to trained, evaluated moment-retrieval models, reproducibly (DVC).",
)


def _print_version(value: bool) -> None:
    if value:
        from pipeline import __version__

        typer.echo(f"vmr {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print the version and exit.")] = False,
) -> None:
    """vmr: raw videos to trained, evaluated moment-retrieval models, reproducibly (DVC)."""

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file (YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a param: KEY=VALUE (dotted key, YAML value); repeatable."),
]
ProfileOpt = Annotated[
    list[Path] | None,
    typer.Option("--profile", help="params file merged over --params (a model section in it replaces that model's whole section); repeatable."),
]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _params(path: Path, overrides: list[str] | None, profiles: list[Path] | None = None) -> Params:
    try:
        return load_params(path, overrides or [], profiles or [], registries=(EXTRACTORS, MODELS))
    except ParamsError as e:
        _fail(str(e))
        raise  # unreachable: _fail raises


def _run(params_path: Path, overrides, profiles, stage, **kwargs) -> None:
    params = _params(params_path, overrides, profiles)
    try:
        stage.run(params, source=str(params_path), **kwargs)
    except ParamsError as e:  # raised when a stage checks its inputs before any work
        _fail(str(e))


@app.command()
def synth(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Generate the synthetic dataset (deterministic for `synth.seed`).

    Reads: params `synth.*`. Writes: `synth.out_dir`/videos/*.mp4 (H.264, PyAV), annotations/
    charades_sta_{train,test}.txt, Charades_v1_{train,test}.csv, video_captions.json, and a
    synthetic GloVe-format text file glove.synthetic.<dim>d.txt.
    """
    from stages import synth as stage

    _run(params, set_, profile, stage)


@app.command()
def decode(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Decode every raw video once (decord, worker processes) into the frame store.

    Reads: `dataset.video_dir`, params `decode.*` and the sampling protocols of the enabled
    `features`. Writes: `decode.out_dir` (frames, per-video manifest, failures report).
    """
    from stages import decode as stage

    _run(params, set_, profile, stage)


@app.command()
def extract(
    feature: Annotated[str, typer.Option(help="extractor name (a key of `extractors`).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
    shard: Annotated[str | None, typer.Option(help="i/n: process shard i of n (default: torchrun env or 0/1).")] = None,
    engine: Annotated[str | None, typer.Option(
        help="local or ray: sets `extract.engine` (Ray: params `ray.*`, docs/cluster.md).")] = None,
) -> None:
    """Extract per-video features with one extractor.

    Reads: the frame store (`decode.out_dir`), params `extractors.<feature>`, `extract.engine`.
    Writes: `merge.npy_dir`/<feature>/<video_id>.npy (T, D) float32 + timestamps, provenance.
    """
    from stages import extract as stage

    if engine is not None:  # validated with the params: a bad name is an error naming `extract.engine`
        set_ = [*(set_ or []), f"extract.engine={engine}"]
    _run(params, set_, profile, stage, feature=feature, shard=shard)


@app.command()
def merge(
    feature: Annotated[str, typer.Option(help="extractor name whose per-video files are merged.")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Merge per-video .npy/.npz features into one HDF5 file.

    Reads: `merge.npy_dir`/<feature>/, params `merge.*`. Writes: `merge.out_dir`/<feature>.h5.
    """
    from stages import merge as stage

    _run(params, set_, profile, stage, feature=feature)


@app.command("import-features")
def import_features(
    name: Annotated[str, typer.Option(help="imported feature name (a key of `imports`).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Read a published feature file in its own layout (no raw video), as `merge.out_dir`/<name>.h5.

    Reads: `imports.<name>.path` (QVHighlights .npz folders, flat or ActivityNet HDF5, .npy folders).
    Writes: `merge.out_dir`/<name>.h5 with row times, its provenance rooted at the file's sha256.
    """
    from stages import import_features as stage

    _run(params, set_, profile, stage, name=name)


@app.command()
def vocab(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Build CLIP_tokenized_count.txt, GloVe_tokenized_count.txt and glove.pkl.

    Reads: the annotation splits of `dataset`, the GloVe text file `vocab.glove_file`.
    Writes: `vocab.out_dir`/{CLIP_tokenized_count.txt, GloVe_tokenized_count.txt, glove.pkl}.
    """
    from stages import vocab as stage

    _run(params, set_, profile, stage)


@app.command("query-features")
def query_features(
    model: Annotated[str, typer.Option(help="model whose frozen query features are encoded (MRNet).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Encode every query once with the frozen encoder a model declares (MRNet: DistilBERT text or
    wav2vec2-style speech).

    Reads: the annotation splits of `dataset`, the model's query-encoder config (a local encoder
    directory, or seeded random init). Writes: `merge.out_dir`/<query feature name>.h5.
    """
    from stages import query_features as stage

    _run(params, set_, profile, stage, model=model)


@app.command("feature-pca")
def feature_pca(
    model: Annotated[str, typer.Option(help="model whose PCA-reduced input is made (MRNet on TACoS).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Reduce merged video features with the PCA a model declares (MRNet TACoS: C3D 4096-d -> 500-d).

    Reads: `merge.out_dir`/<pca source>.h5, the train split (fit_on: train).
    Writes: `merge.out_dir`/<the model's feature>.h5.
    """
    from stages import feature_pca as stage

    _run(params, set_, profile, stage, model=model)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="model name (a key of `model`).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
    nproc_per_node: Annotated[int, typer.Option(help="processes (GPUs) per node; >1 re-launches under torchrun.")] = 1,
) -> None:
    """Train one model.

    Reads: merged features, parsed annotations, vocab files, params `model.<model>` and `trainer.*`.
    Writes: `trainer.out_dir`/<model>/ (checkpoints, dvclive logs).
    """
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        # Re-launch this very command under torchrun; each rank lands in the branch below.
        argv, skip_value = [], False  # drop --nproc-per-node N / --nproc-per-node=N
        for a in sys.argv[1:]:
            if skip_value or a.startswith("--nproc-per-node="):
                skip_value = False
                continue
            skip_value = a == "--nproc-per-node"
            if not skip_value:
                argv.append(a)
        # --standalone: a private rendezvous on a free port (no clash with other jobs on the node).
        # Multi-node: run `torchrun --nnodes ... -m pipeline.cli train ...` yourself.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc_per_node}", "-m", "pipeline.cli", *argv]
        os.execv(sys.executable, cmd)
    from stages import train as stage

    _run(params, set_, profile, stage, model=model)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="model name (a key of `model`).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
    allow_unfinished: Annotated[bool, typer.Option(
        help="evaluate weights of a training run that did not finish (recorded in metrics.json).")] = False,
) -> None:
    """Evaluate a trained model on `evaluate.split`.

    Refuses (exit 2) weights whose training run did not finish, unless --allow-unfinished.

    Reads: the selected checkpoint in `trainer.out_dir`/<model>/, features and annotations.
    Writes: `evaluate.out_dir`/<model>/metrics.json (with the random baseline) and predictions/
    (predictions.jsonl in Moment-DETR's format for grounding; similarity.npz for retrieval).
    """
    from stages import evaluate as stage

    _run(params, set_, profile, stage, model=model, allow_unfinished=allow_unfinished)


@app.command()
def dag(
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="where to write the DVC pipeline.")] = Path("dvc.yaml"),
    check: Annotated[bool, typer.Option(help="only check that OUT is current; exit 1 if it is not.")] = False,
) -> None:
    """Write dvc.yaml from params.yaml and the code: each stage's code deps are its import closure,
    each model's stages depend on exactly what its `needs()` names.

    Reads: params.yaml, the project's source files. Writes: dvc.yaml (unless --check).
    """
    from pipeline.core.params import read_yaml
    from pipeline.dag import build_dag, render

    stages = build_dag(_params(params, None), read_yaml(params), str(params))
    text = render(stages)
    if check:
        if not out.is_file() or out.read_text() != text:
            _fail(f"{out} is not current for {params} and the code: run `vmr dag`", code=1)
        typer.echo(f"{out} is current")
        return
    out.write_text(text)
    typer.echo(f"wrote {out}: {len(stages['stages'])} stages")


@app.command()
def score(
    predictions: Annotated[Path, typer.Argument(help="Moment-DETR jsonl (pred_relevant_windows), or a similarity .npy/.npz for retrieval.")],
    annotations: Annotated[Path, typer.Option(help="ground-truth annotation file.")],
    dataset: Annotated[str, typer.Option(help="dataset convention: qvhighlights, charades_sta, tacos, activitynet, msrvtt, ...")],
    split: Annotated[str, typer.Option(help="split name (recorded; QVHighlights test has no labels).")] = "test",
    format: Annotated[str | None, typer.Option(help="annotation parser (default: the dataset's).")] = None,
    durations: Annotated[list[Path] | None, typer.Option(help="Charades_v1_*.csv duration files (charades_sta format); repeatable.")] = None,
    cleaning: Annotated[str, typer.Option(help="cleaning policy of the annotations: none, mmn, mesm, cnm.")] = "none",
    nms: Annotated[float | None, typer.Option(help="MMN NMS threshold for R@n (default: none).")] = None,
    out: Annotated[Path | None, typer.Option(help="metrics JSON (default: PREDICTIONS.metrics.json).")] = None,
) -> None:
    """Score any predictions file, ours or another repository's, and print the metrics table.

    Reads: PREDICTIONS and --annotations. Writes: the metrics JSON (--out).
    """
    from rich.table import Table

    from pipeline.core.atomic import write_json
    from pipeline.report import print_tables
    from pipeline.text.annotations import AnnotationError
    from pipeline.training.evaluation import flatten_metrics, score_file

    for label, path in (("predictions", predictions), ("--annotations", annotations)):
        if not path.is_file():
            _fail(f"{label}: file not found: {path}")
    try:
        metrics = score_file(predictions, annotations, dataset, split, format=format,
                             durations=[str(d) for d in durations or []], cleaning=cleaning, nms_threshold=nms)
    except (AnnotationError, ValueError, KeyError) as e:
        _fail(str(e))
    out = out or predictions.with_name(predictions.name + ".metrics.json")
    write_json(out, {"dataset": dataset, "split": split, "predictions": str(predictions),
                     "annotations": str(annotations), "cleaning": cleaning, "nms": nms, **metrics})
    table = Table("metric", "value", title=f"{dataset} / {split}: {predictions.name} (all metrics in {out})")
    shown = {k: v for k, v in flatten_metrics(metrics).items()
             if not k.startswith("moment_detr/") or k.startswith("moment_detr/brief/")}
    for key, value in shown.items():
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    print_tables(table)
    typer.echo(f"metrics written to {out}")


def _videos(paths: list[Path]) -> list[Path]:
    """Video files, folders expanded to their videos (sorted); a missing path is an error."""
    from pipeline.media.decode import list_videos

    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = list(list_videos(p).values())
            if not found:
                _fail(f"{p}: no video files in the folder")
            out += found
        elif p.exists():
            out.append(p)
        else:
            _fail(f"{p}: no such video file or folder")
    return out


def _checkpoint_of(params: Params, model: str, checkpoint: Path | None) -> Path:
    """--checkpoint, or the model's kept weights under `trainer.out_dir`, for a known model name."""
    if model not in MODELS:
        _fail(f"--model {model}: unknown model; expected one of {MODELS.names()}")
    return checkpoint or Path(params.trainer.out_dir) / model / "best.pt"


def _open_predictor(params: Params, model: str, checkpoint: Path, allow_recipe_mismatch: bool,
                    cache_dir: Path | None, device: str):
    """The Predictor `vmr predict`, `vmr search` and `vmr serve` share (same recipe checks and cache)."""
    from pipeline.predict import Predictor

    return Predictor.from_checkpoint(checkpoint, allow_recipe_mismatch=allow_recipe_mismatch, cache_dir=cache_dir,
                                     device=device, model=model, fallback=_fallback_recipes(params, model))


def _fallback_recipes(params: Params, model: str) -> dict:
    """The extractor settings of params for the model's feature files, used only when the
    checkpoint's recipe cannot be read and --allow-recipe-mismatch is given."""
    from pipeline.predict.recipe import FeatureRecipe

    if model not in params.model:
        return {}
    needs = MODELS.get(model).needs(MODELS.config(params, model), params.dataset)
    return {name: FeatureRecipe(name=name, extractor=name,
                                config=EXTRACTORS.config(params, name).model_dump(exclude={"device", "threads"}),
                                protocol_key=None, weights="unknown", decode_backend=params.decode.backend,
                                merge=params.merge.model_dump(include={"dtype", "compression", "layout"}))
            for name in needs.features if name in EXTRACTORS}


def _write_outputs(outputs: dict[Path, str]) -> None:
    """Write every rendered output (each atomically), only once all of them rendered."""
    from pipeline.core.atomic import write_text

    for path, text in outputs.items():
        write_text(path, text)
        typer.echo(f"wrote {path}", err=True)


CheckpointOpt = Annotated[Path | None, typer.Option(
    help="the checkpoint (default: `trainer.out_dir`/MODEL/best.pt); its provenance record must be beside it.")]
AllowMismatchOpt = Annotated[bool, typer.Option(
    help="go on when the features cannot be made as for training (a warning; recorded in every output record).")]
CacheDirOpt = Annotated[Path | None, typer.Option(
    help="where features of predicted videos are cached (default: $VMR_CACHE_DIR or ~/.cache/vmr/predict).")]
DeviceOpt = Annotated[str, typer.Option(help="torch device for extraction and the model: cpu, cuda, auto.")]


@app.command()
def predict(
    videos: Annotated[list[Path], typer.Argument(help="video files and/or folders of videos.")],
    model: Annotated[str, typer.Option(help="grounding model name (mmn, mesm, cnm, mrnet).")],
    query: Annotated[list[str] | None, typer.Option("--query", help="a query; repeatable.")] = None,
    queries: Annotated[Path | None, typer.Option(
        help="query file: jsonl lines {\"qid\", \"query\", \"vid\"} (no windows) or one query per line.")] = None,
    checkpoint: CheckpointOpt = None,
    top_k: Annotated[int, typer.Option(help="moments per query.")] = 5,
    out: Annotated[Path | None, typer.Option(help="output file: .json, .jsonl, .csv or .srt (default: JSON on stdout).")] = None,
    html: Annotated[Path | None, typer.Option(help="also write a self-contained HTML page (timelines, thumbnails, player).")] = None,
    allow_recipe_mismatch: AllowMismatchOpt = False,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "cpu",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Find where in new videos each query happens, with a trained grounding model.

    The videos are decoded and their features extracted exactly as for the checkpoint's training
    (read from its provenance: extractor, protocol, weights sha256, PCA, query encoder), then cached
    by content. Refuses (exit 2) a recipe that cannot be reproduced, unless --allow-recipe-mismatch.

    Reads: the videos, the checkpoint and the provenance chain of its training features.
    Writes: --out (ranked moments per query: start, end, score; the video, the query, the
    checkpoint sha256) and --html; features under --cache-dir.
    """
    from pipeline.predict.output import output_format, render, render_html
    from pipeline.predict.predictor import check_queries
    from pipeline.predict.queries import AskedQuery, assign, read_query_file

    p = _params(params, set_, profile)
    checkpoint = _checkpoint_of(p, model, checkpoint)
    if (query is None) == (queries is None):
        _fail("give the queries with --query TEXT (repeatable) or --queries FILE, not both")
    fmt = output_format(out) if out else "json"  # a bad suffix fails before any work
    asked = read_query_file(queries) if queries else [AskedQuery(q) for q in query]
    check_queries([q.text for q in asked])
    jobs = assign(asked, _videos(videos))
    predictor = _open_predictor(p, model, checkpoint, allow_recipe_mismatch, cache_dir, device)
    if predictor.task != "grounding":
        _fail(f"--model {model} ranks videos for a query: use `vmr search`")
    results = predictor.predict_many([(video, [q.text for q in qs]) for video, qs in jobs], top_k)
    records = []
    for (_, qs), recs in zip(jobs, results, strict=True):
        for q, rec in zip(qs, recs, strict=True):
            records.append({"qid": q.qid, **rec} if q.qid is not None else rec)
    outputs = {}
    if out:
        outputs[out] = render(records, fmt)
    if html:
        outputs[html] = render_html(records, predictor.thumbnail, html)
    if not out:
        typer.echo(render(records, "json"), nl=False)
    _write_outputs(outputs)


@app.command()
def search(
    videos: Annotated[list[Path], typer.Argument(help="video files and/or folders of videos to rank.")],
    model: Annotated[str, typer.Option(help="retrieval model name (glscl).")],
    query: Annotated[str, typer.Option(help="the text to rank the videos for.")],
    checkpoint: CheckpointOpt = None,
    top_k: Annotated[int | None, typer.Option(help="videos listed (default: all).")] = None,
    out: Annotated[Path | None, typer.Option(help="output file: .json, .jsonl or .csv (default: JSON on stdout).")] = None,
    allow_recipe_mismatch: AllowMismatchOpt = False,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "cpu",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Rank the videos of a folder for a query with a trained retrieval model (GLSCL).

    Features are made and cached as for `vmr predict`. Reads: the videos, the checkpoint and its
    provenance chain (and its training feature file). Writes: --out (videos, best first, with scores).
    """
    from pipeline.predict.output import output_format, render
    from pipeline.predict.predictor import check_queries

    p = _params(params, set_, profile)
    checkpoint = _checkpoint_of(p, model, checkpoint)
    fmt = output_format(out) if out else "json"
    if fmt == "srt":
        _fail("--out: search results have no times; use .json, .jsonl or .csv")
    check_queries([query])
    found = _videos(videos)
    predictor = _open_predictor(p, model, checkpoint, allow_recipe_mismatch, cache_dir, device)
    records = predictor.search(found, query, top_k)
    if out:
        _write_outputs({out: render(records, fmt)})
    else:
        typer.echo(render(records, "json"), nl=False)


@app.command()
def export(
    out_dir: Annotated[Path, typer.Argument(help="folder to write (replaced only if empty or an earlier export).")],
    format: Annotated[str, typer.Option("--format", help="the official repository: mesm, mmn, cnm or mrnet.")],
    feature: Annotated[list[str] | None, typer.Option(
        help="feature to export (repeatable; default: the features model.<format> reads).")] = None,
    cleaning: Annotated[str, typer.Option(
        help="moment cleaning: official (the target's released files' rule) or none, mmn, mesm, cnm.")] = "official",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Write what an official repository reads, in its layout, to train it on vmr's features.

    Reads: the annotation splits of `dataset`, `merge.out_dir`/<feature>.h5, `vocab.out_dir` (mesm,
    cnm), MRNet's query features (mrnet). Writes: OUT_DIR with README.txt (which config keys to set).
    """
    from pipeline import export as exporter

    _run(params, set_, profile, exporter, fmt=format, out_dir=out_dir, features=feature, cleaning=cleaning)


@app.command()
def lineage(path: Annotated[Path, typer.Argument(help="an artifact written by a vmr stage.")]) -> None:
    """Print the chain of stages, params, inputs and weights that made PATH, back to the raw inputs.

    Reads: provenance records (sidecars / HDF5 attrs) and dvc.lock.
    """
    from pipeline.lineage import format_lineage

    if not path.exists():
        _fail(f"{path}: no such file or directory")
    typer.echo(format_lineage(path))


@app.command()
def report(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """Print where the pipeline's outputs are and the metrics table of every evaluated model.

    Reads: `evaluate.out_dir`/*/metrics.json and the output directories named in params.
    """
    from pipeline.report import print_report

    print_report(_params(params, set_, profile))


@app.command("compare-features")
def compare_features(
    a: Annotated[Path, typer.Argument(help="features to check (ours): an HDF5 file or a folder of <vid>.npy/.npz.")],
    b: Annotated[Path, typer.Argument(help="reference features (e.g. the released file), same forms as A.")],
    max_offset: Annotated[int, typer.Option(min=0, help="try row shifts -N..N per video; report the best.")] = 3,
    out: Annotated[Path, typer.Option(help="the JSON report (every video).")] = Path("feature_parity.json"),
    show: Annotated[int, typer.Option(min=0, help="videos in the printed table (lowest median cosine first).")] = 10,
) -> None:
    """Compare two sets of video features: ours against a released file, two runs, two backends.

    Per video and overall: row counts, the best row offset, row cosine (median, 5th percentile)
    and relative L2 ||A - B|| / ||B|| at that offset; videos in only one side are listed.

    Reads: A and B. Writes: --out (JSON).
    """
    from pipeline.core.atomic import write_json
    from pipeline.media.compare import compare_features as compare
    from pipeline.report import print_parity

    result = compare(a, b, max_offset)
    write_json(out, result)
    print_parity(result, show)
    typer.echo(f"report written to {out}")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="grounding model name (mmn, mesm, cnm, mrnet).")],
    checkpoint: CheckpointOpt = None,
    video_dir: Annotated[Path | None, typer.Option(help="folder whose videos the page offers (searched recursively).")] = None,
    upload_dir: Annotated[Path | None, typer.Option(help="where uploads are kept (default: a temporary folder, removed at exit).")] = None,
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one (the URL is printed).")] = 7860,
    host: Annotated[str, typer.Option(help="address to bind; the default keeps the page on this machine.")] = "127.0.0.1",
    allow_host: Annotated[list[str] | None, typer.Option(help="another host name the page may be reached by "
                          "(repeatable); 127.0.0.1, localhost, ::1 and --host always are.")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="largest upload accepted, in MB (MiB).")] = 2048,
    allow_recipe_mismatch: AllowMismatchOpt = False,
    cache_dir: CacheDirOpt = None,
    device: DeviceOpt = "cpu",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    profile: ProfileOpt = None,
) -> None:
    """A local web page: pick a video from --video-dir (or upload one), type queries, play the moments.

    Predictions are `vmr predict`'s (the same Predictor, recipe checks and cache). Binds 127.0.0.1
    unless --host says otherwise; Ctrl+C stops.

    Reads: the checkpoint and the provenance chain of its training features, --video-dir.
    Writes: uploads to --upload-dir, features under --cache-dir.
    """
    import socket

    import uvicorn

    from pipeline.serve import check_upload_dir, create_app

    p = _params(params, set_, profile)
    checkpoint = _checkpoint_of(p, model, checkpoint)
    if not checkpoint.is_file():
        _fail(f"--checkpoint {checkpoint}: file not found (train first: vmr train --model {model})")
    if video_dir is not None and not video_dir.is_dir():
        _fail(f"--video-dir {video_dir}: no such folder")
    if max_upload_mb <= 0:
        _fail(f"--max-upload-mb {max_upload_mb:g}: must be positive")
    check_upload_dir(video_dir, upload_dir)  # a VmrError: one error line, exit 2
    # Bind before loading the model: a busy port is one quick error line, and --port 0 can print its URL.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e} (pick another --port)")
    with sock:
        predictor = _open_predictor(p, model, checkpoint, allow_recipe_mismatch, cache_dir, device)
        web = create_app(predictor, video_dir=video_dir, upload_dir=upload_dir, checkpoint=str(checkpoint),
                         host=host, allow_hosts=tuple(allow_host or ()), max_upload_mb=max_upload_mb)
        if host not in ("127.0.0.1", "localhost", "::1"):
            typer.echo(f"warning: listening on {host}: other machines can reach this page", err=True)
        url_host = f"[{host}]" if ":" in host else host
        typer.echo(f"vmr serve: http://{url_host}:{sock.getsockname()[1]}/ (model {model}, {checkpoint}); Ctrl+C stops")
        sys.stdout.flush()
        uvicorn.Server(uvicorn.Config(web, log_level="warning")).run(sockets=[sock])


def main() -> None:  # `python -m pipeline.cli` (used by torchrun re-launch)
    app()


if __name__ == "__main__":
    main()
