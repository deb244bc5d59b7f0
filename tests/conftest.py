"""Shared test fixtures: paths to the real annotation files beside the checkout, tiny thread counts.

Tests that read ../shared skip with the reason when it is absent (a fresh clone without it still
passes `make test`); CI sets VMR_REQUIRE_SHARED=1, which turns the absence into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
ANNOTATIONS = SHARED / "data" / "annotations"
REFERENCE_DATA = SHARED / "data" / "reference"


def require_shared(path: Path) -> Path:
    """`path` under ../shared, or a skip with the reason (a failure when VMR_REQUIRE_SHARED=1, as in CI)."""
    if not path.exists():
        reason = f"{path} not found (the shared data beside the checkout, ../shared, is absent)"
        if os.environ.get("VMR_REQUIRE_SHARED") == "1":
            pytest.fail(reason + "; VMR_REQUIRE_SHARED=1 makes this a failure")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared_annotations() -> Path:
    return require_shared(ANNOTATIONS)


@pytest.fixture(scope="session")
def reference_data() -> Path:
    return require_shared(REFERENCE_DATA)


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # CI and dev machines have 2 cores; oversubscription makes torch tests slower, not faster.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    yield


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A tiny project trained through the CLI, every model (tests/support/trained.py): about a
    minute, so only slow tests use it; built once per session for the predict and serve tests."""
    from support.trained import build_project

    return build_project(tmp_path_factory.mktemp("predict_project"))


@pytest.fixture(scope="session")
def tiny_predictor(project, tmp_path_factory):
    """The Predictor on the project's MMN, with its own feature cache."""
    from pipeline.predict import Predictor

    return Predictor.from_checkpoint(project / "runs" / "mmn" / "best.pt",
                                     cache_dir=tmp_path_factory.mktemp("predict-cache"))
