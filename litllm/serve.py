"""`litllm serve`: an OpenAI-compatible HTTP server whose concurrent requests are decoded together.

One scheduler thread owns the model (litllm.batching: continuous batching, requests join and leave the batch
between decoding steps). The HTTP side here (FastAPI on uvicorn) hands requests to the scheduler and gets text
back through one asyncio queue per request.

No request can hold up the others: what one asks for is bounded (body size, prompt length, stop strings),
its prompt is tokenized off the event loop, a failure in its own row ends it alone, the queue is bounded, and
a client that hangs up frees its row at the next step.

Why FastAPI + uvicorn and not LitServe: LitServe's batching collects requests that arrive together and
runs each batch through to its end, so a request that arrives mid-batch waits; a scheduler of our own
lets it join at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from litllm.batching import Generation, Refused, Scheduler
from litllm.decode import TextStream
from litllm.errors import UserError
from litllm.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------- HTTP schema

# Limits on what one request may ask, so that no request slows everyone else's decoding: stop strings are
# matched against every row's text at every token (OpenAI also takes at most 4).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256


class Strict(BaseModel):
    # "7" or 1.5 for an integer is the client's mistake: answered with a 400, not guessed at
    model_config = ConfigDict(strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    """What chat and text completions share; unset or null fields take OpenAI's defaults. Other fields are
    kept (extra="allow") for `check_fields` to refuse by name the ones that would change the answer."""

    model_config = ConfigDict(extra="allow")
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


# OpenAI's fields that change nothing about an answer here (no storage, no tools): accepted and ignored
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# OpenAI's fields this server does not implement, each with the value that asks for nothing (null does too):
# a request asking for more gets a 400 naming the field rather than an answer that silently lacks it
NEUTRAL_VALUES = {"logprobs": False, "top_logprobs": 0, "echo": False, "best_of": 1, "suffix": "",
                  "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "tools": [], "functions": [],
                  "tool_choice": "none", "function_call": "none", "response_format": {"type": "text"},
                  "modalities": ["text"]}


def check_fields(body: SamplingRequest) -> None:
    """Refuse fields this server would otherwise ignore while they ask for something, and text that is no
    Unicode; check the stop strings' limits."""
    unsupported = [name for name, value in (body.model_extra or {}).items()
                   if value is not None and name not in IGNORED_FIELDS and not (
                       name in NEUTRAL_VALUES and same_json(value, NEUTRAL_VALUES[name]))]
    if unsupported:
        names = ", ".join(repr(name) for name in unsupported)
        read = ", ".join(name for name in type(body).model_fields)
        raise APIError(400, f"{names}: not supported by this server (the fields it reads: {read})",
                       param=unsupported[0], code="unsupported_parameter")
    if (path := lone_surrogate(body.model_dump(exclude_none=True))) is not None:
        # JSON lets an escaped lone surrogate ("\ud800") through, but no UTF-8 text holds it: the tokenizer fails
        raise APIError(400, f"{path}: not valid Unicode (a lone UTF-16 surrogate such as \\ud800 without its "
                            "pair); send the character whole", param=path)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_CHARS} characters "
                            f"each (got {len(stop)}, of up to {max(map(len, stop))} characters)", param="stop")


def same_json(value, neutral) -> bool:
    """`value == neutral`, except that JSON's false and 0 differ (Python's == makes them equal)."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def lone_surrogate(value, path: str = "") -> str | None:
    """The path ("messages.0.content") of the first string in a JSON value that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if (found := lone_surrogate(item, f"{path}.{key}" if path else str(key))) is not None:
            return found
    return None


