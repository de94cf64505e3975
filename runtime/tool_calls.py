"""DeepSeek tool calls: which format a chat template renders, rendering, parsing (whole and streamed),
and the grammar that forces a call for ``tool_choice`` "required" or a named function.

Two formats exist (``<｜…｜>`` markers are single tokens of DeepSeek's vocabulary):

- ``deepseek_v3`` (DeepSeek-V3, R1, V3-0324, R1-0528)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

- ``deepseek_v31`` (DeepSeek-V3.1 and later)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{"arg": 1}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

The format is read off the checkpoint's own chat template by rendering a probe conversation
(:func:`template_tool_support`); DeepSeek's published templates render tool calls and tool results
but not the tool definitions, which :func:`render_chat` then adds to the system prompt in DeepSeek's
documented wording. The server (issue G) uses :func:`render_chat`, :func:`tool_call_response_format`
(passed as ``response_format`` to a request), and :func:`parse_tool_calls` /
:class:`ToolCallStreamParser` on the generated text, which must keep the markers (DeepSeek's
tokenizer does not mark them special, so the default decoding keeps them, as vLLM's and SGLang's
DeepSeek parsers rely on too).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .constraints import ConstraintError, check_response_format, json_schema_with_options
from .text import ChatTemplate, TextError, Tokenizer

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
V3, V31 = "deepseek_v3", "deepseek_v31"
TOOL_CALL_FORMATS = (V3, V31)
V3_FENCE_OPEN, V3_FENCE_CLOSE = "\n```json\n", "\n```"
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


class ToolCallError(ValueError):
    """Bad ``tools``/``tool_choice``, or a chat template that cannot render tool calls."""


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One function call: ``arguments`` is the JSON text the model wrote (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)
    complete: bool = True  # False: the output ended inside this call (e.g. max_tokens)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# -- tools and tool_choice -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any] | bool


def check_tools(tools: Any) -> list[Tool]:
    """OpenAI's ``tools`` list checked: ``[{"type": "function", "function": {"name", "description"?,
    "parameters"?}}]``; raises :class:`ToolCallError` naming the bad entry."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ToolCallError("tools must be a non-empty list of {'type': 'function', 'function': {...}}")
    out: list[Tool] = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(t.get("function"), dict)
        ):
            raise ToolCallError(f"{where} must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ToolCallError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r:.80}")
        if any(x.name == name for x in out):
            raise ToolCallError(f"{where}: the function name {name!r} appears twice")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, (dict, bool)):
            raise ToolCallError(
                f"{where}.function.parameters must be a JSON Schema object, got {type(params).__name__}"
            )
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolCallError(f"{where}.function.description must be a string")
        out.append(Tool(name, description, params))
    return out


def resolve_tool_choice(tool_choice: Any, tools: Sequence[Tool]) -> str:
    """ "none", "auto", "required", or the name of the one function to call (from
    ``{"type": "function", "function": {"name": ...}}``); raises :class:`ToolCallError`."""
    if tool_choice is None:
        return "auto"
    if tool_choice in ("none", "auto", "required"):
        return tool_choice
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if not any(t.name == name for t in tools):
            known = ", ".join(t.name for t in tools)
            raise ToolCallError(f"tool_choice names the function {name!r:.80}, which is not in tools ({known})")
        return name
    raise ToolCallError(
        f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': ...}}}}, "
        f"got {tool_choice!r:.80}"
    )


# -- chat templates --------------------------------------------------------------------------------

_PROBE = "moeport_probe_function"


@dataclass(frozen=True)
class TemplateToolSupport:
    """What a chat template does with tools: the call ``format`` it renders (None: no tool calls at
    all) and whether it renders the ``tools`` definitions itself."""

    format: str | None
    renders_definitions: bool


