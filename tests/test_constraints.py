"""Constrained decoding: random-weight models write schema-valid JSON because the grammar leaves them
no other choice; reasoning stays free; other requests in the batch are untouched; bad formats fail early."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner

from moeport.exporter import export
from moeport.runtime import ConstraintError, load
from moeport.runtime.constraints import ConstraintCompiler, check_response_format, compiler_for
from moeport.tools.cli import main

# Every string and array is bounded and no object takes extra properties: the grammar is finite, so
# every output completes (an unbounded one may run into max_new_tokens, as with any engine).
SCHEMAS = {
    "nested_objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "address": {
                        "type": "object",
                        "properties": {
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                            "city": {"enum": ["A", "B"]},
                        },
                        "required": ["zip", "city"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 1,
        "maxItems": 5,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["age", "score", "ratio"],
        "additionalProperties": False,
    },
    "required_and_optional": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 1000},
            "ok": {"type": "boolean"},
            "note": {"type": ["string", "null"], "maxLength": 4},
        },
        "required": ["id", "ok"],
        "additionalProperties": False,
    },
}
RUNS = [{"temperature": 0.0}] + [{"temperature": 1.0, "seed": s} for s in range(3)]


def json_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def model(text_artifact):
    return load(text_artifact)


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    return load(export("zoo:tiny-reasoner", tmp_path_factory.mktemp("reasoner") / "art"))


# -- validity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_weights_write_schema_valid_json_greedy_and_sampled(model, name):
    schema = SCHEMAS[name]
    for run in RUNS:
        out = model.session().generate(
            "Reply in JSON.", max_new_tokens=300, response_format=json_format(name, schema), **run
        )
        assert out.finish_reason == "stop", (run, out.text)  # the grammar completed and ended the request
        jsonschema.validate(json.loads(out.text), schema)
        assert out.tokens[-1] not in model.eos_token_ids  # ended by the grammar, not by an EOS


def test_without_the_constraint_the_same_model_writes_no_json(model):
    """The control: the validity above is the constraint's doing."""
    for run in RUNS:
        text = model.session().generate("Reply in JSON.", max_new_tokens=60, **run).text
        with pytest.raises(ValueError):
            json.loads(text)


def test_json_object_gives_an_object_whenever_it_completes(model):
    outs = [
        model.session().generate(
            "{", max_new_tokens=400, temperature=1.0, seed=s, response_format={"type": "json_object"}
        )
        for s in range(6)
    ]
    done = [o for o in outs if o.finish_reason == "stop"]
    assert done, [o.finish_reason for o in outs]
    for o in done:
        assert isinstance(json.loads(o.text), dict)
    for o in outs:
        assert o.finish_reason in ("stop", "length")  # no free-form schema bounds its length


def test_regex_and_lark_grammar(model):
    for seed in range(4):
        out = model.session().generate(
            "id:",
            max_new_tokens=40,
            temperature=1.0,
            seed=seed,
            response_format={"type": "regex", "regex": r"[A-Z]{2}-\d{3}"},
        )
        assert re.fullmatch(r"[A-Z]{2}-\d{3}", out.text) and out.finish_reason == "stop"
    lark = 'start: answer " " ("yes" | "no")\nanswer: "answer:"'
    out = model.session().generate(
        "?", max_new_tokens=40, temperature=1.0, seed=0, response_format={"type": "grammar", "grammar": lark}
    )
    assert out.text in ("answer: yes", "answer: no")


def test_a_completed_grammar_keeps_text_held_back_for_a_stop_string(model):
    """A tail that could start a stop string is held back; when the grammar ends the request it is output."""
    rf = {"type": "regex", "regex": r"[a-z]{3}\}"}
    out = model.session().generate("x", max_new_tokens=10, stop=["}!"], response_format=rf)
    assert re.fullmatch(r"[a-z]{3}\}", out.text) and out.content == out.text and out.finish_reason == "stop"


def test_greedy_constrained_output_is_the_best_allowed_token_each_step(model):
    """The mask only removes tokens: greedy picks the highest logit among those the grammar allows."""
    rf = {"type": "regex", "regex": "[a-z]{6}"}
    out = model.session().generate("x", max_new_tokens=10, response_format=rf)
    session = model.session()
    logits = session.prefill(model.tokenizer.encode("x"))
    for token in out.tokens:
        letters = [model.tokenizer.token_id(c) for c in "abcdefghijklmnopqrstuvwxyz"]
        assert token == letters[int(np.argmax(logits[letters]))]
        logits = session.step(token)


# -- batching ------------------------------------------------------------------------------------------


