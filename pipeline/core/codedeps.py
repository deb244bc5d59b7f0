"""What code a stage runs, derived from the imports: never listed by hand.

`module_imports` reads a module's `import` statements (all of them, function-local ones too) with
`ast`, without importing anything. `import_closure` follows them through the project's packages.
A stage's code is the closure of `stages/<name>.py` plus the registry members its params select
(the registries import their members by name at run time, which no static reading can see).
The same list feeds dvc.yaml's deps, the provenance `code_version` and the resume guard.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "extractors", "models")  # the project's own top-level packages


def module_file(module: str) -> Path | None:
    """The source file of a project module (`pkg/mod.py` or `pkg/mod/__init__.py`), or None."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    rel = Path(path).resolve().relative_to(REPO_ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


@cache
def module_imports(path: Path) -> tuple[str, ...]:
    """Project modules imported anywhere in `path`, as dotted names (packages included: importing
    `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` first)."""
    path = Path(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name`: name may be a submodule or an attribute of pkg
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if module_file(prefix) is not None:
                    found.add(prefix)
    found.discard(me)
    return tuple(sorted(found))


def import_closure(roots: Iterable[str | Path]) -> list[str]:
    """Every project file the roots (paths or dotted module names) import, transitively, themselves
    included; paths relative to the repository root, sorted."""
    todo: list[Path] = []
    for root in roots:
        path = Path(root) if str(root).endswith(".py") else module_file(str(root))
        if path is None:
            raise ValueError(f"{root}: not a module of the project ({', '.join(PACKAGES)})")
        todo.append((REPO_ROOT / path).resolve())
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        # a module's parent packages run first
        name = module_name(path).split(".")
        todo += [module_file(".".join(name[:i])) for i in range(1, len(name))]
        todo += [module_file(m) for m in module_imports(path)]
        todo = [p for p in todo if p is not None]
    return sorted(str(p.relative_to(REPO_ROOT)) for p in seen)


def stage_code(stage: str, members: Iterable[object] = ()) -> list[str]:
    """The code of stage `stages/<stage>.py`: its import closure plus the closure of each registry
    member the stage's params select (classes, whose defining module is followed, or dotted module
    names, as `Registry.modules` gives them without importing anything)."""
    roots: list[str] = [f"stages.{stage}"]
    roots += [obj if isinstance(obj, str) else obj.__module__ for obj in members]  # type: ignore[attr-defined]
    return import_closure(roots)