def template_tool_support(template: ChatTemplate) -> TemplateToolSupport:
    """Render a probe conversation through ``template`` and see what comes out."""
    tool = {"type": "function", "function": {"name": _PROBE, "description": "probe", "parameters": {"type": "object"}}}
    call = {"id": "call_probe", "type": "function", "function": {"name": _PROBE, "arguments": '{"x": 1}'}}
    user = {"role": "user", "content": "hi"}
    fmt = None
    for content in (None, ""):  # DeepSeek's templates test `content is none`; others need a string
        try:
            text = template.render(
                [user, {"role": "assistant", "content": content, "tool_calls": [call]}],
                add_generation_prompt=False,
                tools=[tool],
            )
        except TextError:
            continue
        if CALL_BEGIN + "function" + SEP + _PROBE in text:
            fmt = V3
        elif CALL_BEGIN + _PROBE + SEP in text:
            fmt = V31
        break
    try:
        renders_definitions = _PROBE in template.render([user], add_generation_prompt=True, tools=[tool])
    except TextError:
        renders_definitions = False
    return TemplateToolSupport(fmt, renders_definitions)


def tool_call_format(tokenizer: Tokenizer, parser: str | None = None) -> str:
    """The tool-call format to use with ``tokenizer``'s chat template (``parser`` overrides the
    detection, like ``--tool-call-parser``); raises :class:`ToolCallError` when there is none."""
    if parser is not None:
        if parser not in TOOL_CALL_FORMATS:
            raise ToolCallError(f"unknown tool-call parser {parser!r:.60} (one of {', '.join(TOOL_CALL_FORMATS)})")
        return parser
    if tokenizer.chat_template is None:
        raise ToolCallError("tools need a chat template, and this model has none")
    fmt = template_tool_support(tokenizer.chat_template).format
    if fmt is None:
        raise ToolCallError(
            "the model's chat template has no tool support (it renders no DeepSeek tool calls); use a template "
            f"that does, or name the format with a tool-call parser ({', '.join(TOOL_CALL_FORMATS)})"
        )
    return fmt


def tools_system_prompt(tools: Sequence[Tool], fmt: str) -> str:
    """The tool definitions as DeepSeek's model cards describe them, for templates that leave them out."""
    parts = ["## Tools\nYou have access to the following tools:\n"]
    for t in tools:
        parts.append(f"\n### {t.name}\nDescription: {t.description}\n\nParameters: {json.dumps(t.parameters)}\n")
    if fmt == V3:
        shape = (
            f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}tool_call_name{V3_FENCE_OPEN}tool_call_arguments{V3_FENCE_CLOSE}"
            f"{CALL_END}{{{{additional_tool_calls}}}}{CALLS_END}"
        )
        chain = "- For multiple tool calls, put each on its own line"
    else:
        call = f"{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}"
        shape = f"{CALLS_BEGIN}{call}{{{{additional_tool_calls}}}}{CALLS_END}"
        chain = "- For multiple tool calls, chain them directly without separators or spaces"
    parts.append(
        f"\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n{shape}\n\nWhere:\n\n"
        "- `tool_call_name` must be an exact match to one of the available tools\n"
        "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
        f"{chain}\n"
    )
    return "".join(parts)


def _chat_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages in the shape DeepSeek's templates expect: every message has ``content`` (None
    for an assistant turn that only calls tools), arguments as JSON text, text parts joined."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ToolCallError(f"each message must be an object, got {type(m).__name__}")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        m["content"] = content
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {}) if isinstance(c, dict) else {}
                if not isinstance(fn.get("arguments", ""), str):
                    fn["arguments"] = json.dumps(fn["arguments"], ensure_ascii=False)
                calls.append({**c, "type": c.get("type", "function"), "function": fn})
            m["tool_calls"] = calls
        elif m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: Any = None,
    add_generation_prompt: bool = True,
    parser: str | None = None,
    **template_kwargs: Any,
) -> str:
    """``messages`` (OpenAI's shapes, with assistant ``tool_calls`` and ``tool`` results) rendered by
    the model's chat template; with ``tools``, a template that does not render their definitions gets
    them in the system prompt. Raises :class:`ToolCallError` for tools without tool support."""
    template = tokenizer.chat_template
    if template is None:
        raise ToolCallError("this model has no chat template")
    msgs = _chat_messages(messages)
    if tools:
        checked = check_tools(tools)
        support = template_tool_support(template)
        fmt = tool_call_format(tokenizer, parser)
        if not support.renders_definitions:
            text = tools_system_prompt(checked, fmt)
            if msgs and msgs[0].get("role") == "system":
                msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{text}"}
            else:
                msgs.insert(0, {"role": "system", "content": text})
        template_kwargs["tools"] = list(tools)
    return template.render(msgs, add_generation_prompt=add_generation_prompt, **template_kwargs)


