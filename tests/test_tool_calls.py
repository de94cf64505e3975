"""DeepSeek tool calls: the format read off the chat template, rendering and parsing (whole and
streamed) in both forms, and forced calls whose arguments follow the tool's schema on random weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest
from conftest import write_byte_tokenizer

from moeport.runtime import load
from moeport.runtime.constraints import ConstraintCompiler
from moeport.runtime.text import Tokenizer
from moeport.runtime.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    V3,
    V31,
    ToolCall,
    ToolCallError,
    ToolCallStreamParser,
    check_tools,
    parse_tool_calls,
    render_chat,
    render_tool_calls,
    template_tool_support,
    tool_call_format,
    tool_call_grammar,
    tool_call_response_format,
)

DATA = Path(__file__).parent / "data"
TEMPLATES = {V3: "deepseek_v3_tool_template.jinja", V31: "deepseek_v31_tool_template.jinja"}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
CALLS = [ToolCall("get_weather", '{"city": "Paris", "unit": "celsius"}'), ToolCall("add", '{"a": 1, "b": 2}')]


def tokenizer_with(tmp_path: Path, template: str) -> Tokenizer:
    write_byte_tokenizer(tmp_path, chat_template=template)
    return Tokenizer(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")


@pytest.fixture(params=[V3, V31])
def fmt(request):
    return request.param


@pytest.fixture
def tok(fmt, tmp_path):
    return tokenizer_with(tmp_path, (DATA / TEMPLATES[fmt]).read_text())


@pytest.fixture(scope="module")
def model(text_artifact):
    return load(text_artifact)


def conversation(calls: list[ToolCall]) -> list[dict]:
    return [
        {"role": "user", "content": "Weather in Paris, and 1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": f"result of {c.name}"} for c in calls),
    ]


# -- the format of a template --------------------------------------------------------------------------


def test_the_format_is_read_off_the_template(fmt, tok):
    support = template_tool_support(tok.chat_template)
    assert support.format == fmt and not support.renders_definitions  # DeepSeek's templates leave tools out
    assert tool_call_format(tok) == fmt


def test_a_template_that_renders_the_definitions_gets_them_once(tmp_path):
    own = "{% for t in tools %}TOOL {{ t.function.name }}: {{ t.function.parameters | tojson }}\n{% endfor %}"
    tok = tokenizer_with(tmp_path, own + (DATA / TEMPLATES[V31]).read_text())
    assert template_tool_support(tok.chat_template).renders_definitions
    text = render_chat(tok, [{"role": "user", "content": "hi"}], TOOLS)
    assert text.count("get_weather") == 1 and "## Tools" not in text


def test_render_chat_adds_the_tool_definitions_to_the_system_prompt(fmt, tok):
    text = render_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], TOOLS)
    assert text.startswith("<bos>Be brief.\n\n## Tools\nYou have access to the following tools:\n")
    assert f"### add\nDescription: a + b\n\nParameters: {json.dumps(ADD)}\n" in text
    shape = f"{CALL_BEGIN}function{SEP}tool_call_name\n```json\n" if fmt == V3 else f"{CALL_BEGIN}tool_call_name{SEP}"
    assert shape in text
    assert text.endswith("<｜User｜>hi<｜Assistant｜><think>\n" if fmt == V3 else "<｜User｜>hi<｜Assistant｜></think>")


@pytest.mark.parametrize("template", ["deepseek_r1_chat_template.jinja", None])
def test_tools_with_a_template_without_tool_support_are_refused(tmp_path, template):
    source = (DATA / template).read_text() if template else "{% for m in messages %}{{ m.content }}{% endfor %}"
    tok = tokenizer_with(tmp_path, source)
    with pytest.raises(ToolCallError, match="chat template has no tool support"):
        render_chat(tok, [{"role": "user", "content": "hi"}], TOOLS)
    assert render_chat(tok, [{"role": "user", "content": "hi"}], TOOLS, parser=V31)  # unless the format is named
    with pytest.raises(ToolCallError, match="unknown tool-call parser 'hermes'"):
        tool_call_format(tok, "hermes")


# -- rendering and parsing -----------------------------------------------------------------------------


def test_the_template_renders_calls_as_render_tool_calls_does_and_they_parse_back(fmt, tok):
    text = render_chat(tok, conversation(CALLS), add_generation_prompt=False)
    assert render_tool_calls(CALLS, fmt) in text
    assert [(c.name, c.arguments) for c in parse_tool_calls(text, fmt).tool_calls] == [
        (c.name, c.arguments) for c in CALLS
    ]
    assert "result of get_weather" in text and "result of add" in text  # the tool results go back in


def stream(text: str, fmt: str, sizes: list[int]) -> tuple[str, dict[int, dict]]:
    """Feed ``text`` in pieces; the content and the calls put together from the deltas alone."""
    parser = ToolCallStreamParser(fmt)
    deltas, at = [], 0
    for n in sizes:
        deltas += parser.feed(text[at : at + n])
        at += n
    deltas += parser.feed(text[at:]) + parser.finish()
    content, calls = "", {}
    for d in deltas:
        assert (d.content is None) != (d.tool_call is None)
        if d.content is not None:
            content += d.content
            continue
        item = d.tool_call
        if item["index"] not in calls:  # the first delta of a call: OpenAI's full header
            assert set(item) == {"index", "id", "type", "function"} and item["type"] == "function"
            assert item["id"].startswith("call_") and item["function"]["name"]
            calls[item["index"]] = {"id": item["id"], "name": item["function"]["name"], "arguments": ""}
        else:
            assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
        calls[item["index"]]["arguments"] += item["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("chunking", ["whole", "chars", "random"])
def test_parse_and_stream_round_trip(fmt, chunking):
    text = "Let me check. " + render_tool_calls(CALLS, fmt)
    rng = random.Random(0)
    sizes = {"whole": [], "chars": [1] * len(text), "random": [rng.randint(1, 9) for _ in range(len(text))]}[chunking]
    content, calls = stream(text, fmt, sizes)
    assert content.strip() == "Let me check."
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [(c.name, c.arguments) for c in CALLS]
    whole = parse_tool_calls(text, fmt)
    assert whole.content == "Let me check." and all(c.complete for c in whole.tool_calls)
    assert [(c.name, c.arguments) for c in whole.tool_calls] == [(c.name, c.arguments) for c in CALLS]


def test_output_without_calls_is_all_content(fmt):
    for text in ["just text", "a < b and <｜tool", "x <｜tool▁calls▁begin｜ almost"]:
        assert parse_tool_calls(text, fmt).content == text and not parse_tool_calls(text, fmt).tool_calls
        assert stream(text, fmt, [1] * len(text)) == (text, {})


def test_an_output_cut_inside_a_call_gives_an_incomplete_call(fmt):
    text = render_tool_calls(CALLS[:1], fmt)
    cut = text[: text.index("Paris") + 3]
    parsed = parse_tool_calls(cut, fmt)
    assert [c.name for c in parsed.tool_calls] == ["get_weather"] and not parsed.tool_calls[0].complete
    assert parsed.tool_calls[0].arguments == '{"city": "Par'


def test_ids_are_unique_and_openai_shaped():
    calls = parse_tool_calls(render_tool_calls(CALLS, V31), V31).tool_calls
    assert len({c.id for c in calls}) == 2
    assert calls[0].to_openai() == {
        "id": calls[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": CALLS[0].arguments},
    }


# -- forced calls on random weights --------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls_parse_and_their_arguments_follow_the_schema(model, fmt, tok, choice):
    # the tool definitions (tested above) would not fit the tiny model's 512-token context byte by byte
    prompt = render_chat(tok, [{"role": "user", "content": "Weather in Paris, and 1+2?"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    rf = tool_call_response_format(TOOLS, choice, fmt, tok, max_calls=2)
    for run in [{"temperature": 0.0}, *({"temperature": 1.0, "seed": s} for s in range(3))]:
        deltas = list(model.session().stream(ids, max_new_tokens=440, response_format=rf, **run))
        text = "".join(d.text for d in deltas)
        parsed = parse_tool_calls(text, fmt)
        assert parsed.content == "" and 1 <= len(parsed.tool_calls) <= 2, text
        if isinstance(choice, dict):
            assert [c.name for c in parsed.tool_calls] == ["add"]
        for call in parsed.tool_calls:
            assert call.complete
            jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
        _, streamed = stream(text, fmt, [len(d.text) for d in deltas])  # as a server would stream it
        assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
            (c.name, c.arguments) for c in parsed.tool_calls
        ]


def test_a_call_its_result_and_the_answer(model, fmt, tok):
    """call -> tool result -> answer, each turn rendered by the model's own template."""
    messages = [{"role": "user", "content": "What is 1+2?"}]
    ids = tok.encode(render_chat(tok, messages), add_special_tokens=False)  # (no definitions: 512-token context)
    rf = tool_call_response_format(TOOLS, {"type": "function", "function": {"name": "add"}}, fmt, tok)
    call = parse_tool_calls(model.session().generate(ids, max_new_tokens=300, response_format=rf).text, fmt).tool_calls[
        0
    ]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
        {"role": "tool", "tool_call_id": call.id, "content": "3"},
    ]
    prompt = render_chat(tok, messages)
    assert render_tool_calls([call], fmt) in prompt and "<｜tool▁output▁begin｜>3<｜tool▁output▁end｜>" in prompt
    answer = model.session().generate(tok.encode(prompt, add_special_tokens=False), max_new_tokens=8)
    assert answer.tokens  # tool_choice "auto" for the answer: unconstrained
    assert tool_call_response_format(TOOLS, "auto", fmt, tok) is None
    assert tool_call_response_format(TOOLS, "none", fmt, tok) is None