class APIError(HTTPException):
    """An error answered as OpenAI does: status code and {"error": {"message", "type", "param", "code"}}.

    An HTTPException, so that one raised while FastAPI reads the body (see `LimitBody`) reaches its handler."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(status, message)
        self.message, self.type, self.param, self.code = message, type, param, code

    @classmethod
    def refused(cls, refusal: Refused) -> APIError:
        return cls(refusal.status, refusal.message, type="server_error", code=refusal.code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message that quotes the client's text (a model name, a field) stays sendable even when
        # that text holds a lone surrogate, which UTF-8 cannot encode
        return Response(json.dumps(self.body()), status_code=self.status_code, media_type="application/json")


# ------------------------------------------------------------------------------------------------ app


def build_app(tokenizer: Tokenizer, scheduler: Scheduler, model_name: str, api_key: str | None = None,
              max_body_bytes: int = 4 * 2**20) -> FastAPI:
    """The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /health; the scheduler runs
    while the app does."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.shutdown()
        scheduler.thread.join()

    app = FastAPI(title="litllm", lifespan=lifespan)
    app.add_middleware(LimitBody, max_body_bytes=max_body_bytes)
    if api_key is not None:  # added last, so it runs first: a request without the key is not even read
        app.add_middleware(RequireAPIKey, api_key=api_key)
    # No token decodes to more characters than the longest one (+1: a SentencePiece word piece decodes alone
    # without its leading space), so a longer prompt cannot fit the context; it is refused before tokenizing,
    # which takes about a second per megabyte.
    chars_per_token = max(len(tokenizer.decode([token])) for token in range(tokenizer.vocab_size)) + 1
    max_prompt_chars = scheduler.max_seq_len * chars_per_token

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        return error.response()

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> Response:  # e.g. a chat template's own check
        return APIError(400, str(error)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        # 400 as OpenAI answers a bad request (FastAPI's default is 422 with its own body)
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                            ).response()
        location = [str(part) for part in first["loc"] if part != "body"]
        param = ".".join(location) or None
        return APIError(400, f"{param or 'body'}: {first['msg']}", param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:  # unknown path, wrong method
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> Response:
        # a bug: the client still gets OpenAI's shape, and uvicorn logs the traceback
        return APIError(500, "the server failed (see its log)", type="server_error").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **scheduler.status()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "litllm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_request(body)
        messages = [{"role": message.role, "content": message.text()} for message in body.messages]
        check_prompt_chars(sum(len(message["content"] or "") for message in messages), "messages")
        # in a thread: rendering and tokenizing a long prompt takes a while, and the event loop serves everyone
        prompt_ids = await asyncio.to_thread(tokenizer.encode_chat, messages, True)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await complete(request, body, prompt_ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_request(body)
        check_prompt_chars(len(body.prompt), "prompt")
        prompt_ids = await asyncio.to_thread(tokenizer.encode, body.prompt)
        # 16 new tokens unless asked, as OpenAI's completions endpoint
        return await complete(request, body, prompt_ids, body.max_tokens or 16, chat=False)

    def check_request(body: SamplingRequest) -> None:
        if body.model != model_name:
            # 404 with code model_not_found, as OpenAI answers (its client raises NotFoundError)
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        check_fields(body)

    def check_prompt_chars(chars: int, param: str) -> None:
        if chars > max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters, more than a context of {scheduler.max_seq_len} "
                                f"tokens can hold (at most {chars_per_token} characters each); shorten the prompt",
                           param=param, code="context_length_exceeded")

    async def complete(request: Request, body: SamplingRequest, prompt_ids: list[int], max_tokens: int | None,
                       chat: bool):
        if not prompt_ids:
            raise APIError(400, "the prompt is empty: there is nothing to continue", param="prompt")
        room = scheduler.max_seq_len - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the context is {scheduler.max_seq_len} tokens, but the prompt alone has "
                                f"{len(prompt_ids)}; shorten the prompt (the server sets its context with --max_seq_len)",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = room if max_tokens is None else max_tokens
        if max_tokens > room:
            raise APIError(
                400, f"the context is {scheduler.max_seq_len} tokens, but the prompt has {len(prompt_ids)} and "
                     f"max_tokens asks for {max_tokens} more; shorten the prompt or lower max_tokens (the server "
                     "sets its context with --max_seq_len)", param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        seed = body.seed
        generation = Generation(
            prompt_ids, max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            generator=None if seed is None else torch.Generator(scheduler.device).manual_seed(seed),
            text=TextStream(tokenizer, stop), loop=asyncio.get_running_loop(),
        )
        try:
            scheduler.submit(generation)
        except Refused as refusal:
            raise APIError.refused(refusal) from None
        response = CompletionResponse(generation, model_name, chat)
        if body.stream:  # a streaming client that leaves is noticed by the StreamingResponse, which closes `stream`
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(response.stream(include_usage), media_type="text/event-stream")
        answer = asyncio.ensure_future(response.whole())
        hangup = asyncio.ensure_future(disconnected(request))
        await asyncio.wait([answer, hangup], return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            hangup.cancel()
            return answer.result()
        answer.cancel()  # the client left: its generation is cancelled, so its row frees at the next step
        return Response(status_code=499)  # nginx's "client closed request"; nobody receives it

    return app


async def disconnected(request: Request) -> None:
    """Return when the client hangs up (after the body, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class RequireAPIKey:
    """ASGI middleware: requests without 'Authorization: Bearer <api_key>' get 401, before their body is read.

    Every path needs the key (/docs and /openapi.json too) but /health, which load balancers probe."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: the key cannot be guessed bytewise
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                      "with the key the server was started with", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class LimitBody:
    """ASGI middleware: a request body over `max_body_bytes` gets 413, without being kept in memory.

    The body is still read to its end before the answer: a client that is still sending when the server closes
    the connection (urllib, requests) would see a reset instead of the 413."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes (the server's "
                                  "--max_body_bytes)", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:  # too large before the app starts
            await read_to_end(receive)
            return await too_large.response()(scope, receive, send)
        received = 0

        async def receive_within_limit() -> dict:  # a body without a Content-Length is counted as it comes
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                if message.get("more_body"):
                    await read_to_end(receive)
                raise too_large
            return message

        await self.app(scope, receive_within_limit, send)


async def read_to_end(receive) -> None:
    """Read the rest of a request body, dropping it."""
    while (await receive()).get("more_body"):
        pass


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
                piece, finish_reason, refusal = await self.generation.events.get()
                if refusal is not None:
                    raise APIError.refused(refusal)
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
            yield self.event(error.body())
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
    api_key_file: Path | None = None,
    api_key: str | None = None,
    max_batch_size: int = 16,
    max_seq_len: int = 2048,
    max_queue: int = 64,
    queue_timeout: float = 60.0,
    max_body_bytes: int = 4 * 2**20,
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
        api_key_file: a file holding the API key (see api_key). Without it or api_key, the key comes from the
            LITLLM_API_KEY environment variable, if set.
        api_key: when set, every request but GET /health must send the header 'Authorization: Bearer <key>'.
            Given here, the key shows in `ps` to every user of the machine: prefer LITLLM_API_KEY or api_key_file.
        max_batch_size: how many requests are decoded together; more wait for a free place.
        max_seq_len: the longest prompt + answer per request (capped at the model's context). The KV cache
            holds max_batch_size x max_seq_len positions and is allocated at start.
        max_queue: how many requests may wait for a place in the batch; more get 429 at once.
        queue_timeout: seconds a request may wait for a place in the batch before it gets 429.
        max_body_bytes: the largest request body; larger ones get 413.
        dtype: float32, bfloat16 or float16 (default: float32 on CPU, the checkpoint's on GPU).
        device: cpu or cuda (default: cuda when available).
    """
    from litllm.api import LLM

    if max_batch_size < 1 or max_seq_len < 2:
        raise UserError(f"--max_batch_size must be >= 1 and --max_seq_len >= 2 (got {max_batch_size}, {max_seq_len})")
    if max_queue < 0 or not queue_timeout > 0 or max_body_bytes < 1:
        raise UserError(f"--max_queue must be >= 0, --queue_timeout > 0 and --max_body_bytes >= 1 (got {max_queue}, "
                        f"{queue_timeout}, {max_body_bytes})")
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535 (got {port})")
    api_key = read_api_key(api_key, api_key_file)
    if api_key is None and not is_loopback(host):
        print(f"warning: {host} is reachable from other machines and no API key is set, so anyone who can reach it "
              "can use the model; set LITLLM_API_KEY or --api_key_file", file=sys.stderr)
    check_port_is_free(host, port)
    llm = LLM.load(checkpoint_dir, dtype=dtype, device=device, adapter=adapter, batched=True)
    max_seq_len = min(max_seq_len, llm.model.config.max_seq_len)
    scheduler = Scheduler(llm.model, max_batch_size, max_seq_len, max_queue, queue_timeout)
    model_name = llm.checkpoint_dir.resolve().name
    app = build_app(llm.tokenizer, scheduler, model_name, api_key, max_body_bytes)
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


def read_api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key from --api_key, --api_key_file or LITLLM_API_KEY (in that order); None when none is given."""
    if api_key is not None and api_key_file is not None:
        raise UserError("give the API key once: --api_key or --api_key_file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except OSError as error:
            raise UserError(f"--api_key_file {api_key_file}: {error.strerror or error}") from error
        if not api_key:
            raise UserError(f"--api_key_file {api_key_file} is empty; write the key into it")
    elif api_key == "":
        raise UserError("--api_key is empty; give the key, or leave the option out to serve without one")
    return api_key if api_key is not None else os.environ.get("LITLLM_API_KEY") or None


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's own loopback (a name that resolves to nothing
    counts as loopback here: binding to it fails with its own error)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, ValueError):
        return True
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def check_port_is_free(host: str, port: int) -> None:
    """Fail in one line before the model loads, rather than after, when the address is taken or wrong."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except (OSError, ValueError) as error:  # ValueError: a host name no resolver takes (too long, a NUL)
        message = getattr(error, "strerror", None) or error
        raise UserError(f"cannot listen on {host}:{port}: {message}; pick another --port (or --host)") from error


if __name__ == "__main__":
    from litllm.cli import run

    run(main)
