"""What every command shares: the consoles and the one-line error handling."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from rocoin.contracts.errors import RocoinError, ServingError, UnavailableError

out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])


def clean_errors(func: F) -> F:
    """One ``error: ...`` line, no traceback, nothing written: exit code 2 for bad input
    (:class:`RocoinError`) or a peer that cannot be reached (:class:`UnavailableError`), 1 for a
    server that failed a valid request (:class:`ServingError`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (RocoinError, UnavailableError, ServingError) as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1 if isinstance(exc, ServingError) else 2) from None

    return wrapper  # type: ignore[return-value]


def require(module: str, extra: str) -> None:
    """One clear line when an optional dependency group is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise RocoinError(f"this command needs {module}: pip install -e '.[{extra}]'")


def flag(model: type[BaseModel], field: str, *names: str, **extra: Any) -> Any:
    """A typer option whose default and help are those of ``model.field``: one default per setting."""
    info = model.model_fields[field]
    default = ... if info.is_required() else info.default
    return typer.Option(default, *names, help=info.description, **extra)
