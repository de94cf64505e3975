"""`moeport serve`, driven the way applications drive it: the official `openai` client against a real uvicorn
server on 127.0.0.1 (in a thread; `moeport serve` subprocesses for signals and flags), raw HTTP (httpx) for
the error cases.

The bundled tiny reasoner (zoo:tiny-reasoner: "347+58" -> reasoning, then "405") answers where the
reasoning/content split matters; the numpy model with a byte-level tokenizer (conftest's ``text_artifact``,
512 positions, random weights) where long or random text is wanted. Every answer is compared with what the
runtime gives for the same tokens alone (``model.session().generate``) or with the model's own logits.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from moeport.exporter import export  # noqa: E402
from moeport.runtime import load  # noqa: E402
from moeport.runtime.server import serve  # noqa: E402
from moeport.tools.arithmetic import heldout_problems  # noqa: E402

TIMEOUT = 60  # seconds any single HTTP exchange may take before the test fails


# -- a server in a thread ------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    name: str
    model: Any
    state: Any  # the app's ServerState (engine, metrics)

    @property
    def engine(self):
        return self.state.engine

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        if isinstance(body, (dict, list)):
            kw["json"] = body
        elif body is not None:
            kw["content"] = body
            kw.setdefault("headers", {"content-type": "application/json"})
        return httpx.post(self.url + path, timeout=TIMEOUT, **kw)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, parsed by prometheus_client: name{label=value,...} -> value."""
        out = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=TIMEOUT).text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


@contextmanager
def serving(model: Any, **options: Any) -> Iterator[Server]:
    """``moeport.runtime.server.serve`` on a free loopback port in a thread; stopped (and joined) after."""
    options.setdefault("shutdown_timeout", 5)
    box: dict[str, Any] = {}
    ready = threading.Event()

    def on_ready(server: Any) -> None:
        box["server"] = server
        ready.set()

    def run() -> None:
        try:
            serve(model, port=0, log_level="warning", ready=on_ready, **options)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    assert ready.wait(60), "the server did not start"
    if "error" in box:
        raise box["error"]
    server = box["server"]
    port = server.servers[0].sockets[0].getsockname()[1]
    state = server.config.app.state.moeport
    try:
        yield Server(f"http://127.0.0.1:{port}", state.name, model, state)
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
        assert "error" not in box, box.get("error")


class Wrapped:
    """A backend program that delegates to the real one; ``before(feeds)`` runs first (may sleep or raise)."""

    def __init__(self, program: Any, before: Any):
        self.program, self.before = program, before
        self.input_names, self.output_names = program.input_names, program.output_names

    def run(self, feeds: dict) -> dict:
        self.before(feeds)
        return self.program.run(feeds)


