"""Method registry: one decorator, ``list_methods()`` and ``build_method()``, in the shape of timm's.

A method is one file in this package that decorates its class with ``@register_method("name")``.
Every module here is imported on first use of the registry, so adding a file is enough.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from methods.base import MethodConfigError, SSLMethod

__all__ = ["MethodConfigError", "SSLMethod", "build_method", "list_methods", "register_method"]

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


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _discover()
    return sorted(_REGISTRY)


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
