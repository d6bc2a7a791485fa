"""The binary tensor data extension of the KServe v2 REST protocol (Triton's ``binary_tensor_data``).

A body with binary tensors is a JSON object followed by the raw bytes of those tensors, in the
order the tensors appear in the JSON; the ``Inference-Header-Content-Length`` header gives the
length of the JSON in bytes (``Content-Length`` still gives the whole body's). A binary input
carries ``parameters.binary_data_size`` (its byte count) instead of ``data``; so does a binary
output of the answer. Tensor bytes are little-endian, row-major, without padding. An output is
answered in binary when the request's ``outputs`` entry for it says ``parameters.binary_data:
true``, or, where it does not say, when the request's ``parameters.binary_data_output`` is true
(``tritonclient.http`` sends that when no outputs are named); otherwise as JSON ``data``.

Hardening (one 400 naming the field, its value and what was expected, before any inference): the
header must be a decimal byte count within the body, the part it delimits must be JSON (the
caller parses it with its depth bound), every ``binary_data_size`` must equal the declared shape
times the datatype's size, and the sizes must add up to exactly the bytes after the JSON. The
whole body is bounded by the REST API's ``max_body_bytes`` before it is read. ``BYTES`` tensors
(length-prefixed strings) are not numbers and are refused by the datatype check.

The server side is :func:`split_body`, :func:`binary_inputs`, :func:`requested_outputs` and
:func:`encode_response`; the client side (rocoin's client and the benchmark) is
:func:`encode_request` and :func:`decode_response`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container
from typing import Any

import numpy as np

from rocoin.contracts.text import short_repr
from rocoin.runtime.api.oip import ProtocolError, check_datatype, check_shape

#: The HTTP header that gives the JSON's length when binary tensors follow it.
HEADER = "Inference-Header-Content-Length"
#: The extension's name in the server metadata's ``extensions``.
EXTENSION = "binary_tensor_data"
#: Little-endian dtypes of the fixed-size KServe datatypes (what a binary tensor may hold).
LITTLE_ENDIAN = {
    "BOOL": np.dtype("|b1"),
    "UINT8": np.dtype("|u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("|i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: A header value with more digits than this is above any body length (and slow to convert).
_MAX_LENGTH_DIGITS = 18


def split_body(raw: bytes, header: str | None) -> tuple[bytes, memoryview | None]:
    """The JSON part of a request body and the bytes after it (``None`` without the header)."""
    if header is None:
        return raw, None
    value = header.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= _MAX_LENGTH_DIGITS and 0 < int(value) <= len(raw)):
        raise ProtocolError(
            400,
            f"{HEADER} = {short_repr(header)}: expected the JSON header's length in bytes, an integer in 1..{len(raw)} (the body's length)",
        )
    length = int(value)
    return raw[:length], memoryview(raw)[length:]


def binary_inputs(inputs: list[Any], binary: memoryview | None) -> list[np.ndarray | None]:
    """Each input's values from the bytes after the JSON (``None`` for an input sent as JSON ``data``).

    ``inputs`` are the request's input objects (dicts, checked by the caller); the binary ones
    take consecutive slices of ``binary`` in their order, and together they must take all of it.
    """
    values: list[np.ndarray | None] = []
    offset = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        parameters = tensor.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ProtocolError(400, f"{where}.parameters = {short_repr(parameters)}: expected an object")
        size = parameters.get("binary_data_size")
        if size is None:
            values.append(None)
            continue
        if binary is None:
            raise ProtocolError(
                400,
                f"{where}.parameters.binary_data_size = {short_repr(size)}: binary data needs the {HEADER} header (the JSON's length in bytes)",
            )
        if "data" in tensor:
            raise ProtocolError(400, f"{where}: both 'data' and parameters.binary_data_size: expected one of them")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(400, f"{where}.parameters.binary_data_size = {short_repr(size)}: expected a non-negative integer (bytes)")
        datatype = check_datatype(tensor.get("datatype"), where)
        shape = check_shape(tensor.get("shape"), where)
        dtype = LITTLE_ENDIAN[datatype]
        expected = math.prod(shape) * dtype.itemsize
        if size != expected:
            raise ProtocolError(
                400,
                f"{where}.parameters.binary_data_size = {size}: expected {expected} (shape {shape} x {dtype.itemsize} bytes per {datatype} value)",
            )
        if offset + size > len(binary):
            raise ProtocolError(
                400,
                f"{where}.parameters.binary_data_size = {size}: only {len(binary) - offset} bytes of binary data left after the JSON header",
            )
        values.append(np.frombuffer(binary, dtype=dtype, count=size // dtype.itemsize, offset=offset))
        offset += size
    if binary is not None and offset != len(binary):
        raise ProtocolError(
            400,
            f"binary data: {len(binary)} bytes after the JSON header but the inputs' binary_data_size add up to {offset}: expected exactly that many",
        )
    return values


def requested_outputs(body: dict[str, Any], available: list[str]) -> list[tuple[str, bool]]:
    """The outputs to answer, in order, each with whether it goes binary.

    Without ``outputs`` (or with an empty list) every output of ``available``, in that order;
    otherwise those named, in the request's order. Classification and shared memory (other
    Triton extensions) are refused by name.
    """
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ProtocolError(400, f"parameters = {short_repr(parameters)}: expected an object")
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise ProtocolError(400, f"parameters.binary_data_output = {short_repr(default)}: expected true or false")
    outputs = body.get("outputs")
    if outputs is None or outputs == []:
        return [(name, default) for name in available]
    if not isinstance(outputs, list) or len(outputs) > len(available):
        raise ProtocolError(
            400, f"outputs = {short_repr(outputs)}: expected a list of at most {len(available)} objects {{name, parameters}}"
        )
    chosen: list[tuple[str, bool]] = []
    for i, output in enumerate(outputs):
        where = f"outputs[{i}]"
        if not isinstance(output, dict):
            raise ProtocolError(400, f"{where} = {short_repr(output)}: expected an object {{name, parameters}}")
        options = output.get("parameters", {})
        name = check_requested_output(
            where, output.get("name"), options if isinstance(options, dict) else {}, available, [n for n, _ in chosen]
        )
        if not isinstance(options, dict):
            raise ProtocolError(400, f"{where}.parameters = {short_repr(options)}: expected an object")
        binary = options.get("binary_data", default)
        if not isinstance(binary, bool):
            raise ProtocolError(400, f"{where}.parameters.binary_data = {short_repr(binary)}: expected true or false")
        chosen.append((name, binary))
    return chosen


def check_requested_output(where: str, name: Any, parameters: Container[str], available: list[str], chosen: list[str]) -> str:
    """One entry of a request's ``outputs`` (REST or gRPC): a name of ``available`` not in ``chosen``
    yet, without the Triton extensions we do not serve (classification, shared memory)."""
    if not isinstance(name, str) or name not in available:
        raise ProtocolError(400, f"{where}.name = {short_repr(name)}: expected one of {', '.join(available)}")
    if name in chosen:
        raise ProtocolError(400, f"{where}.name = {name!r}: asked for twice")
    for unsupported, extension in (("classification", "classification"), ("shared_memory_region", "shared memory")):
        if unsupported in parameters:
            raise ProtocolError(
                400, f"{where}.parameters.{unsupported}: the {extension} extension is not supported; ask for the tensor itself"
            )
    return name


def encode_response(envelope: dict[str, Any], tensors: list[tuple[str, str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """An answer's body, and its JSON's length when binary tensors follow (else ``None``).

    ``tensors`` are ``(name, datatype, little-endian array, binary)``; the JSON is strict (an
    ``NaN`` in a JSON output is an error, not an invalid number).
    """
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, datatype, array, binary in tensors:
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            data = np.ascontiguousarray(array, dtype=LITTLE_ENDIAN[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    header = json.dumps({**envelope, "outputs": outputs}, allow_nan=False, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


# -- the client side -------------------------------------------------------------------------


def encode_request(
    images: np.ndarray, *, query_id: str, binary_input: bool = True, binary_output: bool = True, name: str = "input"
) -> tuple[bytes, dict[str, str]]:
    """An infer request for ``images`` (UINT8, else FP32): its body and the headers it needs."""
    datatype = "UINT8" if images.dtype == np.uint8 else "FP32"
    tensor: dict[str, Any] = {"name": name, "shape": list(images.shape), "datatype": datatype}
    request: dict[str, Any] = {"id": query_id, "inputs": [tensor]}
    if binary_output:
        request["parameters"] = {"binary_data_output": True}
    if not binary_input:
        tensor["data"] = images.ravel().tolist()
        return json.dumps(request, separators=(",", ":")).encode(), {"Content-Type": "application/json"}
    data = np.ascontiguousarray(images, dtype=LITTLE_ENDIAN[datatype]).tobytes()
    tensor["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps(request, separators=(",", ":")).encode()
    return header + data, {"Content-Type": "application/octet-stream", HEADER: str(len(header))}


def decode_response(body: bytes, header: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An infer answer: its JSON object and its outputs by name as arrays of their shape.

    A malformed answer raises ``ValueError`` (the caller names the server)."""
    try:
        head, binary = split_body(body, header)
    except ProtocolError as exc:
        raise ValueError(f"answer: {exc}") from None
    reply = json.loads(head)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for output in reply.get("outputs", []):
        dtype = LITTLE_ENDIAN.get(output["datatype"])
        if dtype is None:
            raise ValueError(f"answer: output {output['name']!r} has datatype {output['datatype']!r}: expected a fixed-size one")
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.asarray(output["data"], dtype=dtype)
        else:
            if binary is None or offset + size > len(binary):
                raise ValueError(f"answer: output {output['name']!r} claims {size} bytes of binary data that the body does not hold")
            array = np.frombuffer(binary, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            offset += size
        arrays[output["name"]] = array.reshape(output["shape"])
    if binary is not None and offset != len(binary):
        raise ValueError(f"answer: {len(binary) - offset} bytes of binary data that no output claims")
    return reply, arrays
