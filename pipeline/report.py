"""`vmr report`: where the outputs are, and the metrics of every evaluated model in one table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from pipeline.core.params import Params
from pipeline.training.evaluation import flatten_metrics

HEADLINE = ("R@1,IoU@0.3", "R@1,IoU@0.5", "R@1,IoU@0.7", "R@5,IoU@0.5", "mIoU", "mAP",
            "t2v_R1", "t2v_R5", "t2v_MdR", "v2t_R1")


_NO_LIMIT = 10_000  # characters: wide enough for any table's natural width


def print_tables(*renderables, console: Console | None = None) -> None:
    """Print rich tables (or text) readably on a terminal and off one.

    Off a terminal (a pipe, `make repro | tee log`, CI), rich lays tables out at $COLUMNS or 80
    characters and cuts every column name to "R@1…". A log has no width to fit, so there each
    table gets its natural width: full names and values, one line per row.
    """
    console = console or Console()
    if console.is_terminal:
        console.print(*renderables)
        return
    for r in renderables:
        width = console.measure(r, options=console.options.update_width(_NO_LIMIT)).maximum
        Console(file=console.file, width=max(width, console.width), color_system=None).print(r)


def collect_metrics(results_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(results_dir.glob("*/metrics.json")):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def print_report(params: Params) -> None:
    console = Console()
    outputs = [
        ("synthetic dataset", params.synth.out_dir),
        ("decoded frames", params.decode.out_dir),
        ("per-video features", params.merge.npy_dir),
        ("merged HDF5 features", params.merge.out_dir),
        ("vocabulary files", params.vocab.out_dir),
        ("checkpoints + dvclive logs", params.trainer.out_dir),
        ("predictions + metrics", params.evaluate.out_dir),
    ]
    table = Table(title="vmr outputs")
    table.add_column("what")
    table.add_column("where")
    for what, where in outputs:
        table.add_row(what, where + ("" if Path(where).exists() else "  (not produced)"))
    print_tables(table, console=console)

    metrics = collect_metrics(Path(params.evaluate.out_dir))
    if not metrics:
        console.print("No evaluated model yet (no metrics.json under "
                      f"{params.evaluate.out_dir}/).")
        return
    flat = {m: {k: v for k, v in flatten_metrics(values).items() if isinstance(v, (int, float))}
            for m, values in metrics.items()}
    columns = [c for c in HEADLINE if any(any(k.split("/")[-1] == c for k in f) for f in flat.values())]
    mt = Table(title=f"metrics ({params.evaluate.out_dir}/<model>/metrics.json)")
    mt.add_column("model")
    for c in columns:
        mt.add_column(c, justify="right")
    for model, values in flat.items():
        for group in sorted({k.rsplit("/", 1)[0] if "/" in k else "" for k in values}):
            cells = []
            for c in columns:
                key = f"{group}/{c}" if group else c
                cells.append(f"{values[key]:.2f}" if key in values else "")
            if any(cells):
                mt.add_row(f"{model} {group}".strip(), *cells)
    print_tables(mt, console=console)
    console.print("Compare runs: `dvc metrics show`, curves: `dvc plots show`.")


def print_parity(result: dict, show: int = 10) -> None:
    """The `vmr compare-features` tables: overall, then the `show` videos least alike."""
    o = result["overall"]
    summary = Table(title=Text(f"feature parity: {result['a']} vs {result['b']} (dim {o['dim']})"))
    summary.add_column("what")
    summary.add_column("value", justify="right")
    rows = [
        ("videos compared", o["videos_compared"]),
        ("only in A / only in B", f"{len(result['only_in_a'])} / {len(result['only_in_b'])}"),
        ("rows A / B / compared", f"{o['rows_a']} / {o['rows_b']} / {o['rows_compared']}"),
        ("videos with other row counts", o["videos_with_other_row_count"]),
        ("best offsets (offset: videos)", ", ".join(f"{k}: {v}" for k, v in o["offsets"].items())),
        ("cosine median", _num(o["cosine_median"])),
        ("cosine 5th percentile", _num(o["cosine_p5"])),
        ("relative L2 |A-B|/|B|", _num(o["rel_l2"])),
    ]
    for what, value in rows:
        summary.add_row(what, str(value))
    tables = [summary]
    worst = sorted(result["videos"].items(), key=lambda kv: (kv[1]["cosine_median"], kv[0]))[:show]
    if worst:
        per_video = Table(title=f"{len(worst)} of {o['videos_compared']} videos, lowest median cosine first")
        for name in ("video", "rows A", "rows B", "offset", "cosine median", "cosine p5", "rel L2"):
            per_video.add_column(name, justify="left" if name == "video" else "right")
        for vid, v in worst:
            per_video.add_row(escape(vid), str(v["rows_a"]), str(v["rows_b"]), str(v["offset"]),
                              _num(v["cosine_median"]), _num(v["cosine_p5"]), _num(v["rel_l2"]))
        tables.append(per_video)
    for side, key in (("A", "only_in_a"), ("B", "only_in_b")):
        if result[key]:
            listed = ", ".join(result[key][:show]) + (" ..." if len(result[key]) > show else "")
            tables.append(Text(f"only in {side} ({len(result[key])}): {listed}"))
    print_tables(*tables)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
