"""The OpenAI-compatible HTTP API of `tunesmith serve` (Starlette, run by uvicorn).

* ``GET /v1/models``, ``GET /v1/models/{name}``
* ``POST /v1/chat/completions`` — messages rendered with the model's training template, exactly as ``tunesmith
  generate`` renders a prompt (a first user message may carry alpaca's ``input``)
* ``POST /v1/completions`` — raw text prompts (a string or a list of strings)
* both: ``stream`` (server-sent events, ``stream_options.include_usage``), ``max_tokens`` / ``max_completion_tokens``,
  ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``, ``n``; extensions ``top_k`` and
  ``repetition_penalty`` (as vLLM names them); ``usage`` counts; errors as OpenAI error objects.
* ``GET /`` — the web page (chat, and side-by-side blind comparison of two served models);
  ``POST /tunesmith/preferences`` records a blind preference in the judge's ``judgements.jsonl`` format and
  ``GET /tunesmith/preferences?a=A&b=B`` gives the win rate so far; ``GET /health``.

Limits: request bodies above ``max_body_bytes`` are refused (413) before they are read whole; a full waiting list is
a 503 with ``Retry-After``; a bad request is a 400 naming the field, and the server keeps serving. With an API key,
every ``/v1`` and ``/tunesmith`` route wants ``Authorization: Bearer KEY`` (compared in constant time; the key is
never logged).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from tunesmith.serve.engine import (
    Busy,
    Engine,
    Params,
    RequestError,
    chat_prompt_ids,
    text_prompt_ids,
)

log = logging.getLogger("tunesmith.serve")

PAGE = Path(__file__).with_name("page.html")
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "echo", "suffix",
               "best_of", "logit_bias", "response_format", "audio", "modalities", "prediction")
MAX_STOPS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------- request parsing


async def read_json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes (max_body_bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes (max_body_bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client closed the connection before the body was read") from None
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e.__class__.__name__}: {str(e)[:120]})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, key: str, default, lo: float | None = None, hi: float | None = None, integer: bool = False,
            lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (not integer and not math.isfinite(value)):
        raise APIError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise APIError(400, f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {value}", key)
    if hi is not None and value > hi:
        raise APIError(400, f"'{key}' must be <= {hi}, got {value}", key)
    return value


def parse_params(body: dict, engine: Engine, prompt_lens: list[int], default_max_tokens: int) -> tuple[Params, int]:
    """(decoding params, n) of a request, every field checked; the prompt must leave room for the answer."""
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}, 0):
            raise APIError(400, f"'{key}' is not supported by tunesmith serve", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0) != 0:
            raise APIError(400, f"'{key}' is not supported (use repetition_penalty)", key)
    if body.get("max_completion_tokens") is not None:
        asked = _number(body, "max_completion_tokens", None, lo=1, integer=True)
    else:
        asked = _number(body, "max_tokens", None, lo=1, integer=True)
    n = _number(body, "n", 1, lo=1, hi=engine.max_batch_size, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise APIError(400, f"'seed' must be a non-negative integer, got {seed!r}", "seed")
    context = engine.served.context
    longest = max(prompt_lens)
    if context is not None:
        room = context - longest
        if room < 1:
            raise APIError(400, f"the prompt has {longest} tokens; the model's context is {context} tokens, which "
                                f"leaves no room for an answer", "messages" if "messages" in body else "prompt",
                           code="context_length_exceeded")
        if asked is not None and asked > room:
            raise APIError(400, f"max_tokens {asked} + the prompt's {longest} tokens exceed the model's context of "
                                f"{context} tokens", "max_tokens", code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(default_max_tokens, room)
    else:
        max_tokens = asked if asked is not None else default_max_tokens
    params = Params(max_tokens=max_tokens,
                    temperature=float(_number(body, "temperature", 1.0, lo=0, hi=2)),
                    top_p=float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)),
                    top_k=_number(body, "top_k", 0, lo=-1, integer=True),
                    repetition_penalty=float(_number(body, "repetition_penalty", 1.0, lo=0, lo_open=True)),
                    seed=seed, stop=stop)
    params.top_k = max(params.top_k, 0)  # -1 (vLLM's "off") is 0 here
    if not isinstance(body.get("stream", False), bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    return params, n


# ---------------------------------------------------------------- the app


class Server:
    def __init__(self, engines: dict[str, Engine], api_key: str | None = None, max_body_bytes: int = 1 << 20,
                 default_max_tokens: int = 256, preferences_dir: str | None = None):
        self.engines, self.max_body_bytes, self.default_max_tokens = engines, max_body_bytes, default_max_tokens
        self._key = api_key.encode() if api_key else None
        self.preferences_dir = Path(preferences_dir) if preferences_dir else None
        self.created = int(time.time())
        self._pref_lock = asyncio.Lock()

    # ---- helpers

    def check_auth(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = hmac.compare_digest(given.strip().encode(), self._key) and scheme.lower() == "bearer"
        if not ok:
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           kind="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def engine(self, body: dict) -> Engine:
        name = body.get("model")
        if name is None and len(self.engines) == 1:
            return next(iter(self.engines.values()))
        if not isinstance(name, str) or name not in self.engines:
            raise APIError(400, f"unknown model {name!r}; this server serves {', '.join(map(repr, self.engines))}",
                           "model", code="model_not_found")
        return self.engines[name]

    def model_card(self, name: str) -> dict:
        served = self.engines[name].served
        return {"id": name, "object": "model", "created": self.created, "owned_by": "tunesmith",
                "max_model_len": served.context, "template": served.template_spec}

    # ---- routes

    async def page(self, request: Request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request):
        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [self.model_card(name) for name in self.engines]})

    async def model(self, request: Request):
        self.check_auth(request)
        name = request.path_params["name"]
        if name not in self.engines:
            raise APIError(404, f"the model {name!r} does not exist", "model", code="model_not_found")
        return JSONResponse(self.model_card(name))

    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool):
        self.check_auth(request)
        body = await read_json(request, self.max_body_bytes)
        engine = self.engine(body)
        served = engine.served
        try:
            if chat:
                prompts = [chat_prompt_ids(served, body.get("messages"))]
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, str):
                    prompt = [prompt]
                if not (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)):
                    raise RequestError("'prompt' must be a string or a non-empty list of strings", "prompt")
                prompts = [text_prompt_ids(served, p) for p in prompt]
        except RequestError as e:
            raise APIError(400, str(e), e.param) from None
        params, n = parse_params(body, engine, [len(p) for p in prompts], self.default_max_tokens)
        stream = body.get("stream", False) is True
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        if stream:  # every piece of text goes to the response as it comes
            on_event = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
        else:  # only the end matters: no wake-up of the event loop per token
            on_event = lambda ev: ev is None and loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
        job = engine.job(prompts, n, params, on_event)
        try:
            engine.submit(job)
        except RequestError as e:
            raise APIError(400, str(e), e.param) from None
        except Busy as e:
            raise APIError(503, f"the server is busy: {e}", kind="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created, name = int(time.time()), served.name
        usage = lambda: {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                         "total_tokens": job.prompt_tokens + job.completion_tokens}
        if stream:
            return StreamingResponse(self._stream(job, events, rid, created, name, chat, n * len(prompts),
                                                  bool(options.get("include_usage")), usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while await events.get() is not None:
                pass
        except asyncio.CancelledError:
            job.cancel()
            raise
        if job.error is not None:
            raise APIError(500, f"generation failed ({job.error.__class__.__name__})", kind="server_error")
        choices = []
        for c in job.choices:
            if chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": None, "finish_reason": c.finish_reason})
            else:
                choices.append({"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": name, "choices": choices, "usage": usage(),
                             "system_fingerprint": None})

    async def _stream(self, job, events: asyncio.Queue, rid: str, created: int, name: str, chat: bool, count: int,
                      include_usage: bool, usage):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra) -> str:
            data = {"id": rid, "object": kind, "created": created, "model": name, "choices": choices, **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(count)])
            while (event := await events.get()) is not None:
                index, text, finish = event
                if chat:
                    delta = {"content": text} if text else {}
                    yield chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}])
                else:
                    yield chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": finish}])
            if job.error is not None:
                err = {"message": f"generation failed ({job.error.__class__.__name__})", "type": "server_error",
                       "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
            elif include_usage:
                yield chunk([], usage=usage())
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away frees its rows at the next step

    # ---- blind preferences (the web page's side-by-side mode)

    def _pair_dir(self, a: str, b: str) -> Path:
        safe = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:80]
        return self.preferences_dir / f"{safe(a)}_vs_{safe(b)}"

    async def preferences(self, request: Request):
        self.check_auth(request)
        if self.preferences_dir is None:
            raise APIError(400, "this server records no preferences (start it with --preferences_dir DIR)")
        if request.method == "GET":
            a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
            return JSONResponse(self._summary(a, b))
        body = await read_json(request, self.max_body_bytes)
        row = preference_row(body, set(self.engines))
        async with self._pref_lock:
            path = self._pair_dir(row["name_a"], row["name_b"]) / "judgements.jsonl"
            row = {"index": count_lines(path), **row}
            await asyncio.to_thread(append_line, path, row)
            summary = self._summary(row["name_a"], row["name_b"])
        return JSONResponse({"recorded": row, "file": str(path), "summary": summary})

    def _summary(self, a: str, b: str) -> dict:
        from tunesmith.evaluation.winrate import win_rate

        path = self._pair_dir(a, b) / "judgements.jsonl"
        outcomes = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    outcomes.append(json.loads(line)["outcome"])
                except (ValueError, KeyError, TypeError):
                    continue
        summary = win_rate(outcomes, 2000, 0.95, 0) if outcomes else {"n": 0}
        return {"name_a": a, "name_b": b, "file": str(path), **summary}

    def app(self) -> Starlette:
        async def api_error(request, exc: APIError):
            return exc.response()

        async def http_error(request, exc: HTTPException):
            return APIError(exc.status_code, str(exc.detail), kind="invalid_request_error").response()

        async def server_error(request, exc: Exception):
            log.exception("request failed")
            return APIError(500, f"internal error ({exc.__class__.__name__})", kind="server_error").response()

        routes = [
            Route("/", self.page), Route("/health", self.health),
            Route("/v1/models", self.models), Route("/v1/models/{name:path}", self.model),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/tunesmith/preferences", self.preferences, methods=["GET", "POST"]),
        ]
        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            self.close()

        return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                            Exception: server_error}, lifespan=lifespan)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def preference_row(body: dict, models: set[str]) -> dict:
    """A judge-format row from the page's vote: ``answer_1`` says which model was shown as answer 1 (the rater does
    not see it), ``verdict`` is what the rater picked (1, 2 or tie), ``outcome`` the judge's A / B / tie."""
    for key in ("instruction", "name_a", "name_b", "output_a", "output_b", "answer_1", "verdict"):
        if not isinstance(body.get(key), str):
            raise APIError(400, f"'{key}' must be a string", key)
    if body["answer_1"] not in ("A", "B"):
        raise APIError(400, "'answer_1' must be A or B", "answer_1")
    verdict = body["verdict"]
    if verdict not in ("1", "2", "tie"):
        raise APIError(400, "'verdict' must be 1, 2 or tie", "verdict")
    for key in ("name_a", "name_b"):
        if body[key] not in models:
            raise APIError(400, f"unknown model {body[key]!r}", key)
    other = "B" if body["answer_1"] == "A" else "A"
    outcome = "tie" if verdict == "tie" else (body["answer_1"] if verdict == "1" else other)
    return {"instruction": body["instruction"], "outcome": outcome, "verdict": verdict,
            "answer_1": body["answer_1"], "name_a": body["name_a"], "name_b": body["name_b"],
            "output_a": body["output_a"], "output_b": body["output_b"], "judge": "human (tunesmith serve page)",
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def append_line(path: Path, row: dict) -> None:
    """One JSON line, one write on an O_APPEND descriptor, fsynced: a crash leaves at most a torn last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
