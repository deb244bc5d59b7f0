"""A small local Ray instance for engine tests; a skip when Ray is absent (a failure under
VMR_REQUIRE_RAY=1, as in CI, which installs the `[ray]` extra)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def require_ray():
    try:
        import ray
    except ImportError:
        reason = "ray is not installed (the optional extra: pip install -e '.[ray]')"
        if os.environ.get("VMR_REQUIRE_RAY") == "1":
            pytest.fail(reason + "; VMR_REQUIRE_RAY=1 makes this a failure")
        pytest.skip(reason)
    return ray


def worker_path(monkeypatch) -> None:
    """Ray's workers inherit the environment of the process that starts the instance: give them
    tests/ (pytest puts it on this process's sys.path only) to import the test extractor."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


@contextmanager
def local_ray(num_cpus: int = 2):
    ray = require_ray()
    with pytest.MonkeyPatch.context() as monkeypatch:
        worker_path(monkeypatch)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
