"""The layers of docs/architecture.md: every import of the project's own code points down (or sideways
within its own package). Read from the source with `ast`, function-local imports included."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.codedeps import PACKAGES, REPO_ROOT, module_imports, module_name

# Lowest first. A module may import modules of its own layer and of the layers below.
LAYERS = [
    ["pipeline", "pipeline.core"],  # `pipeline` itself: only the version string
    ["pipeline.nets"],  # pretrained-network helpers shared by extractors and models
    ["pipeline.media", "pipeline.text"],  # independent siblings: neither imports the other
    ["pipeline.training"],
    ["extractors"],
    ["models"],
    ["stages"],
    ["pipeline.cli", "pipeline.dag", "pipeline.report", "pipeline.lineage", "pipeline.export",
     "pipeline.predict", "pipeline.serve"],  # the app
]
INDEPENDENT = 2  # the layer whose entries must not import each other


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the layer entry) of the longest matching entry."""
    best = None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    if best is None:
        raise AssertionError(f"{module}: in no layer; add it to LAYERS and docs/architecture.md")
    return best


def all_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py"))


def test_every_module_has_a_layer():
    for path in all_modules():
        layer_of(module_name(path))


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_imports_only_point_down(path):
    me = module_name(path)
    my_layer, my_entry = layer_of(me)
    upward = []
    for target in module_imports(path):
        layer, entry = layer_of(target)
        sideways = layer == my_layer == INDEPENDENT and entry != my_entry
        if layer > my_layer or sideways:
            upward.append(f"{target} (layer {layer}: {entry})")
    assert not upward, f"{me} (layer {my_layer}: {my_entry}) imports upward/sideways: {upward}"


def test_a_violation_is_caught(tmp_path, monkeypatch):
    """The check itself: a core module importing a model is reported."""
    bad = REPO_ROOT / "pipeline" / "core" / "_layer_probe.py"
    bad.write_text("from models import MODELS\n")
    try:
        module_imports.cache_clear()
        with pytest.raises(AssertionError, match="imports upward"):
            test_imports_only_point_down(bad)
    finally:
        bad.unlink()
        module_imports.cache_clear()