# -- rendering and parsing calls -------------------------------------------------------------------


def render_tool_calls(calls: Sequence[ToolCall], fmt: str) -> str:
    """The text a model writes for ``calls`` in ``fmt`` (as DeepSeek's templates render them)."""
    if fmt == V3:
        body = "\n".join(
            f"{CALL_BEGIN}function{SEP}{c.name}{V3_FENCE_OPEN}{c.arguments}{V3_FENCE_CLOSE}{CALL_END}" for c in calls
        )
    elif fmt == V31:
        body = "".join(f"{CALL_BEGIN}{c.name}{SEP}{c.arguments}{CALL_END}" for c in calls)
    else:
        raise ToolCallError(f"unknown tool-call format {fmt!r:.60}")
    return f"{CALLS_BEGIN}{body}{CALLS_END}"


@dataclass
class StreamDelta:
    """One piece of streamed output: ``content`` text, or one ``tool_call`` item of OpenAI's
    ``delta.tool_calls`` (``{"index", "id", "type", "function": {"name", "arguments"}}`` first, then
    ``{"index", "function": {"arguments": piece}}``)."""

    content: str | None = None
    tool_call: dict[str, Any] | None = None


def _held_prefix(buf: str, markers: Sequence[str]) -> int:
    """How many chars at the end of ``buf`` could start one of ``markers`` (held back until known)."""
    hold = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(buf)), hold, -1):
            if buf.endswith(m[:k]):
                hold = k
                break
    return hold


