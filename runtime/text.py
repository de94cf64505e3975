"""Text around the model: tokenizer, chat template, incremental detokenization, stop strings,
and splitting DeepSeek-R1 ``<think>...</think>`` output into reasoning and content."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TextError(ValueError):
    """Text could not be handled: no tokenizer, no chat template, a template that fails, ..."""


def _token_text(tok: Any) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return None


class ChatTemplate:
    """A Hugging Face chat template rendered with jinja2 the way transformers renders it
    (sandboxed, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``).

    Templates come with downloaded models, so a render is capped (``runtime/template_limits.py``): at
    most ``time_limit`` seconds, no value or output above ``max_size`` characters/items; going over
    raises :class:`TextError` ("chat template exceeded ...").
    """

    def __init__(
        self,
        source: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        time_limit: float = 2.0,
        max_size: int = 1 << 24,
    ):
        import jinja2

        from .template_limits import CappedEnvironment, TemplateLimitExceeded

        def raise_exception(message: str) -> None:
            raise TextError(f"chat template error: {message}")

        def tojson(
            x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
        ) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = CappedEnvironment(max_size, trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = env._checked_filter("tojson", tojson)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TextError(f"chat template does not parse: {exc}") from exc
        except TemplateLimitExceeded as exc:  # a constant expression folded while compiling
            raise TextError(str(exc)) from None
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.time_limit, self.max_size = time_limit, max_size

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        from .template_limits import TemplateLimitExceeded, time_limit

        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TextError(f"chat messages need 'role' and 'content', got {m!r}")
        parts: list[str] = []
        size = 0
        try:
            with time_limit(self.time_limit):
                chunks = self._template.generate(
                    messages=list(messages),
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                    **kwargs,
                )
                try:
                    for chunk in chunks:
                        size += len(chunk)
                        if size > self.max_size:
                            raise TemplateLimitExceeded(
                                f"chat template exceeded the output limit ({self.max_size} characters)"
                            )
                        parts.append(chunk)
                finally:
                    chunks.close()
        except TemplateLimitExceeded as exc:
            raise TextError(str(exc)) from None
        except TextError:
            raise
        except RecursionError:
            raise TextError("chat template failed to render: too deep recursion") from None
        except Exception as exc:
            raise TextError(f"chat template failed to render: {exc}") from exc
        return "".join(parts)


class Tokenizer:
    """``tokenizer.json`` through the ``tokenizers`` library, plus ``tokenizer_config.json`` facts."""

    def __init__(self, tokenizer_json: Path, tokenizer_config: Path | None = None, template_file: Path | None = None):
        def text(path: Path | None) -> str | None:
            if path is None or not Path(path).is_file():
                return None
            try:
                return Path(path).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise TextError(f"{path}: cannot read ({exc})") from exc

        tok = text(tokenizer_json)
        if tok is None:
            raise TextError(f"{tokenizer_json}: cannot load tokenizer (no such file)")
        self._setup(tok, text(tokenizer_config), text(template_file), str(Path(tokenizer_json).parent))

    @classmethod
    def from_texts(
        cls,
        tokenizer_json: str,
        tokenizer_config: str | None = None,
        chat_template: str | None = None,
        source: str = "",
    ) -> Tokenizer:
        """A tokenizer from the contents of ``tokenizer.json``, ``tokenizer_config.json`` and
        ``chat_template.jinja`` (as an artifact reads them from its verified files)."""
        self = cls.__new__(cls)
        self._setup(tokenizer_json, tokenizer_config, chat_template, source)
        return self

    def _setup(self, tok: str, config: str | None, template: str | None, source: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tok)
        except Exception as exc:
            raise TextError(f"{source}/tokenizer.json: cannot load tokenizer ({exc})") from exc
        cfg: Any = {}
        if config is not None:
            try:
                cfg = json.loads(config)
            except (ValueError, RecursionError) as exc:
                raise TextError(f"{source}/tokenizer_config.json: not valid JSON ({exc})") from exc
            if not isinstance(cfg, dict):
                raise TextError(f"{source}/tokenizer_config.json: expected a JSON object")
        self.config = cfg
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos_token = bool(cfg.get("add_bos_token", False))
        source_text = None
        if template is not None:
            source_text = template
        elif isinstance(cfg.get("chat_template"), str):
            source_text = cfg["chat_template"]
        elif isinstance(cfg.get("chat_template"), list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in cfg["chat_template"] if isinstance(t, dict)}
            source_text = named.get("default") if isinstance(named.get("default"), str) else None
        self.chat_template = ChatTemplate(source_text, self.bos_token, self.eos_token) if source_text else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` a BOS is prepended when the config asks for one."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token:
            bos = self._tok.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise TextError(
                "this model has no chat template (tokenizer_config.json chat_template or "
                "chat_template.jinja); use a plain prompt instead of chat"
            )
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Render the chat template and tokenize it (the template already holds BOS)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting half a UTF-8 character.

    Decodes a small window of recent tokens (as vLLM and transformers' streamers do): the last emitted
    piece as context, then the tokens not emitted yet. Text is held back while it ends in an incomplete
    byte sequence (U+FFFD), for at most :attr:`MAX_HELD` tokens (then it is emitted as decoded: a
    valid character never spans that many); a token that adds no text (a skipped special token) leaves
    the window. So every push decodes O(MAX_HELD) tokens, whatever the run of tokens before it.
    """

    MAX_HELD = 16

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._window: list[int] = []  # context (already emitted), then the held-back tokens
        self._read = 0  # window[:_read] is the context
        self._prefix: str | None = ""  # decode(window[:_read]), None until needed again

    @property
    def window_size(self) -> int:
        """Token ids decoded by each push (bounded by about 2 x MAX_HELD)."""
        return len(self._window)

    def _prefix_text(self) -> str:
        if self._prefix is None:
            self._prefix = self.tok.decode(self._window[: self._read], self.skip)
        return self._prefix

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        self._window.append(int(token_id))
        prefix = self._prefix_text()
        full = self.tok.decode(self._window, self.skip)
        if full == prefix:
            self._window.pop()  # adds nothing (a skipped special token): no need to decode it again
            return ""
        held = len(self._window) - self._read
        if (len(full) <= len(prefix) or full.endswith("\ufffd")) and held < self.MAX_HELD:
            return ""  # nothing new yet, or an incomplete UTF-8 sequence: wait for the next token
        self._window = self._window[self._read :]
        self._read, self._prefix = len(self._window), None
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (e.g. invalid bytes at the very end, shown as U+FFFD)."""
        prefix = self._prefix_text()
        full = self.tok.decode(self._window, self.skip)
        self._window, self._read, self._prefix = [], 0, ""
        return full[len(prefix) :]


class StopStringMatcher:
    """Finds stop strings in streamed text, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit). Text from the stop string on is dropped."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(frozen=True)
