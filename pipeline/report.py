"""`vmr report`: where the outputs are, and the metrics of every evaluated model in one table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.core.params import Params
from pipeline.training.evaluation import flatten_metrics

HEADLINE = ("R@1,IoU@0.3", "R@1,IoU@0.5", "R@1,IoU@0.7", "R@5,IoU@0.5", "mIoU", "mAP",
            "t2v_R1", "t2v_R5", "t2v_MdR", "v2t_R1")


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
    console.print(table)

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
    console.print(mt)
    console.print("Compare runs: `dvc metrics show`, curves: `dvc plots show`.")
