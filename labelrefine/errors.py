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
