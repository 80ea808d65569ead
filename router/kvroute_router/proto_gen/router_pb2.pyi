# mypy: disable-error-code="type-arg"
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PickRequest(_message.Message):
    __slots__ = ("model", "prompt", "messages", "token_ids", "tenant", "headers", "request_id", "max_tokens")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    messages: ChatMessages
    token_ids: TokenIds
    tenant: str
    headers: _containers.ScalarMap[str, str]
    request_id: str
    max_tokens: int
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., tenant: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class EndpointScore(_message.Message):
    __slots__ = ("endpoint", "address", "total", "scores")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    address: str
    total: float
    scores: _containers.ScalarMap[str, float]
    def __init__(self, endpoint: _Optional[str] = ..., address: _Optional[str] = ..., total: _Optional[float] = ..., scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PickResponse(_message.Message):
    __slots__ = ("endpoint", "endpoint_name", "fallbacks", "pool", "policy", "target_model", "decision_id", "reasons", "scores", "prefix_match_ratio", "engine_priority")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_NAME_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MATCH_RATIO_FIELD_NUMBER: _ClassVar[int]
    ENGINE_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    endpoint_name: str
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    pool: str
    policy: str
    target_model: str
    decision_id: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedCompositeFieldContainer[EndpointScore]
    prefix_match_ratio: float
    engine_priority: int
    def __init__(self, endpoint: _Optional[str] = ..., endpoint_name: _Optional[str] = ..., fallbacks: _Optional[_Iterable[str]] = ..., pool: _Optional[str] = ..., policy: _Optional[str] = ..., target_model: _Optional[str] = ..., decision_id: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[_Union[EndpointScore, _Mapping]]] = ..., prefix_match_ratio: _Optional[float] = ..., engine_priority: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("decision_id", "endpoint", "status", "ttft_seconds", "e2e_seconds", "prompt_tokens", "completion_tokens")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    E2E_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    endpoint: str
    status: int
    ttft_seconds: float
    e2e_seconds: float
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, decision_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., status: _Optional[int] = ..., ttft_seconds: _Optional[float] = ..., e2e_seconds: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
