"""Shared test fixtures: paths to the real annotation files beside the checkout, tiny thread counts."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
ANNOTATIONS = SHARED / "data" / "annotations"
REFERENCE_DATA = SHARED / "data" / "reference"


@pytest.fixture(scope="session")
def shared_annotations() -> Path:
    if not ANNOTATIONS.is_dir():
        pytest.fail(f"shared annotations not found at {ANNOTATIONS} (expected ../shared beside the checkout)")
    return ANNOTATIONS


@pytest.fixture(scope="session")
def reference_data() -> Path:
    if not REFERENCE_DATA.is_dir():
        pytest.fail(f"shared reference data not found at {REFERENCE_DATA}")
    return REFERENCE_DATA


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # CI and dev machines have 2 cores; oversubscription makes torch tests slower, not faster.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    yield
