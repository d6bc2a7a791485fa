"""The binary tensor data extension's parsing and encoding, without sockets; fuzzed bodies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("aiohttp")

from rocoin.runtime.api.binary_tensors import (  # noqa: E402
    HEADER,
    binary_inputs,
    decode_response,
    encode_request,
    encode_response,
    requested_outputs,
    split_body,
)
from rocoin.runtime.api.http import _json_body, _parse_infer  # noqa: E402
from rocoin.runtime.api.oip import ProtocolError  # noqa: E402

OUTPUTS = ["logits", "missing_groups"]


def parse(body: bytes, headers: dict[str, str]) -> tuple[np.ndarray, list[tuple[str, bool]]]:
    """What the REST API's infer does with a body before it runs a query."""
    head, binary = split_body(body, headers.get(HEADER))
    request = _json_body(head)
    images, _ = _parse_infer(request, binary)
    return images, requested_outputs(request, OUTPUTS)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_a_binary_request_parses_to_the_same_images_as_json(dtype):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 1, 8, 8)).astype(dtype)
    binary = parse(*encode_request(images, query_id="q"))
    as_json = parse(*encode_request(images, query_id="q", binary_input=False, binary_output=False))
    np.testing.assert_array_equal(binary[0], images)
    np.testing.assert_array_equal(as_json[0], images)
    assert binary[1] == [("logits", True), ("missing_groups", True)]
    assert as_json[1] == [("logits", False), ("missing_groups", False)]


@pytest.mark.parametrize(
    "header, message",
    [("", "= ''"), (" 12 ", None), ("abc", "'abc'"), ("0", "'0'"), ("-1", "'-1'"), ("\u0663", "'\u0663'"), ("1" * 19, "an integer in 1..")],
)
def test_the_header_is_a_byte_count_within_the_body(header, message):
    body = b'{"inputs": []}' + bytes(30)
    if message is None:
        assert split_body(body, header)[0] == body[:12]
        return
    with pytest.raises(ProtocolError, match=HEADER) as caught:
        split_body(body, header)
    assert caught.value.status == 400 and message in str(caught.value)


def test_without_the_header_the_body_is_all_json():
    assert split_body(b"{}", None) == (b"{}", None)


def test_inputs_take_consecutive_slices_that_must_add_up():
    binary = memoryview(bytes(range(12)))
    inputs = [
        {"name": "a", "shape": [4], "datatype": "UINT8", "parameters": {"binary_data_size": 4}},
        {"name": "b", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}},
        {"name": "c", "data": [1, 2]},
    ]
    a, b, c = binary_inputs(inputs, binary)
    assert a.tolist() == [0, 1, 2, 3] and b.tobytes() == bytes(range(4, 12)) and c is None
    with pytest.raises(ProtocolError, match="13 bytes after the JSON header but the inputs' binary_data_size add up to 12"):
        binary_inputs(inputs, memoryview(bytes(13)))


@pytest.mark.parametrize(
    "body, message",
    [
        ({"outputs": "logits"}, "outputs = 'logits': expected a list"),
        ({"outputs": [{"name": "logits"}] * 3}, "expected a list of at most 2"),
        ({"outputs": [{"name": "logits"}, {"name": "logits"}]}, "outputs[1].name = 'logits': asked for twice"),
        ({"outputs": [7]}, "outputs[0] = 7: expected an object"),
        ({"outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]}, "binary_data = 1: expected true or false"),
        ({"outputs": [{"name": "logits", "parameters": {"shared_memory_region": "r"}}]}, "shared memory extension is not supported"),
        ({"parameters": "x"}, "parameters = 'x': expected an object"),
    ],
)
def test_bad_output_requests_are_named(body, message):
    with pytest.raises(ProtocolError) as caught:
        requested_outputs(body, OUTPUTS)
    assert caught.value.status == 400 and message in str(caught.value)


def test_a_per_output_choice_overrides_binary_data_output():
    body = {
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "missing_groups", "parameters": {"binary_data": False}}, {"name": "logits"}],
    }
    assert requested_outputs(body, OUTPUTS) == [("missing_groups", False), ("logits", True)]
    assert requested_outputs({"outputs": []}, OUTPUTS) == [("logits", False), ("missing_groups", False)]


