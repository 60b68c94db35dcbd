"""An OpenAI-compatible local HTTP server: `python -m runtime serve` (Starlette app, served by uvicorn).

    POST /v1/chat/completions   OpenAI request/response shape (and `stream: true` as server-sent
                                events), plus a top-level `safety` object; a refusal is an ordinary
                                assistant message with finish_reason "content_filter"
    GET  /v1/models             the loaded models (OpenAI list shape); GET /v1/models/{id}
    GET  /health                liveness, no token needed

Each `Model` has one KV cache and serialises `chat` behind its own lock, so requests to one model
queue (FIFO-ish, on the lock). Generation runs in worker threads so the event loop stays responsive:
a whole non-streaming answer in one thread call, a stream one `next()` per piece (starlette's
iterate_in_threadpool pattern). When a client disconnects, the generation stops at its next piece
and is closed in a worker thread, which releases the model's lock.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from typing import Any

try:
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the runtime itself never needs these
    raise ImportError(f"the local server needs starlette and uvicorn ({e}); install them with "
                      "pip install -e '.[serve]'") from None

from .errors import ContextOverflowError, RuntimeSafetyError

log = logging.getLogger("runtime.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TOKENS_CAP = 4096
DEFAULT_MAX_TOKENS = 256
FINISH = {"stop": "stop", "length": "length", "safety": "content_filter"}


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _error_for(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ValueError, RuntimeSafetyError)):  # MessagesError, ContextOverflowError, bad values
        code = "context_length_exceeded" if isinstance(exc, ContextOverflowError) else "invalid_request"
        return APIError(400, str(exc), code=code)
    log.exception("internal error while serving a request")
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")


def _safety_dict(reply) -> dict:
    s = reply.safety
    return {"refused": reply.refused, "reason": s.reason, "checks": s.checks, "max_p_unsafe": s.max_p_unsafe,
            "intervened_at": s.intervened_at, "threshold": s.threshold, "enabled": s.enabled}


def _usage_dict(reply) -> dict:
    u = reply.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _number(body: dict, key: str, lo: float, hi: float, default: float | None) -> float | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise APIError(400, f"'{key}' must be a number in [{lo}, {hi}], got {v!r}", param=key)
    return float(v)


class _Stream:
    """One generation driven from the event loop; every step runs in a worker thread."""

    def __init__(self, gen):
        self.gen, self._it = gen, iter(gen)

    async def next(self) -> str | None:
        return await anyio.to_thread.run_sync(next, self._it, None)

    async def close(self) -> None:
        """Close the generator in a worker thread (releases the model's lock if it was stopped early)."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._it.close)


async def _complete(request: Request, gen):
    """Run a whole generation in one worker thread; stop it early if the client disconnects."""
    stop = threading.Event()

    def consume():
        it = iter(gen)
        try:
            for _ in it:
                if stop.is_set():
                    return None
        finally:
            it.close()  # in this thread: releases the model's lock
        return gen.reply

    async def watch_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_disconnect)
        reply = await anyio.to_thread.run_sync(consume)
        tg.cancel_scope.cancel()
    return reply


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, even when sending fails."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


