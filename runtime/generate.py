"""Generation: requests in flight, continuous batching, streaming deltas and stop conditions.

A :class:`Request` is one generation on one :class:`~moeport.runtime.model.Session`. The
:class:`BatchGenerator` advances every active request with **one backend call per step**: prompts
being prefilled and sequences being decoded share the call, with different lengths padded and
masked. Requests may join between steps and leave as soon as they finish (continuous batching).
Single-session ``generate``/``stream`` use the same machinery with a batch of one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .sampling import Sampler, SamplingParams
from .text import IncrementalDetokenizer, ReasoningSplitter, StopStringMatcher, TextDelta

if TYPE_CHECKING:
    from .model import Model, Session


class GenerationError(ValueError):
    """Bad input to a session: empty prompt, token out of vocabulary, context too long, ..."""


FINISH_REASONS = ("eos", "stop", "length", "context")


@dataclass
class Completion:
    """The result of one generation."""

    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" (a stop string) | "length" (max_new_tokens) | "context" (context full)
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
    """One generation in progress: sampling state, text state, stop checks."""

    def __init__(self, session: Session, prompt_ids: Sequence[int], params: SamplingParams, in_reasoning: bool = False):
        model = session.model
        self.session = session
        self.params = params
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
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        if params.max_new_tokens == 0:
            self._finish("length")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, logits: np.ndarray) -> None:
        """Pick the next token from the last position's logits and update every stop condition."""
        token = self.sampler(logits, self.history)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)
        self.history.append(token)
        if token in self.stop_ids and not self.params.ignore_eos:
            self._finish("eos")  # the EOS id is returned with the tokens but adds no text
            return
        if self.detok is not None:
            text, hit = self.stopper.push(self.detok.push(token))
            self._text(text)
            if hit:
                self._finish("stop")
                return
        if len(self.tokens) >= self.params.max_new_tokens:
            self._finish("length")
        elif self.session.position + 1 > self.session.model.max_seq_len:
            self._finish("context")
        else:
            self.pending = [token]

    def _text(self, text: str) -> None:
        if text:
            self.text_parts.append(text)
            self.deltas.extend(self.splitter.push(text))

    def _finish(self, reason: str) -> None:
        if self.detok is not None and reason != "stop":
            self._text(self.stopper.push(self.detok.flush())[0] + self.stopper.flush())
        self.deltas.extend(self.splitter.flush())
        self.finish_reason = reason
        self.pending = []
        self.finished_at = time.perf_counter()

    def take_deltas(self) -> list[TextDelta]:
        out, self.deltas = self.deltas, []
        return out

    def result(self) -> Completion:
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
    """Advances many requests together: one backend call per :meth:`step` (continuous batching)."""

    def __init__(self, model: Model, max_batch: int = 16):
        if max_batch < 1:
            raise GenerationError("max_batch must be >= 1")
        self.model = model
        self.max_batch = max_batch
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        self._lock = threading.Lock()

    def submit(
        self, session: Session, prompt: Sequence[int] | str, params: SamplingParams | None = None, **overrides
    ) -> Request:
        """Queue a generation; it joins the batch at the next step."""
        req = session.request(prompt, params, **overrides)
        if any(r.session is session for r in self.waiting + self.active):
            raise GenerationError("a session can run one generation at a time; fork() it for parallel branches")
        with self._lock:
            if req.done:
                return req
            self.waiting.append(req)
        return req

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def step(self) -> list[Request]:
        """One backend call for every active request; returns the requests that finished in it."""
        with self._lock:
            while self.waiting and len(self.active) < self.max_batch:
                self.active.append(self.waiting.pop(0))
            batch = list(self.active)
            if not batch:
                return []
            rows = self.model.forward_batch([(r.session, r.pending) for r in batch])
            finished = []
            for req, logits in zip(batch, rows, strict=True):
                req.accept(logits[-1])
                if req.done:
                    finished.append(req)
            self.active = [r for r in self.active if not r.done]
            return finished

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.busy:
            self.step()

    def stream(self, req: Request) -> Iterator[TextDelta]:
        """Step the whole batch until ``req`` finishes, yielding ``req``'s deltas as they come."""
        while True:
            yield from req.take_deltas()
            if req.done:
                return
            self.step()
