"""Generation: requests in flight, continuous batching, streaming deltas and stop conditions.

A :class:`Request` is one generation on one :class:`~moeport.runtime.model.Session`. The
:class:`BatchGenerator` advances every active request with **one backend call per step**: prompts
being prefilled and sequences being decoded share the call, with different lengths padded and
masked. Requests may join between steps and leave as soon as they finish (continuous batching).
Single-session ``generate``/``stream`` use the same machinery with a batch of one.

Faults stay with their request: when the batched call raises, the batch is split in halves until the
failing requests are found; each ends with its error (``finish_reason == "error"``; ``result()`` and
its stream raise :class:`RequestFailed`), its session keeps exactly the tokens that went in, and the
others go on with the tokens they would have had alone. The same holds for an exception while a
token is accepted (non-finite logits, the sampler, the detokenizer, the stop matcher). A request owns
its session until it finishes: a second generation or a direct call on that session is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .sampling import Sampler, SamplingError, SamplingParams, TokenLogprob, nonfinite_logits, token_logprob
from .text import IncrementalDetokenizer, ReasoningSplitter, StopStringMatcher, TextDelta

if TYPE_CHECKING:
    from .constraints import TokenConstraint
    from .model import Model, Session


class GenerationError(ValueError):
    """Bad input to a session: empty prompt, token out of vocabulary, context too long, ..."""


class RequestFailed(GenerationError):
    """A request ended with an error (a backend fault, non-finite logits, ...); ``cause`` is the original
    exception. Only this request ended: the others in its batch went on."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause
        self.__cause__ = cause


# "cancelled": the consumer stopped (a closed stream); "error": see Request.error
FINISH_REASONS = ("eos", "stop", "length", "context", "cancelled", "error")


