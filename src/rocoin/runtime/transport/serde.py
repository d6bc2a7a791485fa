"""numpy <-> ``rocoin.v1.Tensor``: the one place where protobuf tensors become arrays and back.

A tensor travels as raw little-endian C-order bytes with its full shape and a dtype name
(``"float32"``, ``"float16"`` (a detector's feature map, where the manifest says so) or ``"uint8"``); nothing is ever pickled. :func:`tensor_from_proto` trusts nothing
in the message: the dtype must be one of :data:`DTYPES`, the shape non-negative, of rank at most
:data:`MAX_RANK`, its byte size within ``max_bytes`` and equal to ``len(data)``.
"""

from __future__ import annotations

import math

import numpy as np

from rocoin.runtime.transport.protocol import rocoin_pb2

#: Element types a tensor may have on the wire, by name -> little-endian numpy dtype.
DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "uint8": np.dtype("u1")}
#: Most dimensions a tensor may have (an image batch has 4).
MAX_RANK = 8


class TensorError(ValueError):
    """A ``Tensor`` message (or an array to send) that breaks the wire format; the message names the field."""


def tensor_to_proto(array: np.ndarray) -> rocoin_pb2.Tensor:
    """The ``Tensor`` message of a float32 or uint8 array (any byte order or memory layout)."""
    array = np.asarray(array)
    name = _dtype_name(array.dtype)
    if name is None:
        raise TensorError(f"dtype: {array.dtype.name!r}: expected one of {_expected_dtypes()} (convert the array first)")
    if array.ndim > MAX_RANK:
        raise TensorError(f"shape: {list(array.shape)}: expected at most {MAX_RANK} dimensions")
    wire = np.ascontiguousarray(array, dtype=DTYPES[name])
    return rocoin_pb2.Tensor(shape=list(array.shape), dtype=name, data=wire.tobytes())


def tensor_from_proto(msg: rocoin_pb2.Tensor, *, max_bytes: int) -> np.ndarray:
    """The array a ``Tensor`` message holds, after checking it against the wire format.

    ``max_bytes`` bounds the data size. The result is read-only when it can share the message's
    bytes (a little-endian host); copy it before writing to it.
    """
    if msg.dtype not in DTYPES:
        raise TensorError(f"dtype: {_short(msg.dtype)}: expected one of {_expected_dtypes()}")
    dtype = DTYPES[msg.dtype]
    shape = [int(n) for n in msg.shape]
    if len(shape) > MAX_RANK:
        raise TensorError(f"shape: {_short_list(shape)}: expected at most {MAX_RANK} dimensions")
    if any(n < 0 for n in shape):
        raise TensorError(f"shape: {_short_list(shape)}: expected non-negative dimensions")
    expected = math.prod(shape) * dtype.itemsize  # exact: Python integers do not overflow
    if expected > max_bytes:
        raise TensorError(f"shape: {_short_list(shape)}: {expected} bytes of {msg.dtype}: expected at most {max_bytes} bytes")
    if len(msg.data) != expected:
        raise TensorError(
            f"data: {len(msg.data)} bytes: expected {expected} (shape {_short_list(shape)} of {msg.dtype},"
            f" {dtype.itemsize} byte{'s' if dtype.itemsize > 1 else ''} each)"
        )
    array = np.frombuffer(msg.data, dtype=dtype).reshape(shape)
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    return array


def _dtype_name(dtype: np.dtype) -> str | None:
    for name, wire in DTYPES.items():
        if dtype.kind == wire.kind and dtype.itemsize == wire.itemsize:
            return name
    return None


def _expected_dtypes() -> str:
    return ", ".join(repr(name) for name in DTYPES)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _short_list(values: list[int], limit: int = 10) -> str:
    if len(values) <= limit:
        return str(values)
    return "[" + ", ".join(str(v) for v in values[:limit]) + f", ... ({len(values)} dimensions)]"
