"""Tiny name -> class registries (detectron2/mmengine style, without the machinery).

A registry discovers its members by importing every public module of one package on first use, so
adding an extractor or a model means adding one file: no central list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
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
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._members and self._members[name] is not obj:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._members[name] = obj  # type: ignore[assignment]
            return obj

        return decorator

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> type:
        self._discover()
        if name not in self._members:
            raise UnknownNameError(f"unknown {self.kind} '{name}'; expected one of {self.names()}")
        return self._members[name]

    def config(self, params: Any, name: str) -> Any:
        """The typed config of member `name`: its `Config` validated from its params section."""
        section = getattr(params, self.table_key).get(name, {}) if self.table_key else {}
        return self.get(name).Config.model_validate(section)

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._members)

    def __contains__(self, name: str) -> bool:
        self._discover()
        return name in self._members
