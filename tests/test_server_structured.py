"""Structured output and tool calls through the server, driven by the official `openai` client: JSON
schemas hold on random weights (only the constraint can make them valid), forced tool calls in both
DeepSeek formats come back as `message.tool_calls` / streamed `delta.tool_calls`, and a tool result sent
back as a `tool` message is rendered by the model's own chat template."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from conftest import byte_model  # noqa: E402
from test_server import TIMEOUT, assert_error, serving  # noqa: E402
from test_tool_calls import DATA, PARAMETERS, TEMPLATES, TOOLS  # noqa: E402

from moeport.runtime import load  # noqa: E402
from moeport.runtime.tool_calls import V3, V31, render_chat, render_tool_calls  # noqa: E402

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer", "minimum": 0}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["user", "ok"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 1,
        "maxItems": 4,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "x": {"type": "number", "minimum": -1, "maximum": 1},
            "n": {"type": "integer", "minimum": 3, "maximum": 7},
        },
        "required": ["x", "n"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module", params=[V3, V31])
def tool_model(request, tmp_path_factory):
    # 4096 positions: the tool definitions are long, byte by byte
    template = (DATA / TEMPLATES[request.param]).read_text()
    art = byte_model(tmp_path_factory.mktemp(request.param), 5, template, max_position_embeddings=4096)
    return request.param, load(art)


@pytest.fixture(scope="module")
def plain_model(text_artifact):
    return load(text_artifact)


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def test_json_schemas_hold_on_random_weights_streamed_or_not(plain_model):
    """Every request's answer parses and validates; the same model writes no JSON without the constraint."""
    valid = total = 0
    with serving(plain_model) as server:
        client = server.client()
        for name in SCHEMAS:
            for run in [{"temperature": 0.0}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.0, "seed": 2}]:
                kwargs = dict(
                    model=server.name,
                    messages=[{"role": "user", "content": f"give me {name}"}],
                    response_format=_schema_format(name),
                    max_tokens=200,
                    **run,
                )
                whole = client.chat.completions.create(**kwargs).choices[0]
                chunks = client.chat.completions.create(stream=True, **kwargs)
                streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                for text in (whole.message.content, streamed):
                    total += 1
                    jsonschema.validate(json.loads(text), SCHEMAS[name])
                    valid += 1
                assert whole.finish_reason == "stop" and streamed == whole.message.content
        free = client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "give me nested"}], max_tokens=60, temperature=0
        )
        with pytest.raises(ValueError):
            json.loads(free.choices[0].message.content)
    assert valid == total == 18


