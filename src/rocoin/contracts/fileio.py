"""Reading documents and writing outputs atomically (nothing half-written on failure).

Every document (fleet, catalog, plan, bundle manifest) is read through :func:`load_document`,
which bounds its size, its nesting and its expanded number of values and refuses a key given
twice; every ``.npy`` through :func:`load_npy`, which checks the header against the file before
reading it; every JSON output through :func:`dumps_json`, which refuses NaN and infinities.
"""

from __future__ import annotations

import contextlib
import gc
import json
import json.decoder
import json.scanner
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError

from rocoin.contracts.errors import RocoinError
from rocoin.contracts.text import one_line, short_repr

#: Largest YAML/JSON document read, checked with stat before reading and again while reading
#: [decision]: rocoin's biggest documents (a fleet or plan of 10^5 devices) take a few MiB.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
#: Deepest nesting of mappings and lists in a document [decision]: rocoin's deepest (a manifest's
#: plan's groups' tensor shapes) is 5 levels; 64 stays far below Python's recursion limit.
MAX_DOCUMENT_DEPTH = 64
#: Most values (scalars, mappings, lists) in a document, counting a YAML alias each time it is
#: used: a plain document of MAX_DOCUMENT_BYTES holds at most about MAX_DOCUMENT_BYTES / 2 values
#: ("0," each), so more can only come from aliases multiplying it (an "alias bomb").
MAX_DOCUMENT_VALUES = MAX_DOCUMENT_BYTES // 2
#: Largest .npy file loaded, header included [decision]: rocoin's arrays (activations of images ×
#: filters, F × F filter graphs) take well under 1 GiB.
MAX_NPY_BYTES = 2 * 1024**3
#: The .npy format versions read (3.0 differs only by UTF-8 field names, which rocoin never writes).
NPY_VERSIONS = ((1, 0), (2, 0))

_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(Exception):
    """A mapping gives one key twice (``line``/``first_line`` are 1-based; 0 when unknown)."""

    def __init__(self, key: Any, line: int = 0, first_line: int = 0) -> None:
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line

    def describe(self) -> str:
        where = f" on line {self.line} (first on line {self.first_line})" if self.line else ""
        return f"duplicate key {short_repr(self.key)}{where}: expected each key once per mapping"