DATATYPES = {"FP32": np.float32, "INT32": np.int32, "UINT8": np.uint8, "FP64": np.float64, "INT64": np.int64}


@settings(max_examples=60, deadline=None)
@given(
    tensors=st.lists(
        st.tuples(
            st.sampled_from(sorted(DATATYPES)),
            st.lists(st.integers(0, 4), min_size=1, max_size=3),
            st.booleans(),
        ),
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_an_encoded_answer_decodes_to_its_tensors(tensors, seed):
    rng = np.random.default_rng(seed)
    arrays = [
        (f"t{i}", datatype, rng.integers(0, 100, size=shape).astype(DATATYPES[datatype]), binary)
        for i, (datatype, shape, binary) in enumerate(tensors)
    ]
    body, length = encode_response({"id": "x"}, arrays)
    assert (length is None) == (not any(binary for *_, binary in arrays))
    reply, decoded = decode_response(body, None if length is None else str(length))
    assert reply["id"] == "x" and list(decoded) == [name for name, *_ in arrays]
    for name, _, array, _ in arrays:
        np.testing.assert_array_equal(decoded[name], array)


# -- fuzzing: every malformed body is a ProtocolError with one line, never another exception ----


def _valid(batch: int, datatype: str) -> tuple[bytes, dict[str, str]]:
    images = np.zeros((batch, 1, 8, 8), dtype=np.uint8 if datatype == "UINT8" else np.float32)
    return encode_request(images, query_id="fuzz")


def _check(body: bytes, headers: dict[str, str]) -> None:
    try:
        images, outputs = parse(body, headers)
    except ProtocolError as exc:
        assert exc.status == 400 and "\n" not in str(exc) and str(exc)
    else:
        # The protocol layer hands on a finite tensor of rank 1..4 in a dtype the source accepts;
        # whether its shape is the manifest's is the source's check (Source.normalise), which
        # refuses any other shape with one message (tests/integration/test_http_binary.py).
        assert 1 <= images.ndim <= 4 and images.size > 0 and outputs
        assert images.dtype in (np.uint8, np.float32) and np.isfinite(images).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    datatype=st.sampled_from(["UINT8", "FP32"]),
    cut=st.integers(0, 2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    header_shift=st.integers(-40, 40),
    tail=st.binary(max_size=16),
)
def test_fuzzed_binary_bodies_are_refused_cleanly(batch, datatype, cut, flips, header_shift, tail):
    body, headers = _valid(batch, datatype)
    raw = bytearray(body[: max(1, len(body) - cut % len(body))] if cut % 3 == 0 else body)
    for position, value in flips:
        raw[position % len(raw)] = value
    raw += tail
    headers = {HEADER: str(int(headers[HEADER]) + header_shift)}
    _check(bytes(raw), headers)


@settings(max_examples=200, deadline=None)
@given(
    size=st.one_of(
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True),
        st.text(max_size=5),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    ),
    shape=st.one_of(st.lists(st.integers(-2, 2**40), max_size=6), st.text(max_size=3), st.none()),
    datatype=st.sampled_from(["UINT8", "FP32", "BYTES", "INT64", "", None, 3]),
    data_bytes=st.integers(0, 300),
    with_data=st.booleans(),
)
@example(size=1, shape=[1], datatype="UINT8", data_bytes=1, with_data=False)  # a rank-1 tensor passes to the source's check
def test_fuzzed_headers_are_refused_cleanly(size, shape, datatype, data_bytes, with_data):
    tensor = {"name": "input", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}
    if with_data:
        tensor["data"] = [0] * 64
    head = json.dumps({"inputs": [tensor]}).encode()
    _check(head + bytes(data_bytes), {HEADER: str(len(head))})
