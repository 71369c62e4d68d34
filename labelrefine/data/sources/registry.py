"""The registry of data source kinds: ``@register_source(kind, options=..., doc=...)``.

A source is one module in this package with a loader registered under its kind::

    @register_source("mykind", options=("classes",), doc="what it reads, in one line")
    def load_mykind(req: SourceRequest) -> DataSplits: ...

:func:`~labelrefine.data.sources.parse_spec` accepts the options listed (plus the common
``size`` and ``channels``) and :func:`~labelrefine.data.sources.load_data` calls the loader with a
:class:`SourceRequest`. The kinds' order is their registration order (the package imports its
modules in the order of the docs table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..imageset import DataSplits

#: Options every kind takes: ``size=S|HxW`` and ``channels=1|3``.
COMMON_OPTIONS = frozenset({"size", "channels"})


@dataclass(frozen=True)
class SourceRequest:
    """What a loader is asked to load: the parsed spec, ``size`` (H, W) and ``channels`` parsed."""

    spec: str
    kind: str
    path: str | None  # None only for a kind registered with needs_path=False
    options: dict[str, str | bool]
    size: tuple[int, int] | None
    channels: int | None
    cache_dir: str | Path | None


Loader = Callable[[SourceRequest], DataSplits]


@dataclass(frozen=True)
class SourceKind:
    """A registered kind: its loader, the options it takes, its one-line doc."""

    kind: str
    load: Loader
    options: frozenset[str]  # every option the kind accepts, COMMON_OPTIONS included
    flags: frozenset[str]  # the options that are bare flags (``,download``)
    needs_path: bool
    no_path_note: str  # why a kind without a path takes none, for the error message
    doc: str


SOURCES: dict[str, SourceKind] = {}


def register_source(
    kind: str,
    *,
    options: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
    doc: str,
    needs_path: bool = True,
    no_path_note: str = "",
) -> Callable[[Loader], Loader]:
    """Register the decorated ``load(req: SourceRequest) -> DataSplits`` under ``kind``.

    ``options`` are the kind's own option names (``size`` and ``channels`` are added), ``flags``
    those of them that are bare flags; ``doc`` is the kind's line in the docs table.
    """
    if kind != kind.strip().lower() or not kind or any(c in kind for c in ":,="):
        raise ValueError(f"source kind {kind!r} must be lower case without ':', ',' or '='")
    if not doc.strip():
        raise ValueError(f"source kind {kind!r} needs a doc line")
    if not set(flags) <= set(options):
        raise ValueError(f"source kind {kind!r}: flags {sorted(set(flags) - set(options))} are not options")

    def deco(load: Loader) -> Loader:
        if kind in SOURCES:
            raise ValueError(f"source kind {kind!r} is registered twice")
        SOURCES[kind] = SourceKind(kind, load, COMMON_OPTIONS | frozenset(options), frozenset(flags),
                                   needs_path, no_path_note, doc)
        return load

    return deco


def known_kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(SOURCES)
