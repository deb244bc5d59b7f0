"""A stage's code is derived from its imports: the closure must hold what the stage really runs."""

from __future__ import annotations

from extractors import EXTRACTORS
from models import MODELS
from pipeline.core.codedeps import REPO_ROOT, import_closure, module_imports, stage_code
from pipeline.core.provenance import code_version


def test_function_local_and_relative_imports_are_seen(tmp_path):
    probe = REPO_ROOT / "pipeline" / "core" / "_codedeps_probe.py"
    probe.write_text("def f():\n    from pipeline.media import sampling\n    from . import atomic\n")
    try:
        module_imports.cache_clear()
        assert {"pipeline.media.sampling", "pipeline.core.atomic"} <= set(module_imports(probe))
    finally:
        probe.unlink()
        module_imports.cache_clear()


def test_closure_includes_parent_packages():
    closure = import_closure(["pipeline.media.sampling"])
    assert {"pipeline/__init__.py", "pipeline/media/__init__.py", "pipeline/media/sampling.py"} <= set(closure)


def test_the_dependencies_hand_written_lists_missed():
    # Each was missing from the hand-written dvc.yaml deps before they were derived (architecture
    # step). GLSCL's CLIP code was extractors/clip.py then; it is the shared pipeline/nets/clip.py now.
    assert "pipeline/nets/clip.py" in stage_code("train", [MODELS.get("glscl")])
    assert "pipeline/text/sentence_features.py" in stage_code("train", [MODELS.get("mrnet")])
    assert "pipeline/media/sampling.py" in stage_code("extract", [EXTRACTORS.get("clip")])


def test_a_stage_depends_on_its_selected_member_only():
    mmn = stage_code("train", [MODELS.get("mmn")])
    assert "models/mmn.py" in mmn and not any(p.startswith(("models/mrnet", "models/cnm")) for p in mmn)
    clip = stage_code("extract", [EXTRACTORS.get("clip")])
    assert "extractors/clip.py" in clip and "extractors/slowfast.py" not in clip


def test_code_version_follows_the_closure(tmp_path):
    files = stage_code("vocab")
    assert code_version(files) == code_version(list(reversed(files)))  # order-free
    assert code_version(files) != code_version([f for f in files if f != "pipeline/text/vocab.py"])
