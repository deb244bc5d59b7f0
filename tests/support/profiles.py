"""The effective config of a profile, as `vmr train --model M --profile profiles/P` builds it."""

from __future__ import annotations

from pathlib import Path

from models import MODELS
from pipeline.cli import _params

REPO = Path(__file__).resolve().parents[2]


def effective(profile: str, model: str):
    """(model config, params) through the CLI's own loader, over the repository's params.yaml."""
    params = _params(REPO / "params.yaml", [], [REPO / "profiles" / profile])
    return MODELS.config(params, model), params
