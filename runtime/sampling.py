"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, min-p, repetition penalty.

The order follows transformers' logits processors: repetition penalty, then temperature, top-k,
top-p and min-p, then a draw from the remaining distribution. ``seed`` makes draws reproducible.

Logits must be finite, except -inf for tokens masked out on purpose (a constraint, a grammar): NaN or
+inf is refused with an error, never turned into an arbitrary token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


CONTEXT_POLICIES = ("error", "stop")
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated tokens
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's EOS ids
    ignore_eos: bool = False
    on_context_limit: str = "error"  # "error": refuse up front; "stop": stop cleanly when the context is full
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> SamplingError:
            return SamplingError(msg)

        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p < 1:
            raise bad(f"min_p must be in [0, 1), got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(f"{name} must be in [-2, 2], got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise bad(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (alternatives per token), got {self.logprobs!r}"
            )
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            raise bad("stop must be a list of strings, not a string")
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise bad(f"stop strings must be non-empty strings, got {s!r}")
        if self.on_context_limit not in CONTEXT_POLICIES:
            raise bad(f"on_context_limit must be one of {', '.join(CONTEXT_POLICIES)}, got {self.on_context_limit!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_defaults(self, defaults: dict[str, Any], **overrides: Any) -> SamplingParams:
        """These params with generation_config-style ``defaults`` under explicit (non-None) ``overrides``."""
        return replace(self, **{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_generation_config(cls, path: Path | None, **overrides: Any) -> SamplingParams:
        """Defaults from a ``generation_config.json`` (temperature, top_k, top_p, min_p,
        repetition_penalty, max_new_tokens, do_sample), then explicit ``overrides`` (None = default)."""
        gen: dict[str, Any] = {}
        if path is not None and Path(path).is_file():
            try:
                gen = json.loads(Path(path).read_text())
            except (OSError, ValueError) as exc:
                raise SamplingError(f"{path}: not valid JSON ({exc})") from exc
        return cls().with_defaults(generation_defaults(gen, str(path)), **overrides)


def generation_defaults(gen: dict[str, Any], source: str = "generation_config.json") -> dict[str, Any]:
    """The sampling defaults a ``generation_config.json`` (already parsed) gives; a value out of range
    is refused with an error naming the file."""
    if not isinstance(gen, dict):
        raise SamplingError(f"{source}: expected a JSON object")
    out: dict[str, Any] = {}
    for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens"):
        if gen.get(key) is not None:
            out[key] = gen[key]
    if gen.get("do_sample") is False or "do_sample" not in gen:
        out["temperature"] = 0.0  # transformers samples only when do_sample is true
    try:
        SamplingParams(**out)
    except (SamplingError, TypeError) as exc:
        raise SamplingError(f"{source}: {exc}") from exc
    return out


def nonfinite_logits(logits: np.ndarray, allow_masked: bool = False) -> str | None:
    """None when ``logits`` are finite (``allow_masked``: -inf allowed where not every entry is -inf),
    else what is wrong ("NaN logits (3 of 256, first at token id 17)").

    Cheap on the finite path (one BLAS dot product, no temporary array, ~7 us for 129k floats): it runs
    on every step's [vocab] row. NaN and inf make the sum of squares non-finite, and so may finite
    values above ~1e19 (numpy then warns of an overflow), which the exact check below clears.
    """
    x = np.asarray(logits).ravel()
    if math.isfinite(float(np.dot(x, x))):
        return None
    nan = np.isnan(x)
    if nan.any():
        return f"NaN logits ({int(nan.sum())} of {x.size}, first at token id {int(np.flatnonzero(nan)[0])})"
    bad = np.isposinf(x) if allow_masked else np.isinf(x)
    if bad.any():
        return f"infinite logits ({int(bad.sum())} of {x.size}, first at token id {int(np.flatnonzero(bad)[0])})"
    if allow_masked and np.isneginf(x).all():
        return "-inf logits for every token (every token is masked out)"
    return None  # finite values whose squares overflowed


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and np.isfinite(x)


class Sampler:
    """Picks the next token from logits; holds the random generator of one sequence."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def probabilities(
        self, logits: np.ndarray, history: Sequence[int] = (), generated: Sequence[int] = ()
    ) -> np.ndarray:
        """The distribution the next token is drawn from (all mass on argmax when greedy). ``history`` (prompt
        and output) feeds the repetition penalty, ``generated`` (output only) the presence/frequency ones."""
        p = self.params
        problem = nonfinite_logits(logits, allow_masked=True)
        if problem:
            raise SamplingError(f"cannot sample from {problem}")
        x = np.array(logits, dtype=np.float64)
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = x[seen]
            x[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(generated):
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
            x[ids] -= p.presence_penalty + p.frequency_penalty * counts
        if p.greedy:
            probs = np.zeros_like(x)
            probs[int(np.argmax(x))] = 1.0
            return probs
        x = x / p.temperature
        if p.top_k and p.top_k < x.size:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x < kth, -np.inf, x)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = cum - probs[order] < p.top_p  # keep tokens until the kept mass reaches top_p
            keep[0] = True
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
        if p.min_p > 0:
            probs = np.where(probs < p.min_p * probs.max(), 0.0, probs)
        return probs / probs.sum()

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (), generated: Sequence[int] = ()) -> int:
        p = self.params
        if p.greedy and p.repetition_penalty == 1.0 and not (p.presence_penalty or p.frequency_penalty):
            # the argmax of the logits as they are (no float64 copy of the vocabulary): the same token
            problem = nonfinite_logits(logits, allow_masked=True)
            if problem:
                raise SamplingError(f"cannot sample from {problem}")
            return int(np.argmax(logits))
        probs = self.probabilities(logits, history, generated)
        if self.params.greedy:
            return int(np.argmax(probs))
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), probs.size - 1))


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model and the ``top`` most likely alternatives
    (token id, log-probability), from the model's own distribution (before sampling parameters)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    x = np.asarray(logits, dtype=np.float64).ravel()
    m = x.max()
    logz = m + math.log(float(np.exp(x - m).sum()))
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        k = min(top, x.size)
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        alternatives = tuple((int(i), float(x[i] - logz)) for i in idx)
    return TokenLogprob(int(token), float(x[token] - logz), alternatives)
