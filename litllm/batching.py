"""Continuous batching: one thread owns the model and decodes every running request together (`litllm serve`).

The KV cache has `max_batch_size` rows; a new request is prefilled into a free row, then every step decodes all busy
rows in one forward pass, each row at its own position: requests join and leave between steps, never waiting for a
whole batch to end. Requests come in through `Scheduler.submit` from an asyncio event loop, and their text goes back
through one asyncio queue per request (`Generation.events`).

No request holds up the others: the queue is bounded, a request that waits too long is ended, a failure in its own
row (prefill, sampling, stop strings) ends it alone, and a cancelled one frees its row at the next step.
"""
from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from litllm.decode import TextStream, prefill, sample
from litllm.model import GPT


class Refused(Exception):
    """A request the scheduler ends without an answer (busy, shutting down, failed). `status` is the HTTP status a
    server answers with (429, 500, 503), `code` OpenAI's error code where it has one; the message says what to do."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


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
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (text piece, finish_reason, Refused | None)
    completion_tokens: int = 0  # tokens the model generated, the stop token included
    cancelled: bool = False  # the client went away: the scheduler drops the request, or frees its row
    queued_at: float = field(default_factory=time.monotonic)

    def send(self, piece: str = "", finish_reason: str | None = None, error: Refused | None = None) -> None:
        # the scheduler thread may not touch the event loop's queue directly
        self.loop.call_soon_threadsafe(self.events.put_nowait, (piece, finish_reason, error))


class Scheduler:
    """Owns the model: prefills new requests into free KV-cache rows and decodes all busy rows together.

    At most `max_queue` requests wait for a free row; more are refused at once, and one that waited
    `queue_timeout` seconds is ended: a client gets a quick "busy" it can act on rather than an unbounded wait.
    """

    def __init__(self, model: GPT, max_batch_size: int, max_seq_len: int, max_queue: int,
                 queue_timeout: float) -> None:
        self.model = model
        self.device = model.embed_tokens.weight.device
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.rows: list[Generation | None] = [None] * max_batch_size
        self.next_token = [0] * max_batch_size  # per row: the token to feed at the next step
        self.position = [0] * max_batch_size  # per row: where that token goes
        self.waiting: deque[Generation] = deque()
        # guards `waiting` and moves from it into `rows`, so `submit` counts each request exactly once
        self.lock = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="litllm-scheduler", daemon=True)
        model.setup_kv_cache(batch_size=max_batch_size, max_seq_len=max_seq_len)

    def start(self) -> None:
        self.thread.start()

    def submit(self, generation: Generation) -> None:
        # called on the event loop, as `shutdown` is: nothing slips in after the scheduler drained the queue
        with self.lock:
            if self.stopping.is_set():
                raise Refused(503, "the server is shutting down")
            running = sum(g is not None for g in self.rows)
            if running + len(self.waiting) >= len(self.rows) + self.max_queue:
                raise Refused(429, f"the server is busy: {running} requests are being answered and "
                                   f"{len(self.waiting)} are waiting (its --max_queue); retry later", code="queue_full")
            self.waiting.append(generation)
            self.lock.notify()

    def shutdown(self) -> None:
        """Take no more requests and end the running ones, each with an error the client sees."""
        with self.lock:
            self.stopping.set()
            self.lock.notify()

    def status(self) -> dict[str, int]:
        return {"running": sum(g is not None for g in self.rows), "waiting": len(self.waiting)}

    @torch.inference_mode()
    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._step()
            except Exception:  # a bug or an out-of-memory must neither stop the server nor leave clients waiting
                traceback.print_exc()
                self._end_all(Refused(500, "the model failed (see the server log)"))
        shutting_down = Refused(503, "the server is shutting down")
        with self.lock:
            for generation in self.waiting:
                generation.send(error=shutting_down)
            self.waiting.clear()
        self._end_all(shutting_down)

    def _step(self) -> None:
        self._drop_waiting()
        self._admit()
        for row, generation in enumerate(self.rows):
            if generation is not None and generation.cancelled:
                self._free(row)
        busy = [row for row, generation in enumerate(self.rows) if generation is not None]
        if busy:
            self._decode(busy)

    def _drop_waiting(self) -> None:
        """End the waiting requests whose client left or that waited too long."""
        now = time.monotonic()
        with self.lock:
            for generation in list(self.waiting):
                if generation.cancelled:
                    self.waiting.remove(generation)
                elif now - generation.queued_at > self.queue_timeout:
                    self.waiting.remove(generation)
                    generation.send(error=Refused(
                        429, f"the server is busy: no place in the batch came free within {self.queue_timeout:g} s "
                             "(its --queue_timeout); retry later", code="queue_timeout"))

    def _end_all(self, error: Refused) -> None:
        for row, generation in enumerate(self.rows):
            if generation is not None:
                generation.send(error=error)
                self._free(row)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows; when nothing runs, sleep until a request comes."""
        while not self.stopping.is_set():
            with self.lock:
                if None not in self.rows:
                    return
                if not self.waiting:
                    if any(g is not None for g in self.rows):
                        return
                    self.lock.wait()
                    continue
                generation = self.waiting.popleft()
                if generation.cancelled:
                    continue
                row = self.rows.index(None)
                self.rows[row] = generation
            with self._failing_alone(row):
                self._prefill(row)

    def _prefill(self, row: int) -> None:
        prompt = torch.tensor([self.rows[row].prompt_ids], device=self.device)  # (1, T)
        logits = prefill(self.model, prompt, torch.arange(prompt.size(1), device=self.device)[None],
                         cache_rows=slice(row, row + 1))  # (1, vocab)
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
            with self._failing_alone(row):
                self._accept(row, logits[row:row + 1])

    @contextmanager
    def _failing_alone(self, row: int) -> Iterator[None]:
        """A failure in one row's own work (its prefill, sampling, stop strings) ends that request alone."""
        try:
            yield
        except Exception:
            traceback.print_exc()
            self.rows[row].send(error=Refused(500, "generating this answer failed (see the server log)"))
            self._free(row)

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
