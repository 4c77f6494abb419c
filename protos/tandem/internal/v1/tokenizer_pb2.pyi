from protos.tandem.internal.v1 import engine_pb2 as _engine_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("vocab_size", "eos_token_ids", "has_chat_template", "max_bytes_per_token")
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    has_chat_template: bool
    max_bytes_per_token: int
    def __init__(self, vocab_size: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., has_chat_template: _Optional[bool] = ..., max_bytes_per_token: _Optional[int] = ...) -> None: ...

class ChatTurn(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("text", "chat", "max_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatTurns
    max_tokens: int
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatTurns, _Mapping]] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class ChatTurns(_message.Message):
    __slots__ = ("turns", "parse_special_tokens")
    TURNS_FIELD_NUMBER: _ClassVar[int]
    PARSE_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    turns: _containers.RepeatedCompositeFieldContainer[ChatTurn]
    parse_special_tokens: bool
    def __init__(self, turns: _Optional[_Iterable[_Union[ChatTurn, _Mapping]]] = ..., parse_special_tokens: _Optional[bool] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("token_ids", "skip_special_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    skip_special_tokens: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., skip_special_tokens: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class DetokOpen(_message.Message):
    __slots__ = ("request_id", "stop", "skip_special_tokens", "prompt_token_ids", "include_stop_str_in_output", "spaces_between_special_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SPACES_BETWEEN_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    stop: _containers.RepeatedScalarFieldContainer[str]
    skip_special_tokens: bool
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    include_stop_str_in_output: bool
    spaces_between_special_tokens: bool
    def __init__(self, request_id: _Optional[str] = ..., stop: _Optional[_Iterable[str]] = ..., skip_special_tokens: _Optional[bool] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., include_stop_str_in_output: _Optional[bool] = ..., spaces_between_special_tokens: _Optional[bool] = ...) -> None: ...

class DetokStep(_message.Message):
    __slots__ = ("request_id", "token_ids", "finish", "piece_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    PIECE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish: _engine_pb2.EngineFinish
    piece_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish: _Optional[_Union[_engine_pb2.EngineFinish, str]] = ..., piece_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeInput(_message.Message):
    __slots__ = ("opens", "steps", "closes")
    OPENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CLOSES_FIELD_NUMBER: _ClassVar[int]
    opens: _containers.RepeatedCompositeFieldContainer[DetokOpen]
    steps: _containers.RepeatedCompositeFieldContainer[DetokStep]
    closes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, opens: _Optional[_Iterable[_Union[DetokOpen, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[DetokStep, _Mapping]]] = ..., closes: _Optional[_Iterable[str]] = ...) -> None: ...

class DetokResult(_message.Message):
    __slots__ = ("request_id", "text", "token_ids", "finished", "finish", "matched_stop", "pieces", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish: _engine_pb2.EngineFinish
    matched_stop: str
    pieces: _containers.RepeatedScalarFieldContainer[str]
    error: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish: _Optional[_Union[_engine_pb2.EngineFinish, str]] = ..., matched_stop: _Optional[str] = ..., pieces: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ...) -> None: ...

class DetokenizeOutput(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DetokResult]
    def __init__(self, results: _Optional[_Iterable[_Union[DetokResult, _Mapping]]] = ...) -> None: ...