class Server:
    def __init__(self, models: dict, api_key: str | None, max_body_bytes: int, max_tokens_cap: int):
        if not models:
            raise ValueError("the server needs at least one model")
        self.models = dict(models)
        self.default = next(iter(self.models))
        self.api_key = api_key or None
        self.max_body_bytes = int(max_body_bytes)
        self.max_tokens_cap = int(max_tokens_cap)
        self.created = int(time.time())

    # -- request checks ------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        too_big = APIError(413, f"request body is larger than {self.max_body_bytes} bytes",
                           code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def chat_args(self, body: dict) -> tuple[str, Any, dict, bool, bool]:
        name = body.get("model") or self.default
        if not isinstance(name, str) or name not in self.models:
            raise APIError(404, f"model {name!r} not found; available: {', '.join(self.models)}",
                           code="model_not_found", param="model")
        if "messages" not in body:
            raise APIError(400, "'messages' is required", param="messages")
        messages = body["messages"]
        if isinstance(messages, list):  # OpenAI content parts -> plain text (text parts only)
            messages = [self._flatten(i, m) for i, m in enumerate(messages)]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.max_tokens_cap)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise APIError(400, f"'max_tokens' must be a positive integer, got {max_tokens!r}", param="max_tokens")
        if max_tokens > self.max_tokens_cap:
            raise APIError(400, f"'max_tokens' is {max_tokens}; this server allows at most {self.max_tokens_cap}",
                           param="max_tokens")
        n = body.get("n")
        if n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be a boolean", param="stream")
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        kw = {"max_tokens": max_tokens, "temperature": _number(body, "temperature", 0.0, 2.0, 0.0),
              "top_p": _number(body, "top_p", 0.0, 1.0, 0.95), "seed": (seed or 0) & 0xFFFFFFFF}
        return name, messages, kw, stream, include_usage

    @staticmethod
    def _flatten(i: int, m: Any) -> Any:
        if not isinstance(m, dict) or not isinstance(m.get("content"), list):
            return m
        texts = []
        for part in m["content"]:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}]['content']: only text parts are supported", param="messages")
            texts.append(part["text"])
        return {**m, "content": "".join(texts)}

    # -- endpoints -------------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": list(self.models)})

    def _model_obj(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "safechat"}

    async def list_models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_obj(n) for n in self.models]})

    async def get_model(self, request: Request) -> JSONResponse:
        self.authorize(request)
        name = request.path_params["name"]
        if name not in self.models:
            raise APIError(404, f"model {name!r} not found", code="model_not_found", param="model")
        return JSONResponse(self._model_obj(name))

    async def chat_completions(self, request: Request):
        self.authorize(request)
        body = await self.read_json(request)
        name, messages, kw, stream, include_usage = self.chat_args(body)
        model = self.models[name]
        # validates the messages and the context window before anything is sent (400 on error)
        gen = await anyio.to_thread.run_sync(lambda: model.chat(messages, stream=True, **kw))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if stream:
            return _EventStream(self._events(_Stream(gen), head, include_usage), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        reply = await _complete(request, gen)
        if reply is None:
            return JSONResponse({}, status_code=499)  # the client went away; nobody reads this
        return JSONResponse({
            **head, "object": "chat.completion", "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text, "refusal": None},
                         "logprobs": None, "finish_reason": FINISH.get(reply.finish_reason, "stop")}],
            "usage": _usage_dict(reply), "safety": _safety_dict(reply)})

    async def _events(self, run: _Stream, head: dict, include_usage: bool):
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            d = {**head, "object": "chat.completion.chunk", "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            try:
                while (piece := await run.next()) is not None:
                    yield chunk({"content": piece})
            except Exception as e:  # headers are sent: report in the stream, then end it
                err = _error_for(e)
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type, 'code': err.code}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            reply = run.gen.reply
            yield chunk({}, FINISH.get(reply.finish_reason, "stop"), safety=_safety_dict(reply))
            if include_usage:
                d = {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage_dict(reply)}
                yield f"data: {json.dumps(d)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # normal end, client disconnect (cancellation) or aclose(): release the model
            await run.close()


def create_app(models: dict, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP) -> Starlette:
    """The ASGI app serving `models` ({name: runtime.Model}; the first is the default)."""
    srv = Server(models, api_key, max_body_bytes, max_tokens_cap)

    def wrap(endpoint):
        async def handler(request: Request):
            try:
                return await endpoint(request)
            except Exception as e:  # every error answers in the OpenAI shape, never a traceback
                return _error_for(e).response()
        return handler

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    routes = [Route("/health", wrap(srv.health), methods=["GET"]),
              Route("/v1/models", wrap(srv.list_models), methods=["GET"]),
              Route("/v1/models/{name:path}", wrap(srv.get_model), methods=["GET"]),
              Route("/v1/chat/completions", wrap(srv.chat_completions), methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.server = srv
    return app


def serve(models: dict, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
          log_level: str = "info") -> None:
    """Serve `models` with uvicorn until interrupted (binds to 127.0.0.1 unless told otherwise)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"the local server needs uvicorn ({e}); install it with pip install -e '.[serve]'") from None
    app = create_app(models, api_key=api_key, max_body_bytes=max_body_bytes, max_tokens_cap=max_tokens_cap)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
