"""Profiles through the command line: `--profile` builds exactly the published configuration.

A model section of a profile replaces the synthetic default's section in params.yaml (keys it does
not spell out take the model's own defaults, which are the seed's), so nothing of the default
leaks in. Per-model parameter counts against the official numbers are in tests/models/.
"""

from __future__ import annotations

import pytest
import yaml
from support.profiles import REPO, effective

from models import MODELS

PROFILES = sorted(p.name for p in (REPO / "profiles").glob("*.yaml"))


def sections(profile: str) -> dict:
    return yaml.safe_load((REPO / "profiles" / profile).read_text()).get("model") or {}


@pytest.mark.parametrize("profile", [p for p in PROFILES if sections(p)])
def test_a_profile_model_section_is_the_whole_config(profile):
    for model, section in sections(profile).items():
        cfg, _ = effective(profile, model)
        assert cfg == MODELS.get(model).Config.model_validate(section), \
            f"{profile}: params.yaml's model.{model} leaks into the published config"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads_through_the_cli(profile):
    overlay = yaml.safe_load((REPO / "profiles" / profile).read_text())
    for model in sections(profile) or [None]:
        _, params = effective(profile, model or "mmn")
        for key in ("features", "models"):
            if key in overlay:
                assert list(getattr(params, key)) == overlay[key]