class ToolCallStreamParser:
    """Splits generated text into content and tool calls as it streams in: :meth:`feed` each text
    delta, :meth:`finish` at the end; :attr:`calls` holds the calls so far."""

    MAX_HEADER = 512  # a call header (type, name) longer than this is not a call header

    def __init__(self, fmt: str, make_id: Callable[[], str] = new_call_id):
        if fmt not in TOOL_CALL_FORMATS:
            raise ToolCallError(f"unknown tool-call format {fmt!r:.60} (one of {', '.join(TOOL_CALL_FORMATS)})")
        self.fmt = fmt
        self.make_id = make_id
        self.state = "content"  # content | block | header | args | after
        self.buf = ""
        self.calls: list[ToolCall] = []
        self.content_parts: list[str] = []
        self._args_started = False
        ends = [CALL_END, CALLS_END]
        self._arg_ends = [V3_FENCE_CLOSE + CALL_END, "```" + CALL_END, *ends] if fmt == V3 else ends

    def feed(self, text: str) -> list[StreamDelta]:
        self.buf += text
        out: list[StreamDelta] = []
        while self.buf and self._step(out):
            pass
        return _merged(out)

    def finish(self) -> list[StreamDelta]:
        """The held-back tail: content, or the arguments of a call the output ended inside."""
        out: list[StreamDelta] = []
        rest, self.buf = self.buf, ""
        if self.state in ("content", "after"):
            self._content(out, rest)
        elif self.state == "args":
            self._args(out, rest)
            self.calls[-1].complete = False
        elif self.state == "header" and rest.strip():
            self._content(out, CALL_BEGIN + rest)  # never became a call: keep the text
        return _merged(out)

    # one transition; False when more text is needed
    def _step(self, out: list[StreamDelta]) -> bool:
        buf = self.buf
        if self.state in ("content", "after"):
            starts = [i for i in (buf.find(CALLS_BEGIN), buf.find(CALL_BEGIN)) if i >= 0]
            if self.state == "after" or not starts:
                hold = 0 if self.state == "after" else _held_prefix(buf, (CALLS_BEGIN, CALL_BEGIN))
                self._content(out, buf[: len(buf) - hold])
                self.buf = buf[len(buf) - hold :]
                return False
            at = min(starts)
            self._content(out, buf[:at])
            if buf.startswith(CALLS_BEGIN, at):
                self.buf, self.state = buf[at + len(CALLS_BEGIN) :], "block"
            else:  # a call without the block marker: take it all the same
                self.buf, self.state = buf[at + len(CALL_BEGIN) :], "header"
            return True
        if self.state == "block":
            body = buf.lstrip()
            if body.startswith(CALL_BEGIN):
                self.buf, self.state = body[len(CALL_BEGIN) :], "header"
                return True
            if body.startswith(CALLS_END):
                self.buf, self.state = body[len(CALLS_END) :], "after"
                return True
            if CALL_BEGIN.startswith(body) or CALLS_END.startswith(body):
                self.buf = body
                return False  # a marker may be arriving
            self.state = "content"  # stray text inside the block: keep it as content
            return True
        if self.state == "header":
            return self._header(out)
        return self._arguments(out)

    def _header(self, out: list[StreamDelta]) -> bool:
        buf = self.buf
        sep = buf.find(SEP)
        if sep < 0:
            if len(buf) > self.MAX_HEADER:
                self.state, self.buf = "content", CALL_BEGIN + buf
                return True
            return False
        if self.fmt == V31:
            name, rest = buf[:sep].strip(), buf[sep + len(SEP) :]
        else:  # "function<sep>NAME\n```json\n"
            after = buf[sep + len(SEP) :]
            newline = after.find("\n")
            if newline < 0:
                if len(after) > self.MAX_HEADER:
                    self.state, self.buf = "content", CALL_BEGIN + buf
                    return True
                return False
            name, rest = after[:newline].strip(), after[newline:]
            fence = V3_FENCE_OPEN
            if rest.startswith(fence):
                rest = rest[len(fence) :]
            elif fence.startswith(rest):
                return False  # the fence is still arriving
        call = ToolCall(name=name, arguments="", id=self.make_id())
        self.calls.append(call)
        index = len(self.calls) - 1
        out.append(
            StreamDelta(
                tool_call={
                    "index": index,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            )
        )
        self.buf, self.state, self._args_started = rest, "args", False
        return True

    def _arguments(self, out: list[StreamDelta]) -> bool:
        buf = self.buf
        found = [(i, m) for m in self._arg_ends if (i := buf.find(m)) >= 0]
        if found:
            at, marker = min(found, key=lambda x: (x[0], -len(x[1])))
            self._args(out, buf[:at])
            self.buf = buf[at + len(marker) :]
            self.state = "after" if marker == CALLS_END else "block"
            return True
        hold = _held_prefix(buf, self._arg_ends)
        self._args(out, buf[: len(buf) - hold])
        self.buf = buf[len(buf) - hold :]
        return False

    def _args(self, out: list[StreamDelta], text: str) -> None:
        if not self._args_started:
            text = text.lstrip()
        if not text:
            return
        self._args_started = True
        self.calls[-1].arguments += text
        out.append(StreamDelta(tool_call={"index": len(self.calls) - 1, "function": {"arguments": text}}))

    def _content(self, out: list[StreamDelta], text: str) -> None:
        if text:
            self.content_parts.append(text)
            out.append(StreamDelta(content=text))

    @property
    def content(self) -> str:
        return "".join(self.content_parts)


def _merged(deltas: list[StreamDelta]) -> list[StreamDelta]:
    """Adjacent pieces of the same kind joined (content with content, one call's arguments)."""
    out: list[StreamDelta] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev is not None and d.content is not None and prev.content is not None:
            prev.content += d.content
        elif (
            prev is not None
            and d.tool_call is not None
            and prev.tool_call is not None
            and set(d.tool_call) == {"index", "function"}
            and prev.tool_call["index"] == d.tool_call["index"]
        ):
            prev.tool_call["function"]["arguments"] += d.tool_call["function"]["arguments"]
        else:
            out.append(d)
    return out


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall]


