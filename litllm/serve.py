"""`litllm serve`: an OpenAI-compatible HTTP server whose concurrent requests are decoded together.

One scheduler thread owns the model. Its KV cache has `max_batch_size` rows; a new request is prefilled
into a free row, then every step decodes all busy rows in one forward pass, each row at its own position
(continuous batching: requests join and leave between steps, never waiting for a whole batch to end).
The HTTP side (FastAPI on uvicorn) hands requests to the scheduler through a queue and gets text back
through one asyncio queue per request.

Why FastAPI + uvicorn and not LitServe: LitServe's batching collects requests that arrive together and
runs each batch through to its end, so a request that arrives mid-batch waits; a scheduler of our own
lets it join at the next step, and keeps the whole server in this one readable file.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from litllm.errors import UserError
from litllm.decode import TextStream, sample
from litllm.model import GPT
from litllm.tokenizer import Tokenizer

# ------------------------------------------------------------------------------------------- scheduler


@dataclass
class Generation:
    """One request as the scheduler sees it; results go back to the HTTP side through `events`."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None  # seeded per request, so a seed reproduces whatever runs beside it
    text: TextStream
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (text piece, finish_reason, APIError | None)
    completion_tokens: int = 0  # tokens the model generated, the stop token included
    cancelled: bool = False  # the client went away: the scheduler frees the row

    def send(self, piece: str = "", finish_reason: str | None = None, error: APIError | None = None) -> None:
        # the scheduler thread may not touch the event loop's queue directly
        self.loop.call_soon_threadsafe(self.events.put_nowait, (piece, finish_reason, error))


class Scheduler:
    """Owns the model: prefills new requests into free KV-cache rows and decodes all busy rows together."""

    def __init__(self, model: GPT, max_batch_size: int, max_seq_len: int) -> None:
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.max_seq_len = max_seq_len
        self.rows: list[Generation | None] = [None] * max_batch_size
        self.next_token = [0] * max_batch_size  # per row: the token to feed at the next step
        self.position = [0] * max_batch_size  # per row: where that token goes
        self.waiting: queue.Queue[Generation | None] = queue.Queue()  # None: wake up and stop
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="litllm-scheduler", daemon=True)
        model.setup_kv_cache(batch_size=max_batch_size, max_seq_len=max_seq_len)

    def start(self) -> None:
        self.thread.start()

    def submit(self, generation: Generation) -> None:
        # called on the event loop, as `shutdown` is: nothing slips in after the scheduler drained the queue
        if self.stopping.is_set():
            raise APIError(503, "the server is shutting down", type="server_error")
        self.waiting.put(generation)

    def shutdown(self) -> None:
        """Take no more requests and end the running ones, each with an error the client sees."""
        self.stopping.set()
        self.waiting.put(None)

    def status(self) -> dict[str, int]:
        return {"running": sum(g is not None for g in self.rows), "waiting": self.waiting.qsize()}

    @torch.inference_mode()
    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._step()
            except Exception:  # a bug or an out-of-memory must neither stop the server nor leave clients waiting
                traceback.print_exc()
                self._end_all(APIError(500, "the model failed (see the server log)", type="server_error"))
        while not self.waiting.empty():
            if (generation := self.waiting.get()) is not None:
                generation.send(error=APIError(503, "the server is shutting down", type="server_error"))
        self._end_all(APIError(503, "the server is shutting down", type="server_error"))

    def _step(self) -> None:
        self._admit()
        for row, generation in enumerate(self.rows):
            if generation is not None and generation.cancelled:
                self._free(row)
        busy = [row for row, generation in enumerate(self.rows) if generation is not None]
        if busy:
            self._decode(busy)

    def _end_all(self, error: APIError) -> None:
        for row, generation in enumerate(self.rows):
            if generation is not None:
                generation.send(error=error)
                self._free(row)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows; when nothing runs, sleep until a request comes."""
        while None in self.rows and not self.stopping.is_set():
            try:
                generation = self.waiting.get(block=all(g is None for g in self.rows))
            except queue.Empty:
                return
            if generation is not None and not generation.cancelled:
                self._prefill(generation, self.rows.index(None))

    def _prefill(self, generation: Generation, row: int) -> None:
        self.rows[row] = generation
        prompt = torch.tensor([generation.prompt_ids], device=self.device)  # (1, T)
        hidden = self.model(prompt, torch.arange(prompt.size(1), device=self.device)[None],
                            cache_rows=slice(row, row + 1), return_hidden=True)
        logits = self.model.lm_head(hidden[:, -1]).float()  # (1, vocab): only the last position is sampled from
        self.position[row] = prompt.size(1)
        self._accept(row, logits)

    def _decode(self, busy: list[int]) -> None:
        # rows [0, last busy row] go through the model: a view of the cache, so nothing is copied; idle rows
        # among them compute a throwaway token in their own row, which no other row can attend to
        n_rows = max(busy) + 1
        tokens = torch.tensor(self.next_token[:n_rows], device=self.device)[:, None]  # (n_rows, 1)
        positions = torch.tensor(self.position[:n_rows], device=self.device)[:, None]  # (n_rows, 1)
        logits = self.model(tokens, positions, cache_rows=slice(0, n_rows))[:, -1]  # (n_rows, vocab)
        for row in busy:
            self.position[row] += 1
            self._accept(row, logits[row:row + 1])

    def _accept(self, row: int, logits: torch.Tensor) -> None:
        """Sample the row's next token from its logits (1, vocab), send the text it completes, finish or go on."""
        generation = self.rows[row]
        token = int(sample(logits, generation.temperature, top_p=generation.top_p, generator=generation.generator))
        generation.completion_tokens += 1
        piece = generation.text.add(token)
        finish_reason = None
        if generation.text.finished:
            finish_reason = "stop"
        elif generation.completion_tokens == generation.max_tokens:
            finish_reason = "length"
            piece += generation.text.flush()
        if piece or finish_reason:
            generation.send(piece, finish_reason)
        if finish_reason is None:
            self.next_token[row] = token
        else:
            self._free(row)

    def _free(self, row: int) -> None:
        # position 0 keeps the idle row's throwaway step from widening everyone's attention span
        self.rows[row], self.next_token[row], self.position[row] = None, 0, 0


