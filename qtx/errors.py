"""The one exception type for a user's mistake, and the one for resources not on the machine.

Every invalid config value, mismatched checkpoint or bad input raises :class:`UserError`
with one sentence that names the field and the allowed values. It subclasses ``ValueError``,
so ``except ValueError`` still catches it; the command-line mains (``qtx.run.cli``) print it as
``error: <sentence>`` and exit with status 2, without a traceback. Any other exception is a
programming error and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """An invalid config value, a mismatched checkpoint or bad input (one sentence)."""


class MissingResources(UserError):
    """Data or tokenizers the run needs are not on this machine: one line per missing thing,
    each saying what is missing and how to get it once with network access."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))
