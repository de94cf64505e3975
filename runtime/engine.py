"""The engine: one thread owns a model and runs every request in one continuous batch.

Clients (the HTTP server's handlers, or plain threads) call :meth:`Engine.submit` from any thread; the
request is checked at once (a bad one is refused before it is queued) and queued; at most ``max_queue``
requests may wait for a batch slot (one that would start at once never counts as waiting). The engine
thread admits queued requests between steps while the batch has room, runs one backend call per step for
everything in flight (:class:`~moeport.runtime.generate.BatchGenerator`), and hands each request's new
tokens and text to its ``on_event`` callback. Finished requests leave at once. The thread sleeps on a
condition variable when there is nothing to do (no polling).

Nothing a request does stops the loop: a request that fails (bad input found late, the model call, a
broken consumer) ends alone, the prefix cache and the observer are best effort, and should the loop itself
hit a bug, the requests in flight end with that error and the loop goes on.

Prompts go through the automatic prefix cache (:mod:`moeport.runtime.prefix_cache`): the latent rows
of the longest cached prefix are copied into the new session and only the rest is prefilled; after its
prompt is in, a request's rows are added to the cache (and its whole sequence when it finishes).

``n > 1`` choices share the prompt: it is prefilled once (all but its last token) and forked; each
choice then feeds the last prompt token itself, so every choice samples from the same logits.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .generate import BatchGenerator, Completion, GenerationError, Request, RequestFailed
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, TokenLogprob
from .text import TextDelta

__all__ = [
    "Engine",
    "EngineRequest",
    "ChoiceEvent",
    "EngineClosed",
    "QueueFull",
    "InvalidRequest",
    "EngineObserver",
]

log = logging.getLogger("moeport.engine")


class EngineClosed(GenerationError):
    """The engine is shutting down and takes no new requests."""


class QueueFull(GenerationError):
    """Too many requests are waiting; try again later."""


class InvalidRequest(GenerationError):
    """A request that could never run; ``param`` names the culprit ("prompt", "n" or "max_tokens")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class ChoiceEvent:
    """What one choice of a request produced in one step (delivered on the engine thread)."""

    request: EngineRequest
    index: int
    deltas: list[TextDelta]  # new text, labelled "reasoning" or "content"
    tokens: list[int]  # new token ids
    text: str  # the new text as generated (<think> tags included, stop strings not)
    logprobs: list[TokenLogprob]  # one per new token when the request asked for logprobs
    finish_reason: str | None = None  # set on the choice's last event
    error: RequestFailed | None = None


class EngineObserver:
    """Hooks for metrics; every method is called on the engine thread and must be quick."""

    def admitted(self, request: EngineRequest, queued_seconds: float) -> None: ...

    def first_token(self, request: EngineRequest, seconds: float) -> None: ...

    def tokens(self, count: int, seconds_per_token: float) -> None: ...

    def finished(self, request: EngineRequest) -> None: ...

    def step(self, batch: int, seconds: float) -> None: ...


_ids = itertools.count(1)


