"""How a runtime process starts: typed options from a JSON file, logging, one-line errors.

``python -m rocoin.runtime.device --options FILE`` and ``python -m rocoin.runtime.api --options
FILE`` are what :class:`rocoin.runtime.cluster.local.LocalCluster` starts: the options are the
same validated models (:class:`~rocoin.runtime.device.options.DeviceOptions`,
:class:`~rocoin.runtime.api.options.SourceOptions`) that ``rocoin device serve`` and ``rocoin
source serve`` build from their flags, so each setting has one default, written once.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from rocoin.contracts.errors import RocoinError, ServingError, UnavailableError
from rocoin.contracts.fileio import load_validated
from rocoin.contracts.text import one_line

M = TypeVar("M", bound=BaseModel)


def run_entry_point(model: type[M], run: Callable[[M], None], what: str, argv: list[str] | None = None) -> int:
    """Parse ``--options FILE`` (JSON or YAML of ``model``), configure INFO logging, call ``run``.

    Returns 0 (or 130 when interrupted). On an error it exits with one ``error:`` line on stderr,
    as the CLI does: code 2 for bad options or input or a peer that cannot be reached, 1 for a
    server that failed a valid request.
    """
    from rocoin.logs import configure

    parser = argparse.ArgumentParser(prog=f"python -m {what}", description=__doc__.splitlines()[0])
    parser.add_argument("--options", required=True, help=f"JSON/YAML file of {model.__name__}")
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    args = parser.parse_args(argv)
    configure(logging.INFO, json_lines=args.log_json)
    try:
        options = load_validated(model, args.options, f"{model.__name__} (see {model.__module__})")
        run(options)
    except (RocoinError, UnavailableError, ServingError) as exc:
        # argparse is this entry point's command line: its exit writes the one error line to stderr.
        parser.exit(1 if isinstance(exc, ServingError) else 2, f"error: {one_line(str(exc), 2000)}\n")
    except KeyboardInterrupt:
        return 130
    return 0


def option_default(model: type[BaseModel], field: str):
    """The default of ``model.field``: what the command line shows and uses when a flag is absent."""
    return model.model_fields[field].default
