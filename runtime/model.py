"""Loaded models and sessions: prefill, step, fork, latent KV cache, batched forward, generation."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeport.backends.base import Backend, Program, best_backend, check_options, get_backend
from moeport.exporter.manifest import Artifact, ArtifactError, read_artifact

from .cache import BatchBuffers, LatentCache
from .generate import BatchGenerator, Completion, GenerationError, Request
from .sampling import SamplingParams, generation_defaults
from .text import TextDelta, TextError, Tokenizer

__all__ = ["load", "Model", "Session", "GenerationError"]


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
    if isinstance(backend, str):
        backend = best_backend() if backend == "auto" else get_backend(backend)
    options = check_options(backend, options)  # before anything is read: a typo fails fast
    artifact = read_artifact(artifact_dir, verify=verify)
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
        # static-shape programs (npu) take fixed-capacity cache buffers of their own dtype, whole, every step
        self.cache_capacity: int | None = getattr(program, "cache_capacity", None)
        self.cache_dtype = np.dtype(getattr(program, "cache_dtype", np.float32))
        if self.cache_capacity is not None:
            self.max_seq_len = min(self.max_seq_len, self.cache_capacity)
        cache = artifact.cache
        self.num_layers: int = cache["layers"]
        self.latent_dim: int = cache["dim"]
        self._cache_in = [cache["input"].format(i=i) for i in range(self.num_layers)]
        self._cache_out = [cache["output"].format(i=i) for i in range(self.num_layers)]
        self.generation_config = self._side_json("generation_config.json")
        self.eos_token_ids: tuple[int, ...] = self._eos_ids()
        self.generation_defaults = generation_defaults(
            self.generation_config, str(artifact.directory / "generation_config.json")
        )
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_loaded = False
        self._tokenizer_lock = threading.Lock()

    def _side_json(self, name: str) -> dict[str, Any]:
        """A JSON side file of the artifact (read from its verified file), or {} when it has none."""
        if not self.artifact.has(name):
            return {}
        data = self.artifact.read_json(name)
        if not isinstance(data, dict):
            raise ArtifactError(f"{self.artifact.directory / name}: expected a JSON object")
        return data

    def _eos_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            return tuple(self.config.eos_token_ids)
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids):
            raise ArtifactError(
                f"{self.artifact.directory / 'generation_config.json'}: eos_token_id {eos!r:.60} must be token ids "
                f"in 0..{self.vocab_size - 1}"
            )
        return tuple(ids)

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The artifact's tokenizer (tokenizer.json + tokenizer_config.json), or None without one."""
        with self._tokenizer_lock:
            if not self._tokenizer_loaded:
                art = self.artifact
                if art.has("tokenizer.json"):  # every file read from its verified descriptor
                    self._tokenizer = Tokenizer.from_texts(
                        art.read_text("tokenizer.json"),
                        art.read_text("tokenizer_config.json") if art.has("tokenizer_config.json") else None,
                        art.read_text("chat_template.jinja") if art.has("chat_template.jinja") else None,
                        source=str(art.directory),
                    )
                self._tokenizer_loaded = True
        return self._tokenizer

    def opens_reasoning(self, ids: Sequence[int]) -> bool:
        """Whether a sequence ends inside an opened ``<think>`` (DeepSeek-R1's chat template ends the prompt
        with ``<think>\n``): the output then starts in the reasoning part."""
        tok = self.tokenizer
        if tok is None or len(ids) == 0:
            return False
        try:
            return tok.decode(list(ids[-4:]), skip_special_tokens=False).rstrip().endswith("<think>")
        except (TypeError, ValueError, OverflowError):
            return False  # ids the tokenizer cannot decode: the request reports them

    def require_tokenizer(self) -> Tokenizer:
        tok = self.tokenizer
        if tok is None:
            raise TextError(f"{self.artifact.directory} has no tokenizer.json; give token ids instead of text")
        return tok

    def chat_ids(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        return self.require_tokenizer().encode_chat(messages, add_generation_prompt)

    def sampling_params(self, params: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
        """``params`` (or the generation_config.json defaults) with explicit ``overrides`` applied."""
        if params is not None:
            return params.with_defaults({}, **overrides)
        return SamplingParams().with_defaults(self.generation_defaults, **overrides)

    def session(self) -> Session:
        return Session(self)

    def batch(self, max_batch: int = 16) -> BatchGenerator:
        """A continuous-batching generator over this model's sessions."""
        return BatchGenerator(self, max_batch)

    def close(self) -> None:
        """Release the compiled program; sessions of this model refuse further use."""
        self.program = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forward_batch(
        self, items: Sequence[tuple[Session, Sequence[int]]], logits_to_keep: int = 1
    ) -> list[np.ndarray]:
        """Feed new tokens to several sessions in one backend call; returns each one's logits for its last
        ``logits_to_keep`` new tokens ([min(keep, n_i), vocab]).

        One session runs on views of its own cache buffers (no copy). Several are right-aligned: each
        cache sits just before the shared new-token block and its new tokens at the block's end;
        padding is masked out of attention, and each session keeps only its own new rows.
        All or nothing: if the call raises, no session has advanced. Sessions that are generating are
        refused.
        """
        return self._forward(items, logits_to_keep)

    def _forward(
        self,
        items: Sequence[tuple[Session, Sequence[int]]],
        logits_to_keep: int,
        owners: Sequence[object | None] | None = None,
    ) -> list[np.ndarray]:
        """:meth:`forward_batch` for the generation that owns each session (``owners[i]``: its ownership
        token from ``Session._claim``, None for a session no generation may own)."""
        if self.program is None:
            raise GenerationError("the model was closed; load it again to use its sessions")
        sessions = [s for s, _ in items]
        if len({id(s) for s in sessions}) != len(sessions):
            raise GenerationError("the same session appears twice in one batch")
        owners = list(owners) if owners is not None else [None] * len(sessions)
        for s, owner in zip(sessions, owners, strict=True):
            s._check_owner(owner, "prefill/step/forward")  # fail fast, before waiting for its lock
        locks = sorted(sessions, key=id)
        for s in locks:
            s._lock.acquire()
        try:
            for s, owner in zip(sessions, owners, strict=True):
                s._check_owner(owner, "prefill/step/forward")
            pasts = [s.position for s in sessions]
            try:
                if self.cache_capacity is not None and len(items) > 1:  # static graphs: one sequence per call
                    return [self._run([item], logits_to_keep)[0] for item in items]
                return self._run(items, logits_to_keep)
            except BaseException:
                for s, past in zip(sessions, pasts, strict=True):  # no half-appended cache: back to before
                    s._rollback(past)
                raise
        finally:
            for s in reversed(locks):
                s._lock.release()

    def _batch_buffers(self, sessions: Sequence[Session], need: int) -> BatchBuffers:
        """The shared buffers ``sessions`` (in this order) decode in: the ones they already share when they
        are the same batch with room for ``need`` rows, else new ones they move into (a batch changes
        when a sequence joins or leaves, not at every step). Sessions that leave get their rows back."""
        first = sessions[0].cache.slot
        shared = first[0] if first is not None else None
        if (
            shared is not None
            and shared.batch == len(sessions)
            and need <= shared.capacity
            and all(s.cache.slot == (shared, r) for r, s in enumerate(sessions))
        ):
            return shared
        olds = {id(s.cache.slot[0]): s.cache.slot[0] for s in sessions if s.cache.slot is not None}
        capacity = -(-int(need * 1.25 + 16) // 64) * 64  # room for the next decode steps
        shared = BatchBuffers(self.num_layers, len(sessions), capacity, self.latent_dim, np.float32)
        for r, s in enumerate(sessions):
            s.cache.attach(shared, r)
        for old in olds.values():  # members of an earlier batch that are not in this one
            for ref in old.members:
                member = ref()
                if member is not None and member.slot is not None and member.slot[0] is old:
                    member.detach()
        shared.members = [weakref.ref(s.cache) for s in sessions]
        return shared

    def _run(self, items: Sequence[tuple[Session, Sequence[int]]], logits_to_keep: int) -> list[np.ndarray]:
        """One backend call for ``items`` (their sessions locked); appends each session's new rows."""
        program = self.program
        if program is None:
            raise GenerationError("the model was closed; load it again to use its sessions")
        sessions = [s for s, _ in items]
        news = [s.check_ids(ids) for s, ids in items]
        pasts = [s.position for s in sessions]
        b, p, n = len(items), max(pasts), max(len(x) for x in news)
        keep = min(max(1, logits_to_keep), n)
        ids = np.zeros((b, n), np.int64)
        pos = np.zeros((b, n), np.int64)
        if self.cache_capacity is not None:  # the whole fixed buffers; rows past the sequence are masked
            p = self.cache_capacity
            caches = list(sessions[0].cache.buffers)
        elif b == 1:
            caches = sessions[0].cache.views()
        else:  # the sessions' caches as rows of shared buffers, each from position 0, the rest masked
            shared = self._batch_buffers(sessions, max(past + len(new) for past, new in zip(pasts, news, strict=True)))
            p, caches = shared.capacity, shared.arrays
        mask = np.zeros((b, p + n), np.int64)
        for r, (new, past) in enumerate(zip(news, pasts, strict=True)):
            k = len(new)
            ids[r, n - k :] = new
            pos[r, n - k :] = np.arange(past, past + k)
            mask[r, :past] = 1  # the sequence's rows start every cache buffer (alone: they are the buffer)
            mask[r, p + n - k :] = 1  # new tokens right-aligned in the new-token block
        feeds = {
            "input_ids": ids,
            "position_ids": pos,
            "attention_mask": mask,
            "logits_to_keep": np.array([keep], np.int64),
        }
        feeds.update(zip(self._cache_in, caches, strict=True))
        out = program.run(feeds)
        logits = out["logits"]
        rows_out = [out[name] for name in self._cache_out]  # [B, n, D] per layer
        result = []
        for r, (s, new) in enumerate(zip(sessions, news, strict=True)):
            k = len(new)
            s.cache.append([rows[r : r + 1, n - k :] for rows in rows_out])
            s.tokens.extend(int(t) for t in new)
            result.append(logits[r, keep - min(k, keep) :])
        return result


class _Ownership:
    """The token by which one generation owns a session (see ``Session._claim``)."""


class Session:
    """One sequence: its latent KV cache and position. ``prefill`` then ``step`` equals one long prefill.

    Sessions of one model share its weights; each owns its cache. A session may be used from any
    thread (calls on one session are serialized); ``fork()`` copies a prefix for parallel branches.
    While a generation runs on a session it owns it: a second generation, and ``prefill``/``step``/
    ``forward``/``reset``/``truncate``/``fork``, raise :class:`GenerationError` until it ends.
    """

    def __init__(self, model: Model):
        self.model = model
        self._lock = threading.RLock()
        self._owner: weakref.ref[_Ownership] | None = None  # the running generation's token (weak: a
        # request dropped unfinished, e.g. with its abandoned generator, frees the session)
        self._reset()

    # -- ownership by a generation ---------------------------------------------------------------
    def _current_owner(self) -> _Ownership | None:
        ref = self._owner
        return ref() if ref is not None else None

    def _claim(self) -> _Ownership:
        """Make the session owned by a new generation; refused while another one runs."""
        token = _Ownership()
        self._check_owner(None, "generate")
        with self._lock:
            self._check_owner(None, "generate")
            self._owner = weakref.ref(token)
        return token

    def _release(self, token: object) -> None:
        with self._lock:
            if self._current_owner() is token:
                self._owner = None

    @property
    def generating(self) -> bool:
        """Whether a generation currently owns this session."""
        return self._current_owner() is not None

    def _check_owner(self, owner: object | None, what: str) -> None:
        current = self._current_owner()
        if current is None or current is owner:
            return
        if what == "generate":
            raise GenerationError("session is already generating; fork() it for parallel branches")
        raise GenerationError(
            f"{what}: session is generating; wait until its generation ends, or fork() it for parallel branches"
        )

    def _rollback(self, length: int) -> None:
        """Back to ``length`` tokens after a failed call (rows past the length are never read)."""
        self.cache.truncate(min(length, self.cache.length))
        del self.tokens[length:]

    # -- the sequence ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence: empty cache, position 0."""
        self._check_owner(None, "reset")
        with self._lock:
            self._check_owner(None, "reset")
            self._reset()

    def _reset(self) -> None:
        with self._lock:
            m = self.model
            if m.cache_capacity is None:
                self.cache = LatentCache(m.num_layers, m.latent_dim)
            else:
                self.cache = LatentCache(m.num_layers, m.latent_dim, m.cache_dtype, m.cache_capacity, fixed=True)
            self.tokens: list[int] = []

    def fork(self) -> Session:
        """A new session starting from this one's cache (e.g. a shared system prompt), independent after."""
        self._check_owner(None, "fork")
        with self._lock:
            self._check_owner(None, "fork")
            child = Session(self.model)
            child.cache = self.cache.copy()
            child.tokens = list(self.tokens)
            return child

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens of the sequence (e.g. to re-use a shared prefix)."""
        self._check_owner(None, "truncate")
        with self._lock:
            self._check_owner(None, "truncate")
            if not 0 <= length <= self.position:
                raise GenerationError(f"cannot truncate a {self.position}-token session to {length} tokens")
            self.cache.truncate(length)
            self.tokens = self.tokens[:length]

    def extend_cached(self, token_ids: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        """Append tokens whose latent rows were computed before (``rows``: per layer ``[1, n, dim]``), e.g.
        by the prefix cache, without running the model. The rows must be the ones the model gives for
        exactly these tokens after this session's current ones."""
        self._check_owner(None, "extend_cached")
        with self._lock:
            self._check_owner(None, "extend_cached")
            ids = self.check_ids(token_ids)
            if len(rows) != self.model.num_layers or any(r.shape != (1, len(ids), self.model.latent_dim) for r in rows):
                raise GenerationError(f"extend_cached: expected {self.model.num_layers} x [1, {len(ids)}, dim] rows")
            self.cache.append([r.astype(self.cache.dtype, copy=False) for r in rows])
            self.tokens.extend(int(t) for t in ids)

    @property
    def position(self) -> int:
        """Number of tokens in the cache (the position the next token will take)."""
        return len(self.tokens)

    def check_ids(self, token_ids: Sequence[int]) -> np.ndarray:
        """Validate new token ids against the vocabulary and the context limit."""
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
                + (" (the cache capacity of the static graphs)" if self.model.cache_capacity is not None else "")
            )
        return ids.astype(np.int64)

    def forward(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens; returns logits for every one of them ([len, vocab] float32)."""
        return self.model.forward_batch([(self, token_ids)], logits_to_keep=len(token_ids))[0]

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append tokens to the sequence; returns the logits of the last one ([vocab] float32)."""
        return self.model.forward_batch([(self, token_ids)])[0][-1]

    def step(self, token_id: int) -> np.ndarray:
        """Append one token; returns its logits ([vocab] float32)."""
        return self.prefill([token_id])

    # -- generation ---------------------------------------------------------------------------
    def request(
        self,
        prompt: Sequence[int] | str,
        params: SamplingParams | None = None,
        in_reasoning: bool | None = None,
        *,
        response_format: Any = None,
        **overrides: Any,
    ) -> Request:
        """A generation request on this session (text prompts are tokenized; a prompt that ends in
        ``<think>`` starts the output in the reasoning part, unless ``in_reasoning`` says otherwise).
        ``response_format`` constrains the answer (after any reasoning) to a JSON schema, a regex or a
        grammar (runtime/constraints.py); a bad one raises
        :class:`~moeport.runtime.constraints.ConstraintError` here, before anything runs."""
        params = self.model.sampling_params(params, **overrides)
        tok = self.model.tokenizer
        if isinstance(prompt, str):
            if prompt == "":
                raise GenerationError("empty prompt: at least one token is needed")
            tok = self.model.require_tokenizer()
            has_bos = bool(tok.bos_token) and prompt.startswith(tok.bos_token)
            prompt = tok.encode(prompt, add_special_tokens=not has_bos and self.position == 0)
        # a prompt ending in "<think>" (DeepSeek-R1's chat template) starts the output inside the reasoning
        if in_reasoning is None:
            in_reasoning = self.model.opens_reasoning([*self.tokens, *prompt])
        in_reasoning = bool(in_reasoning)
        constraint = None
        if response_format is not None:
            from .constraints import compiler_for

            constraint = compiler_for(self.model).start(response_format, in_reasoning)
        return Request(self, prompt, params, in_reasoning=in_reasoning, constraint=constraint)

    def generate(
        self, prompt: Sequence[int] | str, params: SamplingParams | None = None, **overrides: Any
    ) -> Completion:
        """Generate from ``prompt`` (ids or text) with ``params`` / keyword overrides (``max_new_tokens``,
        ``temperature``, ``top_p``, ``seed``, ``stop``, ``ignore_eos``, ``response_format``, ...)."""
        gen = BatchGenerator(self.model, 1)
        req = gen.submit(self, prompt, params, **overrides)
        try:
            gen.run()
        finally:
            if not req.done:  # interrupted (KeyboardInterrupt, ...): the session is free again
                gen.cancel(req)
        return req.result()

    def stream(
        self, prompt: Sequence[int] | str, params: SamplingParams | None = None, **overrides: Any
    ) -> Iterator[TextDelta]:
        """Like :meth:`generate`, yielding text deltas labelled ``reasoning`` or ``content`` as they come.
        The finished :class:`Completion` is the generator's return value. Closing the stream early
        cancels the generation (the session keeps what went in so far)."""
        gen = BatchGenerator(self.model, 1)
        req = gen.submit(self, prompt, params, **overrides)
        try:
            yield from gen.stream(req)
        finally:
            if not req.done:
                gen.cancel(req)
        return req.result()
