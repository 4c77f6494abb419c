"""An OpenAI-style JSON body (POST /v1/completions or /v1/chat/completions) mapped onto tandem.v1.GenerateRequest.

Only JSON types are checked here (with messages naming the JSON field); values and ranges are checked by
gateway/validation.py, the same code the gRPC API runs, and its messages are turned back into the JSON names the
client used by `translate()` (`params.top_p: must be in (0, 1]` -> `top_p: must be in (0, 1]`).

Accepted: OpenAI's parameters that Tandem implements, vLLM's extra sampling parameters under vLLM's names, and a
few OpenAI fields that only label a request (`user`, `metadata`...), which are ignored. Anything else is refused
with 400 naming it, so that a client never believes a parameter applied when it did not. Structured output
(`response_format`, vLLM's `guided_*` and `structured_outputs`) is read by gateway/openai_structured.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gateway.openai_structured import FIELDS as STRUCTURED_FIELDS, BadStructuredField, structured_output
from gateway.request_log import InvalidRequestId, validate_request_id
from protos.tandem.v1 import generation_pb2 as api

COMPLETIONS = "completions"
CHAT = "chat"

_UINT32 = 2 ** 32
_INT32 = 2 ** 31

# JSON name -> (GenerationParams field, JSON type). Both endpoints take these, under these names.
_PARAMS = {
    "temperature": "float", "top_p": "float", "top_k": "int32", "min_p": "float", "seed": "uint64",
    "n": "uint32", "best_of": "uint32", "presence_penalty": "float", "frequency_penalty": "float",
    "repetition_penalty": "float", "min_tokens": "uint32", "ignore_eos": "bool",
    "include_stop_str_in_output": "bool", "skip_special_tokens": "bool", "spaces_between_special_tokens": "bool",
    "use_beam_search": "bool", "length_penalty": "float", "stop_token_ids": "uint32_list",
    "allowed_token_ids": "uint32_list", "prompt_logprobs": "uint32",
}
# Read below, field by field.
_COMMON = {"model", "stream", "stream_options", "max_tokens", "stop", "logit_bias", "logprobs", "priority",
           "cache_salt", "request_id", "return_token_ids", *STRUCTURED_FIELDS}
_ONLY = {COMPLETIONS: {"prompt", "echo"},
         CHAT: {"messages", "max_completion_tokens", "top_logprobs", "parse_special_tokens"}}
# OpenAI fields that label a request or tune a service Tandem does not run: accepted, and without effect.
_IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}

# gRPC field paths in validation messages -> their JSON names (the client's choice among synonyms overrides).
_DEFAULT_NAMES = {**{f"params.{k}": k for k in _PARAMS}, "params.max_tokens": "max_tokens", "params.stop": "stop",
                  "params.logit_bias": "logit_bias", "params.logprobs": "logprobs", "params.echo": "echo",
                  "prompt": "prompt", "chat.messages": "messages", "adapter": "model", "cache_salt": "cache_salt",
                  "request_id": "request_id"}


class BadField(ValueError):
    """A 400: `param` names the JSON field, and the message starts with it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class UnknownModel(ValueError):
    """A 404: no model or adapter of that name can be served."""


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str                                   # COMPLETIONS or CHAT
    model: str                                  # as the client named it; responses repeat it
    requests: tuple[api.GenerateRequest, ...]   # one per prompt (a completions call may send several)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False                      # return each token's logprob (chat: logprobs true)
    prompt_logprobs: bool = False               # the echoed prompt's logprobs come first (completions echo)
    return_token_ids: bool = False
    names: dict[str, str] = field(default_factory=dict)   # see translate()


def translate(message: str, names: dict[str, str]) -> tuple[str, str | None]:
    """A validation message with its leading gRPC field path replaced by the JSON name, and that name (the
    error's `param`); unchanged, with None, when the message names no mapped field."""
    head, sep, rest = message.partition(":")
    for path in sorted(names, key=len, reverse=True):
        if head == path or head.startswith((path + "[", path + ".")):
            return names[path] + head[len(path):] + sep + rest, names[path]
    return message, None


