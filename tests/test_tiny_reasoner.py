"""The bundled tiny reasoning MoE (zoo:tiny-reasoner) through moeport, checked against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moeport.exporter import export
from moeport.models import zoo
from moeport.runtime import load
from moeport.tools.arithmetic import evaluate, heldout_problems, parse_answer
from moeport.tools.cli import main

ZOO = zoo.resolve("zoo:tiny-reasoner")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reasoner")
    out = {"fp32": export("zoo:tiny-reasoner", root / "fp32")}
    for w in ("int8", "int4"):
        out[w] = export("zoo:tiny-reasoner", root / w, weights=w, block_size=32)
    return out


@pytest.fixture(scope="module")
def fp32_eval(artifacts):
    return evaluate(load(artifacts["fp32"]), heldout_problems())


def test_the_bundled_model_is_small_and_complete():
    files = {p.name for p in ZOO.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "heldout.json",
    } <= files
    assert sum(p.stat().st_size for p in ZOO.iterdir()) <= 8 * 1024 * 1024
    cfg = json.loads((ZOO / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["n_group"] > cfg["topk_group"] and cfg["q_lora_rank"]


def test_heldout_accuracy_through_moeport(fp32_eval):
    assert len(fp32_eval.completions) == 200
    assert fp32_eval.accuracy >= 0.95, f"{fp32_eval.correct}/200"
    assert all(c.reasoning for c in fp32_eval.completions)  # every answer comes after a <think> trace


def test_greedy_tokens_equal_transformers(artifacts):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(ZOO, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ZOO)
    model = load(artifacts["fp32"])
    for problem in heldout_problems()[:5]:
        messages = [{"role": "user", "content": problem.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == model.chat_ids(messages)  # our template + tokenizer give transformers' ids
        with torch.inference_mode():
            want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64)[0, len(ids) :].tolist()
        got = model.session().generate(ids, max_new_tokens=64).tokens
        assert got == want


def test_chat_template_renders_like_transformers():
    from transformers import AutoTokenizer

    from moeport.runtime.text import Tokenizer

    hf = AutoTokenizer.from_pretrained(ZOO)
    ours = Tokenizer(ZOO / "tokenizer.json", ZOO / "tokenizer_config.json")
    conversations = [
        [{"role": "user", "content": "347+58"}],
        [
            {"role": "system", "content": "x"},
            {"role": "user", "content": "1+1"},
            {"role": "assistant", "content": "<think>\n001+001\n1+1+0=02\n</think>\n\n2"},
            {"role": "user", "content": "9-3"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, gen) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )


def test_run_chat_json_answers_with_a_reasoning_trace(artifacts):
    r = CliRunner().invoke(
        main, ["run", str(artifacts["fp32"]), "--prompt", "347+58", "--chat", "--temperature", "0", "--json"]
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["content"] == "405"
    assert "7+8" in out["reasoning"] and "</think>" not in out["reasoning"]
    assert out["finish_reason"] == "eos"


def test_stream_labels_reasoning_then_content(artifacts):
    model = load(artifacts["fp32"])
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "91-406"}])
    deltas = list(model.session().stream(prompt))
    parts = [d.part for d in deltas]
    assert parts[0] == "reasoning" and parts[-1] == "content"
    assert parts == sorted(parts, key=lambda p: p != "reasoning")  # all reasoning, then all content
    assert "".join(d.text for d in deltas if d.part == "content") == "-315"


@pytest.mark.parametrize("weights, min_agreement, max_drop", [("int8", 0.98, 0.02), ("int4", 0.90, 0.05)])
def test_quantized_reasoner_stays_accurate(artifacts, fp32_eval, weights, min_agreement, max_drop):
    """Top-1 agreement with fp32 over teacher-forced positions, and arithmetic accuracy within a few points."""
    base, quant = load(artifacts["fp32"]), load(artifacts[weights])
    problems = heldout_problems()
    seqs = [
        base.chat_ids([{"role": "user", "content": p.prompt}]) + c.tokens
        for p, c in zip(problems[:12], fp32_eval.completions[:12], strict=True)
    ]
    assert sum(map(len, seqs)) >= 256
    agree = np.concatenate(
        [base.session().forward(s).argmax(-1) == quant.session().forward(s).argmax(-1) for s in seqs]
    )
    assert agree.mean() >= min_agreement
    ev = evaluate(quant, problems)
    assert ev.accuracy >= fp32_eval.accuracy - max_drop
    assert sum(parse_answer(c) is not None for c in ev.completions) == len(problems)
