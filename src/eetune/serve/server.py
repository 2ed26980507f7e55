"""`eetune serve DIR`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over an exits directory.

    eetune serve runs/exits --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "exits", "prompt": "The capital of France is", "max_tokens": 16}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the
tokenizer's chat template), GET /metrics (Prometheus). Streaming is Server-Sent Events as the
OpenAI clients read them (`data: {...}` chunks, then `data: [DONE]`). The eetune extension
`{"eetune": {"mode": "full|early-exit|self-spec|auto", "threshold": T, "draft_len": N,
"draft_context": true|false}}` (the
OpenAI clients' `extra_body`) chooses the decoding per request; the reply carries an `eetune`
object (resolved mode, token ids, mean exit layer, drafts). Decoding is scheduled by
`eetune.serve.scheduler` (continuous batching). Errors are OpenAI error bodies
`{"error": {"message", "type", "param", "code"}}`, never a traceback. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import signal
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eetune.decode.api import DecodeOptions, chat_prompt_ids, end_token_ids
from eetune.errors import EETuneError
from eetune.serve.metrics import Metrics
from eetune.serve.scheduler import Draining, Job, QueueFull, Scheduler, SchedulerConfig

SERVER_MODES = ("full", "early-exit", "self-spec", "auto")
UNSUPPORTED = {  # OpenAI parameters the engine cannot honour, and the value that means "off"
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "response_format": (None,),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ServeSettings:
    model_name: str  # the model id clients pass (`model`)
    mode: str = "auto"  # default mode of requests that do not choose one
    threshold: float | None = None  # default threshold (None: the exits directory's calibration, else 0.9)
    draft_len: int = 4  # self-spec draft length
    draft_exit: int | str | None = None  # self-spec draft exit (None: the deepest)
    draft_context: bool = False  # self-spec: a restricted draft head also proposes the prompt's tokens outside its K
    max_tokens: int = 256  # default max_tokens (capped by what the context leaves)
    temperature: float = 0.0  # default temperature (0: greedy)


# --- request parsing ---------------------------------------------------------------------------
def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))
    if integer:
        ok = ok and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]" if lo is not None else ""
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind}{' in ' + rng if rng else ''} (got {v!r})", param=name,
                       code="invalid_value")
    return int(v) if integer else float(v)


class Frontend:
    """Turns OpenAI request bodies into scheduler jobs and their events into OpenAI responses."""

    def __init__(self, model, tokenizer, scheduler: Scheduler, settings: ServeSettings, metrics: Metrics):
        self.model, self.tok, self.sched, self.s, self.metrics = model, tokenizer, scheduler, settings, metrics
        self.eos = end_token_ids(model, tokenizer)
        self.capacity = scheduler.cfg.capacity
        self.draining = False

    def options(self, body: dict, prompt_len: int, prompt_param: str) -> tuple[DecodeOptions, tuple, bool]:
        for name, off in UNSUPPORTED.items():
            if name in body and body[name] not in off:
                raise APIError(400, f"{name} is not supported by this server: leave it out", param=name,
                               code="unsupported_parameter")
        n = body.get("n", 1)
        if n is not None and n != 1:
            raise APIError(400, f"n={n!r}: this server returns one choice per request (n=1); send n requests",
                           param="n", code="unsupported_parameter")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, f"stream must be true or false (got {stream!r})", param="stream", code="invalid_value")
        limit = self.capacity - prompt_len
        if limit < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server's context is {self.capacity} "
                                f"(--max-context): shorten it", param=prompt_param, code="context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, name, None, lo=1, integer=True)
        if max_tokens is None:
            max_tokens = min(self.s.max_tokens, limit)
        elif max_tokens > limit:
            raise APIError(400, f"{prompt_len} prompt tokens + {name}={max_tokens} exceed this server's context of "
                                f"{self.capacity} tokens: lower {name} or shorten the prompt", param=name,
                           code="context_length_exceeded")
        temperature = _number(body, "temperature", self.s.temperature, lo=0, hi=2)
        top_p = _number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)
        seed = _number(body, "seed", None, lo=0, hi=2 ** 63 - 1, integer=True)
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        else:
            raise APIError(400, "stop must be a string or a list of at most 4 strings", param="stop",
                           code="invalid_value")
        ext = body.get("eetune") or {}
        if not isinstance(ext, dict):
            raise APIError(400, "eetune must be an object, e.g. {\"mode\": \"early-exit\", \"threshold\": 0.9}",
                           param="eetune", code="invalid_value")
        unknown = sorted(set(ext) - {"mode", "threshold", "draft_len", "draft_context"})
        if unknown:
            raise APIError(400, f"unknown eetune option(s) {', '.join(unknown)}: use mode, threshold, draft_len, "
                                f"draft_context", param="eetune", code="invalid_value")
        mode = ext.get("mode", self.s.mode) or self.s.mode
        if mode not in SERVER_MODES:
            raise APIError(400, f"unknown eetune mode {mode!r}: use one of {', '.join(SERVER_MODES)}",
                           param="eetune.mode", code="invalid_value")
        threshold = _number(ext, "threshold", self.s.threshold, lo=0)
        draft_len = _number(ext, "draft_len", self.s.draft_len, lo=1, hi=64, integer=True)
        draft_context = ext.get("draft_context", self.s.draft_context)
        if not isinstance(draft_context, bool):
            raise APIError(400, f"eetune.draft_context must be true or false (got {draft_context!r})",
                           param="eetune.draft_context", code="invalid_value")
        opts = DecodeOptions(mode=mode, max_new_tokens=max_tokens, threshold=threshold, draft_len=draft_len,
                             draft_exit=self.s.draft_exit, draft_context=draft_context, temperature=temperature,
                             top_p=top_p, seed=seed, eos_token_ids=self.eos)
        for m in (["full", self.sched.cfg.auto_mode] if mode == "auto" else [mode]):
            try:
                dataclasses.replace(opts, mode=m).validate(self.model)
            except EETuneError as e:
                raise APIError(400, str(e), param="eetune", code="invalid_value") from None
        return opts, stop, stream

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            if not p.strip():
                raise APIError(400, "empty prompt: give some text", param="prompt", code="invalid_value")
            return list(self.tok(p, add_special_tokens=True)["input_ids"])
        V = self.model.backbone.vocab_size
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < V for t in p):
                raise APIError(400, f"prompt token ids must be in 0..{V - 1}", param="prompt", code="invalid_value")
            return list(p)
        raise APIError(400, "prompt must be a non-empty string, a list of one string, or a list of token ids "
                            "(one prompt per request)", param="prompt", code="invalid_value")

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError(400, "messages must be a non-empty list of {role, content}", param="messages",
                           code="invalid_value")
        clean = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise APIError(400, "each message needs a role and content", param="messages", code="invalid_value")
            c = m.get("content")
            if isinstance(c, list):  # content parts: text only
                if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str)
                           for x in c):
                    raise APIError(400, "only text content parts are supported", param="messages",
                                   code="invalid_value")
                c = "".join(x["text"] for x in c)
            if not isinstance(c, str):
                raise APIError(400, "message content must be a string", param="messages", code="invalid_value")
            clean.append({"role": m["role"], "content": c})
        if getattr(self.tok, "chat_template", None) is None:
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions",
                           param="messages", code="no_chat_template")
        if not any(m["content"].strip() for m in clean):
            raise APIError(400, "empty messages: give some text", param="messages", code="invalid_value")
        try:
            if len(clean) == 1 and clean[0]["role"] == "user":
                return chat_prompt_ids(self.tok, clean[0]["content"])  # exactly `eetune generate --chat`
            x = self.tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=True, return_dict=False)
            return list(x["input_ids"]) if hasattr(x, "keys") else list(x)
        except Exception as e:  # a template that refuses these roles or their order
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages",
                           code="invalid_value") from None

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise APIError(400, "model is required (GET /v1/models lists it)", param="model", code="invalid_value")
        if name != self.s.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves `{self.s.model_name}`)",
                           param="model", code="model_not_found")

    def submit(self, ids, opts, stop, loop, queue) -> Job:
        def sink(kind, data):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, data))
        job = Job(ids, opts, self.tok, stop, sink)
        if self.draining:
            self.metrics.rejected(opts.mode)
            raise APIError(503, "the server is shutting down", "server_error", None, "shutting_down",
                           headers={"Retry-After": "1"})
        try:
            self.sched.submit(job)
        except QueueFull as e:
            self.metrics.rejected(opts.mode)
            raise APIError(503, f"the server is busy ({e}): retry later", "server_error", None, "queue_full",
                           headers={"Retry-After": "1"}) from None
        except Draining:
            self.metrics.rejected(opts.mode)
            raise APIError(503, "the server is shutting down", "server_error", None, "shutting_down",
                           headers={"Retry-After": "1"}) from None
        return job


def build_app(model, tokenizer, scheduler: Scheduler, settings: ServeSettings, metrics: Metrics):
    front = Frontend(model, tokenizer, scheduler, settings, metrics)
    app = FastAPI(title="eetune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.front = front

    def error_response(err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        code = "not_found" if err.status_code == 404 else ("method_not_allowed" if err.status_code == 405 else None)
        return error_response(APIError(err.status_code, str(err.detail), "invalid_request_error", None, code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        msg = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in err.errors())
        return error_response(APIError(400, f"invalid request ({msg})", "invalid_request_error", None, "invalid_value"))

    @app.exception_handler(Exception)
    async def _any_error(request, err):
        return error_response(APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error", None,
                                       "internal_error"))

    @app.get("/health")
    async def health():
        if front.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": settings.model_name, "queue": len(scheduler.waiting),
                "running": scheduler.live()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": STARTED,
                                            "owned_by": "eetune"}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    async def handle(request: Request, chat: bool):
        body = await read_body(request)
        front.check_model(body)
        ids = front.chat_prompt(body) if chat else front.completion_prompt(body)
        opts, stop, stream = front.options(body, len(ids), "messages" if chat else "prompt")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = front.submit(ids, opts, stop, loop, queue)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(job.ids),
                    "total_tokens": len(ids) + len(job.ids)}

        async def next_event():
            """The job's next (kind, data) event; None once the client has gone (the job is then
            cancelled: its row leaves at the next step)."""
            while True:
                try:
                    return await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return None

        def failure() -> APIError | None:
            """The error a job that ended without a reply answers with, else None."""
            if job.finished_by == "error":
                return APIError(500, f"decoding failed: {job.error}", "server_error", None, "internal_error")
            if job.finished_by == "cancelled":
                return APIError(503, "the request was cancelled (the server is shutting down)", "server_error",
                                None, "cancelled")
            return None

        if not stream:
            try:
                while True:
                    event = await next_event()
                    if event is None:
                        return Response(status_code=499)
                    if event[0] == "done":
                        break
            finally:
                if not job.finished:
                    job.cancel()
            err = failure()
            if err is not None:
                raise err
            choice = {"index": 0, "finish_reason": job.finish_reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": job.text}
            else:
                choice["text"] = job.text
            return {"id": rid, "object": obj, "created": created, "model": settings.model_name,
                    "choices": [choice], "usage": usage(), "eetune": job.info()}

        def chunk(piece: str | None, finish: str | None, first: bool = False, extra: dict | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if piece is None else {"content": piece})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                o = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
                o = "text_completion"
            out = {"id": rid, "object": o, "created": created, "model": settings.model_name, "choices": [choice]}
            if extra:
                out.update(extra)
            return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

        async def events():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    event = await next_event()
                    if event is None:
                        return
                    kind, data = event
                    if kind == "text":
                        yield chunk(data, None)
                    elif kind == "done":
                        break
                err = failure()
                if err is not None:
                    yield f"data: {json.dumps(err.body())}\n\n"
                else:
                    yield chunk(None, job.finish_reason, extra={"eetune": job.info()})
                    if include_usage:
                        u = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": created, "model": settings.model_name, "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(u)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not job.finished:
                    job.cancel()  # the client went away: its row leaves at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


STARTED = int(time.time())


def serve(directory: str, host: str = "127.0.0.1", port: int = 8000, *, settings: dict | None = None,
          scheduler: dict | None = None, device: str = "cpu", dtype: str = "fp32", drain_s: float = 30.0,
          log_level: str = "warning") -> int:
    """Load the exits directory and serve it until SIGTERM / SIGINT; returns the exit code (0)."""
    import sys
    from pathlib import Path

    import torch
    import uvicorn

    from eetune.model.backbone import load_tokenizer
    from eetune.model.early_exit import EarlyExitModel

    model = EarlyExitModel.from_pretrained(directory, dtype=dtype, device=device)
    tok = load_tokenizer(model.backbone)
    cfg = SchedulerConfig(**(scheduler or {}))
    limit = getattr(model.backbone.config, "max_position_embeddings", None) or \
        getattr(model.backbone.config, "n_positions", None)
    if limit:
        cfg.capacity = min(cfg.capacity, int(limit))
    settings = ServeSettings(**{"model_name": Path(directory).resolve().name, **(settings or {})})
    for m in ("full", cfg.auto_mode) if settings.mode == "auto" else (settings.mode,):  # refuse bad defaults now
        DecodeOptions(mode=m, threshold=settings.threshold, draft_len=settings.draft_len,
                      draft_exit=settings.draft_exit, draft_context=settings.draft_context,
                      temperature=settings.temperature).validate(model)
    metrics = Metrics()
    sched = Scheduler(model, tok, cfg, metrics)
    app = build_app(model, tok, sched, settings, metrics)
    front = app.state.front

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop accepting; uvicorn finishes open responses (bounded by drain_s)
            front.draining = True
            sched.stop_accepting()
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29 re-raises captured signals
            if sig == signal.SIGTERM and captured and sig in captured:
                captured.remove(sig)  # a drained SIGTERM is a clean exit (code 0), not a re-raise

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"eetune serve: http://{host}:{port}/v1 (model `{settings.model_name}`, "
                      f"{model.backbone.num_layers} layers, exits {list(model.exit_layers)}, default mode "
                      f"{settings.mode}, max batch {cfg.max_batch}, context {cfg.capacity})", flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=max(1, int(math.ceil(drain_s))), lifespan="off")
    server = Server(config)
    torch.set_grad_enabled(False)
    sched.start()
    try:
        server.run()
    finally:
        sched.shutdown()
    if not server.started:
        print(f"eetune: error: could not listen on {host}:{port}", file=sys.stderr)
        return 2
    return 0
