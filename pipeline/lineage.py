"""`vmr lineage PATH`: the chain of stages that made an artifact, back to the raw inputs.

Two sources are joined: the provenance records the stages write (params read, input hashes, code
version, weights) and `dvc.lock` (the command, dep and output hashes DVC verified). Each input named
by a record is followed in turn until a record marked `raw` (or with no inputs) ends the chain; an
imported published file is such a root, shown with its full sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.core.provenance import DIR_RECORD, read_record


def find_record(path: Path) -> tuple[Path, dict[str, Any]] | None:
    """The record of `path`, or of the nearest enclosing directory artifact that has one."""
    for candidate in [path, *path.resolve().parents]:
        record = read_record(candidate)
        if record is not None:
            return candidate, record
        if candidate.is_dir() and (candidate / DIR_RECORD).exists():
            break
    return None


def load_lock(lock_path: Path = Path("dvc.lock")) -> dict[str, Any]:
    if not lock_path.is_file():
        return {}
    return (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})


def lock_stage_for(path: Path, lock: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The dvc.lock stage with an output equal to or containing `path`."""
    target = path.resolve()
    for name, stage in lock.items():
        for out in stage.get("outs", []):
            out_path = Path(out["path"]).resolve()
            if target == out_path or out_path in target.parents:
                return name, stage
    return None


def lineage_chain(path: Path, lock: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Depth-first list of {path, record, lock_stage, depth}, artifact first."""
    lock = load_lock() if lock is None else lock
    chain: list[dict[str, Any]] = []
    seen: set[Path] = set()

    def visit(p: Path, depth: int) -> None:
        found = find_record(p)
        artifact, record = found if found else (p, None)
        if artifact.resolve() in seen:
            return
        seen.add(artifact.resolve())
        chain.append({"path": str(p), "artifact": _display(artifact), "record": record,
                      "lock": lock_stage_for(artifact, lock), "depth": depth})
        if (record or {}).get("raw"):  # e.g. a published feature file: its inputs are not vmr's
            return
        for inp in (record or {}).get("inputs", {}).values():
            visit(Path(inp["path"]), depth + 1)

    visit(path, 0)
    return chain


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def format_lineage(path: Path) -> str:
    lines = []
    for node in lineage_chain(path):
        pad = "  " * node["depth"]
        record, lock = node["record"], node["lock"]
        head = f"{pad}{node['path']}"
        if node["artifact"] != str(Path(node["path"])):
            head += f"  (part of {node['artifact']})"
        lines.append(head)
        if record is None:
            lines.append(f"{pad}  no provenance record (not written by a vmr stage)")
            continue
        lines.append(f"{pad}  stage: {record.get('stage')}   code: {record.get('code_version')}")
        for key, value in record.get("params", {}).items():
            lines.append(f"{pad}  param {key} = {_short(value)}")
        for role, w in record.get("weights", {}).items():
            lines.append(f"{pad}  weights {role}: {w}")
        for role, inp in record.get("inputs", {}).items():
            lines.append(f"{pad}  input {role}: {inp['path']} sha256={inp['sha256'][:16]}")
        if lock:
            name, stage = lock
            lines.append(f"{pad}  dvc.lock stage '{name}': cmd `{stage.get('cmd')}`")
            for out in stage.get("outs", []):
                lines.append(f"{pad}    out {out['path']} md5={out.get('md5')}")
        published = record.get("published")
        if published:
            root = record.get("inputs", {}).get("published", {})
            lines.append(f"{pad}  {published.get('note')}: {root.get('path')} ({published.get('layout')}) "
                         f"sha256={root.get('sha256')}")
        if record.get("raw"):
            lines.append(f"{pad}  (raw input: the chain starts here)")
    return "\n".join(lines)


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
