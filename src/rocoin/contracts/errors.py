"""The error types rocoin raises on purpose, one per situation; anything else is a bug.

- :class:`RocoinError`: bad input (a file, a field, an option) or a request that cannot be
  satisfied; the message names the field, the value and what was expected.
- :class:`InfeasiblePlanError` (a ``RocoinError``): the planner's constraints cannot be met.
- :class:`UnavailableError`: a peer (a device, the source, a server process) could not be
  reached, exited, or was not ready in time: a fault of the system, or of an address given.
- :class:`ServingError`: a valid request the server could not answer (HTTP 500 / ``INTERNAL``).

The command line (and each runtime entry point) shows any of them as one ``error:`` line without
a traceback. The exit code is 2, as it was when all but the last were ``RocoinError`` (from here a
wrong address and a peer that went away look the same); 1 for a ``ServingError``.

A step of the offline pipeline whose cached output cannot be reused raises its own type there
(``rocoin.pipeline``); it is redone, never shown as an error.
"""

from __future__ import annotations


class RocoinError(ValueError):
    """Bad input (a file, a field, an option) or a request that cannot be satisfied."""


class InfeasiblePlanError(RocoinError):
    """The constraints of the knowledge-assignment problem cannot be met."""


class UnavailableError(RuntimeError):
    """A peer could not be reached, exited, or was not ready in time (not the caller's input)."""


class ServingError(RuntimeError):
    """A valid request the server could not answer: a fault on the serving side, not the caller's
    (HTTP 500 / ``INTERNAL`` with this one-line message)."""
