"""Constrained decoding: a JSON schema, a regex or a grammar per request, applied as a token mask.

The grammar engine is llguidance (docs/structured-output.md says why): a response format is compiled
once per tokenizer into a matcher (cached, see :class:`ConstraintCompiler`), each request gets its
own copy (:class:`TokenConstraint`), and at every step the tokens the grammar cannot take next get
-inf logits before sampling; the chosen token then advances the matcher. When the grammar is
complete the request ends (finish_reason "stop"); while it could still go on, EOS is allowed only
where the grammar may end.

Reasoning stays free: while the output is inside ``<think>...</think>`` nothing is masked, and a
model whose first token opens ``<think>`` may do so (when the tokenizer has ``<think>``/``</think>``
as single tokens). A mask costs tens of microseconds (docs/structured-output.md), so by default it is
computed when the logits arrive; ``ConstraintCompiler.overlap`` computes it instead in a worker thread
right after a token is accepted, while the model runs the next step (llguidance releases the GIL while
it computes, as ONNX Runtime does while it runs): a gain only where a core is idle during the model
step, a loss on a machine whose cores the model's threads fill (measured there).

Response formats (OpenAI's shapes, plus two of llguidance's):
``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``,
``{"type": "regex", "regex": "..."}``, ``{"type": "grammar", "grammar": "<lark>"}`` and
``{"type": "text"}`` (no constraint).
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .model import Model


class ConstraintError(ValueError):
    """A response format that cannot be used: malformed, not a JSON schema, not compilable, no tokenizer."""


RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")

# JSON as models write it from json.dumps: ", " and ": ", no other whitespace. Free whitespace would let
# a model pad forever (a random-weight model does); a schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 1 << 20  # a schema, regex or grammar larger than this is refused before compiling
# after </think> a reasoning model writes a blank line or two before its answer (DeepSeek-R1 does): up to
# this many whitespace-only tokens pass there, outside the grammar, so the answer starts where it would
LEADING_WHITESPACE_TOKENS = 4
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - a dependency; only a broken install lacks it
        raise ConstraintError(f"response_format needs the llguidance package ({exc}); pip install llguidance") from None
    return llguidance


@dataclass(frozen=True)
class GrammarSpec:
    """A response format reduced to one llguidance grammar; ``key`` identifies it in the cache."""

    kind: str
    grammar: str
    what: str  # for error messages: "json_schema 'weather'", "regex", ...

    @property
    def key(self) -> str:
        return self.grammar


def _json_text(value: Any, what: str) -> Any:
    """A schema given as a JSON string is parsed; anything else is taken as it is."""
    if isinstance(value, (str, bytes)):
        if len(value) > MAX_GRAMMAR_CHARS:
            raise ConstraintError(f"{what}: larger than {MAX_GRAMMAR_CHARS} characters")
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise ConstraintError(f"{what} is not valid JSON ({exc})") from None
    return value


def json_schema_with_options(schema: dict[str, Any] | bool) -> dict[str, Any] | bool:
    """``schema`` with moeport's JSON whitespace options (its own ``x-guidance`` options win)."""
    if isinstance(schema, bool):
        return schema
    own = schema.get("x-guidance")
    options = {**JSON_OPTIONS, **(own if isinstance(own, dict) else {})}
    return {**schema, "x-guidance": options}


def schema_grammar(schema: Any, what: str = "json_schema.schema") -> str:
    """The llguidance grammar of a JSON schema (a dict, a bool or a JSON string), with moeport's JSON
    whitespace options; raises :class:`ConstraintError` for something that is not a schema."""
    schema = _json_text(schema, what)
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"{what} must be a JSON Schema (an object or a boolean), got {type(schema).__name__}")
    try:
        text = json.dumps(json_schema_with_options(schema))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConstraintError(f"{what} is not JSON-serializable ({exc})") from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise ConstraintError(f"{what}: larger than {MAX_GRAMMAR_CHARS} characters")
    return _llguidance().LLMatcher.grammar_from_json_schema(text)