def test_a_batch_mixes_constrained_and_free_requests_without_changing_the_free_ones(model):
    prompts = ["hello", "world wide", "abc", "json please"]
    schema = SCHEMAS["bounded_numbers"]
    free_alone = [
        model.session().generate(p, max_new_tokens=24, temperature=0.8, seed=i).tokens for i, p in enumerate(prompts)
    ]
    constrained_alone = [
        model.session()
        .generate(p, max_new_tokens=200, temperature=0.8, seed=i, response_format=json_format("n", schema))
        .tokens
        for i, p in enumerate(prompts)
    ]
    gen = model.batch(max_batch=8)
    pairs = []
    for i, p in enumerate(prompts):
        free = gen.submit(model.session(), p, max_new_tokens=24, temperature=0.8, seed=i)
        constrained = gen.submit(
            model.session(), p, max_new_tokens=200, temperature=0.8, seed=i, response_format=json_format("n", schema)
        )
        pairs.append((free, constrained))
    gen.run()
    for i, (free, constrained) in enumerate(pairs):
        assert free.result().tokens == free_alone[i]
        assert constrained.result().tokens == constrained_alone[i]
        jsonschema.validate(json.loads(constrained.result().text), schema)


def test_masks_computed_inline_or_in_the_worker_give_the_same_tokens(model):
    compiler = compiler_for(model)
    rf = json_format("n", SCHEMAS["nested_objects"])
    assert not compiler.overlap
    inline = model.session().generate("q", max_new_tokens=200, temperature=1.0, seed=7, response_format=rf).tokens
    compiler.overlap = True
    try:
        gen = model.batch()
        reqs = [gen.submit(model.session(), "q", max_new_tokens=200, temperature=1.0, seed=7, response_format=rf)]
        reqs.append(gen.submit(model.session(), "q", max_new_tokens=30, temperature=1.0, seed=8))
        gen.run()
        overlapped = reqs[0].result().tokens
    finally:
        compiler.overlap = False
    assert overlapped == inline


def test_streaming_a_constrained_request(model):
    rf = json_format("n", SCHEMAS["array_of_enums"])
    deltas = list(model.session().stream("colors", max_new_tokens=100, temperature=1.0, seed=3, response_format=rf))
    text = "".join(d.text for d in deltas)
    assert all(d.part == "content" for d in deltas)
    jsonschema.validate(json.loads(text), SCHEMAS["array_of_enums"])


# -- reasoning -----------------------------------------------------------------------------------------


def test_reasoning_is_free_and_the_answer_is_constrained(reasoner):
    ids = reasoner.chat_ids([{"role": "user", "content": "347+58"}])
    free = reasoner.session().generate(ids, max_new_tokens=100)
    assert free.reasoning and free.content == "405"
    # an answer the model gives anyway: the whole output is unchanged
    fits = json_format("sum", {"type": "integer", "minimum": 0, "maximum": 1998})
    same = reasoner.session().generate(ids, max_new_tokens=100, response_format=fits)
    assert same.reasoning == free.reasoning and same.content == "405" and same.finish_reason == "stop"
    # an answer it would not give: the reasoning is the same tokens, the answer obeys the schema
    schema = {"type": "integer", "minimum": 1000, "maximum": 1999}
    forced = reasoner.session().generate(ids, max_new_tokens=100, response_format=json_format("big", schema))
    think_end = free.tokens.index(reasoner.tokenizer.token_id("</think>")) + 1
    assert forced.tokens[:think_end] == free.tokens[:think_end]
    jsonschema.validate(json.loads(forced.content), schema)


def test_a_prompt_that_opens_think_starts_unconstrained(reasoner):
    think = reasoner.tokenizer.token_id("<think>")
    ids = [*reasoner.chat_ids([{"role": "user", "content": "120-7"}]), think]
    free = reasoner.session().generate(ids, max_new_tokens=100)
    constrained = reasoner.session().generate(
        ids, max_new_tokens=100, response_format={"type": "regex", "regex": "-?[0-9]+"}
    )
    assert free.reasoning and constrained.reasoning == free.reasoning
    assert constrained.content == free.content == "113"


def test_a_think_close_spread_over_byte_tokens_opens_the_answer(model):
    """Byte-level vocabulary: no </think> token; the tag is found in the bytes."""
    compiler = compiler_for(model)
    tok = model.tokenizer
    c = compiler.start({"type": "regex", "regex": "[0-9]+"}, in_reasoning=True)
    logits = np.zeros(model.vocab_size, np.float32)
    for t in tok.encode("let me see </think>", add_special_tokens=False):
        assert c.mask_logits(logits) is logits  # reasoning: nothing masked
        assert not c.advance(t)
    allowed = np.isfinite(c.mask_logits(logits))
    digits = {tok.token_id(d) for d in "0123456789"}
    whitespace = {tok.encode(w, add_special_tokens=False)[0] for w in " \t\r\n"}  # may come before the answer
    assert set(np.flatnonzero(allowed)) == digits | whitespace


# -- compiling once ------------------------------------------------------------------------------------