# ---------------------------------------------------------------------------------------- HTTP schema


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What chat and text completions share; unset or null fields take OpenAI's defaults."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch.Generator.manual_seed takes
    n: int | None = Field(None, ge=1, le=1)  # one choice per request
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str


class APIError(Exception):
    """An error answered as OpenAI does: status code and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


# ------------------------------------------------------------------------------------------------ app


def build_app(tokenizer: Tokenizer, scheduler: Scheduler, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /health; the scheduler runs
    while the app does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.shutdown()
        scheduler.thread.join()

    app = FastAPI(title="litllm", lifespan=lifespan)
    if api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:  # e.g. a chat template's own check
        return APIError(400, str(error)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # 400 as OpenAI answers a bad request (FastAPI's default is 422 with its own body)
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                            ).response()
        location = [str(part) for part in first["loc"] if part != "body"]
        param = ".".join(location) or None
        return APIError(400, f"{param or 'body'}: {first['msg']}", param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:  # unknown path, wrong method
        return APIError(error.status_code, str(error.detail)).response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **scheduler.status()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "litllm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        messages = [{"role": message.role, "content": message.text()} for message in body.messages]
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await complete(body, prompt_ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        # 16 new tokens unless asked, as OpenAI's completions endpoint
        return await complete(body, tokenizer.encode(body.prompt), body.max_tokens or 16, chat=False)

    def check_model(name: str) -> None:
        if name != model_name:
            # 404 with code model_not_found, as OpenAI answers (its client raises NotFoundError)
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    async def complete(body: SamplingRequest, prompt_ids: list[int], max_tokens: int | None, chat: bool):
        if not prompt_ids:
            raise APIError(400, "the prompt is empty: there is nothing to continue", param="prompt")
        room = scheduler.max_seq_len - len(prompt_ids)
        max_tokens = room if max_tokens is None else max_tokens
        if max_tokens > room or room < 1:
            raise APIError(
                400, f"the context is {scheduler.max_seq_len} tokens, but the prompt has {len(prompt_ids)} and "
                     f"max_tokens asks for {max_tokens} more; shorten the prompt or lower max_tokens (the server "
                     "sets its context with --max_seq_len)",
                param="max_tokens" if room >= 1 else ("messages" if chat else "prompt"),
                code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        seed = body.seed
        generation = Generation(
            prompt_ids, max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            generator=None if seed is None else torch.Generator(scheduler.device).manual_seed(seed),
            text=TextStream(tokenizer, stop), loop=asyncio.get_running_loop(),
        )
        scheduler.submit(generation)
        response = CompletionResponse(generation, model_name, chat)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(response.stream(include_usage), media_type="text/event-stream")
        return await response.whole()

    return app


class RequireAPIKey:
    """ASGI middleware: /v1 requests without 'Authorization: Bearer <api_key>' get 401, before their body is read."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: the key cannot be guessed bytewise
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                      "with the key the server was started with (--api_key)", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class CompletionResponse:
    """Turns a generation's events into OpenAI's response bodies: whole, or as server-sent event chunks."""

    def __init__(self, generation: Generation, model_name: str, chat: bool) -> None:
        self.generation, self.model_name, self.chat = generation, model_name, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def pieces(self) -> AsyncIterator[tuple[str, str | None]]:
        """(text piece, None) as they come, ending with (piece, finish_reason)."""
        try:
            while True:
                piece, finish_reason, error = await self.generation.events.get()
                if error is not None:
                    raise error
                yield piece, finish_reason
                if finish_reason is not None:
                    return
        finally:
            self.generation.cancelled = True  # done, or the client left: either way the row is free to go

    async def whole(self) -> dict:
        text, finish_reason = "", None
        async for piece, finish_reason in self.pieces():
            text += piece
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        return self.body([{**choice, "logprobs": None, "finish_reason": finish_reason}], usage=self.usage())

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        if self.chat:
            yield self.event(self.body([self.delta({"role": "assistant", "content": ""})], chunk=True))
        try:
            async for piece, finish_reason in self.pieces():
                if piece:
                    yield self.event(self.body([self.delta({"content": piece})], chunk=True))
                if finish_reason is not None:
                    yield self.event(self.body([self.delta({}, finish_reason)], chunk=True))
        except APIError as error:
            # the status line has gone out already: the error travels as an event, as OpenAI's do
            yield self.event({"error": {"message": error.message, "type": error.type, "param": None, "code": None}})
            return
        if include_usage:
            yield self.event(self.body([], usage=self.usage(), chunk=True))
        yield "data: [DONE]\n\n"

    def delta(self, delta: dict, finish_reason: str | None = None) -> dict:
        content = {"delta": delta} if self.chat else {"text": delta.get("content", "")}
        return {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}

    def body(self, choices: list[dict], usage: dict | None = None, chunk: bool = False) -> dict:
        # OpenAI names chat stream chunks "chat.completion.chunk"; text completion chunks keep their name
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model_name, "choices": choices}
        return {**body, "usage": usage} if usage is not None else body

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.generation.prompt_ids), self.generation.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def event(data: dict) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------ CLI