def grammar_spec(response_format: Any) -> GrammarSpec | None:
    """Check a ``response_format`` and reduce it to a grammar (None for ``{"type": "text"}``)."""
    if not isinstance(response_format, dict):
        raise ConstraintError(
            f"response_format must be an object with a 'type' ({', '.join(RESPONSE_FORMAT_TYPES)}), "
            f"got {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    llg = _llguidance()
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec(kind, schema_grammar({"type": "object"}), "json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ConstraintError('response_format json_schema needs \'json_schema\': {"name", "schema", "strict"}')
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise ConstraintError(f"response_format json_schema.name must be a string, got {name!r:.60}")
        if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
            raise ConstraintError(
                f"response_format json_schema.strict must be true or false, got {spec['strict']!r:.60}"
            )
        if "schema" not in spec:
            raise ConstraintError("response_format json_schema needs a 'schema'")
        what = f"json_schema {name!r}" if name else "json_schema"
        return GrammarSpec(kind, schema_grammar(spec["schema"], f"{what} schema"), what)
    if kind in ("regex", "grammar"):
        source = response_format.get(kind)
        if not isinstance(source, str) or not source:
            raise ConstraintError(f"response_format {kind} needs a non-empty string '{kind}'")
        if len(source) > MAX_GRAMMAR_CHARS:
            raise ConstraintError(f"response_format {kind}: larger than {MAX_GRAMMAR_CHARS} characters")
        make = llg.LLMatcher.grammar_from_regex if kind == "regex" else llg.LLMatcher.grammar_from_lark
        return GrammarSpec(kind, make(source), kind)
    raise ConstraintError(
        f"response_format type {kind!r:.60} is not supported (one of {', '.join(RESPONSE_FORMAT_TYPES)})"
    )


def _engine_message(message: str, limit: int = 300) -> str:
    """llguidance's error as one line: without its parser-state dump, caret lines and source echo."""
    for cut in ("<state>", "<grammar>"):
        message = message.split(cut, 1)[0]
    keep = [
        x.strip()
        for x in message.splitlines()
        if x.strip() and set(x.strip()) - set("^ ") and not re.match(r"^\s*\d+\s*\|", x)
    ]
    text = " ".join(keep) or "unknown error"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_response_format(response_format: Any) -> GrammarSpec | None:
    """:func:`grammar_spec` plus a compile check without a tokenizer: every error a schema, regex or
    grammar can have on its own, found before a model is loaded (as the CLI does)."""
    spec = grammar_spec(response_format)
    if spec is not None:
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(spec.grammar)
        if is_error:
            raise ConstraintError(f"{spec.what} cannot be compiled: {_engine_message(messages[0])}")
    return spec


def _engine_tokenizer(tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int]):
    """llguidance's view of a ``tokenizer.json``: read natively when llguidance knows its decoder
    (byte-level BPE, SentencePiece-style), else from each token's decoded text (e.g. WordLevel + Fuse)."""
    llg = _llguidance()
    eos = list(eos_ids) if eos_ids else None
    try:
        return llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
    except ValueError as native_error:
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(tokenizer_json)
        added = json.loads(tokenizer_json).get("added_tokens") or []
        special = [t["id"] for t in added if isinstance(t, dict) and t.get("special") and isinstance(t.get("id"), int)]
        n = hf.get_vocab_size(with_added_tokens=True)
        if n > vocab_size:
            raise ConstraintError(
                f"the tokenizer has {n} tokens but the model only {vocab_size} logits"
            ) from native_error
        token_bytes = [hf.decode([i], skip_special_tokens=False).encode("utf-8") for i in range(n)]
        token_bytes += [b""] * (vocab_size - n)

        class _Vocabulary:  # what llguidance.TokenizerWrapper reads
            tokens = token_bytes
            eos_token_id = eos[0] if eos else None
            bos_token_id = None
            special_token_ids = special

            def __call__(self, text: str | bytes) -> list[int]:
                s = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                return hf.encode(s, add_special_tokens=False).ids

        try:
            return llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary()), n_vocab=vocab_size, eos_token=eos)
        except Exception as exc:
            raise ConstraintError(f"the grammar engine cannot use this tokenizer ({native_error}; {exc})") from None


_mask_worker: ThreadPoolExecutor | None = None
_mask_worker_lock = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    global _mask_worker
    with _mask_worker_lock:
        if _mask_worker is None:
            _mask_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeport-mask")
        return _mask_worker


