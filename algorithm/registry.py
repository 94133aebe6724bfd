"""Registries of the algorithm's variants: a variant is one module that registers a class under a name, and the
config names it (`algorithm.advantage`, `algorithm.selector`, `algorithm.loss`, `algorithm.transition`).

The modules of a variant package (`algorithm/advantages/`, `algorithm/selectors/`, `algorithm/losses/`) are
imported when the registry is first read, so adding a variant is adding its file: nothing else lists it.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class of one kind of variant (`key`: the config key that names one, for messages)."""

    def __init__(self, key: str, package: Optional[str] = None):
        self.key, self.package = key, package
        self._classes: dict[str, type[T]] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.key}: two variants named {name!r} ({self._classes[name].__name__}, "
                                 f"{cls.__name__})")
            cls.name = name
            self._classes[name] = cls
            return cls
        return add

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        self._load()
        if name not in self._classes:
            raise ValueError(f"{self.key}={name!r} is not a known variant; choose one of {self.names()}")
        return self._classes[name]
