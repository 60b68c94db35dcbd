"""The OpenAI wire format of the local server: request checks, the error shape, response pieces.

Everything a client can get wrong is answered here as an `APIError` (4xx, OpenAI's
`{"error": {"message", "type", "param", "code"}}`) before the model is touched.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from .errors import ContextOverflowError, RuntimeSafetyError

log = logging.getLogger("runtime.server")

DEFAULT_MAX_TOKENS = 256
FINISH = {"stop": "stop", "length": "length", "safety": "content_filter"}


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_for(exc: BaseException) -> APIError:
    """The APIError to answer for an exception: 400 for bad input, 500 (logged, no traceback sent) otherwise."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ValueError, RuntimeSafetyError)):  # MessagesError, ContextOverflowError, bad values
        code = "context_length_exceeded" if isinstance(exc, ContextOverflowError) else "invalid_request"
        return APIError(400, str(exc), code=code, param=getattr(exc, "param", None))
    log.exception("internal error while serving a request")
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")


def queue_full(name: str, waiting: int, limit: int, retry_after: int) -> APIError:
    return APIError(503, f"model {name!r} is busy: it is answering a request and {waiting} more are waiting "
                         f"(at most {limit} may wait); retry in {retry_after} s", type="server_error",
                    code="model_busy", headers={"Retry-After": str(retry_after)})


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: Any          # validated further (roles, types, context window) by Model.chat
    kwargs: dict           # max_tokens, temperature, top_p, seed for Model.chat
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, lo: float, hi: float, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise APIError(400, f"'{key}' must be a number in [{lo}, {hi}], got {v!r}", param=key)
    return float(v)


def _integer(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise APIError(400, f"'{key}' must be an integer, got {v!r}", param=key)
    return v


def parse_chat(body: dict, models: dict, default: str, max_tokens_cap: int,
               defaults: dict | None = None) -> ChatRequest:
    """Check a /v1/chat/completions body; raise APIError (4xx) naming the first problem.

    `defaults`: the server's Model.chat keywords for fields the body leaves out (the body's win).
    """
    defaults = defaults or {}
    name = body.get("model") or default
    if not isinstance(name, str) or name not in models:
        raise APIError(404, f"model {name!r} not found; available: {', '.join(models)}",
                       code="model_not_found", param="model")
    if "messages" not in body:
        raise APIError(400, "'messages' is required", param="messages")
    messages = body["messages"]  # roles, content parts, Unicode: checked by Model.chat (runtime/prompt.py)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(defaults.get("max_tokens", DEFAULT_MAX_TOKENS), max_tokens_cap)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
    if max_tokens > max_tokens_cap:
        raise APIError(400, f"'max_tokens' is {max_tokens}; this server allows at most {max_tokens_cap}",
                       param="max_tokens")
    if _integer(body, "n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    seed = _integer(body, "seed")
    _unsupported(body)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    kw = {**defaults, "max_tokens": max_tokens}
    kw.update({"stop": body.get("stop", defaults.get("stop")),  # checked by Model.chat (runtime/stops.py)
               "response_format": body.get("response_format")})  # a grammar (runtime/formats.py)
    for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):  # absent: the server's, else the chat defaults
        if body.get(key) is not None:
            kw[key] = _number(body, key, lo, hi, 0.0)
    if seed is not None:  # absent: the server's --seed, else a fresh seed per request
        kw["seed"] = seed & 0xFFFFFFFF
    return ChatRequest(name, messages, kw, stream, include_usage)


# Fields a client may send that this server cannot honour: answered with a 400 naming the field rather
# than ignored (a client asking for tools or JSON output must not silently get plain text).
def _unsupported(body: dict) -> None:
    if body.get("tools") or body.get("functions"):
        key = "tools" if body.get("tools") else "functions"
        raise APIError(400, f"'{key}' (function calling) is not supported by this server", param=key)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise APIError(400, "'tool_choice' is not supported by this server (no tools)", param="tool_choice")
    if body.get("logprobs") or body.get("top_logprobs"):
        key = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise APIError(400, f"'{key}' is not supported by this server", param=key)



def safety_dict(reply) -> dict:
    s = reply.safety
    d = {"refused": reply.refused, "reason": s.reason, "checks": s.checks, "max_p_unsafe": s.max_p_unsafe,
         "intervened_at": s.intervened_at, "threshold": s.threshold, "enabled": s.enabled}
    if s.category_scores is not None:  # a model with a category head
        d |= {"category": s.category, "category_scores": s.category_scores, "controversial": s.controversial,
              "allowed": [{"at": at, "category": c} for at, c in s.allowed]}
    return d


def usage_dict(reply) -> dict:
    u = reply.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def completion(head: dict, reply) -> dict:
    """The non-streaming response body."""
    return {**head, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text,
                                                 "refusal": reply.text if reply.refused else None},
                         "logprobs": None, "finish_reason": FINISH.get(reply.finish_reason, "stop")}],
            "usage": usage_dict(reply), "safety": safety_dict(reply)}


def chunk_event(head: dict, delta: dict, finish: str | None = None, **extra) -> str:
    """One server-sent `chat.completion.chunk` event."""
    d = {**head, "object": "chat.completion.chunk", "system_fingerprint": None,
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"


def usage_event(head: dict, reply) -> str:
    d = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_dict(reply)}
    return f"data: {json.dumps(d)}\n\n"


def error_event(err: APIError) -> str:
    return f"data: {json.dumps(err.body())}\n\n"
