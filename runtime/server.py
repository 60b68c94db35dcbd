"""An OpenAI-compatible local HTTP server: `python -m runtime serve` (Starlette app, served by uvicorn).

    POST /v1/chat/completions   OpenAI request/response shape (and `stream: true` as server-sent
                                events), plus a top-level `safety` object; a refusal is an ordinary
                                assistant message with finish_reason "content_filter"
    GET  /v1/models             the loaded models (OpenAI list shape); GET /v1/models/{id}
    GET  /health                liveness and per-model queue figures, no token needed

Each `Model` has one KV cache, so it answers one request at a time. Requests for a model wait
for their turn in a bounded FIFO queue on the event loop (`server_limits`); beyond `max_queue`
waiting requests the server answers 503 with Retry-After. Generation runs in worker threads so
the event loop stays responsive: a whole non-streaming answer in one thread call, a stream one
`next()` per piece. When a client disconnects (while waiting or generating), its generation
stops at the next piece and is closed in a worker thread, which releases the model.
"""
from __future__ import annotations

import hmac
import threading
import time
import uuid

try:
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # the runtime itself never needs these
    raise ImportError(f"the local server needs starlette and uvicorn ({e}); install them with "
                      "pip install -e '.[serve]'") from None

from .server_limits import DEFAULT_MAX_QUEUE, DEFAULT_RETRY_AFTER_S, ModelQueue, Turn
from .server_schema import (FINISH, APIError, chunk_event, completion, error_event, error_for, parse_chat,
                            parse_json_body, queue_full, safety_dict, usage_event)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_TOKENS_CAP = 4096
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"  # pages served from this machine


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


