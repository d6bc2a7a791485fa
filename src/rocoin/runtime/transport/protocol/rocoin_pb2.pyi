from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeviceInferRequest(_message.Message):
    __slots__ = ("query_id", "input", "timeout_s", "cancel")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    input: Tensor
    timeout_s: float
    cancel: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query_id: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., timeout_s: _Optional[float] = ..., cancel: _Optional[_Iterable[str]] = ...) -> None: ...

class DeviceInferResponse(_message.Message):
    __slots__ = ("query_id", "device_id", "group", "features", "compute_s", "error_code", "error", "max_batch")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    device_id: str
    group: int
    features: Tensor
    compute_s: float
    error_code: int
    error: str
    max_batch: int
    def __init__(self, query_id: _Optional[str] = ..., device_id: _Optional[str] = ..., group: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., compute_s: _Optional[float] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ..., max_batch: _Optional[int] = ...) -> None: ...

class JoinHello(_message.Message):
    __slots__ = ("device_id", "profile_json", "cached_models", "protocol", "device_key")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    CACHED_MODELS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    profile_json: str
    cached_models: _containers.RepeatedScalarFieldContainer[str]
    protocol: int
    device_key: str
    def __init__(self, device_id: _Optional[str] = ..., profile_json: _Optional[str] = ..., cached_models: _Optional[_Iterable[str]] = ..., protocol: _Optional[int] = ..., device_key: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("group", "model_json", "send_model", "epoch", "student_flops")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    SEND_MODEL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STUDENT_FLOPS_FIELD_NUMBER: _ClassVar[int]
    group: int
    model_json: str
    send_model: bool
    epoch: int
    student_flops: float
    def __init__(self, group: _Optional[int] = ..., model_json: _Optional[str] = ..., send_model: _Optional[bool] = ..., epoch: _Optional[int] = ..., student_flops: _Optional[float] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("sha256", "offset", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class HealthCheck(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    def __init__(self, nonce: _Optional[str] = ...) -> None: ...

class SourceMessage(_message.Message):
    __slots__ = ("assign", "chunk", "request", "health")
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    assign: Assignment
    chunk: ModelChunk
    request: DeviceInferRequest
    health: HealthCheck
    def __init__(self, assign: _Optional[_Union[Assignment, _Mapping]] = ..., chunk: _Optional[_Union[ModelChunk, _Mapping]] = ..., request: _Optional[_Union[DeviceInferRequest, _Mapping]] = ..., health: _Optional[_Union[HealthCheck, _Mapping]] = ...) -> None: ...

class ModelReady(_message.Message):
    __slots__ = ("sha256", "epoch", "error")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    epoch: int
    error: str
    def __init__(self, sha256: _Optional[str] = ..., epoch: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("nonce", "model_sha256")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    model_sha256: str
    def __init__(self, nonce: _Optional[str] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class DeviceMessage(_message.Message):
    __slots__ = ("hello", "answer", "ready", "health")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    hello: JoinHello
    answer: DeviceInferResponse
    ready: ModelReady
    health: HealthReply
    def __init__(self, hello: _Optional[_Union[JoinHello, _Mapping]] = ..., answer: _Optional[_Union[DeviceInferResponse, _Mapping]] = ..., ready: _Optional[_Union[ModelReady, _Mapping]] = ..., health: _Optional[_Union[HealthReply, _Mapping]] = ...) -> None: ...

class AssignMessage(_message.Message):
    __slots__ = ("assign", "chunk")
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    assign: Assignment
    chunk: ModelChunk
    def __init__(self, assign: _Optional[_Union[Assignment, _Mapping]] = ..., chunk: _Optional[_Union[ModelChunk, _Mapping]] = ...) -> None: ...

class LinkProbe(_message.Message):
    __slots__ = ("padding",)
    PADDING_FIELD_NUMBER: _ClassVar[int]
    padding: bytes
    def __init__(self, padding: _Optional[bytes] = ...) -> None: ...

class LinkProbeReply(_message.Message):
    __slots__ = ("received_bytes",)
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ...) -> None: ...

class SourceInferRequest(_message.Message):
    __slots__ = ("query_id", "input", "deadline_s")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    input: Tensor
    deadline_s: float
    def __init__(self, query_id: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class SourceInferResponse(_message.Message):
    __slots__ = ("query_id", "logits", "missing_groups", "answered_by", "latency_s")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    MISSING_GROUPS_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    logits: Tensor
    missing_groups: _containers.RepeatedScalarFieldContainer[int]
    answered_by: _containers.RepeatedScalarFieldContainer[str]
    latency_s: float
    def __init__(self, query_id: _Optional[str] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., missing_groups: _Optional[_Iterable[int]] = ..., answered_by: _Optional[_Iterable[str]] = ..., latency_s: _Optional[float] = ...) -> None: ...