def test_markers_that_are_tokens_are_forced_as_those_tokens(tmp_path):
    """DeepSeek's vocabulary has each marker as one token: the grammar asks for that token."""
    from tokenizers import Tokenizer as HFTokenizer

    write_byte_tokenizer(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.add_tokens([CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP])  # not special, as in DeepSeek's
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    grammar = tool_call_grammar(check_tools(TOOLS), ["add"], V31, tok.token_id)
    assert f"<[{tok.token_id(CALLS_BEGIN)}]>" in grammar and CALLS_BEGIN not in grammar
    compiler = ConstraintCompiler((tmp_path / "tokenizer.json").read_text(), hf.get_vocab_size(), [257])
    constraint = compiler.start({"type": "grammar", "grammar": grammar})
    ids = tok.encode(render_tool_calls([ToolCall("add", '{"a": 5, "b": 6}')], V31), add_special_tokens=False)
    assert ids[0] == tok.token_id(CALLS_BEGIN)
    assert [constraint.advance(t) for t in ids] == [False] * (len(ids) - 1) + [True]  # accepted, then complete


# -- bad tools -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tools, choice, message",
    [
        ([], "required", "tools must be a non-empty list"),
        ([{"type": "retrieval"}], "required", "tools[0] must be"),
        ([{"type": "function", "function": {"name": "has space"}}], "required", "tools[0].function.name must be"),
        (TOOLS + TOOLS[:1], "required", "tools[2]: the function name 'get_weather' appears twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "required", "must be a JSON Schema"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "names the function 'nope', which is not in tools"),
        (TOOLS, "sometimes", "tool_choice must be"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
            "required",
            "tools[0].function.parameters: json_schema 'f' cannot be compiled: Invalid type: nope",
        ),
    ],
)
def test_bad_tools_and_tool_choice(tools, choice, message):
    with pytest.raises(ToolCallError) as err:
        tool_call_response_format(tools, choice, V31)
    assert message in str(err.value)
