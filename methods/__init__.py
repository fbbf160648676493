"""Method registry: one decorator, ``list_methods()`` and ``build_method()``, in the shape of timm's.

A method is one file in this package that decorates its class with ``@register_method("name")``.
Every module here is imported when the package is imported, so adding a file is enough: the
decorator also stores the method's defaults as a hydra structured config (``methods.presets``),
which the preset YAMLs in configs/method/ extend.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from methods.base import MethodConfigError, SSLMethod
from methods.presets import store_method_defaults

__all__ = [
    "MethodConfigError",
    "SSLMethod",
    "build_method",
    "default_grid_presets",
    "get_method_class",
    "list_methods",
    "register_method",
]

_REGISTRY: dict[str, type[SSLMethod]] = {}
_discovered = False


def register_method(name: str):
    """Class decorator: make ``cls`` buildable as ``build_method(name, ...)``."""

    def decorate(cls: type[SSLMethod]) -> type[SSLMethod]:
        if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
            raise TypeError(f"@register_method({name!r}) expects an SSLMethod subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is already registered by {existing.__module__}")
        cls.name = name
        if not cls.__dict__.get("default_preset"):
            cls.default_preset = name
        store_method_defaults(cls)
        _REGISTRY[name] = cls
        return cls

    return decorate


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def list_methods(*, trains: bool | None = None) -> list[str]:
    """Names of every registered method, sorted; ``trains=True``/``False`` keeps only the methods
    that train (or only the reference rows that do not)."""
    _discover()
    return sorted(n for n, cls in _REGISTRY.items() if trains is None or cls.trains == trains)


def default_grid_presets() -> list[str]:
    """The presets of the default grid (``python -m eval.grid -m``): the reference rows, then
    every method's default preset followed by the base presets its comparisons need."""
    _discover()
    classes = [_REGISTRY[name] for name in sorted(_REGISTRY)]
    presets: list[str] = []
    for cls in sorted(classes, key=lambda c: not c.is_reference):
        for preset in (cls.default_preset, *cls.base_presets):
            if preset not in presets:
                presets.append(preset)
    return presets


def get_method_class(name: str) -> type[SSLMethod]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodConfigError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def build_method(name: str, backbone: nn.Module, **options: Any) -> SSLMethod:
    """Build method ``name`` around ``backbone``; ``options`` are fields of the method's Config."""
    cls = get_method_class(name)
    return cls(backbone, cls.make_config(**options))


# Importing the package registers every method, so that hydra finds their config nodes whatever
# module composes the first config.
_discover()