def test_json_object_and_a_constrained_request_batched_with_free_ones(plain_model):
    """Free requests running in the same batch as a constrained one keep their lone-run tokens."""
    tok = plain_model.tokenizer
    prompts = ["alpha", "beta", "gamma"]
    want = [plain_model.session().generate(tok.encode(p), max_new_tokens=40, ignore_eos=True).tokens for p in prompts]
    with serving(plain_model) as server:
        client = server.client()
        with ThreadPoolExecutor(4) as pool:
            free = [
                pool.submit(
                    client.completions.create,
                    model=server.name,
                    prompt=p,
                    max_tokens=40,
                    temperature=0,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )
                for p in prompts
            ]
            obj = pool.submit(
                client.chat.completions.create,
                model=server.name,
                messages=[{"role": "user", "content": "an object please"}],
                response_format={"type": "json_object"},
                max_tokens=300,
                temperature=0,
            )
            got = [f.result(TIMEOUT).model_dump()["choices"][0]["token_ids"] for f in free]
            answer = obj.result(TIMEOUT).choices[0]
    assert got == want
    if answer.finish_reason == "stop":  # an object that completed within max_tokens must parse
        assert isinstance(json.loads(answer.message.content), dict)
    else:
        assert answer.finish_reason == "length" and answer.message.content.startswith("{")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_in_both_formats(tool_model, choice):
    fmt, model = tool_model
    with serving(model) as server:
        client = server.client()
        for run in [{"temperature": 0.0}, {"temperature": 1.0, "seed": 3}]:
            kwargs = dict(
                model=server.name,
                messages=[{"role": "user", "content": "Weather in Paris, and 1+2?"}],
                tools=TOOLS,
                tool_choice=choice,
                max_tokens=1500,  # "required" allows up to 8 parallel calls, ~60 byte tokens each
                **run,
            )
            whole = client.chat.completions.create(**kwargs).choices[0]
            assert whole.finish_reason == "tool_calls", whole
            calls = whole.message.tool_calls
            assert calls and whole.message.content is None
            for call in calls:
                assert call.type == "function" and call.id.startswith("call_")
                jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
            if isinstance(choice, dict):
                assert [c.function.name for c in calls] == ["add"]
            # streamed: delta.tool_calls pieces assemble into the same calls
            assembled: dict[int, dict] = {}
            finish = None
            for chunk in client.chat.completions.create(stream=True, **kwargs):
                if not chunk.choices:
                    continue
                c = chunk.choices[0]
                finish = c.finish_reason or finish
                assert not c.delta.content
                for piece in c.delta.tool_calls or []:
                    slot = assembled.setdefault(piece.index, {"name": "", "arguments": ""})
                    if piece.function.name:
                        slot["name"] = piece.function.name
                    slot["arguments"] += piece.function.arguments or ""
            assert finish == "tool_calls"
            assert [(v["name"], v["arguments"]) for _, v in sorted(assembled.items())] == [
                (c.function.name, c.function.arguments) for c in calls
            ]
        single = client.chat.completions.create(**{**kwargs, "parallel_tool_calls": False}).choices[0]
        assert single.finish_reason == "tool_calls" and len(single.message.tool_calls) == 1


def test_a_tool_result_goes_back_and_the_model_answers(tool_model):
    """call -> `tool` message with its tool_call_id -> answer, rendered by the model's own template: the
    prompt the server built is exactly the template's rendering (its token count says so)."""
    fmt, model = tool_model
    tok = model.tokenizer
    with serving(model) as server:
        client = server.client()
        messages = [{"role": "user", "content": "What is 1+2?"}]
        first = client.chat.completions.create(
            model=server.name,
            messages=messages,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
            max_tokens=300,
            temperature=0,
        )
        call = first.choices[0].message.tool_calls[0]
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "3"},
        ]
        answer = client.chat.completions.create(
            model=server.name, messages=messages, tools=TOOLS, max_tokens=8, temperature=0
        )
    rendered = render_chat(tok, messages, TOOLS, parser=fmt)
    from moeport.runtime.tool_calls import ToolCall

    again = ToolCall(call.function.name, call.function.arguments, call.id)
    assert render_tool_calls([again], fmt) in rendered and "3" in rendered
    assert answer.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_structured_output_errors_are_400s_naming_the_field(plain_model, tool_model):
    fmt, model = tool_model
    with serving(plain_model) as server:
        ask = {"model": server.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
        assert_error(
            server.post("/v1/chat/completions", {**ask, "response_format": bad_schema}), 400, "response_format"
        )
        unknown = {"type": "xml"}
        assert_error(server.post("/v1/chat/completions", {**ask, "response_format": unknown}), 400, "response_format")
        # the plain model's template renders no tool calls
        err = assert_error(server.post("/v1/chat/completions", {**ask, "tools": TOOLS}), 400, "tools")
        assert "no tool support" in err["message"]
    with serving(model) as server:
        ask = {"model": server.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "tools": TOOLS}
        choice = {"type": "function", "function": {"name": "nosuch"}}
        assert_error(server.post("/v1/chat/completions", {**ask, "tool_choice": choice}), 400, "tool_choice")
        broken = [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]
        assert_error(server.post("/v1/chat/completions", {**ask, "tools": broken}), 400, "tools")
        both = {**ask, "tool_choice": "required", "response_format": {"type": "json_object"}}
        assert_error(server.post("/v1/chat/completions", both), 400, "response_format")
        assert server.client().chat.completions.create(**{k: v for k, v in ask.items() if k != "tools"}).choices