def parse(body: object, kind: str, base_model: str) -> OpenAIRequest:
    """Raises BadField (400) or UnknownModel (404)."""
    if not isinstance(body, dict):
        raise BadField("body", "must be a JSON object")
    for key in body:
        if key not in _PARAMS and key not in _COMMON and key not in _ONLY[kind] and key not in _IGNORED:
            raise BadField(key, f"not a parameter of /v1/{'chat/completions' if kind == CHAT else 'completions'} "
                                f"that this server implements")
    body = {k: v for k, v in body.items() if v is not None}   # JSON null: the default, as if absent
    names = dict(_DEFAULT_NAMES)
    params = api.GenerationParams()
    for name, kind_of in _PARAMS.items():
        if name in body:
            _set(params, name, _typed(name, body[name], kind_of))
    model = _text(body, "model", "")
    adapter = "" if model in ("", base_model) else model
    if len(adapter) > 64:   # the engine never loads an adapter under a longer name (gateway/validation.py)
        raise UnknownModel(f"model: {adapter[:64]!r}... is not served here")
    stream = _bool(body, "stream", False)
    include_usage = _stream_options(body, stream)
    _structured_output(body, params, names)
    _max_tokens(body, kind, params, names)
    if "stop" in body:
        params.stop.extend(_stop(body["stop"]))
    if "logit_bias" in body:
        params.logit_bias.update(_logit_bias(body["logit_bias"]))
    logprobs = _logprobs(body, kind, params, names)
    echo = kind == COMPLETIONS and _bool(body, "echo", False)
    prompt_logprobs = echo and logprobs and not params.HasField("prompt_logprobs")
    if echo:
        params.echo = True
        if prompt_logprobs:
            params.prompt_logprobs = params.logprobs
    common = dict(params=params, priority=_int32(body, "priority"), cache_salt=_text(body, "cache_salt", ""),
                  adapter=adapter, request_id=_request_id(body))
    if kind == CHAT:
        chat = api.Chat(messages=_messages(body.get("messages")),
                        parse_special_tokens=_bool(body, "parse_special_tokens", False))
        requests = (api.GenerateRequest(chat=chat, **common),)
    else:
        prompts = _prompts(body.get("prompt"))
        if stream and len(prompts) > 1:
            raise BadField("prompt", f"a streamed completion takes one prompt, got {len(prompts)}")
        requests = tuple(api.GenerateRequest(prompt=p, **common) for p in prompts)
    return OpenAIRequest(kind=kind, model=model or base_model, requests=requests, stream=stream,
                         include_usage=include_usage, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                         return_token_ids=_bool(body, "return_token_ids", False), names=names)


# --- fields ---------------------------------------------------------------------------------------------------------

def _typed(name: str, value: object, kind_of: str):
    if kind_of == "bool":
        if not isinstance(value, bool):
            raise BadField(name, f"must be true or false, got {value!r}")
        return value
    if kind_of == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadField(name, f"must be a number, got {value!r}")
        return float(value)
    if kind_of == "uint32_list":
        if not isinstance(value, list):
            raise BadField(name, f"must be a list of token ids, got {value!r}")
        return [_integer(f"{name}[{i}]", v, 0, _UINT32) for i, v in enumerate(value)]
    lo, hi = {"int32": (-_INT32, _INT32), "uint32": (0, _UINT32), "uint64": (0, 2 ** 64)}[kind_of]
    return _integer(name, value, lo, hi)