#: libyaml's parser when PyYAML was built with it (the wheels are): a 10,000-device fleet parses in
#: well under a second instead of ~3 s; the construction (and the checks below) stay in Python.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[misc, valid-type]
    """A safe loader that refuses a key repeated in one mapping (PyYAML keeps the last).

    Keys brought in by a merge (``<<: *base``) may still be overridden: only the keys written in
    the mapping itself are compared.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _YAML_MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of every JSON document: a key given twice is an error."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _locate_json_duplicate(text: str) -> _DuplicateKey | None:
    """The first duplicate key of ``text`` with its lines (parsed again, slowly: errors only).

    The C parser that reads documents gives the hook no positions; the pure-Python one lets us
    record where every value of an object starts.
    """

    def line_of(index: int) -> int:
        return text.count("\n", 0, index) + 1

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None, *args):
        starts: list[int] = []

        def scan(string: str, index: int):
            starts.append(index)
            return scan_once(string, index)

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            first: dict[str, int] = {}
            for i, (key, _) in enumerate(pairs):
                if key in first:
                    raise _DuplicateKey(key, line_of(starts[i]), line_of(starts[first[key]]))
                first[key] = i
            return dict(pairs)

        return json.decoder.JSONObject(s_and_end, strict, scan, object_hook, hook, memo, *args)

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]
    try:
        decoder.decode(text)
    except _DuplicateKey as exc:
        return exc
    except (ValueError, RecursionError):
        return None
    return None


def _plain_yaml_table() -> dict[int, str]:
    """``str.translate`` table of :func:`_plain_yaml`: 0 to Z, other digits to N, e/E to e, o/O to
    o, _ to U, signs to -, separators (space, newline, ``:,[]{}``) to a space, the characters it refuses
    to ``!``, any other character to a."""
    table = {c: "a" for c in range(128)}
    table.update({ord(c): "N" for c in "123456789"})
    table[ord("0")] = "Z"
    table.update({ord("e"): "e", ord("E"): "e", ord("o"): "o", ord("O"): "o", ord("-"): "-", ord("+"): "-", ord("."): ".", ord("_"): "U"})
    table.update({ord(c): " " for c in " \n:,[]{}"})
    table.update({c: "!" for c in [*range(32), 127] if c != ord("\n")})
    table.update({ord(c): "!" for c in "&*!%|><\\?=@`"})
    return table


_PLAIN_TABLE = _plain_yaml_table()
#: Numbers that YAML 1.2 (yaml-rs) reads but YAML 1.1 (PyYAML) reads otherwise, as they look
#: once translated: a leading zero (1.1: octal) or 0o, 0X, 0_9 (1.1: strings; 0x, 0b too, to be
#: safe), an exponent (1.1 wants a dot and a signed exponent), a sign before a dot, an
#: underscore first or after a leading dot (1.1: strings). Found by comparing both readers on
#: random documents: any new difference belongs here (and in test_yaml_loader's TRICKY).
_NUMBERS_READ_OTHERWISE = tuple(" ZZ| ZN| Zo| Za| ZU| -ZZ| -ZN| -Zo| -Za| -ZU| -.| .U|Ze|Ne|.e|Ue| UN| UZ| U.| UU| -U".split("|"))
_COMPACT_NESTED_SEQUENCES = re.compile(r"-[ ]+-(?=[ \n]|$)")
#: Deepest indentation the fast reader takes: yaml-rs recurses on the C stack (some 10,000
#: levels crash the process instead of raising), so deeply nested documents go to PyYAML.
_MAX_PLAIN_INDENT = 256


def _plain_yaml(text: str) -> bool:
    """Whether ``text`` keeps to the YAML that yaml-rs (1.2) and PyYAML (1.1) read alike, judged
    from the text alone (conservatively: a pattern inside a quoted string counts too).

    Refused: non-ASCII text, tabs and control characters; anchors, aliases, merge keys and tags
    (``& * < !``: yaml-rs has no merge keys and its own alias limits), directives and document
    markers (``% --- ...``), block scalars (``| >``), complex keys (``?``), escapes (``\\``),
    the reserved ``@`` and backquote, ``=``; numbers that the two read otherwise
    (``_NUMBERS_READ_OTHERWISE``); compact nested sequences (``- - x``) and indentation beyond
    ``_MAX_PLAIN_INDENT`` (deep nesting). Strings that PyYAML would read as something else are
    caught after parsing (:func:`_agrees_with_pyyaml`).
    """
    if not text.isascii():
        return False
    lines = "\n" + text  # a scalar starts after a space or a line's start: the first one too
    shape = lines.translate(_PLAIN_TABLE)
    if "!" in shape or any(pattern in shape for pattern in _NUMBERS_READ_OTHERWISE):
        return False
    if "\n---" in lines or "\n..." in lines or "\n" + " " * (_MAX_PLAIN_INDENT + 1) in lines:
        return False
    return _COMPACT_NESTED_SEQUENCES.search(text) is None


class _NotPlain(Exception):
    """The fast reader declines a document: PyYAML reads it (and reports its errors)."""


def _load_plain_yaml(text: str) -> Any:
    """Parse a plain YAML document with yaml-rs (Rust), ~10x faster than PyYAML's C loader.

    Raises :class:`_NotPlain` when yaml-rs is missing, the text is not plain (:func:`_plain_yaml`),
    yaml-rs refuses it (a duplicate key, a syntax error) or read it otherwise than PyYAML would
    (:func:`_agrees_with_pyyaml`): PyYAML then reads the document, so every result is PyYAML's
    and every error message and line number too.
    """
    if not _plain_yaml(text):
        raise _NotPlain
    try:
        import yaml_rs
    except ImportError:
        raise _NotPlain from None
    try:
        data = yaml_rs.loads(text, parse_datetime=False, duplicate_key_policy=yaml_rs.DuplicateKeyPolicy.Error)
    except Exception:  # noqa: BLE001 - any refusal: PyYAML reads it and names the problem
        raise _NotPlain from None
    if not _agrees_with_pyyaml(data):
        raise _NotPlain
    return data


def _agrees_with_pyyaml(data: Any) -> bool:
    """Whether PyYAML would read what yaml-rs read as ``data``: every mapping key a string (1.1
    and 1.2 may merge other keys differently) and no string that PyYAML would have resolved to
    another type had it been plain (yes, 0b101, 1:30, 2024-01-05, =, <<, ...; a quoted one is
    refused too: the parsed data no longer says which it was)."""
    resolvers = _StrictLoader.yaml_implicit_resolvers
    verdicts: dict[str, bool] = {}

    def plain_str(value: str) -> bool:
        verdict = verdicts.get(value)
        if verdict is None:
            candidates = resolvers.get(value[:1] if value else "", ())
            verdict = not any(regexp.match(value) for _, regexp in candidates)
            verdicts[value] = verdict
        return verdict

    stack = [data]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            if any(type(key) is not str or not plain_str(key) for key in node):
                return False
            values = node.values()
        elif type(node) is list:
            values = node
        else:
            if type(node) is str and not plain_str(node):
                return False
            continue
        for value in values:
            kind = type(value)
            if kind is str:
                if not plain_str(value):
                    return False
            elif kind is dict or kind is list:
                stack.append(value)
    return True


def _load_yaml(text: str) -> Any:
    """PyYAML's strict loader with the cyclic garbage collector paused (it would scan the
    growing document over and over: ~2.5x slower for a 100,000-device fleet)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    finally:
        if enabled:
            gc.enable()


