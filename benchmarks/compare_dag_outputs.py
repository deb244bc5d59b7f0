"""Compare the outputs of two runs of the default DAG, content by content.

    python benchmarks/compare_dag_outputs.py RUN_A RUN_B [--json out.json]

Used to show that a refactor preserved behaviour: RUN_A and RUN_B are two checkouts (or copies)
after `dvc repro`. Every output file under work/, features/, vocab/, runs/ and results/ is compared:

- arrays exactly (.npy; every HDF5 dataset; every tensor of a torch checkpoint);
- JSON exactly, after dropping what *must* change when the code or the raw bytes change: the
  `code_version` of provenance records, input `sha256` digests (synthetic videos are bit-exact in
  pixels but x264 may write other bytes), stage names, and the `code` / `inputs` digests inside a
  checkpoint's resume record;
- any other file byte for byte.

Prints one line per difference and a summary; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

ROOTS = ("work", "features", "vocab", "runs", "results")
VOLATILE_KEYS = {"code_version", "sha256", "stage", "code", "inputs", "torch", "environment", "dvc_lock_stage"}


def scrub(obj):
    """JSON without the fields that legitimately differ between code versions or video bytes."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        a, b = scrub(a), scrub(b)
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def compare_h5(a: Path, b: Path) -> str | None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        if sorted(names_a) != sorted(names_b):
            return "different datasets"
        for name in names_a:
            if isinstance(fa[name], h5py.Dataset) and not np.array_equal(fa[name][()], fb[name][()]):
                return f"dataset {name} differs"
        attrs_a = {k: v for k, v in fa.attrs.items() if k != "provenance"}
        attrs_b = {k: v for k, v in fb.attrs.items() if k != "provenance"}
        if not same_tree(attrs_a, attrs_b):
            return "root attrs differ"
        if "provenance" in fa.attrs and scrub(json.loads(fa.attrs["provenance"])) != scrub(
                json.loads(fb.attrs["provenance"])):
            return "provenance differs beyond code version and digests"
    return None


def compare_file(a: Path, b: Path) -> str | None:
    if a.read_bytes() == b.read_bytes():
        return None
    if a.suffix == ".npy":
        return None if np.array_equal(np.load(a), np.load(b)) else "array differs"
    if a.suffix in (".h5", ".hdf5"):
        return compare_h5(a, b)
    if a.suffix == ".pt":
        sa = torch.load(io.BytesIO(a.read_bytes()), map_location="cpu", weights_only=True)
        sb = torch.load(io.BytesIO(b.read_bytes()), map_location="cpu", weights_only=True)
        return None if same_tree(sa, sb) else "checkpoint differs (tensors or records)"
    if a.suffix == ".json":
        return None if scrub(json.loads(a.read_text())) == scrub(json.loads(b.read_text())) else "JSON differs"
    return "bytes differ"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    files_a = {p.relative_to(args.run_a) for r in ROOTS for p in (args.run_a / r).rglob("*") if p.is_file()}
    files_b = {p.relative_to(args.run_b) for r in ROOTS for p in (args.run_b / r).rglob("*") if p.is_file()}
    problems = {str(p): "only in A" for p in files_a - files_b} | {str(p): "only in B" for p in files_b - files_a}
    identical = equal_content = 0
    for rel in sorted(files_a & files_b):
        a, b = args.run_a / rel, args.run_b / rel
        if a.read_bytes() == b.read_bytes():
            identical += 1
            continue
        problem = compare_file(a, b)
        if problem:
            problems[str(rel)] = problem
        else:
            equal_content += 1
    for rel, problem in sorted(problems.items()):
        print(f"DIFF {rel}: {problem}")
    summary = {"files_compared": len(files_a & files_b), "byte_identical": identical,
               "equal_modulo_code_version_and_digests": equal_content, "differences": len(problems)}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({**summary, "problems": problems}, indent=1))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
