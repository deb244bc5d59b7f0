"""Data lineage: provenance chains, and the DVC checks CI runs on a clean checkout (tiny profile).

The end-to-end check (marked slow, run by `make test-e2e` from .ci/run):
  1. `dvc repro` completes on a clean copy of the checkout;
  2. a second `dvc repro` runs no stage and `dvc status` is clean;
  3. changing one parameter of one stage re-runs exactly that stage and its descendants;
  4. two more clean runs from nothing, in other directories, give byte-identical outputs (dvc.lock
     hashes) for every stage, synth's videos included.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import provenance
from pipeline.core.params import deep_merge
from pipeline.lineage import lineage_chain

REPO = Path(__file__).resolve().parents[2]
# Parameters to change in step 3, most specific first: the first one some stage reads is used.
PARAM_CANDIDATES = [
    ("merge.compression", "gzip"),
    ("vocab.splits", ["train", "test"]),
    ("synth.seed", 1),
]


def test_lineage_follows_inputs_back_to_the_raw_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "v.mp4").write_bytes(b"video")
    provenance.write_record(raw, {"stage": "synth", "params": {}, "inputs": {}, "raw": True})
    feat = tmp_path / "feat.npy"
    feat.write_bytes(b"feat")
    provenance.write_record(feat, provenance.make_record("extract", {"k": 1}, inputs={"videos": raw},
                                                         weights={"clip": "random"}))
    chain = lineage_chain(Path("feat.npy"), lock={})
    assert [n["record"]["stage"] for n in chain] == ["extract", "synth"]
    result = CliRunner().invoke(app, ["lineage", "feat.npy"])
    assert result.exit_code == 0
    assert "weights clip: random" in result.output and "raw input" in result.output
    assert CliRunner().invoke(app, ["lineage", "nope.npy"]).exit_code == 2


# -- the DVC lineage check ------------------------------------------------------------------------


def clean_copy(dest: Path, profile: Path) -> Path:
    """What a fresh clone has (tracked + untracked-not-ignored files), with the profile merged in."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = deep_merge(yaml.safe_load((dest / "params.yaml").read_text()), yaml.safe_load(profile.read_text()))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "dvc.lock").unlink(missing_ok=True)  # the lock of the default run does not apply
    # dvc.yaml follows params.yaml: regenerate it for the merged profile, as `make repro` does
    subprocess.run([sys.executable, "-m", "pipeline.cli", "dag"], cwd=dest, check=True, capture_output=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=ci@vmr", "-c", "user.name=ci", "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def dvc(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "VMR_NO_PROGRESS": "1"}
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def lock_stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def descendants(lock: dict, start: str) -> set[str]:
    """`start` and every stage that (transitively) depends on one of its outputs."""
    def overlaps(dep: str, out: str) -> bool:  # equal, or one inside the other (a dir dep holds the out)
        dep, out = dep.rstrip("/"), out.rstrip("/")
        return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")

    found, frontier = {start}, [start]
    while frontier:
        outs = [o["path"] for o in lock[frontier.pop()].get("outs", [])]
        for name, stage in lock.items():
            if name not in found and any(overlaps(d["path"], o) for d in stage.get("deps", []) for o in outs):
                found.add(name)
                frontier.append(name)
    return found


def nondeterministic(root: Path) -> set[str]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name for name, s in stages.items() if (s.get("meta") or {}).get("deterministic") is False}


@pytest.mark.slow
def test_dvc_lineage_on_a_clean_checkout(tmp_path):
    profile = REPO / "profiles" / "tiny.yaml"
    a = clean_copy(tmp_path / "a", profile)

    first = dvc(a, "repro")
    lock = lock_stages(a)
    assert ran_stages(first) == set(lock), "the first repro must run every stage"

    assert ran_stages(dvc(a, "repro")) == set(), "a second repro must run nothing"
    assert "up to date" in dvc(a, "status")

    # 3. one parameter of one stage -> exactly that stage and its descendants re-run
    params = yaml.safe_load((a / "params.yaml").read_text())
    def reads(stage: dict, key: str) -> bool:
        listed = (stage.get("params") or {}).get("params.yaml", {})
        return any(key == p or key.startswith(p + ".") for p in listed)

    key, value = next((k, v) for k, v in PARAM_CANDIDATES if any(reads(s, k) for s in lock.values()))
    owners = {n for n, s in lock.items() if reads(s, key)}
    assert len(owners) == 1, f"{key} is read by {owners}: pick a parameter of one stage"
    owner = owners.pop()
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(dvc(a, "repro")) == descendants(lock, owner)

    # 4. two more clean runs from nothing, synth included, give the same bytes for every stage
    #    (x264 once encoded a video to other bytes now and then: synth now runs without mbtree)
    b, c = clean_copy(tmp_path / "b", profile), clean_copy(tmp_path / "c", profile)
    dvc(b, "repro")
    dvc(c, "repro")
    lock_b, lock_c = lock_stages(b), lock_stages(c)
    assert set(lock_b) == set(lock_c) == set(lock)
    assert not nondeterministic(b), "every stage must be deterministic"
    for name in lock_b:
        outs_b = {o["path"]: o["md5"] for o in lock_b[name].get("outs", [])}
        outs_c = {o["path"]: o["md5"] for o in lock_c[name].get("outs", [])}
        assert outs_b == outs_c, f"stage {name} is not byte-identical across clean runs"
