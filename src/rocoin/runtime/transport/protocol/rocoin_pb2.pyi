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
    __slots__ = ("query_id", "device_id", "group", "features", "compute_s", "error_code", "error")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    query_id: str
    device_id: str
    group: int
    features: Tensor
    compute_s: float
    error_code: int
    error: str
    def __init__(self, query_id: _Optional[str] = ..., device_id: _Optional[str] = ..., group: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., compute_s: _Optional[float] = ..., error_code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

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