class ConstraintCompiler:
    """Compiles response formats for one tokenizer and keeps the last ``cache_size`` compiled (LRU).

    ``overlap``: compute each request's next mask in a worker thread while the model runs, instead of
    when the logits arrive (the default: on a machine whose cores the model fills, the hand-off to the
    worker cost more than the mask, see docs/structured-output.md).
    """

    def __init__(
        self,
        tokenizer_json: str,
        vocab_size: int,
        eos_ids: Sequence[int] = (),
        cache_size: int = 64,
        overlap: bool = False,
    ):
        self.vocab_size = vocab_size
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.llg_tokenizer = _engine_tokenizer(tokenizer_json, vocab_size, self.eos_ids)
        self.cache_size = cache_size
        self.overlap = overlap
        self._cache: OrderedDict[str, CompiledConstraint] = OrderedDict()
        self._lock = threading.Lock()
        from tokenizers import Tokenizer as HFTokenizer

        self._hf = HFTokenizer.from_str(tokenizer_json)
        # single-token reasoning tags: masks are skipped inside them and <think> may open the output
        self.think_open = self.token_id(THINK_OPEN)
        self.think_close = self.token_id(THINK_CLOSE)
        self._whitespace: np.ndarray | None = None

    @property
    def whitespace_tokens(self) -> np.ndarray:
        """[vocab] bool: the tokens that are whitespace only (llguidance finds them: the first mask of a
        whitespace regex)."""
        if self._whitespace is None:
            llg = _llguidance()
            m = llg.LLMatcher(self.llg_tokenizer, llg.LLMatcher.grammar_from_regex(r"[ \t\r\n]+"), log_level=0)
            bits = np.frombuffer(m.compute_bitmask(), dtype=np.uint8)
            self._whitespace = np.unpackbits(bits, count=self.vocab_size, bitorder="little").view(bool).copy()
            self._whitespace[list(self.eos_ids)] = False
        return self._whitespace

    def token_id(self, text: str) -> int | None:
        """The id of ``text`` when it is one token of the vocabulary (tool-call markers, think tags)."""
        return self._hf.token_to_id(text)

    def compile(self, response_format: Any) -> CompiledConstraint | None:
        """The compiled constraint of ``response_format`` (cached), None for no constraint; a
        :class:`CompiledConstraint` is passed through. Raises :class:`ConstraintError`."""
        if isinstance(response_format, CompiledConstraint):
            if response_format.compiler is not self:
                raise ConstraintError("this compiled constraint belongs to another model's tokenizer")
            return response_format
        spec = grammar_spec(response_format)
        if spec is None:
            return None
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        compiled = CompiledConstraint(self, spec)  # outside the lock: llguidance compiles without the GIL
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def start(self, response_format: Any, in_reasoning: bool = False) -> TokenConstraint | None:
        """A fresh per-request constraint (None for no constraint); ``in_reasoning``: the prompt opened
        ``<think>``, so masking starts after ``</think>``."""
        compiled = self.compile(response_format)
        return None if compiled is None else compiled.start(in_reasoning)


class CompiledConstraint:
    """One response format compiled for one tokenizer; :meth:`start` gives each request its own matcher."""

    def __init__(self, compiler: ConstraintCompiler, spec: GrammarSpec):
        llg = _llguidance()
        self.compiler = compiler
        self.spec = spec
        self._template = llg.LLMatcher(compiler.llg_tokenizer, spec.grammar, log_level=0)
        if not self._template.is_error():  # the first mask finds what only the lexer sees (too complex, ...)
            self._template.compute_bitmask()
        if self._template.is_error():
            raise ConstraintError(f"{spec.what} cannot be compiled: {_engine_message(self._template.get_error())}")
        self._lock = threading.Lock()

    def start(self, in_reasoning: bool = False) -> TokenConstraint:
        with self._lock:
            matcher = self._template.deep_copy()  # ~10 us, against ~1 ms to build one
        return TokenConstraint(self.compiler, matcher, in_reasoning)


