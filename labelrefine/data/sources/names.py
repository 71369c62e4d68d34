"""Class lists and names: checking class names, integer labels' classes, printable ids, short messages.

Integer labels without a class list name their classes by value, as folder names do: the
classes are the distinct values present (all splits), ascending, named ``str(value)``
(:func:`present_classes`, :func:`index_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import UserError


def check_class_names(names: Sequence[object], what: str, *, hint: str = "") -> None:
    """Refuse an empty class name or a name listed twice: a :class:`UserError` starting with ``what``."""
    texts = [str(c) for c in names]
    if any(not c for c in texts):
        raise UserError(f"{what}: empty class name{hint}")
    seen: set[str] = set()
    for c in texts:
        if c in seen:
            raise UserError(f"{what}: class {_short(c)!r} listed twice")
        seen.add(c)


def _short(value: object, limit: int = 60) -> str:
    """``str(value)`` cut to ``limit`` characters: never put an unbounded value into a message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * limit:
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"  # no str(): it may be refused
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _class_list(classes: Sequence[str], limit: int = 20) -> str:
    """``a, b, c`` for a message; long lists show their first ``limit`` names and the count."""
    if len(classes) <= limit:
        return ", ".join(classes)
    return f"{', '.join(classes[:limit])}, ... ({len(classes)} classes)"


def printable_name(name: str) -> str:
    """``name`` itself when it is valid Unicode text, else a lossless printable form of it.

    A file name that is not valid UTF-8 reaches Python with each undecodable byte as a lone
    surrogate (``os.fsdecode``); such a string cannot be written as UTF-8. Its printable form
    spells every byte that is not UTF-8 as ``\\xNN`` (Python's ``backslashreplace``), so
    ``b"caf\\xe9.png"`` becomes ``caf\\xe9.png``. Valid names come back unchanged.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (e.g. JSON "\\ud800")
        raw = name.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def present_classes(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The sorted distinct values of integer label arrays: the classes of integer labels.

    Integer labels name their classes by value, as folder names do for ``imagefolder``: the
    classes are the values that occur in the training labels, in ascending order, and class
    ``i`` is named ``str(values[i])``. Labels ``0..C-1`` that all occur keep their indices.
    """
    arrays = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.int64)


def index_labels(present: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Class indices of integer ``values`` among ``present`` (sorted), and the position of the
    first value that is not one of them (``None`` when all are)."""
    values = np.asarray(values, dtype=np.int64)
    idx = np.searchsorted(present, values)
    found = np.zeros(values.shape, dtype=bool)
    inside = idx < len(present)
    found[inside] = present[idx[inside]] == values[inside]
    bad = None if found.all() else int(np.flatnonzero(~found)[0])
    return idx.astype(np.int64), bad