def test_compiled_constraints_are_cached_and_reusable(model):
    compiler = compiler_for(model)
    rf = json_format("n", SCHEMAS["bounded_numbers"])
    first = compiler.compile(rf)
    assert compiler.compile(json.loads(json.dumps(rf))) is first  # equal formats share one compiled grammar
    out = model.session().generate("x", max_new_tokens=100, response_format=first)  # a compiled one is accepted too
    jsonschema.validate(json.loads(out.text), SCHEMAS["bounded_numbers"])


def test_the_cache_is_bounded(text_artifact):
    tokenizer_json = (Path(text_artifact) / "tokenizer.json").read_text()
    compiler = ConstraintCompiler(tokenizer_json, 258, [257], cache_size=2)
    a, b, c = ({"type": "regex", "regex": f"{x}+"} for x in "abc")
    ca = compiler.compile(a)
    compiler.compile(b)
    compiler.compile(c)
    assert len(compiler._cache) == 2 and compiler.compile(a) is not ca


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response_format, message",
    [
        ("json", "response_format must be an object"),
        ({"type": "xml"}, "type 'xml' is not supported"),
        ({"type": "json_schema"}, "needs 'json_schema'"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a 'schema'"),
        ({"type": "json_schema", "json_schema": {"name": 5, "schema": {}}}, "name must be a string"),
        ({"type": "json_schema", "json_schema": {"schema": "{not json"}}, "is not valid JSON"),
        ({"type": "json_schema", "json_schema": {"schema": 5}}, "must be a JSON Schema"),
        ({"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "nope"}}}, "'t' cannot be compiled"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "weird"}}}, "Unknown format"),
        ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/defs/missing"}}}, "cannot be compiled"),
        ({"type": "regex", "regex": "(unclosed"}, "regex cannot be compiled"),
        ({"type": "regex"}, "needs a non-empty string 'regex'"),
        ({"type": "grammar", "grammar": "start: undefined_rule"}, "grammar cannot be compiled"),
    ],
)
def test_bad_formats_are_refused_at_submit_and_nothing_runs(model, response_format, message):
    gen = model.batch()
    session = model.session()
    with pytest.raises(ConstraintError, match=re.escape(message)):
        gen.submit(session, "hi", max_new_tokens=5, response_format=response_format)
    assert not gen.busy and not session.generating and session.position == 0
    assert model.session().generate("hi", max_new_tokens=3).tokens  # the model is fine


def test_the_check_without_a_tokenizer_finds_the_same_errors():
    with pytest.raises(ConstraintError, match="Invalid type: nope"):
        check_response_format({"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}})
    assert check_response_format({"type": "text"}) is None


def test_a_model_without_a_tokenizer_refuses_response_format(tiny_artifact):
    with pytest.raises(ConstraintError, match="has no tokenizer.json"):
        load(tiny_artifact).session().generate([1, 2, 3], max_new_tokens=2, response_format={"type": "json_object"})


def test_text_format_means_no_constraint(model):
    plain = model.session().generate("hi", max_new_tokens=8, temperature=0.0).tokens
    assert (
        model.session().generate("hi", max_new_tokens=8, temperature=0.0, response_format={"type": "text"}).tokens
        == plain
    )


# -- command line --------------------------------------------------------------------------------------


def test_cli_json_schema_prints_valid_json(text_artifact, tmp_path):
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMAS["nested_objects"]))
    r = CliRunner().invoke(
        main, ["run", str(text_artifact), "--prompt", "hi", "--json-schema", str(schema_file), "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    jsonschema.validate(json.loads(out["content"]), SCHEMAS["nested_objects"])
    r = CliRunner().invoke(main, ["run", str(text_artifact), "--prompt", "hi", "--json-schema", str(schema_file)])
    jsonschema.validate(json.loads(r.stdout.strip()), SCHEMAS["nested_objects"])  # streamed: just the content


def test_cli_regex_and_the_reasoner(reasoner):
    r = CliRunner().invoke(
        main, ["run", str(reasoner.artifact.directory), "--prompt", "347+58", "--chat", "--regex", "[0-9]+", "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["content"] == "405" and out["reasoning"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"type": "object",', "not a JSON file"),
        ('{"type": "nope"}', "cannot be compiled: Invalid type: nope"),
        ("[1, 2]", "must be a JSON Schema"),
    ],
)
def test_cli_bad_schema_file_is_one_line(text_artifact, tmp_path, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    r = CliRunner().invoke(main, ["run", str(text_artifact), "--prompt", "hi", "--json-schema", str(bad)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0] and "bad.json" in lines[0]


def test_cli_refuses_both_flags(text_artifact, tmp_path):
    f = tmp_path / "s.json"
    f.write_text("{}")
    r = CliRunner().invoke(main, ["run", str(text_artifact), "--prompt", "hi", "--json-schema", str(f), "--regex", "a"])
    assert r.exit_code == 2 and "at most one of --json-schema and --regex" in r.output
