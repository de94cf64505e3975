"""Limits for rendering chat templates that come with downloaded models.

jinja2's sandbox keeps a template away from Python internals but lets it spend any amount of time and
memory: nested loops, ``'a' * 10**9``, a string doubled with ``~`` forty times. :class:`CappedEnvironment`
is the sandbox with

- a **time limit**: a trace hook (``sys.settrace``, this thread only, removed after the render) checks a
  deadline at every Python function call and on every line of the template's compiled code;
- **size limits**: ``*``, ``**``, ``+`` and ``%`` are intercepted and refused *before* they would build
  a string or list longer than ``max_size`` (or an integer wider than :data:`MAX_INT_BITS`); so are
  ``replace``/``join`` that would, integer arguments above ``max_size`` (widths for ``center``,
  ``indent``, ``ljust``...) and format strings asking for such widths; every ``~`` concatenation, call
  and filter result is checked after, and the output is counted as it streams;
- ``range`` bounded by the sandbox (100 000 items); ``lipsum`` removed.

A single C-level operation not listed above can still build one value up to a few times ``max_size``
before the check after it refuses it. Nothing runs in another thread.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import Concat
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_INT_BITS = 1 << 16  # integers a template may build (65 536 bits, ~20 000 digits)
_NUMBER = re.compile(r"\d+")


class TemplateLimitExceeded(BaseException):
    """A render went over its time or size limit. A BaseException, so that no ``except Exception`` in
    jinja2 or a filter swallows it; :class:`~moeport.runtime.text.ChatTemplate` turns it into a TextError."""


class _CheckedConcatGenerator(CodeGenerator):
    """Compiles ``a ~ b`` as ``environment.checked_concat(str_join((a, b)))``."""

    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        self.write("environment.checked_concat(")
        super().visit_Concat(node, frame)
        self.write(")")


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict, set)):
        return len(value)
    return 0


class CappedEnvironment(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with size limits; :meth:`render` adds the time and output limits."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CheckedConcatGenerator

    def __init__(self, max_size: int, **options: Any):
        super().__init__(**options)
        self.max_size = max_size
        self.globals.pop("lipsum", None)  # n paragraphs of filler text: no template needs it
        self.filters = {name: self._checked_filter(name, f) for name, f in self.filters.items()}

    # -- sizes -----------------------------------------------------------------------------------
    def refuse(self, what: str) -> TemplateLimitExceeded:
        return TemplateLimitExceeded(f"chat template exceeded the size limit ({self.max_size} items): {what}")

    def sized(self, value: Any, what: str) -> Any:
        if _size(value) > self.max_size:
            raise self.refuse(f"{what} gave {_size(value)} items")
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise self.refuse(f"{what} gave a {value.bit_length()}-bit integer")
        return value

    def checked_concat(self, value: str) -> str:
        return self.sized(value, "'~'")

    def _check_ints(self, args: tuple, kwargs: dict, what: str) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self.max_size:
                raise self.refuse(f"{what} with argument {a}")

    def _check_format(self, fmt: str, what: str) -> None:
        widths = [int(n) for n in _NUMBER.findall(fmt) if len(n) <= 24]
        if any(w > self.max_size for w in widths) or any(len(n) > 24 for n in _NUMBER.findall(fmt)):
            raise self.refuse(f"{what} with a format width above the limit")

    def _check_replace(self, s: Any, old: Any, new: Any, count: Any = -1) -> None:
        if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
            return
        hits = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        if len(s) + hits * (len(new) - len(old)) > self.max_size:
            raise self.refuse("replace() would build a string above the limit")

    def _check_join(self, sep: Any, items: Any) -> None:
        if isinstance(sep, str) and isinstance(items, (list, tuple)):
            total = len(sep) * max(len(items) - 1, 0) + sum(len(x) for x in items if isinstance(x, str))
            if total > self.max_size:
                raise self.refuse("join() would build a string above the limit")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator in ("*", "**") and all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right)):
            bits = left.bit_length() * max(right, 1) if operator == "**" else left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise self.refuse(f"'{operator}' would build a {bits}-bit integer")
        elif operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(n, int) and _size(seq) * max(n, 0) > self.max_size:
                raise self.refuse(f"'*' would build {_size(seq) * n} items")
        elif operator == "+" and _size(left) + _size(right) > self.max_size:
            raise self.refuse(f"'+' would build {_size(left) + _size(right)} items")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, "'%'")
        return self.sized(super().call_binop(context, operator, left, right), f"'{operator}'")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        name = getattr(obj, "__name__", "a call")
        target = getattr(obj, "__self__", None)
        if isinstance(target, str):  # a str method: widths (center, ljust, zfill...), replace, join
            self._check_ints(args, kwargs, f"str.{name}()")
            if name == "replace" and len(args) >= 2:
                self._check_replace(target, *args[:3])
            elif name == "join" and args:
                self._check_join(target, args[0])
            elif name == "expandtabs" and target.count("\t") * (args[0] if args else 8) > self.max_size:
                raise self.refuse("expandtabs() would build a string above the limit")
        return self.sized(super().call(context, obj, *args, **kwargs), f"{name}()")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        fmt = getattr(value, "__self__", None)
        if isinstance(fmt, str) and getattr(value, "__name__", "") in ("format", "format_map"):
            self._check_format(fmt, "str.format")
        return super().wrap_str_format(value)

    def _checked_filter(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        skip = 0 if getattr(f, "jinja_pass_arg", None) is None else 1  # a context / eval context comes first

        @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_ctx marks
        def checked(*args: Any, **kwargs: Any) -> Any:
            values = args[skip:]
            if name in _WIDTH_FILTERS:
                self._check_ints(values, kwargs, f"filter {name}")
            if name == "indent" and values and isinstance(values[0], str):
                width = values[1] if len(values) > 1 else kwargs.get("width", 4)
                width = len(width) if isinstance(width, str) else width
                if isinstance(width, int) and len(values[0]) + width * (values[0].count("\n") + 1) > self.max_size:
                    raise self.refuse("filter indent would build a string above the limit")
            elif name == "replace" and len(values) >= 3:
                self._check_replace(*values[:4])
            elif name == "join" and values:
                self._check_join(values[1] if len(values) > 1 else kwargs.get("d", ""), values[0])
            elif name == "format" and values and isinstance(values[0], str):
                self._check_format(values[0], "filter format")
            return self.sized(f(*args, **kwargs), f"filter {name}")

        return checked


_WIDTH_FILTERS = frozenset({"center", "indent", "truncate", "wordwrap", "batch", "slice"})


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TemplateLimitExceeded` in this thread's Python code once ``seconds`` have passed:
    checked at every function call, and at every line of the template's own code (its loops)."""
    end = time.perf_counter() + seconds

    def check() -> None:
        if time.perf_counter() > end:
            raise TemplateLimitExceeded(f"chat template exceeded its time limit ({seconds:g} s)")

    def on_line(frame: Any, event: str, arg: Any) -> Callable[..., Any]:
        check()
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Callable[..., Any] | None:
        check()
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)