def parse_tool_calls(text: str, fmt: str, make_id: Callable[[], str] = new_call_id) -> ParsedOutput:
    """Split a whole output into its content (stripped) and tool calls; the same result as streaming it."""
    parser = ToolCallStreamParser(fmt, make_id)
    parser.feed(text)
    parser.finish()
    return ParsedOutput(parser.content.strip(), parser.calls)


# -- constraining the call -------------------------------------------------------------------------


def _lark_literal(text: str, token_id: Callable[[str], int | None] | None) -> str:
    """A marker as one token when the vocabulary has it (``<[id]>``), else as a string literal."""
    tid = token_id(text) if token_id is not None else None
    return f"<[{tid}]>" if tid is not None else json.dumps(text, ensure_ascii=False)


def tool_call_grammar(
    tools: Sequence[Tool],
    names: Sequence[str],
    fmt: str,
    token_id: Callable[[str], int | None] | None = None,
    max_calls: int = 1,
) -> str:
    """A lark grammar (llguidance's dialect) for 1..``max_calls`` calls of the functions ``names`` in
    ``fmt``, each call's arguments constrained by that function's ``parameters`` schema."""
    if fmt not in TOOL_CALL_FORMATS:
        raise ToolCallError(f"unknown tool-call format {fmt!r:.60}")
    by_name = {t.name: t for t in tools}
    lit = {m: _lark_literal(m, token_id) for m in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)}
    rules = []
    for i, name in enumerate(names):
        schema = json.dumps(json_schema_with_options(by_name[name].parameters), ensure_ascii=False)
        if fmt == V3:
            head = f'{lit[CALL_BEGIN]} "function" {lit[SEP]} {json.dumps(name + V3_FENCE_OPEN)}'
            rules.append(f"call_{i}: {head} %json {schema} {json.dumps(V3_FENCE_CLOSE)} {lit[CALL_END]}")
        else:
            rules.append(f"call_{i}: {lit[CALL_BEGIN]} {json.dumps(name)} {lit[SEP]} %json {schema} {lit[CALL_END]}")
    alternatives = " | ".join(f"call_{i}" for i in range(len(names)))
    more = f' ("\\n" call){{0,{max_calls - 1}}}' if fmt == V3 else f" call{{0,{max_calls - 1}}}"
    start = f"start: {lit[CALLS_BEGIN]} call{more if max_calls > 1 else ''} {lit[CALLS_END]}"
    return "\n".join([start, f"call: {alternatives}", *rules]) + "\n"


def tool_call_response_format(
    tools: Any,
    tool_choice: Any,
    fmt: str,
    tokenizer: Tokenizer | None = None,
    parallel_tool_calls: bool = True,
    max_calls: int = 8,
) -> dict[str, Any] | None:
    """The ``response_format`` that forces the tool call(s) ``tool_choice`` asks for ("required": one
    or more calls of any tool, at most ``max_calls``, or one with ``parallel_tool_calls=False``; a named
    function: one call of it), None for "auto"/"none". ``tokenizer`` lets the markers be single tokens."""
    checked = check_tools(tools)
    choice = resolve_tool_choice(tool_choice, checked)
    if choice in ("auto", "none"):
        return None
    if not isinstance(max_calls, int) or max_calls < 1:
        raise ToolCallError(f"max_calls must be >= 1, got {max_calls!r}")
    names = [t.name for t in checked] if choice == "required" else [choice]
    for i, t in enumerate(checked):
        if t.name in names:  # each schema on its own, so that the error names its tool
            try:
                check_response_format({"type": "json_schema", "json_schema": {"name": t.name, "schema": t.parameters}})
            except ConstraintError as exc:
                raise ToolCallError(f"tools[{i}].function.parameters: {exc}") from None
    count = max_calls if choice == "required" and parallel_tool_calls else 1
    token_id = tokenizer.token_id if tokenizer is not None else None
    return {"type": "grammar", "grammar": tool_call_grammar(checked, names, fmt, token_id, count)}
