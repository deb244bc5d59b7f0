"""Tiny name -> class registries (detectron2/mmengine style, without the machinery).

A member registers itself with `@REGISTRY.register("name")` in any module of the registry's package,
so adding an extractor or a model means adding one file: no central list to edit. The registry finds
its members by reading those decorators with `ast`, without importing anything, and imports a
member's module only when the member is asked for by name: `vmr decode` validating `model.mmn`
does not import the other models (nor torch, which the registered classes keep out of their modules'
top level).

A member may be a light *spec* that names its implementation, `register("mmn", impl="models.mmn:MMN")`:
`spec(name)` is the spec (Config, what the member needs; no torch), `get(name)` the implementation,
imported on that call. Without `impl`, both are the registered class.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core.errors import UnknownNameError

T = TypeVar("T")


class Registry:
    def __init__(self, kind: str, package: str, list_key: str | None = None, table_key: str | None = None):
        self.kind = kind  # "extractor", "model", ... (used in error messages)
        self.package = package  # dotted package whose modules register themselves
        # where params.yaml names members (`features: [clip]`) and configures them (`extractors.clip`)
        self.list_key, self.table_key = list_key, table_key
        self._members: dict[str, type] = {}
        self._impls: dict[str, str] = {}  # name -> "module:Class" of a spec's implementation

    def register(self, name: str, impl: str | None = None) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._members and self._members[name] is not obj:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._members[name] = obj  # type: ignore[assignment]
            if impl is not None:
                self._impls[name] = impl
            return obj

        return decorator

    @cached_property
    def _modules(self) -> dict[str, str]:
        """name -> the module that registers it, read from the package's source files."""
        root = Path(importlib.import_module(self.package).__file__).parent
        found: dict[str, str] = {}
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if any(p.startswith("_") for p in parts):
                continue
            module = ".".join([self.package, *parts])
            for name in _registered_names(path):
                if name in found:
                    raise KeyError(f"{self.kind} '{name}' is registered twice ({found[name]}, {module})")
                found[name] = module
        return found

    def spec(self, name: str) -> type:
        """The registered class (a spec or the member itself), its module imported on first use."""
        if name not in self._members:
            if name not in self._modules:
                raise UnknownNameError(f"unknown {self.kind} '{name}'; expected one of {self.names()}")
            importlib.import_module(self._modules[name])
        return self._members[name]

    def get(self, name: str) -> type:
        """The member's implementation (the registered class, or what its `impl` names)."""
        member = self.spec(name)
        if name not in self._impls:
            return member
        module, _, attr = self._impls[name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def modules(self, name: str) -> list[str]:
        """The modules that hold member `name`'s code (its spec's, then its implementation's), by
        name and without importing the implementation: what `codedeps.stage_code` follows."""
        modules = [self.spec(name).__module__]
        if name in self._impls:
            modules.append(self._impls[name].partition(":")[0])
        return modules

    def config(self, params: Any, name: str) -> Any:
        """The typed config of member `name`: its `Config` validated from its params section."""
        section = getattr(params, self.table_key).get(name, {}) if self.table_key else {}
        return self.spec(name).Config.model_validate(section)

    def names(self) -> list[str]:
        return sorted(set(self._modules) | set(self._members))

    def __contains__(self, name: str) -> bool:
        return name in self._members or name in self._modules


def _registered_names(path: Path) -> list[str]:
    """Names given to `@<registry>.register("name", ...)` decorators in one source file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "register"
                        and dec.args and isinstance(dec.args[0], ast.Constant) and isinstance(dec.args[0].value, str)):
                    names.append(dec.args[0].value)
    return names
