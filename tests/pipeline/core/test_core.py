"""Registries, atomic writes and provenance records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.core import atomic, provenance
from pipeline.core.registry import Registry


def test_registry_rejects_unknown_and_duplicate_names():
    reg = Registry("widget", package="extractors")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and "a" in reg
    with pytest.raises(KeyError, match="unknown widget 'b'"):
        reg.get("b")
    with pytest.raises(KeyError, match="registered twice"):
        reg.register("a")(type("Other", (), {}))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    atomic.write_json(target, {"b": 1, "a": 2})
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}


def test_sigkill_mid_write_never_leaves_a_finished_looking_file(tmp_path):
    target = tmp_path / "big.bin"
    code = (
        "import os, signal; from pipeline.core.atomic import atomic_path\n"
        f"with atomic_path({str(target)!r}) as t:\n"
        "    t.write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert proc.returncode != 0
    assert not target.exists()
    assert atomic.remove_stale_temporaries(tmp_path) == 1 and list(tmp_path.iterdir()) == []


def test_provenance_record_round_trip_and_hashes(tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("hello")
    record = provenance.make_record("demo", {"a": 1}, inputs={"text": data}, weights={"net": "random"},
                                    code=["pipeline/core/provenance.py"])
    art = tmp_path / "out.npy"
    art.write_bytes(b"x")
    provenance.write_record(art, record)
    back = provenance.read_record(art)
    assert back["inputs"]["text"]["sha256"] == provenance.sha256_file(data)
    assert back["weights"] == {"net": "random"} and back["stage"] == "demo"
    # the code version depends only on the code named
    assert provenance.code_version(["pipeline/core/provenance.py"]) != provenance.code_version(["pipeline/core/params.py"])


def test_weights_record_checks_sha256(tmp_path, capsys):
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights")
    digest = provenance.sha256_file(w)
    assert provenance.weights_record(w, digest) == digest
    with pytest.raises(ValueError, match="does not match"):
        provenance.weights_record(w, "0" * 64)
    assert provenance.weights_record(None) == "random"
    assert "random init" in capsys.readouterr().err


def test_tree_digest_ignores_its_own_record(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    before = provenance.sha256_tree(tmp_path)
    provenance.write_record(tmp_path, {"stage": "x"})
    assert provenance.sha256_tree(tmp_path) == before
    (tmp_path / "b.txt").write_text("b")
    assert provenance.sha256_tree(tmp_path) != before


def test_atomic_write_of_a_name_near_the_limit(tmp_path):
    # 250 bytes + ".json" is a legal name; its temporary (".tmp-<name>.<random>") once was not
    target = tmp_path / ("é" * 125 + ".json")  # 2 bytes each: cut must not split a character
    atomic.write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    leftover = tmp_path / (atomic.temporary_prefix(target.name) + "abcdefgh")
    leftover.write_text("half")
    atomic.remove_own_temporaries(target)
    assert not leftover.exists() and target.exists()
