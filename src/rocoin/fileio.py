"""Reading documents and writing outputs atomically (nothing half-written on failure)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import BaseModel, ValidationError

from rocoin.errors import RocoinError


def load_document(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML or JSON file (JSON is YAML, but ``.json`` files get JSON's error messages)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RocoinError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RocoinError(f"{path}: cannot read ({exc})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())
        raise RocoinError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML/JSON'}: {detail}") from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming the field, the value and what was expected (first error; count of others)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = _format_loc(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    where = f"{source}: {loc}" if loc else source
    if first.get("type") == "extra_forbidden":
        text = f"{where}: unknown field"
    elif first.get("type") == "missing":
        text = f"{where}: required field is missing"
    elif isinstance(first.get("input"), (dict, list)):
        text = f"{where}: {msg}"
    else:
        text = f"{where} = {_short_repr(first.get('input'))}: {msg}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(model: type[BaseModel], data: Any, source: str) -> Any:
    """Validate ``data`` against ``model``; bad data raises one :class:`RocoinError` line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RocoinError(format_validation_error(exc, source)) from None


def load_validated(model: type[BaseModel], path: str | os.PathLike[str], expected: str) -> Any:
    """Read a YAML/JSON mapping from ``path`` and validate it; ``expected`` describes the mapping."""
    data = load_document(path)
    if not isinstance(data, dict):
        raise RocoinError(f"{path}: expected {expected}, got {type(data).__name__}")
    return validate(model, data, str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise RocoinError(f"{path}: output folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