def main(
    checkpoint_dir: Path,
    adapter: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 16,
    max_seq_len: int = 2048,
    dtype: str | None = None,
    device: str | None = None,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API; concurrent requests are decoded together.

    Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with "stream": true),
    GET /health. The model's id is the checkpoint directory's name. Ctrl-C stops the server.

    Args:
        checkpoint_dir: a Hugging Face model directory.
        adapter: a LoRA adapter directory (PEFT format), merged into the checkpoint.
        host: the address to listen on (0.0.0.0 makes the server reachable from other machines).
        port: the port to listen on.
        api_key: when set, /v1 requests must send the header 'Authorization: Bearer <api_key>'.
        max_batch_size: how many requests are decoded together; more wait for a free place.
        max_seq_len: the longest prompt + answer per request (capped at the model's context). The KV cache
            holds max_batch_size x max_seq_len positions and is allocated at start.
        dtype: float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's on GPU).
        device: cpu or cuda (default: cuda when available).
    """
    from litllm.api import LLM

    if max_batch_size < 1 or max_seq_len < 2:
        raise UserError(f"--max_batch_size must be >= 1 and --max_seq_len >= 2 (got {max_batch_size}, {max_seq_len})")
    check_port_is_free(host, port)
    llm = LLM.load(checkpoint_dir, dtype=dtype, device=device, adapter=adapter)
    max_seq_len = min(max_seq_len, llm.model.config.max_seq_len)
    scheduler = Scheduler(llm.model, max_batch_size, max_seq_len)
    model_name = llm.checkpoint_dir.resolve().name
    app = build_app(llm.tokenizer, scheduler, model_name, api_key)
    cache_gb = llm.model.kv_cache_bytes() / 1e9
    print(f"Serving '{model_name}' at http://{host}:{port}/v1: up to {max_batch_size} requests decoded together, "
          f"{max_seq_len} tokens each (KV cache {cache_gb:.2f} GB){', API key required' if api_key else ''}. "
          "Ctrl-C stops.", file=sys.stderr)
    Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=5), scheduler).run()


class Server(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C first ends the running generations, so open streams close at once
    (uvicorn would wait for them, then cancel them) and the process exits within a decode step."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler) -> None:
        super().__init__(config)
        self.scheduler = scheduler

    async def shutdown(self, sockets=None) -> None:
        self.scheduler.shutdown()  # on the event loop, like Scheduler.submit
        await super().shutdown(sockets)


def check_port_is_free(host: str, port: int) -> None:
    """Fail in one line before the model loads, rather than after, when the address is taken or wrong."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}; "
                        "pick another --port (or --host)") from error


if __name__ == "__main__":
    from litllm.cli import run

    run(main)