@dataclass(eq=False)
class EngineRequest:
    """A client's request: ``n`` choices of one prompt. Read its progress through ``on_event``."""

    prompt: list[int]
    params: SamplingParams
    n: int = 1
    in_reasoning: bool | None = None
    on_event: Callable[[ChoiceEvent], None] | None = None
    response_format: Any = None  # a compiled constraint (runtime/constraints.py), or None
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.perf_counter)
    cached_tokens: int = 0  # prompt tokens served by the prefix cache
    choices: list[Request] = field(default_factory=list)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    error: BaseException | None = None  # set if the request could not start at all
    _cancelled: bool = False
    _sent: list[int] = field(default_factory=list)  # tokens already delivered, per choice
    _text_sent: list[int] = field(default_factory=list)  # text parts already delivered, per choice
    _closed: list[bool] = field(default_factory=list)  # finish delivered, per choice
    _last: list[float] = field(default_factory=list)  # when each choice last delivered tokens
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this request at the next step (e.g. its client went away); safe from any thread."""
        self._cancelled = True
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine._wake()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def results(self) -> list[Completion]:
        """The finished choices (raises the error of a request that failed as a whole, or of a failed choice)."""
        if self.error is not None:
            raise self.error
        return [c.result() for c in self.choices]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


class Engine:
    """Owns ``model``; runs every submitted request in one continuous batch on its own thread."""

    def __init__(
        self,
        model: Any,
        max_batch: int = 16,
        max_queue: int = 256,
        prefix_cache_mb: float = 512,
        prefix_block_tokens: int = 32,
        observer: EngineObserver | None = None,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.observer = observer or EngineObserver()
        self.prefix_cache = PrefixCache(
            model.num_layers,
            model.latent_dim,
            model.cache_dtype,
            budget_bytes=int(prefix_cache_mb * (1 << 20)),
            block_tokens=prefix_block_tokens,
        )
        self._gen = BatchGenerator(model, max_batch)
        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []
        self._cv = threading.Condition()
        self._closing = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="moeport-engine", daemon=True)
        self._thread.start()

    # -- client side (any thread) -------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch slot."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs and takes requests."""
        return self._thread.is_alive() and not self._closing

    def check(self, prompt: Sequence[int], params: SamplingParams, n: int = 1) -> list[int]:
        """Refuse a request that could never run (bad ids, a context that cannot hold it), before queueing:
        raises :class:`InvalidRequest` naming the culprit."""
        if not 1 <= n <= self.max_batch:
            raise InvalidRequest(f"n must be between 1 and {self.max_batch} (the batch size), got {n}", "n")
        if isinstance(prompt, str):
            raise InvalidRequest("the engine takes token ids; tokenize text first", "prompt")
        ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequest("empty prompt: at least one token is needed", "prompt")
        vocab = self.model.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of the vocabulary (0..{vocab - 1})", "prompt")
        limit = self.model.max_seq_len
        if len(ids) >= limit:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; the context holds {limit} (prompt + output)", "prompt"
            )
        if params.on_context_limit == "error" and len(ids) + params.max_new_tokens > limit:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the context length "
                f"{limit}; lower max_tokens",
                "max_tokens",
            )
        return ids

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        n: int = 1,
        on_event: Callable[[ChoiceEvent], None] | None = None,
        in_reasoning: bool | None = None,
        response_format: Any = None,
    ) -> EngineRequest:
        """Queue a request (checked first: raises InvalidRequest, QueueFull, EngineClosed). A request that
        fits in the batch's free slots starts at the next step; one that has to wait for a slot is refused
        with QueueFull when ``max_queue`` requests are already waiting. ``response_format`` (a JSON schema,
        regex or grammar, see runtime/constraints.py) is compiled here, so a bad one is refused at once."""
        ids = self.check(prompt, params, n)
        compiled = None
        if response_format is not None:
            from .constraints import ConstraintError, compiler_for

            try:
                compiled = compiler_for(self.model).compile(response_format)
            except ConstraintError as exc:
                raise InvalidRequest(str(exc), "response_format") from None
        req = EngineRequest(ids, params, n, in_reasoning, on_event, compiled)
        req._engine = self  # type: ignore[attr-defined]
        with self._cv:
            if self._closing or not self._thread.is_alive():
                raise EngineClosed("the server is shutting down")
            if n > self._free_slots() and len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting for a batch slot (--max-queue {self.max_queue})"
                )
            self._waiting.append(req)
            self._cv.notify()
        return req

    def _free_slots(self) -> int:
        """Batch slots not taken by a running choice or by a request waiting to start (under ``_cv``)."""
        taken = sum(r.n for r in list(self._running) if not r.done) + sum(r.n for r in self._waiting)
        return self.max_batch - taken

    def generate(self, prompt: Sequence[int], params: SamplingParams, n: int = 1) -> list[Completion]:
        """Submit and wait (for scripts and tests): the finished choices."""
        req = self.submit(prompt, params, n)
        req.wait()
        return req.results()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; let those in flight finish, cancelling what is left after ``timeout``
        seconds (None: wait for all); then stop the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                with self._cv:
                    for r in [*self._waiting, *self._running]:
                        r._cancelled = True
                    self._cv.notify()
                self._thread.join(30)
                break
            self._thread.join(0.1 if left is None else min(left, 0.1))

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # -- engine thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._waiting or self._running or self._closing):
                        self._cv.wait()
                    if self._closing and not self._waiting and not self._running:
                        return
                try:
                    self._iteration()
                except Exception as exc:  # noqa: BLE001 - a bug here must not hang every client
                    log.exception("engine step failed; ending the requests in flight")
                    self._fail_running(exc)
        finally:
            self._stopped.set()
            self._fail_everything(EngineClosed("the engine stopped"))

    def _iteration(self) -> None:
        self._cancel_requested()
        self._admit()
        if self._gen.busy:
            start = time.perf_counter()
            batch = len(self._gen.active) + min(len(self._gen.waiting), self.max_batch)
            self._gen.step()
            self._observe("step", batch, time.perf_counter() - start)
        self._deliver()

    def _fail_running(self, exc: BaseException) -> None:
        """End every running choice with ``exc`` (delivered at the next ``_deliver``)."""
        for r in self._running:
            for c in r.choices:
                if not c.done:
                    c.fail(exc, "the engine failed: ")
                self._gen.cancel(c)
        try:
            self._deliver()
        except Exception:  # noqa: BLE001 - the last resort: close the requests without their events
            log.exception("could not deliver the engine's failure")
            for r in self._running:
                r.error = r.error or RequestFailed(str(exc), exc)
                r._done.set()
            self._running = []

    def _fail_everything(self, exc: BaseException) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for r in waiting:
            self._finish_unstarted(r, exc)
        if self._running:
            self._fail_running(exc)

    def _cancel_requested(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r._cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish_unstarted(r, None)
        for r in self._running:
            if r._cancelled:
                for c in r.choices:
                    if not c.done:
                        self._gen.cancel(c)

    def _finish_unstarted(self, r: EngineRequest, error: BaseException | None) -> None:
        r.error = error
        r.finished_at = time.perf_counter()
        if r.on_event is not None:
            for i in range(r.n):
                reason = "error" if error is not None else "cancelled"
                failure = (
                    error if isinstance(error, RequestFailed) or error is None else RequestFailed(str(error), error)
                )
                self._emit(ChoiceEvent(r, i, [], [], "", [], reason, failure))
        r._done.set()
        self._observe("finished", r)

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self._waiting:
                    return
                r = self._waiting[0]
                in_flight = sum(1 for c in self._gen.active if not c.done) + len(self._gen.waiting)
                if in_flight and in_flight + r.n > self.max_batch:
                    return
                self._waiting.popleft()
            try:
                self._start(r)
            except Exception as exc:  # noqa: BLE001 - a request that cannot start fails alone
                for c in r.choices:
                    self._gen.cancel(c)
                self._finish_unstarted(r, exc)
                continue
            r.admitted_at = time.perf_counter()
            with self._cv:
                self._running.append(r)
            self._observe("admitted", r, r.admitted_at - r.created)

    def _start(self, r: EngineRequest) -> None:
        model, prompt = self.model, r.prompt
        base = model.session()
        match = self.prefix_cache.lookup(prompt)
        if match.tokens:
            base.extend_cached(prompt[: match.tokens], match.rows)
        r.cached_tokens = match.tokens
        rest = prompt[match.tokens :]
        if r.n == 1:
            sessions, feeds = [base], [rest]
        else:  # the prompt once (all but its last token), then one fork per choice
            if len(rest) > 1:
                base.prefill(rest[:-1])
                self._remember(base)
            sessions, feeds = [base.fork() for _ in range(r.n)], [rest[-1:]] * r.n
        if r.in_reasoning is None:  # from the whole prompt: a choice may be fed only its last token
            r.in_reasoning = model.opens_reasoning(prompt)
        for i, (s, feed) in enumerate(zip(sessions, feeds, strict=True)):
            params = r.params
            if r.n > 1 and params.seed is not None:  # each choice its own reproducible stream
                params = replace(params, seed=(params.seed + i) % 2**64)
            r.choices.append(
                self._gen.submit(s, feed, params, in_reasoning=r.in_reasoning, response_format=r.response_format)
            )
        r._sent, r._text_sent, r._closed, r._last = [0] * r.n, [0] * r.n, [False] * r.n, [0.0] * r.n

    def _remember(self, session: Any) -> None:
        """Offer a session's rows to the prefix cache (called between steps: the rows are final). Best
        effort: a failure costs later requests a cache hit, never this request its answer."""
        try:
            self.prefix_cache.insert(session.tokens, session.cache.views())
        except Exception:  # noqa: BLE001
            log.exception("prefix cache insert failed")

    def _observe(self, hook: str, *args: Any) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # noqa: BLE001 - metrics must never cost a request
            log.exception("engine observer %s failed", hook)

    def _deliver(self) -> None:
        now = time.perf_counter()
        still = []
        for r in self._running:
            for i, c in enumerate(r.choices):
                if r._closed[i]:
                    continue
                sent = r._sent[i]
                new_tokens = c.tokens[sent:]
                deltas = c.take_deltas()
                parts = c.text_parts[r._text_sent[i] :]
                r._text_sent[i] += len(parts)
                if new_tokens and sent == 0:  # the prompt is in: share its rows
                    if r.first_token_at is None:
                        r.first_token_at = now
                        self._observe("first_token", r, now - r.created)
                    if r.n == 1:
                        self._remember(c.session)
                elif new_tokens:
                    self._observe("tokens", len(new_tokens), (now - r._last[i]) / len(new_tokens))
                if new_tokens:
                    r._last[i] = now
                logprobs = c.logprobs[sent : sent + len(new_tokens)] if c.params.logprobs is not None else []
                r._sent[i] = sent + len(new_tokens)
                text = "".join(parts)
                if c.done:
                    r._closed[i] = True
                    self._emit(ChoiceEvent(r, i, deltas, new_tokens, text, logprobs, c.finish_reason, c.error))
                    if c.error is None:
                        self._remember(c.session)
                elif new_tokens or deltas:
                    self._emit(ChoiceEvent(r, i, deltas, new_tokens, text, logprobs))
            if all(r._closed):
                r.finished_at = now
                r._done.set()
                self._observe("finished", r)
            else:
                still.append(r)
        with self._cv:
            self._running = still

    def _emit(self, event: ChoiceEvent) -> None:
        callback = event.request.on_event
        if callback is None:
            return
        try:
            callback(event)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the engine: end its request
            event.request._cancelled = True

    # -- facts -----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "queue_depth": self.queue_depth,
            "running": self.running,
            "prefix_cache_bytes": self.prefix_cache.nbytes,
            "prefix_cache_hit_rate": self.prefix_cache.hit_rate,
        }