def _describe(exc: BaseException) -> str:
    """An exception as one line: our own errors by their message, others with their type."""
    if isinstance(exc, (GenerationError, SamplingError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Completion:
    """The result of one generation."""

    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" (a stop string, a completed grammar) | "length" | "context" (context full)
    text: str | None = None  # decoded output (None without a tokenizer)
    reasoning: str | None = None  # the <think> part, when the model produced one
    content: str | None = None  # the answer after </think> (the whole text when there was no reasoning)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


class Request:
    """One generation in progress: sampling state, text state, stop checks.

    ``done`` once finished; ``finish_reason`` says why, and ``error`` holds the :class:`RequestFailed`
    of a request that ended with an error (``result()`` raises it).
    """

    def __init__(
        self,
        session: Session,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        in_reasoning: bool = False,
        constraint: TokenConstraint | None = None,
    ):
        model = session.model
        self.session = session
        self.params = params
        self.constraint = constraint  # this request's grammar (runtime/constraints.py): masks logits, may end it
        ids = session.check_ids(prompt_ids)
        limit, start = model.max_seq_len, session.position
        if params.on_context_limit == "error" and start + len(ids) + params.max_new_tokens > limit:
            raise GenerationError(
                f"prompt ({start + len(ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the max "
                f"sequence length {limit}"
                + (" (the cache capacity of the static graphs)" if model.cache_capacity is not None else "")
                + "; lower max_new_tokens or let generation stop at the limit (on_context_limit='stop')"
            )
        self.pending: list[int] = [int(t) for t in ids]
        self.prompt_tokens = len(ids)
        self.history: list[int] = [*session.tokens, *self.pending]  # for the repetition penalty
        self.sampler = Sampler(params)
        self.stop_ids = set(model.eos_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        tok = model.tokenizer
        self.detok = IncrementalDetokenizer(tok) if tok is not None else None
        self.stopper = StopStringMatcher(params.stop)
        self.splitter = ReasoningSplitter(in_reasoning)
        self.text_parts: list[str] = []
        self.deltas: list[TextDelta] = []  # produced and not yet consumed by a stream
        self._deltas_lock = threading.Lock()  # the engine thread adds, a client thread takes
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per token when params.logprobs is set
        self.reasoning_tokens = 0  # generated tokens inside <think>...</think>
        self.finish_reason: str | None = None
        self.error: RequestFailed | None = None
        self.ownership: object | None = None  # the session's ownership token while a generator runs this
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        if params.max_new_tokens == 0:
            self._finish("length")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def step_number(self) -> int:
        """The 1-based number of the token being generated."""
        return len(self.tokens) + 1

    def accept(self, logits: np.ndarray) -> None:
        """Pick the next token from the last position's logits and update every stop condition."""
        problem = nonfinite_logits(logits)
        if problem:
            raise GenerationError(
                f"step {self.step_number}: the model produced {problem} at token position {self.session.position - 1}"
            )
        raw = logits
        if self.constraint is not None:
            logits = self.constraint.mask_logits(logits)
        token = self.sampler(logits, self.history, self.tokens)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.params.logprobs is not None:  # the model's own distribution, before the grammar's mask
            self.logprobs.append(token_logprob(raw, token, self.params.logprobs))
        if self.splitter.part == "reasoning":  # the closing </think> still counts as reasoning
            self.reasoning_tokens += 1
        self.tokens.append(token)
        self.history.append(token)
        grammar_complete = self.constraint is not None and self.constraint.advance(token)
        if token in self.stop_ids and not self.params.ignore_eos:
            self._finish("eos")  # the EOS id is returned with the tokens but adds no text
            return
        if self.detok is not None:
            text, hit = self.stopper.push(self.detok.push(token))
            self._text(text)
            if hit:
                self._finish("stop")
                return
        if grammar_complete:
            if self.detok is not None:  # nothing of a completed grammar is held back (but a stop string)
                text, hit = self.stopper.push(self.detok.flush())
                self._text(text if hit else text + self.stopper.flush())
            self._finish("stop")
            return
        if len(self.tokens) >= self.params.max_new_tokens:
            self._finish("length")
        elif self.session.position + 1 > self.session.model.max_seq_len:
            self._finish("context")
        else:
            self.pending = [token]

    def fail(self, exc: BaseException, during: str = "") -> None:
        """End this request with ``exc`` as its error (its text so far stays; nothing more is decoded)."""
        if self.done:
            return
        where = f"step {self.step_number}: " if not str(exc).startswith("step ") else ""
        self.error = RequestFailed(f"{where}{during}{_describe(exc)}", exc)
        with self._deltas_lock:
            try:
                self.deltas.extend(self.splitter.flush())
            except Exception:  # noqa: BLE001 - the text state may be what failed
                pass
        self._end("error")

    def cancel(self) -> None:
        """End this request now (e.g. its consumer went away), keeping the text produced so far."""
        if not self.done:
            self._finish("cancelled")

    def _text(self, text: str) -> None:
        if text:
            self.text_parts.append(text)
            deltas = self.splitter.push(text)
            with self._deltas_lock:
                self.deltas.extend(deltas)

    def _finish(self, reason: str) -> None:
        if self.detok is not None and reason != "stop":
            self._text(self.stopper.push(self.detok.flush())[0] + self.stopper.flush())
        deltas = self.splitter.flush()
        with self._deltas_lock:
            self.deltas.extend(deltas)
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.pending = []
        self.finished_at = time.perf_counter()
        self.session.cache.detach()  # out of the batch's shared buffers, which may then be freed
        self.finish_reason = reason  # last: another thread polling `done` then sees the whole outcome
        if self.ownership is not None:
            self.session._release(self.ownership)
            self.ownership = None

    def take_deltas(self) -> list[TextDelta]:
        with self._deltas_lock:
            out, self.deltas = self.deltas, []
        return out

    def result(self) -> Completion:
        """The finished generation (so far, if it is still running); raises the request's error if it failed."""
        if self.error is not None:
            raise self.error
        end = self.finished_at or time.perf_counter()
        first = self.first_token_at or end
        text = "".join(self.text_parts) if self.detok is not None else None
        reasoning = self.splitter.reasoning_text if self.detok is not None else None
        saw_reasoning = bool(self.splitter.reasoning) or self.splitter.seen_close
        return Completion(
            tokens=list(self.tokens),
            prompt_tokens=self.prompt_tokens,
            finish_reason=self.finish_reason or "length",
            text=text,
            reasoning=reasoning if saw_reasoning else None,
            content=self.splitter.content_text if self.detok is not None else None,
            prefill_seconds=first - self.started,
            decode_seconds=end - first,
        )


class BatchGenerator:
    """Advances many requests together: one backend call per :meth:`step` (continuous batching).

    Thread-safe: :meth:`submit` and :meth:`cancel` may be called from any thread while another thread
    (an engine loop) calls :meth:`step`; steps are serialized.
    """

    def __init__(self, model: Model, max_batch: int = 16):
        if max_batch < 1:
            raise GenerationError("max_batch must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        self._lock = threading.Lock()  # guards waiting/active; held only briefly
        self._step_lock = threading.RLock()  # one step at a time

    def submit(
        self, session: Session, prompt: Sequence[int] | str, params: SamplingParams | None = None, **overrides
    ) -> Request:
        """Queue a generation; it joins the batch at the next step. The request owns ``session`` until it
        finishes: a session that is already generating is refused."""
        ownership = session._claim()
        try:
            req = session.request(prompt, params, **overrides)
        except BaseException:
            session._release(ownership)
            raise
        if req.done:  # nothing to generate (max_new_tokens=0)
            session._release(ownership)
            return req
        req.ownership = ownership
        with self._lock:
            self.waiting.append(req)
        return req

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.active)

    def cancel(self, req: Request) -> None:
        """End ``req`` between steps (finish_reason "cancelled") and release its session."""
        with self._step_lock:
            with self._lock:
                if req in self.waiting:
                    self.waiting.remove(req)
                self.active = [r for r in self.active if r is not req]
            req.cancel()

    def step(self) -> list[Request]:
        """One backend call for every active request; returns the requests that finished in it (with an
        error too: a failing request never makes this raise)."""
        with self._step_lock:
            with self._lock:
                while self.waiting and len(self.active) < self.max_batch:
                    self.active.append(self.waiting.pop(0))
                batch = [r for r in self.active if not r.done]
            for req, out in self._forward(batch):
                if isinstance(out, BaseException):
                    req.fail(out, "the model call failed: ")
                    continue
                try:
                    req.accept(out[-1])
                except Exception as exc:  # noqa: BLE001 - delivered to the request
                    req.fail(exc)
            finished = [r for r in batch if r.done]
            with self._lock:
                self.active = [r for r in self.active if not r.done]
            return finished

    def _forward(self, batch: list[Request]) -> list[tuple[Request, np.ndarray | BaseException]]:
        """Each request's logits, or the exception that its own call raised: a failed batched call is
        split in halves until the failing requests are found (the model call is all or nothing)."""
        if not batch:
            return []
        try:
            rows = self.model._forward([(r.session, r.pending) for r in batch], 1, [r.ownership for r in batch])
            return list(zip(batch, rows, strict=True))
        except Exception as exc:  # noqa: BLE001 - delivered to the failing requests
            if len(batch) == 1:
                return [(batch[0], exc)]
            half = len(batch) // 2
            return self._forward(batch[:half]) + self._forward(batch[half:])

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.busy:
            self.step()

    def stream(self, req: Request) -> Iterator[TextDelta]:
        """Step the whole batch until ``req`` finishes, yielding ``req``'s deltas as they come; raises
        ``req``'s :class:`RequestFailed` if it ends with an error."""
        while True:
            yield from req.take_deltas()
            if req.done:
                if req.error is not None:
                    raise req.error
                return
            self.step()
