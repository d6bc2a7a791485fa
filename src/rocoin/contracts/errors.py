"""The one error type that user-facing code raises for bad input or impossible requests.

The CLI turns a :class:`RocoinError` into a single ``error: ...`` line on stderr and exit
code 2, without a traceback.
"""

from __future__ import annotations


class RocoinError(ValueError):
    """Bad input (a file, a field, an option) or a request that cannot be satisfied."""


class InfeasiblePlanError(RocoinError):
    """The constraints of the knowledge-assignment problem cannot be met."""


class ServingError(RuntimeError):
    """A valid request the server could not answer: a fault on the serving side, not the caller's
    (HTTP 500 / ``INTERNAL`` with this one-line message)."""