class TextDelta:
    """A piece of streamed output: ``part`` is "reasoning" or "content"."""

    part: str
    text: str


class ReasoningSplitter:
    """Splits streamed text at DeepSeek-R1's ``<think>`` / ``</think>`` tags.

    Starts in ``content`` (or ``reasoning`` when the prompt already opened ``<think>``); tags split
    across deltas are recognised; the tags themselves and the whitespace next to them are dropped.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, in_reasoning: bool = False):
        self.part = "reasoning" if in_reasoning else "content"
        self.seen_close = False
        self.buf = ""
        self.at_part_start = True
        self.held_ws = ""
        self.reasoning: list[str] = []
        self.content: list[str] = []

    def push(self, text: str) -> list[TextDelta]:
        self.buf += text
        out: list[TextDelta] = []
        while self.buf:
            tag = self.CLOSE if self.part == "reasoning" else (self.OPEN if not self.seen_close else None)
            if tag is None:
                self._emit(out, self.buf)
                self.buf = ""
                break
            i = self.buf.find(tag)
            if i >= 0:
                self._emit(out, self.buf[:i], closing=True)
                self.buf = self.buf[i + len(tag) :]
                if self.part == "reasoning":
                    self.part, self.seen_close = "content", True
                else:
                    self.part = "reasoning"
                self.at_part_start = True
                continue
            hold = next((k for k in range(min(len(tag) - 1, len(self.buf)), 0, -1) if self.buf.endswith(tag[:k])), 0)
            self._emit(out, self.buf[: len(self.buf) - hold])
            self.buf = self.buf[len(self.buf) - hold :]
            break
        return out

    def _emit(self, out: list[TextDelta], text: str, closing: bool = False) -> None:
        # whitespace at the edges of a part is dropped: leading at once, trailing held until more text follows
        text = self.held_ws + text
        if self.at_part_start:
            text = text.lstrip()
        body = text.rstrip()
        self.held_ws = "" if closing else text[len(body) :]
        if not body:
            return
        self.at_part_start = False
        (self.reasoning if self.part == "reasoning" else self.content).append(body)
        out.append(TextDelta(self.part, body))

    def flush(self) -> list[TextDelta]:
        out: list[TextDelta] = []
        if self.buf:
            self._emit(out, self.buf)
            self.buf = ""
        return out

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning).strip()

    @property
    def content_text(self) -> str:
        return "".join(self.content).strip()
