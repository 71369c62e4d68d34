"""User-facing errors.

Anything the user can cause (a missing file, a bad label, a rate out of range) raises
:class:`UserError` with a one-line message that names the file or field. The CLI turns it
into ``labelrefine: error: <message>`` on stderr and exit code 2; library callers get an
ordinary exception they can catch.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a one-line message naming the file or field."""

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller built.
        super().__init__(" ".join(str(message).split()))


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops (exit code 1) and the last good checkpoint, if any, is kept."""


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for embedding user input in a message.

    The work is bounded whatever ``value`` is: :mod:`reprlib` looks at only the first few items
    and levels of a container (a YAML alias structure that would expand to gigabytes stays
    cheap), and anything whose repr fails shows as ``<type>``.
    """
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 4, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = limit
    try:
        text = r.repr(value)
    except Exception:  # noqa: BLE001 - a repr that raises (e.g. an int too long for str()) is still shown
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