async def _until_disconnect(request: Request) -> None:
    """Return when the client hangs up (the body has been read: receive() then waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Stream:
    """One generation driven from the event loop: every step runs in a worker thread; owns its Turn."""

    def __init__(self, gen, turn: Turn):
        self.gen, self._it, self.turn = gen, iter(gen), turn

    async def next(self) -> str | None:
        return await anyio.to_thread.run_sync(next, self._it, None)

    async def close(self) -> None:
        """Close the generation in a worker thread (releases the model's lock), then give up the turn."""
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self._it.close)
            finally:
                self.turn.release()


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

    async def watch():
        await _until_disconnect(request)
        stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        reply = await anyio.to_thread.run_sync(consume)
        tg.cancel_scope.cancel()
    return reply


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generation and gives up its turn, however it ends."""

    def __init__(self, run: _Stream, content, **kw):
        super().__init__(content, **kw)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.run.close()


class Server:
    def __init__(self, models: dict, api_key: str | None, max_body_bytes: int, max_tokens_cap: int,
                 max_queue: int = DEFAULT_MAX_QUEUE, retry_after: int = DEFAULT_RETRY_AFTER_S,
                 defaults: dict | None = None):
        if not models:
            raise ValueError("the server needs at least one model")
        self.models = dict(models)
        self.default = next(iter(self.models))
        self.api_key = api_key or None
        self.max_body_bytes = int(max_body_bytes)
        self.max_tokens_cap = int(max_tokens_cap)
        self.defaults = dict(defaults or {})  # Model.chat keywords a request may override (safechat serve --temperature)
        self.retry_after = max(1, int(retry_after))
        by_model: dict[int, ModelQueue] = {}  # one queue per Model object, even if served under two names
        self.queues = {n: by_model.setdefault(id(m), ModelQueue(max_queue)) for n, m in self.models.items()}
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
        return parse_json_body(b"".join(chunks))

    async def take_turn(self, request: Request, name: str) -> Turn | None:
        """Join `name`'s queue (503 when full) and wait for the model; None if the client left meanwhile."""
        queue = self.queues[name]
        turn = queue.join()
        if turn is None:
            raise queue_full(name, queue.waiting, queue.max_waiting, self.retry_after)
        try:
            async with anyio.create_task_group() as tg:
                async def left():
                    await _until_disconnect(request)
                    tg.cancel_scope.cancel()  # stops the wait below
                tg.start_soon(left)
                await turn.wait()
                tg.cancel_scope.cancel()
        except BaseException:
            turn.release()
            raise
        if not turn.active:  # the client hung up while waiting
            turn.release()
            return None
        return turn

    # -- endpoints -------------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": list(self.models),
                             "queues": {n: q.stats() for n, q in self.queues.items()}})

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
        req = parse_chat(await self.read_json(request), self.models, self.default, self.max_tokens_cap,
                         self.defaults)
        model = self.models[req.model]
        # validates the messages and the context window before queueing (400 on error); starts nothing
        gen = await anyio.to_thread.run_sync(lambda: model.chat(req.messages, stream=True, **req.kwargs))
        turn = await self.take_turn(request, req.model)
        if turn is None:
            return JSONResponse({}, status_code=499)  # the client went away; nobody reads this
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        if req.stream:
            run = _Stream(gen, turn)
            return _EventStream(run, self._events(run, head, req.include_usage), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            reply = await _complete(request, gen)
        finally:
            turn.release()
        if reply is None:
            return JSONResponse({}, status_code=499)
        return JSONResponse(completion(head, reply))

    @staticmethod
    async def _events(run: _Stream, head: dict, include_usage: bool):
        try:
            yield chunk_event(head, {"role": "assistant", "content": ""})
            try:
                while (piece := await run.next()) is not None:
                    yield chunk_event(head, {"content": piece})
            except Exception as e:  # headers are sent: report in the stream, then end it
                yield error_event(error_for(e))
                yield "data: [DONE]\n\n"
                return
            reply = run.gen.reply
            yield chunk_event(head, {}, FINISH.get(reply.finish_reason, "stop"), safety=safety_dict(reply))
            if include_usage:
                yield usage_event(head, reply)
            yield "data: [DONE]\n\n"
        finally:  # normal end, client disconnect (cancellation) or aclose(): release the model
            await run.close()


def create_app(models: dict, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP, max_queue: int = DEFAULT_MAX_QUEUE,
               retry_after: int = DEFAULT_RETRY_AFTER_S, cors_origins: list[str] | None = None,
               defaults: dict | None = None) -> Starlette:
    """The ASGI app serving `models` ({name: runtime.Model}; the first is the default).

    `max_queue`: requests that may wait per model while one generates (more get 503 + Retry-After).
    `cors_origins`: web origins allowed to call the API from a browser besides localhost / 127.0.0.1
    (any port), which always are, as with Ollama; ['*'] allows any.
    `defaults`: Model.chat keywords for what a request leaves out (max_tokens, temperature, top_p,
    repeat_penalty, seed, stop), as Ollama's model parameters; a request's own fields win.
    """
    srv = Server(models, api_key, max_body_bytes, max_tokens_cap, max_queue=max_queue, retry_after=retry_after,
                 defaults=defaults)

    def wrap(endpoint):
        async def handler(request: Request):
            try:
                return await endpoint(request)
            except Exception as e:  # every error answers in the OpenAI shape, never a traceback
                return _error_response(error_for(e))
        return handler

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    routes = [Route("/health", wrap(srv.health), methods=["GET"]),
              Route("/v1/models", wrap(srv.list_models), methods=["GET"]),
              Route("/v1/models/{name:path}", wrap(srv.get_model), methods=["GET"]),
              Route("/v1/chat/completions", wrap(srv.chat_completions), methods=["POST"])]
    cors = [Middleware(CORSMiddleware, allow_origins=list(cors_origins or []), allow_origin_regex=LOCAL_ORIGINS,
                       allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"], max_age=600)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, middleware=cors)
    app.state.server = srv
    return app


def serve(models: dict, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
          max_queue: int = DEFAULT_MAX_QUEUE, log_level: str = "info", cors_origins: list[str] | None = None,
          defaults: dict | None = None) -> None:
    """Serve `models` with uvicorn until interrupted (binds to 127.0.0.1 unless told otherwise)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"the local server needs uvicorn ({e}); install it with pip install -e '.[serve]'") from None
    app = create_app(models, api_key=api_key, max_body_bytes=max_body_bytes, max_tokens_cap=max_tokens_cap,
                     max_queue=max_queue, cors_origins=cors_origins, defaults=defaults)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
