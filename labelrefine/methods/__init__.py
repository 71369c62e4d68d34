"""Method registry: every training method, looked up by name.

Each method is one file with one class behind the :class:`~labelrefine.methods.base.Method`
interface, registered with :func:`register`. Tests loop over :data:`METHODS`, so a new method
is tested the moment it is registered.
"""

from __future__ import annotations

from ..errors import UserError
from .base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _load_all()
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods() -> list[type[Method]]:
    _load_all()
    return list(METHODS.values())


def _load_all() -> None:
    """Import every module of this package; importing a module registers its methods."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["METHODS", "Method", "get_method", "list_methods", "register"]