class TokenConstraint:
    """One request's grammar state: :meth:`mask_logits` before sampling, :meth:`advance` after.

    Phases: "reasoning" (inside <think>: no mask), "start" (the first answer token: the grammar's
    tokens, plus <think> when it is a single token), "answer" (the grammar's tokens), "done".
    """

    def __init__(self, compiler: ConstraintCompiler, matcher: Any, in_reasoning: bool):
        self.compiler = compiler
        self.matcher = matcher
        self.vocab_size = compiler.vocab_size
        self.phase = "reasoning" if in_reasoning else "start"
        self._mask = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)
        self._pending: Future | None = None
        self._tail = b""  # the end of the reasoning so far, to find a </think> that spans tokens
        self._leading_whitespace = 0  # whitespace tokens still allowed before the answer (after </think>)
        self._mask_current = False  # the mask in _mask is for the matcher's present state
        self.mask_seconds = 0.0  # time spent computing masks (in the worker when overlapped)
        if self.phase == "start":
            self._prefetch()

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def _fill(self) -> None:
        t = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)  # releases the GIL
        self.mask_seconds += time.perf_counter() - t

    def _prefetch(self) -> None:
        self._mask_current = False
        if self.compiler.overlap:
            self._pending = _worker().submit(self._fill)

    def allowed(self) -> np.ndarray:
        """The tokens the next step may take ([vocab] bool); all True while reasoning."""
        if self.phase == "reasoning":
            return np.ones(self.vocab_size, dtype=bool)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        elif not self._mask_current:
            self._fill()
        self._mask_current = True
        if self.matcher.is_error():
            raise ConstraintError(f"the grammar failed: {_engine_message(self.matcher.get_error())}")
        ok = np.unpackbits(self._mask.view(np.uint8), count=self.vocab_size, bitorder="little").view(bool)
        if self.phase == "start" and self.compiler.think_open is not None and self.compiler.think_close is not None:
            ok[self.compiler.think_open] = True
        if self._leading_whitespace > 0:
            ok |= self.compiler.whitespace_tokens
        return ok

    def mask_logits(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar cannot take next at -inf (a new array; unchanged
        while reasoning)."""
        if self.phase in ("reasoning", "done"):
            return logits
        return np.where(self.allowed(), logits, np.float32(-np.inf))

    def advance(self, token: int) -> bool:
        """Take the sampled token; True when the grammar is complete (the request should end)."""
        token = int(token)
        if self.phase == "done":
            return True
        if self.phase == "reasoning":
            self._after_reasoning_token(token)
            return False
        if self.phase == "start":
            if token == self.compiler.think_open and self.compiler.think_close is not None:
                self.phase = "reasoning"
                return False
            self.phase = "answer"
        if self._leading_whitespace > 0:
            if self.compiler.whitespace_tokens[token] and not self._mask_allows(token):
                self._leading_whitespace -= 1  # before the answer: not the grammar's (its mask stays valid)
                return False
            self._leading_whitespace = 0
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"the grammar refused token {token}: {_engine_message(self.matcher.get_error())}")
        if self.matcher.is_stopped():
            self.phase = "done"
            return True
        self._prefetch()
        return False

    def _mask_allows(self, token: int) -> bool:
        return bool((int(self._mask[token >> 5]) >> (token & 31)) & 1)

    def _after_reasoning_token(self, token: int) -> None:
        close = self.compiler.think_close
        if close is not None:
            if token == close:
                self.phase = "answer"
                self._leading_whitespace = LEADING_WHITESPACE_TOKENS
                self._prefetch()
            return
        # </think> spread over several tokens: find it in the bytes; what follows it in the same token
        # is the answer's start
        self._tail += self.compiler.llg_tokenizer.decode_bytes([token])
        at = self._tail.find(THINK_CLOSE.encode())
        if at < 0:
            self._tail = self._tail[-len(THINK_CLOSE) :]
            return
        rest = self._tail[at + len(THINK_CLOSE) :].lstrip()
        self.phase = "answer"
        self._leading_whitespace = LEADING_WHITESPACE_TOKENS
        if rest:
            ids = self.compiler.llg_tokenizer.tokenize_bytes(rest)
            if not self.matcher.consume_tokens(ids):
                raise ConstraintError(f"the grammar refused the answer's start {rest!r:.40}")
            if self.matcher.is_stopped():
                self.phase = "done"
                return
        self._prefetch()


_compilers: weakref.WeakKeyDictionary[Model, ConstraintCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(model: Model) -> ConstraintCompiler:
    """The model's constraint compiler (built once, on first use), from the artifact's tokenizer.json."""
    with _compilers_lock:
        compiler = _compilers.get(model)
        if compiler is None:
            art = model.artifact
            if not art.has("tokenizer.json"):
                raise ConstraintError(
                    f"{art.directory} has no tokenizer.json: response_format needs the tokenizer to map the grammar "
                    "onto tokens"
                )
            compiler = ConstraintCompiler(art.read_text("tokenizer.json"), model.vocab_size, model.eos_token_ids)
            _compilers[model] = compiler
    return compiler