def slow(seconds: float):
    return lambda feeds: time.sleep(seconds)


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_error(resp: httpx.Response, status: int, param: str | None = None, says: str = "") -> dict:
    """OpenAI's error object, with ``status``; its message one line naming the problem."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    assert says.lower() in err["message"].lower(), err
    return err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- models --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reasoner_dir(tmp_path_factory) -> Path:
    return export("zoo:tiny-reasoner", tmp_path_factory.mktemp("reasoner") / "tiny-reasoner")


@pytest.fixture(scope="module")
def reasoner(reasoner_dir):
    return load(reasoner_dir, threads=1)


@pytest.fixture(scope="module")
def reasoner_server(reasoner) -> Iterator[Server]:
    with serving(reasoner) as server:
        yield server


@pytest.fixture(scope="module")
def text_model(text_artifact):
    return load(text_artifact, threads=1)


@pytest.fixture(scope="module")
def text_server(text_model) -> Iterator[Server]:
    with serving(text_model) as server:
        yield server


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def reasoning_tokens(model: Any, tokens: list[int]) -> int:
    """Generated tokens from the one after <think> through </think> (what usage reports as reasoning)."""
    tok = model.tokenizer
    return tokens.index(tok.token_id("</think>")) - tokens.index(tok.token_id("<think>"))


# -- chat completions ----------------------------------------------------------------------------------------


def test_chat_answer_comes_apart_from_its_reasoning(reasoner, reasoner_server):
    ids = reasoner.chat_ids(user("347+58"))
    want = reasoner.session().generate(ids, max_new_tokens=64)
    r = reasoner_server.client().chat.completions.create(
        model=reasoner_server.name, messages=user("347+58"), max_tokens=64, temperature=0
    )
    assert r.object == "chat.completion" and r.model == reasoner_server.name and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == want.content == "405"
    assert choice.message.reasoning_content == want.reasoning and "7+8+0=15" in want.reasoning
    assert "<think>" not in choice.message.reasoning_content + choice.message.content
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        len(ids),
        len(want.tokens),
        len(ids) + len(want.tokens),
    )
    assert u.completion_tokens_details.reasoning_tokens == reasoning_tokens(reasoner, want.tokens) > 0
    assert u.prompt_tokens_details.cached_tokens == 0


def test_a_streamed_chat_splits_reasoning_and_content_in_its_deltas(reasoner, reasoner_server):
    ids = reasoner.chat_ids(user("612-87"))
    want = reasoner.session().generate(ids, max_new_tokens=64)
    client = reasoner_server.client()
    chunks = list(
        client.chat.completions.create(
            model=reasoner_server.name,
            messages=user("612-87"),
            max_tokens=64,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    deltas = [c.choices[0].delta for c in body]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == (want.reasoning, want.content) and content == "525"
    # reasoning first, then content: no delta after the first content delta carries reasoning
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert not any(getattr(d, "reasoning_content", None) for d in deltas[first_content:])
    assert len([d for d in deltas if getattr(d, "reasoning_content", None)]) > 10  # streamed, not one lump
    assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + ["stop"]
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage.completion_tokens == len(want.tokens)
    assert last.usage.prompt_tokens == len(ids)
    assert last.usage.completion_tokens_details.reasoning_tokens == reasoning_tokens(reasoner, want.tokens)

    plain = list(client.chat.completions.create(model=reasoner_server.name, messages=user("612-87"), stream=True))
    assert all(c.usage is None and c.choices for c in plain)  # no usage chunk unless asked


def test_raw_sse_ends_with_done(reasoner_server):
    body = {"messages": user("1+2"), "stream": True, "max_tokens": 64}
    with httpx.stream("POST", reasoner_server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"


def test_multi_turn_drops_earlier_reasoning(reasoner, reasoner_server):
    first = reasoner.session().generate(reasoner.chat_ids(user("347+58")), max_new_tokens=64)
    history = [
        *user("347+58"),
        {"role": "assistant", "content": first.content, "reasoning_content": first.reasoning},
        *user("12+5"),
    ]
    as_text = [*history[:1], {"role": "assistant", "content": first.text}, *history[2:]]  # <think>...</think>405
    bare = [*history[:1], {"role": "assistant", "content": first.content}, *history[2:]]
    ids = reasoner.chat_ids(bare)
    want = reasoner.session().generate(ids, max_new_tokens=64)
    client = reasoner_server.client()
    for messages in (history, as_text):
        r = client.chat.completions.create(model=reasoner_server.name, messages=messages, max_tokens=64)
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == want.content
        assert r.choices[0].message.reasoning_content == want.reasoning


def test_n_choices_share_one_prefill(text_model, text_artifact):
    """n=4: the prompt goes through the model once (all but its last token), then once per choice."""
    model = load(text_artifact, threads=1)
    prompt_len = len(model.chat_ids(user("count the ways")))
    fed: list[int] = []  # prompt positions fed to the model, call by call

    def count(feeds):
        new = feeds["input_ids"].shape[1]
        real = feeds["attention_mask"][:, -new:] == 1
        fed.append(int((real & (feeds["position_ids"] < prompt_len)).sum()))

    model.program = Wrapped(model.program, count)
    with serving(model) as server:
        r = server.client().chat.completions.create(
            model=server.name, messages=user("count the ways"), n=4, max_tokens=8, temperature=1.0, seed=5
        )
        again = server.client().chat.completions.create(
            model=server.name, messages=user("count the ways"), n=4, max_tokens=8, temperature=1.0, seed=5
        )
    assert sum(fed) == 2 * (prompt_len - 1 + 4)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # independent draws
    assert texts == [c.message.content for c in again.choices]  # seeded: reproducible choice by choice
    assert r.usage.completion_tokens == 4 * 8 and r.usage.prompt_tokens == prompt_len


def test_n_greedy_choices_all_equal_the_lone_run(reasoner, reasoner_server):
    want = reasoner.session().generate(reasoner.chat_ids(user("808+192")), max_new_tokens=64)
    r = reasoner_server.client().chat.completions.create(
        model=reasoner_server.name, messages=user("808+192"), n=3, max_tokens=64, temperature=0
    )
    assert [(c.message.content, c.message.reasoning_content) for c in r.choices] == [(want.content, want.reasoning)] * 3
    assert r.usage.completion_tokens == 3 * len(want.tokens)


def test_n_choices_stream_each_with_its_index(reasoner, reasoner_server):
    want = reasoner.session().generate(reasoner.chat_ids(user("5+5")), max_new_tokens=64)
    chunks = list(
        reasoner_server.client().chat.completions.create(
            model=reasoner_server.name, messages=user("5+5"), n=2, max_tokens=64, stream=True
        )
    )
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == want.content
        assert [c.finish_reason for c in mine if c.finish_reason] == ["stop"]


@pytest.mark.parametrize("stop", ["+", ["\n", "="], ["=1", "xyz"]])
def test_stop_strings_cut_the_output(reasoner, reasoner_server, stop):
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    want = reasoner.session().generate(reasoner.chat_ids(user("347+58")), max_new_tokens=64, stop=stops)
    assert want.finish_reason == "stop"
    client = reasoner_server.client()
    r = client.chat.completions.create(model=reasoner_server.name, messages=user("347+58"), max_tokens=64, stop=stop)
    assert r.choices[0].finish_reason == "stop"
    assert (r.choices[0].message.reasoning_content or "", r.choices[0].message.content) == (want.reasoning or "", "")
    assert not any(s in (r.choices[0].message.reasoning_content or "") for s in stops)
    streamed = client.chat.completions.create(
        model=reasoner_server.name, messages=user("347+58"), max_tokens=64, stop=stop, stream=True
    )
    text = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in streamed if c.choices)
    assert text == (want.reasoning or "")


def test_finish_reason_length(reasoner, reasoner_server):
    r = reasoner_server.client().chat.completions.create(
        model=reasoner_server.name, messages=user("347+58"), max_tokens=5
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_seeded_sampling_is_reproducible(text_model, text_server):
    client = text_server.client()

    def draw(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=text_server.name, messages=user("roll"), max_tokens=24, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    ids = text_model.chat_ids(user("roll"))
    alone = text_model.session().generate(ids, max_new_tokens=24, temperature=1.0, seed=11)
    assert draw(11) == draw(11) == alone.content
    assert draw(12) != draw(11)


def test_logprobs_are_the_model_s_log_softmax(text_model, text_server):
    """Each token's logprob and its top alternatives equal log-softmax of the model's own logits
    (``Session.forward`` over the same tokens), computed here independently."""
    ids = text_model.chat_ids(user("logprobs"))
    r = text_server.client().chat.completions.create(
        model=text_server.name,
        messages=user("logprobs"),
        max_tokens=10,
        temperature=0.8,
        seed=3,
        logprobs=True,
        top_logprobs=4,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = r.choices[0]
    tokens = choice.token_ids
    assert len(tokens) == 10 and len(choice.logprobs.content) == 10
    logits = text_model.session().forward(ids + tokens[:-1])[len(ids) - 1 :].astype(np.float64)
    logsoftmax = logits - logits.max(-1, keepdims=True)
    logsoftmax -= np.log(np.exp(logsoftmax).sum(-1, keepdims=True))
    tok = text_model.tokenizer
    for j, (entry, token) in enumerate(zip(choice.logprobs.content, tokens, strict=True)):
        assert entry.token == tok.decode([token], skip_special_tokens=False)
        assert entry.logprob == pytest.approx(logsoftmax[j, token], abs=2e-4)
        top = np.argsort(-logsoftmax[j])[:4]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(logsoftmax[j, top].tolist(), abs=2e-4)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([int(t)], skip_special_tokens=False) for t in top]

    c = text_server.client().completions.create(
        model=text_server.name,
        prompt=ids,
        max_tokens=10,
        temperature=0.8,
        seed=3,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert c.choices[0].logprobs.token_logprobs == pytest.approx([e.logprob for e in choice.logprobs.content], abs=1e-6)
    assert all(len(alts) == 2 for alts in c.choices[0].logprobs.top_logprobs)


@pytest.mark.parametrize("presence, frequency", [(0.0, 1.5), (1.8, 0.0), (0.7, 0.6), (-2.0, 0.0)])
def test_presence_and_frequency_penalties_are_openai_s(text_model, text_server, presence, frequency):
    """Greedy with penalties: each token is argmax(logits - presence * [seen] - frequency * count), the
    counts over the generated tokens only (OpenAI's definition), checked step by step on the model's logits."""
    ids = text_model.chat_ids(user("aaaa"))
    n = 24
    s, generated = text_model.session(), []
    logits = s.prefill(ids)
    for _ in range(n):
        x = logits.astype(np.float64)
        seen, counts = np.unique(np.array(generated, dtype=np.int64), return_counts=True)
        x[seen] -= presence + frequency * counts
        generated.append(int(np.argmax(x)))
        logits = s.step(generated[-1])
    r = text_server.client().chat.completions.create(
        model=text_server.name,
        messages=user("aaaa"),
        max_tokens=n,
        temperature=0,
        presence_penalty=presence,
        frequency_penalty=frequency,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert r.choices[0].token_ids == generated
    plain = text_model.session().generate(ids, max_new_tokens=n, ignore_eos=True).tokens
    assert generated != plain  # the penalties did change the output (so the check above has teeth)


# -- completions, models, health, metrics ---------------------------------------------------------------------


def test_completions_from_text_and_from_token_ids(text_model, text_server):
    tok = text_model.tokenizer
    ids = tok.encode("Once upon a time")
    want = text_model.session().generate(ids, max_new_tokens=16, ignore_eos=True)
    client = text_server.client()
    for prompt in ("Once upon a time", ids):
        r = client.completions.create(
            model=text_server.name, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        assert r.object == "text_completion" and r.choices[0].text == want.text
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 16)
    streamed = list(
        client.completions.create(
            model=text_server.name, prompt=ids, max_tokens=16, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == want.text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_completions_on_a_model_without_a_tokenizer_stream_token_ids(tiny_artifact):
    """The bench checkpoints have no tokenizer: prompts are token ids, and each generated token still
    arrives as its own chunk (with ``return_token_ids``, its id)."""
    model = load(tiny_artifact, threads=1)
    want = model.session().generate([5, 6, 7], max_new_tokens=12, ignore_eos=True).tokens
    with serving(model) as server:
        client = server.client()
        chunks = list(
            client.completions.create(
                model=server.name,
                prompt=[5, 6, 7],
                max_tokens=12,
                stream=True,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )
        )
        assert [t for c in chunks for t in c.choices[0].token_ids] == want
        assert len(chunks) == 12  # one chunk per token, although no text
        r = client.completions.create(
            model=server.name,
            prompt=[5, 6, 7],
            max_tokens=12,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        assert r.choices[0].token_ids == want
        chat = server.post("/v1/chat/completions", {"messages": user("hi")})
        assert_error(chat, 400, says="no tokenizer")


def test_models_and_health(reasoner, reasoner_server):
    models = reasoner_server.client().models.list()
    assert reasoner_server.name == "tiny-reasoner"  # the artifact folder's name
    assert [m.id for m in models.data] == ["tiny-reasoner"]
    assert models.data[0].owned_by == "moeport"
    health = httpx.get(reasoner_server.url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_metrics_follow_the_requests(text_model):
    model = load(text_model.artifact.directory, threads=1)
    model.program = Wrapped(model.program, slow(0.01))
    with serving(model, max_batch=1) as server:
        before = server.metrics()
        assert before["moeport_queue_depth"] == 0 and before["moeport_running_requests"] == 0
        ids = model.chat_ids(user("metrics"))
        client = server.client()
        stream = client.chat.completions.create(
            model=server.name, messages=user("metrics"), max_tokens=40, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(
                client.chat.completions.create,
                model=server.name,
                messages=user("next"),
                max_tokens=3,
                extra_body={"ignore_eos": True},
            )
            wait_until(lambda: server.metrics()["moeport_queue_depth"] == 1, what="a queued request")
            during = server.metrics()
            assert during["moeport_running_requests"] == 1
            list(stream)
            queued.result(TIMEOUT)
        after = server.metrics()
    assert after["moeport_queue_depth"] == 0 and after["moeport_running_requests"] == 0
    grew = {k: after[k] - before.get(k, 0) for k in after}
    assert grew["moeport_prompt_tokens_total"] == len(ids) + len(model.chat_ids(user("next")))
    assert grew["moeport_generated_tokens_total"] == 40 + 3
    assert grew["moeport_time_to_first_token_seconds_count"] == 2
    assert grew["moeport_time_per_output_token_seconds_count"] == 39 + 2
    assert grew["moeport_requests_total{finish_reason=length}"] == 2
    # the throttled model takes >= 10 ms a step: every token after the first took that long
    assert after["moeport_time_per_output_token_seconds_bucket{le=0.005}"] == 0
    assert grew["moeport_time_per_output_token_seconds_sum"] >= 41 * 0.01


def test_prefix_cache_hits_are_reported_and_change_nothing(text_model):
    """A second request sharing a long prefix (a system prompt) gets it from the cache: cached_tokens in its
    usage and in the metrics, and exactly the greedy tokens it gets without the cache."""
    system = {"role": "system", "content": "You are a careful assistant. " * 8}  # 232 bytes
    first, second = [system, *user("first question")], [system, *user("second question")]
    want = [
        text_model.session().generate(text_model.chat_ids(m), max_new_tokens=20, ignore_eos=True)
        for m in (first, second)
    ]
    with serving(text_model) as server:
        client = server.client()

        def ask(messages):
            return client.chat.completions.create(
                model=server.name,
                messages=messages,
                max_tokens=20,
                temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )

        a, b = ask(first), ask(second)
        m = server.metrics()
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    shared = len(text_model.chat_ids([system])) - 1  # the system turn, less what the template adds after it
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert shared - 32 < cached <= shared and cached % 32 == 0
    assert [a.choices[0].token_ids, b.choices[0].token_ids] == [w.tokens for w in want]
    assert m["moeport_prefix_cache_hit_tokens_total"] == cached
    assert m["moeport_prefix_cache_hit_rate"] == pytest.approx(cached / (a.usage.prompt_tokens + b.usage.prompt_tokens))
    assert m["moeport_prefix_cache_bytes"] > 0


def test_sixteen_concurrent_clients_each_get_their_lone_run_answer(reasoner, reasoner_dir):
    problems = heldout_problems()[:16]
    want = [reasoner.session().generate(reasoner.chat_ids(user(p.prompt)), max_new_tokens=64) for p in problems]
    model = load(reasoner_dir, threads=1)
    model.program = Wrapped(model.program, slow(0.002))  # lets every client join before the first finishes
    with serving(model, max_batch=16) as server:
        client = server.client()
        start = threading.Barrier(16)

        def ask(problem):
            start.wait(TIMEOUT)
            r = client.chat.completions.create(
                model=server.name, messages=user(problem.prompt), max_tokens=64, temperature=0
            )
            return r.choices[0].message, r.usage.completion_tokens, r.choices[0].finish_reason

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, problems))
        m = server.metrics()
    for (message, n, finish), w, p in zip(got, want, problems, strict=True):
        assert (message.content, message.reasoning_content, n, finish) == (
            w.content,
            w.reasoning,
            len(w.tokens),
            "stop",
        )
        assert message.content == str(p.answer)
    tokens = sum(len(w.tokens) for w in want)
    assert m["moeport_step_seconds_count"] < tokens / 4  # they ran together, not one after another


# -- bad input and overload (raw HTTP) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param, says",
    [
        (b'{"messages": [', None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": "hi"}, "messages", "list"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "string"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "user"),
        ({"messages": [{"content": "x"}]}, "messages.0.role", "required"),
        ({"messages": user("1+1"), "temperature": "hot"}, "temperature", "number"),
        ({"messages": user("1+1"), "temperature": True}, "temperature", "number"),
        ({"messages": user("1+1"), "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"messages": user("1+1"), "max_tokens": 1.5}, "max_tokens", "integer"),
        ({"messages": user("1+1"), "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": user("1+1"), "n": "2"}, "n", "integer"),
        ({"messages": user("1+1"), "stream": "yes"}, "stream", "boolean"),
        ({"messages": user("1+1"), "stop": 5}, "stop", "string"),
        ({"messages": user("1+1"), "stop": [""]}, "stop", "empty"),
        ({"messages": user("1+1"), "seed": -1}, "seed", "greater than or equal to 0"),
        ({"messages": user("1+1"), "top_logprobs": 3}, "top_logprobs", "logprobs"),
        ({"messages": user("1+1"), "max_tokens": 500}, "max_tokens", "context"),
        ({"messages": user("1+1"), "n": 1000}, "n", "n must be"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content", "image_url"),
        ({"messages": user("1+1"), "response_format": {"type": "yaml"}}, "response_format", "yaml"),
        (  # the tiny reasoner's chat template renders no tool calls
            {"messages": user("1+1"), "tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "no tool support",
        ),
    ],
)
def test_bad_chat_requests_get_400_with_openai_s_error_object(reasoner_server, body, param, says):
    assert_error(reasoner_server.post("/v1/chat/completions", body), 400, param, says)


@pytest.mark.parametrize(
    "prompt, says",
    [
        ([26], "out of the vocabulary"),
        ([-1], "out of the vocabulary"),
        ([2**70], "out of the vocabulary"),
        ([], "empty"),
        ("", "empty"),
        ([[1, 2]], "prompt"),
        (list(range(1, 20)) * 7, "context"),
    ],
)
def test_bad_prompts_get_400(reasoner_server, prompt, says):
    assert_error(reasoner_server.post("/v1/completions", {"prompt": prompt, "max_tokens": 4}), 400, says=says)


def test_unknown_models_and_routes_get_openai_s_error_object(reasoner_server):
    err = assert_error(reasoner_server.post("/v1/chat/completions", {"model": "gpt-9", "messages": user("1+1")}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    with pytest.raises(openai.NotFoundError):
        reasoner_server.client().chat.completions.create(model="gpt-9", messages=user("1+1"))
    assert_error(reasoner_server.post("/v1/embeddings", {"input": "x"}), 404)
    assert_error(httpx.get(reasoner_server.url + "/v1/chat/completions", timeout=TIMEOUT), 405)


def test_a_body_too_large_is_refused_even_without_a_content_length(reasoner_server):
    def chunks():
        for _ in range(17):
            yield b" " * (1 << 20)

    assert_error(reasoner_server.post("/v1/chat/completions", chunks()), 413)


def test_api_key(reasoner):
    with serving(reasoner, api_key="s3cret") as server:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            err = assert_error(server.post("/v1/chat/completions", {"messages": user("1+1")}, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        r = server.client("s3cret").chat.completions.create(model=server.name, messages=user("347+58"), max_tokens=64)
        assert r.choices[0].message.content == "405"
        assert httpx.get(server.url + "/health", timeout=TIMEOUT).status_code == 200  # probes need no key


def test_a_full_queue_gets_429_with_retry_after(text_artifact):
    """--max-batch 1 --max-queue 0: the first request runs (nothing waits), the next is refused at once."""
    model = load(text_artifact, threads=1)
    model.program = Wrapped(model.program, slow(0.01))
    with serving(model, max_batch=1, max_queue=0) as server:
        long = {"prompt": "a", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=long, timeout=TIMEOUT) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            busy = server.post("/v1/completions", {"prompt": "b", "max_tokens": 2})
            err = assert_error(busy, 429, says="busy")
            assert err["type"] == "rate_limit_exceeded" and int(busy.headers["retry-after"]) >= 1
            with pytest.raises(openai.RateLimitError):
                server.client().completions.create(model=server.name, prompt="b", max_tokens=2)
            assert [line for line in lines if line][-1] == "data: [DONE]"
        assert server.post("/v1/completions", {"prompt": "b", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot(text_artifact, stream):
    """A client drops a long request mid-way: the engine cancels it at its next step, and the request queued
    behind it (max batch 1) runs at once instead of after it."""
    model = load(text_artifact, threads=1)
    model.program = Wrapped(model.program, slow(0.01))
    with serving(model, max_batch=1) as server:
        long = {"prompt": "a", "max_tokens": 400, "stream": stream, "ignore_eos": True}  # >= 4 s alone
        if stream:
            with httpx.Client(timeout=TIMEOUT) as c, c.stream("POST", server.url + "/v1/completions", json=long) as r:
                lines = (line for line in r.iter_lines() if line.startswith("data:"))
                for _ in range(3):
                    next(lines)
                with ThreadPoolExecutor(1) as pool:
                    queued = pool.submit(server.post, "/v1/completions", {"prompt": "b", "max_tokens": 2})
                    wait_until(lambda: server.engine.queue_depth == 1, what="the second request to queue")
                    c.close()  # the client goes away
                    gone = time.monotonic()
                    assert queued.result(TIMEOUT).status_code == 200
        else:
            with ThreadPoolExecutor(1) as pool:
                with pytest.raises(httpx.ReadTimeout):
                    httpx.post(server.url + "/v1/completions", json=long, timeout=0.5)
                gone = time.monotonic()
                queued = pool.submit(server.post, "/v1/completions", {"prompt": "b", "max_tokens": 2})
                assert queued.result(TIMEOUT).status_code == 200
        assert time.monotonic() - gone < 2.5  # the dropped request alone had >= 3.9 s to go
        m = server.metrics()
        assert m["moeport_requests_total{finish_reason=cancelled}"] == 1
        assert m["moeport_generated_tokens_total"] < 150  # the dropped request stopped early
        wait_until(lambda: server.engine.running == 0, what="no request running")


def test_a_failing_model_call_ends_only_its_own_request(text_artifact):
    """The backend raises whenever a sequence reaches position 105 (only the long prompts get there), five
    tokens into the generation: that request gets a 500 error object (streamed: an error event after its
    first tokens), the requests batched with it their lone-run answers."""
    model = load(text_artifact, threads=1)
    prompts = ["alpha", "beta", "gamma"]  # short: they never reach position 105
    want = [
        model.session().generate(model.tokenizer.encode(p), max_new_tokens=30, ignore_eos=True).text for p in prompts
    ]

    def fault(feeds):
        time.sleep(0.005)
        if (feeds["position_ids"][:, -1] == 105).any():
            raise RuntimeError("device fault")

    model.program = Wrapped(model.program, fault)
    with serving(model) as server:
        client = server.client()
        with ThreadPoolExecutor(3) as pool:
            good = [
                pool.submit(
                    client.completions.create,
                    model=server.name,
                    prompt=p,
                    max_tokens=30,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
                for p in prompts
            ]
            wait_until(lambda: server.engine.running == 3, what="three requests running")
            long = {"prompt": "x" * 100, "max_tokens": 30, "ignore_eos": True}
            err = assert_error(server.post("/v1/completions", long), 500, says="device fault")
            assert err["type"] == "internal_error"
            streamed = client.completions.create(
                model=server.name, prompt="y" * 100, max_tokens=30, stream=True, extra_body={"ignore_eos": True}
            )
            chunks = []
            with pytest.raises(openai.APIError, match="device fault"):
                for c in streamed:
                    chunks.append(c)
            assert len(chunks) >= 4  # its first tokens came through before the fault
            assert [f.result(TIMEOUT).choices[0].text for f in good] == want
        wait_until(lambda: server.engine.running == 0, what="no request running")
        assert client.completions.create(model=server.name, prompt="delta", max_tokens=3).choices[0].text


NASTY = [
    b"",
    b"null",
    b'"x"',
    b"[" * 100_000,
    b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"messages": [{"role": "user", "content": "\\u0000\\ud800"}]}',
    b'{"messages": [{"role": "user", "content": "1+1"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "1+1"}], "max_tokens": 1e999}',
    b'{"messages": [{"role": "user", "content": "1+1"}], "max_tokens": 99999999999999999999999}',
    b'{"messages": [{"role": "user", "content": "1+1"}], "seed": 18446744073709551616}',
    b'{"messages": [{"role": "user", "content": "1+1"}], "stream_options": 7}',
    b'{"messages": [{"role": "user", "content": "1+1"}], "logprobs": true, "top_logprobs": 99}',
    b'{"messages": [{"role": "user", "content": null}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
    b'{"messages": [{"role": "user", "content": "' + b"9" * 5000 + b'"}]}',
    b'{"prompt": [0.5]}',
    b"\xff\xfe\x00",
]


def test_no_request_crashes_the_server(reasoner_server):
    for body in NASTY:
        for path in ("/v1/chat/completions", "/v1/completions"):
            resp = reasoner_server.post(path, body)
            assert 400 <= resp.status_code < 500, (body[:60], resp.status_code, resp.text[:200])
            assert_error(resp, resp.status_code)
    r = reasoner_server.client().chat.completions.create(
        model=reasoner_server.name, messages=user("347+58"), max_tokens=64
    )
    assert r.choices[0].message.content == "405"
    assert reasoner_server.engine._thread.is_alive()


# -- `moeport serve` as a process: signals and flags ------------------------------------------------------------

# `moeport serve` with every backend call slowed down, so that a stream is provably in flight for seconds
SLOW_SERVE = """
import sys, time
from moeport.runtime import model as model_module

init = model_module.Model.__init__

class Slow:
    def __init__(self, program):
        self.program = program
        self.input_names, self.output_names = program.input_names, program.output_names

    def run(self, feeds):
        time.sleep(0.02)
        return self.program.run(feeds)

def slowed(self, artifact, program, *args, **kw):
    init(self, artifact, Slow(program), *args, **kw)

model_module.Model.__init__ = slowed
from moeport.tools.cli import main
main(sys.argv[1:], prog_name="moeport")
"""


@contextmanager
def serve_process(args: list[str], script: Path | None = None, port: int | None = None) -> Iterator[tuple]:
    port = port or free_port()
    cmd = [sys.executable, "-P", *([str(script)] if script else ["-m", "moeport.tools.cli"]), "serve", *args]
    if "--port" not in args:
        cmd += ["--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def wait_healthy(proc: subprocess.Popen, url: str) -> None:
    end = time.monotonic() + 120
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("moeport serve did not become healthy")


def refused(url: str) -> bool:
    """A new request is turned away: the connection is refused, or it gets 503."""
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 503
    except httpx.TransportError:
        return True


def test_sigterm_lets_the_stream_in_flight_finish_and_exits_0(text_artifact, tmp_path):
    script = tmp_path / "slow_serve.py"
    script.write_text(SLOW_SERVE)
    with serve_process([str(text_artifact), "--threads", "1"], script) as (proc, url):
        wait_healthy(proc, url)
        body = {"prompt": "a", "max_tokens": 100, "stream": True, "ignore_eos": True}  # >= 2 s
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: refused(url), timeout=5, what="new requests to be refused")
            rest = [line for line in lines if line.startswith("data:")]
        assert proc.wait(30) == 0, proc.communicate()[1]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert len(rest) == 100  # 99 more tokens, then [DONE]: nothing was cut


def test_sigterm_past_the_shutdown_timeout_ends_the_stream_and_exits_0(text_artifact, tmp_path):
    script = tmp_path / "slow_serve.py"
    script.write_text(SLOW_SERVE)
    with serve_process([str(text_artifact), "--threads", "1", "--shutdown-timeout", "0.5"], script) as (proc, url):
        wait_healthy(proc, url)
        body = {"prompt": "a", "max_tokens": 400, "stream": True, "ignore_eos": True}  # >= 8 s
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            try:
                events = [line for line in lines if line.startswith("data:")]
            except httpx.RemoteProtocolError:
                pass  # cut mid-chunk: ended all the same
        assert time.monotonic() - start < 5
        assert proc.wait(30) == 0, proc.communicate()[1]
    assert "data: [DONE]" not in events and len(events) < 300


def test_a_port_in_use_is_one_clear_error(text_artifact):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with serve_process([str(text_artifact), "--threads", "1"], port=port) as (proc, url):
            assert proc.wait(60) == 1
            err = proc.stderr.read()
    assert f"Error: could not serve on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_a_public_address_needs_an_api_key_or_insecure(text_artifact):
    with serve_process([str(text_artifact), "--host", "0.0.0.0"]) as (proc, url):
        assert proc.wait(60) == 2
        err = proc.stderr.read()
    assert err.count("\n") == 1 and err.startswith("Error: --host 0.0.0.0 is reachable") and "--api-key" in err
    with serve_process([str(text_artifact), "--host", "0.0.0.0", "--insecure", "--threads", "1"]) as (proc, url):
        wait_healthy(proc, url)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    env_port = free_port()
    with serve_process(
        [str(text_artifact), "--host", "0.0.0.0", "--api-key", "k", "--threads", "1"], port=env_port
    ) as (proc, url):
        wait_healthy(proc, url)
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"authorization": "Bearer k"}, timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# -- tools/loadgen.py ------------------------------------------------------------------------------------------


def test_loadgen_measures_what_the_server_served(text_model, capsys):
    from moeport.tools import loadgen

    assert loadgen.prompts(3, 40, 32, 7, 0, 256) == loadgen.prompts(3, 40, 32, 7, 0, 256)  # fixed seed
    spans = [(0.0, 10.0), (2.0, 8.0), (5.0, 12.0)]
    assert [loadgen.busy_time(spans, k) for k in (1, 2, 3, 4)] == [[(0, 12)], [(2, 10)], [(5, 8)], []]
    with serving(text_model) as server:
        argv = ["--base-url", f"{server.url}/v1", "--concurrency", "4", "--requests", "8", "--prompt-tokens", "40"]
        argv += ["--shared-prefix-tokens", "32", "--max-tokens", "10", "--token-range", "0:256", "--json"]
        assert loadgen.main(argv) == 0
        m = server.metrics()
    out = json.loads(capsys.readouterr().out)
    assert (out["requests"], out["failed"], out["output_tokens"]) == (8, 0, 80)
    assert all(r["output_tokens"] == 10 and r["ttft_ms"] > 0 for r in out["per_request"])
    assert out["decode_tokens_per_second"] > 0 and out["ttft_ms"]["p50"] <= out["ttft_ms"]["p99"]
    assert out["steady_decode_tokens_per_second"] is None or out["steady_decode_tokens_per_second"] > 0
    assert m["moeport_generated_tokens_total"] == 80 + 10  # and the warm-up request
    assert max(r["cached_tokens"] for r in out["per_request"]) == 32  # the shared prefix came from the cache
    with pytest.raises(SystemExit):
        loadgen.parse_args(["--base-url", "http://10.0.0.1:8000/v1"])
