"""Loaded models and sessions: prefill, step, latent KV cache, greedy generation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from moeport.backends.base import Backend, Program, best_backend, get_backend
from moeport.exporter.manifest import Artifact, read_artifact


class GenerationError(ValueError):
    """Bad input to a session: empty prompt, token out of vocabulary, context too long, ..."""


def load(
    artifact_dir: str | Path,
    backend: str | Backend = "cpu",
    verify: bool = True,
    **options: Any,
) -> Model:
    """Load an exported artifact and compile it for ``backend`` ("cpu", ..., or "auto" for the best).

    ``verify`` checks every file's sha256 against the manifest first. Backend ``options`` (e.g.
    ``threads``) are passed to the backend's compile step.
    """
    artifact = read_artifact(artifact_dir, verify=verify)
    if isinstance(backend, str):
        backend = best_backend() if backend == "auto" else get_backend(backend)
    start = time.perf_counter()
    program = backend.compile(artifact, options)
    return Model(artifact, program, backend.name, time.perf_counter() - start)


class Model:
    """One compiled artifact; sessions share its weights and each own a latent KV cache."""

    def __init__(self, artifact: Artifact, program: Program, backend_name: str, load_seconds: float = 0.0):
        self.artifact = artifact
        self.program: Program | None = program
        self.backend_name = backend_name
        self.load_seconds = load_seconds
        self.config = artifact.config
        self.vocab_size = artifact.vocab_size
        self.max_seq_len = artifact.max_seq_len
        cache = artifact.cache
        self.num_layers: int = cache["layers"]
        self.latent_dim: int = cache["dim"]
        self._cache_in = [cache["input"].format(i=i) for i in range(self.num_layers)]
        self._cache_out = [cache["output"].format(i=i) for i in range(self.num_layers)]
        self.eos_token_ids: tuple[int, ...] = self._eos_ids()
        self._tokenizer = None

    def _eos_ids(self) -> tuple[int, ...]:
        path = self.artifact.file("generation_config.json")
        if path is not None:
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
                if eos is not None:
                    return tuple(eos) if isinstance(eos, list) else (int(eos),)
            except (OSError, ValueError):
                pass
        return tuple(self.config.eos_token_ids)

    @property
    def tokenizer(self):
        """The artifact's tokenizer (``tokenizers`` library), or None when it has no tokenizer.json."""
        if self._tokenizer is None:
            path = self.artifact.file("tokenizer.json")
            if path is None:
                return None
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def session(self) -> Session:
        return Session(self)

    def close(self) -> None:
        self.program = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # one backend call over a batch of rows
    def _run(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, caches: list[np.ndarray]):
        if self.program is None:
            raise GenerationError("the model was closed; load it again to use its sessions")
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        feeds.update(zip(self._cache_in, caches, strict=True))
        out = self.program.run(feeds)
        return out["logits"], [out[name] for name in self._cache_out]


@dataclass
class GenerationResult:
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stop_reason: str  # "eos" | "length"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


class Session:
    """One sequence: its latent KV cache and position. ``prefill`` then ``step`` equals one long prefill."""

    def __init__(self, model: Model):
        self.model = model
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: empty cache, position 0."""
        dim = self.model.latent_dim
        self.caches = [np.zeros((1, 0, dim), np.float32) for _ in range(self.model.num_layers)]
        self.tokens: list[int] = []

    @property
    def position(self) -> int:
        """Number of tokens in the cache (the position the next token will take)."""
        return len(self.tokens)

    def _check_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        if len(token_ids) == 0:
            raise GenerationError("empty prompt: at least one token is needed")
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise GenerationError(f"token ids must be a flat list of integers, got {token_ids!r:.80}")
        bad = ids[(ids < 0) | (ids >= self.model.vocab_size)]
        if bad.size:
            raise GenerationError(f"token id {int(bad[0])} is out of the vocabulary (0..{self.model.vocab_size - 1})")
        if self.position + len(ids) > self.model.max_seq_len:
            raise GenerationError(
                f"context too long: {self.position} cached + {len(ids)} new tokens > max sequence length "
                f"{self.model.max_seq_len}"
            )
        return ids.astype(np.int64)

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens to the sequence; returns the logits of the last one ([vocab] float32)."""
        return self.forward(token_ids)[-1]

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens; returns logits for every one of them ([len, vocab] float32)."""
        ids = self._check_ids(token_ids)
        start, n = self.position, len(ids)
        positions = np.arange(start, start + n, dtype=np.int64)[None]
        mask = np.ones((1, start + n), np.int64)
        logits, caches = self.model._run(ids[None], positions, mask, self.caches)
        self.caches = caches
        self.tokens.extend(int(t) for t in ids)
        return logits[0]

    def step(self, token_id: int) -> np.ndarray:
        """Append one token; returns its logits ([vocab] float32)."""
        return self.prefill([token_id])

    def generate_iter(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_at_eos: bool = True) -> Iterator[int]:
        """Greedy decoding: yields new token ids one at a time."""
        if max_new_tokens < 0:
            raise GenerationError("max_new_tokens must be >= 0")
        if self.position + len(prompt_ids) + max_new_tokens > self.model.max_seq_len:
            raise GenerationError(
                f"prompt ({self.position + len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the max sequence length {self.model.max_seq_len}"
            )
        if max_new_tokens == 0:
            self._check_ids(prompt_ids)
            return
        logits = self.prefill(prompt_ids)
        for i in range(max_new_tokens):
            token = int(np.argmax(logits))
            yield token
            if stop_at_eos and token in self.model.eos_token_ids:
                return
            if i + 1 < max_new_tokens:
                logits = self.step(token)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, stop_at_eos: bool = True) -> GenerationResult:
        """Greedy generation with timings (prefill vs decode)."""
        tokens: list[int] = []
        t0 = time.perf_counter()
        first = None
        for token in self.generate_iter(prompt_ids, max_new_tokens, stop_at_eos):
            if first is None:
                first = time.perf_counter()
            tokens.append(token)
        end = time.perf_counter()
        first = first or end
        stop = "eos" if tokens and stop_at_eos and tokens[-1] in self.model.eos_token_ids else "length"
        return GenerationResult(tokens, len(prompt_ids), first - t0, end - first, stop)