def _read_document_text(path: Path) -> str:
    too_big = f"expected a document of at most {MAX_DOCUMENT_BYTES} bytes"
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise RocoinError(f"{path}: {size} bytes: {too_big}")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_DOCUMENT_BYTES + 1)  # a pipe or device file has no size to stat
    except FileNotFoundError:
        raise RocoinError(f"{path}: file not found") from None
    except OSError as exc:
        raise RocoinError(f"{path}: cannot read ({exc})") from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise RocoinError(f"{path}: more than {MAX_DOCUMENT_BYTES} bytes: {too_big}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RocoinError(f"{path}: cannot read ({exc})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text did


def load_document(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML or JSON file (JSON is YAML, but ``.json`` files get JSON's error messages).

    Refused with one :class:`RocoinError` line: a file over ``MAX_DOCUMENT_BYTES``, nesting deeper
    than ``MAX_DOCUMENT_DEPTH``, more than ``MAX_DOCUMENT_VALUES`` values once YAML aliases are
    expanded, and a key given twice in one mapping.
    """
    path = Path(path)
    text = _read_document_text(path)
    is_json = path.suffix.lower() == ".json"
    try:
        if is_json:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            try:
                data = _load_plain_yaml(text)
            except _NotPlain:
                data = _load_yaml(text)
    except RecursionError:
        raise RocoinError(
            f"{path}: nested too deeply to parse: expected at most {MAX_DOCUMENT_DEPTH} levels of mappings and lists"
        ) from None
    except _DuplicateKey as exc:
        located = _locate_json_duplicate(text) if is_json else None
        raise RocoinError(f"{path}: {(located or exc).describe()}") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own limit, where pure Python recurses
            raise RocoinError(
                f"{path}: nested too deeply to parse: expected at most {MAX_DOCUMENT_DEPTH} levels of mappings and lists"
            ) from None
        detail = " ".join(str(exc).split())
        raise RocoinError(f"{path}: not valid {'JSON' if is_json else 'YAML/JSON'}: {detail}") from None
    except ValueError as exc:  # PyYAML's constructors on a scalar its resolver took for a number: 0x_
        raise RocoinError(f"{path}: not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    _check_document_shape(data, str(path))
    return data


def _check_document_shape(data: Any, source: str) -> None:
    """Refuse nesting deeper than ``MAX_DOCUMENT_DEPTH`` or more than ``MAX_DOCUMENT_VALUES`` values.

    The walk recurses at most ``MAX_DOCUMENT_DEPTH + 1`` levels (it stops there), so it cannot
    exhaust the stack; a container reached again through a YAML alias is measured once, so an
    alias bomb costs no more than its text; a recursive alias never ends and so is too deep.
    """
    measured: dict[int, tuple[int, int]] = {}  # id(container) -> (levels, values)
    loc: list[Any] = []

    def too_deep(levels: int) -> RocoinError:
        where = f"{source}: {_format_loc(tuple(loc))}" if loc else source
        return RocoinError(f"{where}: nested {levels} levels deep: expected at most {MAX_DOCUMENT_DEPTH} levels of mappings and lists")

    def too_many() -> RocoinError:
        return RocoinError(
            f"{source}: more than {MAX_DOCUMENT_VALUES} values (a YAML alias counts each time it is used):"
            f" expected at most {MAX_DOCUMENT_VALUES}"
        )

    def walk(node: Any, depth: int) -> tuple[int, int]:
        if isinstance(node, dict):
            children: Any = node.items()
        elif isinstance(node, (list, tuple)):
            children = enumerate(node)
        else:
            return 0, 1
        if depth > MAX_DOCUMENT_DEPTH:
            raise too_deep(depth)
        known = measured.get(id(node))
        if known is not None:
            if depth - 1 + known[0] > MAX_DOCUMENT_DEPTH:
                raise too_deep(depth - 1 + known[0])
            return known
        levels, values = 0, 1
        for key, child in children:
            if not isinstance(child, (dict, list, tuple)):  # a scalar: one value, no recursion
                values += 1
                continue
            loc.append(key)
            child_levels, child_values = walk(child, depth + 1)
            loc.pop()
            levels = max(levels, child_levels)
            values += child_values
            if values > MAX_DOCUMENT_VALUES:
                raise too_many()
        if values > MAX_DOCUMENT_VALUES:
            raise too_many()
        measured[id(node)] = (levels + 1, values)
        return levels + 1, values

    walk(data, 1)


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
        text = f"{where} = {short_repr(first.get('input'))}: {msg}"
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


def dumps_json(data: Any, source: str) -> str:
    """``data`` as indented JSON; NaN or an infinity (not JSON) is one :class:`RocoinError` line
    naming ``source`` and the field, e.g. ``plan.json: groups[0].latency_s = inf``."""
    try:
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    except ValueError:
        found = _find_non_finite(data)
        if found is None:
            raise
        loc, value = found
        where = f"{source}: {loc}" if loc else source
        raise RocoinError(f"{where} = {value!r}: expected a finite number") from None


def _find_non_finite(data: Any) -> tuple[str, float] | None:
    """The location and value of the first NaN or infinity of ``data``, in document order."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    seen: set[int] = set()
    while stack:
        node, loc = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                return _format_loc(loc), node
        elif isinstance(node, (dict, list, tuple)) and id(node) not in seen:
            seen.add(id(node))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend(reversed([(child, (*loc, key)) for key, child in items]))
    return None


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON; nothing is written when it holds NaN or an infinity."""
    write_text_atomic(path, dumps_json(data, str(path)))


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Load one ``.npy`` array: never unpickles, and checks the header before reading the data.

    The header must describe a non-object array whose size, with the header, is exactly the
    file's and at most ``MAX_NPY_BYTES``; anything else is one :class:`RocoinError` line.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _read_npy(handle, path, os.fstat(handle.fileno()).st_size)
    except FileNotFoundError:
        raise RocoinError(f"{path}: file not found") from None
    except OSError as exc:
        raise RocoinError(f"{path}: cannot read ({exc})") from None


def _read_npy(handle: Any, path: Path, size: int) -> np.ndarray:
    unreadable = f"{path}: not a readable .npy array"
    if size > MAX_NPY_BYTES:
        raise RocoinError(f"{path}: {size} bytes: expected an .npy file of at most {MAX_NPY_BYTES} bytes")
    if handle.read(4) == b"PK\x03\x04":
        raise RocoinError(f"{path}: expected a single .npy array, got an .npz archive")
    handle.seek(0)
    try:
        version = np.lib.format.read_magic(handle)
    except (ValueError, EOFError) as exc:
        raise RocoinError(f"{unreadable} ({one_line(str(exc))})") from None
    if version not in NPY_VERSIONS:
        raise RocoinError(f"{path}: .npy format version {version[0]}.{version[1]}: expected 1.0 or 2.0")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, _, dtype = read_header(handle)
    except (ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise RocoinError(f"{unreadable} ({one_line(str(exc))})") from None
    if dtype.hasobject:
        raise RocoinError(f"{path}: dtype {dtype}: expected numbers (object arrays would need unpickling, which is never done)")
    if any(d < 0 for d in shape):
        raise RocoinError(f"{path}: header shape {shape}: expected non-negative dimensions")
    if dtype.itemsize == 0:
        raise RocoinError(f"{path}: dtype {dtype} has empty items: expected numbers")
    data_bytes = math.prod(shape) * dtype.itemsize
    claimed = handle.tell() + data_bytes
    if claimed > MAX_NPY_BYTES:
        raise RocoinError(
            f"{path}: header claims shape {shape} of {dtype} = {data_bytes} bytes: expected an .npy file of at most {MAX_NPY_BYTES} bytes"
        )
    if claimed != size:
        raise RocoinError(
            f"{path}: header claims shape {shape} of {dtype} ({claimed} bytes with the header) but the file has {size} bytes:"
            " expected a complete .npy file (truncated or padded?)"
        )
    handle.seek(0)
    try:
        return np.lib.format.read_array(handle, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise RocoinError(f"{unreadable} ({one_line(str(exc))})") from None