def _integer(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadField(name, f"must be an integer, got {value!r}")
    if not lo <= value < hi:
        raise BadField(name, f"must be an integer in [{lo}, {hi - 1}], got {value}")
    return value


def _set(params: api.GenerationParams, name: str, value) -> None:
    if isinstance(value, list):
        getattr(params, name).extend(value)
    else:
        setattr(params, name, value)


def _bool(body: dict, name: str, default: bool) -> bool:
    return _typed(name, body[name], "bool") if name in body else default


def _text(body: dict, name: str, default: str) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise BadField(name, f"must be a string, got {value!r}")
    return value


def _int32(body: dict, name: str) -> int:
    return _typed(name, body[name], "int32") if name in body else 0


def _request_id(body: dict) -> str:
    if "request_id" not in body:
        return ""
    try:
        return validate_request_id(body["request_id"], "request_id")
    except InvalidRequestId as e:
        raise BadField("request_id", str(e).partition(": ")[2]) from None


def _stream_options(body: dict, stream: bool) -> bool:
    if "stream_options" not in body:
        return False
    options = body["stream_options"]
    if not stream:
        raise BadField("stream_options", "only applies with stream: true")
    if not isinstance(options, dict):
        raise BadField("stream_options", f"must be an object, got {options!r}")
    for key in options:
        if key != "include_usage":
            raise BadField(f"stream_options.{key}", "not an option this server implements (include_usage is)")
    return _bool(options, "include_usage", False) if options.get("include_usage") is not None else False


def _structured_output(body: dict, params: api.GenerationParams, names: dict[str, str]) -> None:
    try:
        spec, spec_names = structured_output(body)
    except BadStructuredField as e:
        raise BadField(e.param, str(e)) from None
    if spec is not None:
        params.structured_output.CopyFrom(spec)
        names.update(spec_names)


def _max_tokens(body: dict, kind: str, params: api.GenerationParams, names: dict[str, str]) -> None:
    # Chat: max_completion_tokens is OpenAI's current name, max_tokens the deprecated one; the former wins.
    for name in ("max_completion_tokens", "max_tokens") if kind == CHAT else ("max_tokens",):
        if name in body:
            params.max_tokens = _typed(name, body[name], "uint32")
            names["params.max_tokens"] = name
            return


def _stop(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise BadField("stop", f"must be a string or a list of strings, got {value!r}")
    return value


def _logit_bias(value: object) -> dict[int, float]:
    if not isinstance(value, dict):
        raise BadField("logit_bias", f"must be an object of token id -> bias, got {value!r}")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < _UINT32):
            raise BadField("logit_bias", f"key {key!r} is not a token id")
        out[int(key)] = _typed(f"logit_bias[{key}]", bias, "float")
    return out


def _logprobs(body: dict, kind: str, params: api.GenerationParams, names: dict[str, str]) -> bool:
    """Completions: `logprobs: k` (k alternatives per token). Chat: `logprobs: true` and `top_logprobs: k`."""
    if kind == COMPLETIONS:
        if "logprobs" not in body:
            return False
        params.logprobs = _typed("logprobs", body["logprobs"], "uint32")
        return True
    wanted = _bool(body, "logprobs", False)
    if "top_logprobs" in body:
        if not wanted:
            raise BadField("top_logprobs", "needs logprobs: true")
        params.logprobs = _typed("top_logprobs", body["top_logprobs"], "uint32")
        names["params.logprobs"] = "top_logprobs"
    elif wanted:
        params.logprobs = 0
    return wanted


def _prompts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value is None:
        raise BadField("prompt", "is required")
    if not isinstance(value, list):
        raise BadField("prompt", f"must be a string or a list of strings, got {value!r}")
    if not value:
        raise BadField("prompt", "must not be empty")
    if not all(isinstance(p, str) for p in value):
        raise BadField("prompt", "token id lists are not supported: send text")
    return value


def _messages(value: object) -> list[api.ChatMessage]:
    if value is None:
        raise BadField("messages", "is required")
    if not isinstance(value, list):
        raise BadField("messages", f"must be a list of messages, got {value!r}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadField(f"messages[{i}]", f"must be an object with role and content, got {m!r}")
        role = m.get("role")
        if not isinstance(role, str):
            raise BadField(f"messages[{i}].role", f"must be a string, got {role!r}")
        # OpenAI's newer name for the system role; the chat templates know "system".
        out.append(api.ChatMessage(role="system" if role == "developer" else role,
                                   content=_content(m.get("content"), f"messages[{i}].content")))
    return out


def _content(value: object, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadField(where, f"must be a string or a list of text parts, got {value!r}")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadField(f"{where}[{j}]", f"only {{\"type\": \"text\", \"text\": ...}} parts are supported, "
                                            f"got {part!r}")
        texts.append(part["text"])
    return "".join(texts)
