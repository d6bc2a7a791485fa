"""The error types rocoin raises on purpose, one per situation; anything else is a bug.

============================  =====================================================  ==========
type                          situation                                               CLI
============================  =====================================================  ==========
:class:`RocoinError`          bad input (a file, a field, an option) or a request    ``error:``
                              that cannot be satisfied; the message names the field,  line,
                              the value and what was expected                         exit 2
:class:`InfeasiblePlanError`  the planner's constraints cannot be met (a             exit 2
                              ``RocoinError``: the input asks for the impossible)
:class:`UnavailableError`     a peer (a device, the source, a server process) could  ``error:``
                              not be reached, exited, or was not ready in time: a    line,
                              fault of the system, not of the input                  exit 1
:class:`ServingError`         a valid request the server could not answer (HTTP 500  ``error:``
                              / ``INTERNAL`` with this one-line message)             line, exit 1
============================  =====================================================  ==========

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
