"""Runtime isolation: a failing request ends only itself, one generation per session, non-finite logits
name their step, backends that are not thread-safe are serialized, text limits hold."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moeport.runtime import GenerationError, Sampler, SamplingError, SamplingParams, load
from moeport.runtime.generate import RequestFailed
from moeport.runtime.text import ChatTemplate, IncrementalDetokenizer, TextError, Tokenizer

PROMPTS = [[3, 14, 15, 92, 65], [2, 71, 82], [1, 41, 42, 13, 56, 23, 9], [7, 8]]
LONG = list(range(10, 40))  # 30 tokens: the only sequence that reaches position POISON
POISON = 34  # the long prompt's 6th new token is predicted from position 34 (the 5th new token's)


class Wrapped:
    """A program that delegates to the real one; ``hook(feeds, out)`` may raise or change the outputs."""

    def __init__(self, program, hook):
        self.program, self.hook = program, hook
        self.input_names, self.output_names = program.input_names, program.output_names

    def run(self, feeds):
        out = self.program.run(feeds)
        self.hook(feeds, out)
        return out


def rows_at(feeds, position: int) -> list[int]:
    """Batch rows whose last new token sits at ``position``."""
    return [r for r in range(feeds["position_ids"].shape[0]) if feeds["position_ids"][r, -1] == position]


def raise_at(position: int):
    def hook(feeds, out):
        if rows_at(feeds, position):
            raise RuntimeError(f"device fault at position {position}")

    return hook


def poison_at(position: int, value: float):
    def hook(feeds, out):
        for r in rows_at(feeds, position):
            out["logits"][r, -1, 5] = value

    return hook


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return load(tiny_artifact)


def alone(model, prompt, n: int = 10, **kw) -> list[int]:
    return model.session().generate(prompt, max_new_tokens=n, ignore_eos=True, **kw).tokens


def install(model, hook):
    real = model.program
    model.program = Wrapped(real, hook)
    return real


# -- a failing request ends only itself ----------------------------------------------------------


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_a_failing_request_ends_only_itself(model, fault):
    """One request's backend call raises (or yields NaN logits) mid-generation in a batch of five: it
    finishes with its error, its session stays consistent, the others get exactly their lone-run tokens."""
    want = [alone(model, p) for p in PROMPTS]
    real = install(model, raise_at(POISON) if fault == "raise" else poison_at(POISON, np.nan))
    try:
        gen = model.batch()
        sessions = [model.session() for _ in range(5)]
        reqs = [
            gen.submit(s, p, max_new_tokens=10, ignore_eos=True)
            for s, p in zip(sessions, [*PROMPTS, LONG], strict=True)
        ]
        steps = 0
        while gen.busy:
            gen.step()  # never raises for the others' sake
            steps += 1
        assert steps == 10
    finally:
        model.program = real
    assert [r.result().tokens for r in reqs[:4]] == want
    bad = reqs[4]
    assert bad.finish_reason == "error" and bad.done
    assert isinstance(bad.error, RequestFailed) and isinstance(bad.error, GenerationError)
    with pytest.raises(RequestFailed, match="step 6") as info:
        bad.result()
    assert len(bad.tokens) == 5
    if fault == "raise":  # the 5th token's call failed: the session holds the prompt and 4 tokens
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "device fault at position 34" in str(info.value)
        fed = 4
    else:  # the 5th token went in; its logits were NaN
        assert "NaN logits" in str(info.value) and "position 34" in str(info.value)
        fed = 5
    s = sessions[4]  # consistent: nothing half-written
    assert s.position == len(LONG) + fed and s.cache.length == s.position
    assert s.tokens == LONG + bad.tokens[:fed]
    fresh = model.session().prefill([*s.tokens, 9])
    np.testing.assert_allclose(s.prefill([9]), fresh, atol=1e-5)


def test_an_exception_while_accepting_ends_only_its_request(model):
    want = [alone(model, p) for p in PROMPTS]
    gen = model.batch()
    reqs = [gen.submit(model.session(), p, max_new_tokens=10, ignore_eos=True) for p in PROMPTS]

    def broken(logits, history, generated=()):
        raise ZeroDivisionError("sampler state broken")

    reqs[1].sampler = broken
    gen.run()
    assert [reqs[i].result().tokens for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
    assert reqs[1].finish_reason == "error"
    with pytest.raises(RequestFailed, match="sampler state broken"):
        reqs[1].result()
    assert reqs[1].session.position == len(PROMPTS[1])  # only the prompt went in


def test_the_failed_stream_raises_after_its_text(text_artifact):
    model = load(text_artifact)
    model.program = Wrapped(model.program, raise_at(12))
    stream = model.session().stream("hello world", max_new_tokens=20, ignore_eos=True)
    with pytest.raises(RequestFailed, match="device fault"):
        for _ in stream:
            pass


def test_a_failed_batch_call_writes_no_session(model):
    """forward_batch is all or nothing: when the call raises, no session of the batch has advanced."""
    sessions = [model.session() for _ in PROMPTS]
    for s, p in zip(sessions, PROMPTS, strict=True):
        s.prefill(p)
    before = [(s.position, list(s.tokens)) for s in sessions]

    def short_rows(feeds, out):  # layer 1's new rows for the first two sessions only: the third one's write fails
        name = model._cache_out[1]
        out[name] = out[name][:2]

    real = install(model, short_rows)
    try:
        with pytest.raises(ValueError, match="broadcast"):
            model.forward_batch([(s, [5, 6]) for s in sessions])
    finally:
        model.program = real
    assert [(s.position, s.tokens) for s in sessions] == before
    assert all(s.cache.length == s.position for s in sessions)


# -- one generation per session ------------------------------------------------------------------


class Gate:
    """Holds the model's calls inside ``run`` until released, so a generation is provably in flight."""

    def __init__(self):
        self.inside, self.release = threading.Event(), threading.Event()

    def __call__(self, feeds, out):
        self.inside.set()
        assert self.release.wait(30)


def in_thread(fn, *args, **kw):
    box: dict = {}

    def work():
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    return t, box


def test_a_second_generation_on_a_busy_session_is_refused_at_once(model):
    want = alone(model, PROMPTS[0], 12)
    gate = Gate()
    real = install(model, gate)
    s = model.session()
    try:
        first, first_box = in_thread(s.generate, PROMPTS[0], max_new_tokens=12, ignore_eos=True)
        assert gate.inside.wait(30)
        second, second_box = in_thread(s.generate, PROMPTS[1], max_new_tokens=12, ignore_eos=True)
        second.join(5)
        assert not second.is_alive(), "the second generate waited instead of failing at once"
        assert isinstance(second_box.get("error"), GenerationError)
        assert "already generating" in str(second_box["error"]) and "fork()" in str(second_box["error"])
        for call in (
            lambda: s.prefill([1]),
            lambda: s.step(1),
            lambda: s.forward([1]),
            s.reset,
            lambda: s.truncate(0),
            s.fork,
            lambda: model.forward_batch([(s, [1])]),
        ):
            t, box = in_thread(call)
            t.join(5)
            assert not t.is_alive() and isinstance(box.get("error"), GenerationError), call
            assert "generating" in str(box["error"])
    finally:
        gate.release.set()
        model.program = real
    first.join(30)
    assert first_box["value"].tokens == want  # no mixing
    assert s.tokens == PROMPTS[0] + want[:-1]
    # the session is free again once its generation ended
    more = s.generate([9], max_new_tokens=3, ignore_eos=True).tokens
    assert more == alone(model, PROMPTS[0] + want[:-1] + [9], 3)


def test_the_session_is_free_after_an_error_or_an_abandoned_stream(model):
    s = model.session()
    real = install(model, raise_at(len(LONG) + 2))
    try:
        with pytest.raises(RequestFailed):
            s.generate(LONG, max_new_tokens=8, ignore_eos=True)
    finally:
        model.program = real
    assert s.position == len(LONG) + 2
    s.reset()
    stream = s.stream(PROMPTS[0], max_new_tokens=50, ignore_eos=True)
    next(iter(stream), None)  # the tiny artifact has no tokenizer: no deltas, the generation runs through
    stream.close()
    s.truncate(0)
    assert s.generate(PROMPTS[0], max_new_tokens=4, ignore_eos=True).tokens == alone(model, PROMPTS[0], 4)


def test_an_abandoned_text_stream_frees_its_session(text_artifact):
    model = load(text_artifact)
    s = model.session()
    stream = s.stream("hello", max_new_tokens=200, ignore_eos=True)
    next(stream)
    with pytest.raises(GenerationError, match="already generating"):
        s.generate("x", max_new_tokens=1)
    stream.close()  # the consumer walked away: the request is cancelled and the session released
    assert s.position < len("hello") + 200
    s.generate("x", max_new_tokens=1)


def test_the_same_session_submitted_from_two_threads(model):
    gen = model.batch()
    s = model.session()
    barrier = threading.Barrier(2)

    def submit():
        barrier.wait()
        return gen.submit(s, PROMPTS[0], max_new_tokens=5, ignore_eos=True)

    results = [in_thread(submit) for _ in range(2)]
    for t, _ in results:
        t.join(10)
    errors = [box["error"] for _, box in results if "error" in box]
    assert len(errors) == 1 and "already generating" in str(errors[0])
    gen.run()
    (req,) = [box["value"] for _, box in results if "value" in box]
    assert req.result().tokens == alone(model, PROMPTS[0], 5)


def test_clients_submit_while_an_engine_thread_steps(model):
    """The server's shape: one engine thread steps the batch; clients submit from their own threads."""
    prompts = [[i + 1, i + 2, (7 * i) % 200 + 3] for i in range(12)]
    want = [alone(model, p, 8) for p in prompts]
    gen = model.batch(max_batch=5)
    stop = threading.Event()

    def engine():
        while not stop.is_set():
            if not gen.step():
                time.sleep(0.0005)

    eng = threading.Thread(target=engine, daemon=True)
    eng.start()
    got: dict[int, list[int]] = {}

    def client(i):
        req = gen.submit(model.session(), prompts[i], max_new_tokens=8, ignore_eos=True)
        while not req.done:
            time.sleep(0.001)
        got[i] = req.result().tokens

    clients = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in clients:
        t.start()
    for t in clients:
        t.join(60)
    stop.set()
    eng.join(10)
    assert [got[i] for i in range(len(prompts))] == want


# -- non-finite logits ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=20, seed=3)])
def test_non_finite_logits_name_the_step(model, value, word, sampling):
    real = install(model, poison_at(POISON, value))
    try:
        with pytest.raises(GenerationError, match=rf"step 6: the model produced {word} logits.*position 34"):
            model.session().generate(LONG, max_new_tokens=10, ignore_eos=True, **sampling)
    finally:
        model.program = real


@pytest.mark.parametrize("greedy", [True, False])
def test_the_sampler_refuses_nan_and_inf_but_keeps_minus_inf_masks(greedy):
    params = SamplingParams(temperature=0.0 if greedy else 1.0, top_k=0 if greedy else 3, seed=0)
    logits = np.linspace(0, 1, 16).astype(np.float32)
    for bad, word in ((np.nan, "NaN"), (np.inf, "infinite")):
        x = logits.copy()
        x[2] = bad
        with pytest.raises(SamplingError, match=word):
            Sampler(params)(x)
    masked = logits.copy()
    masked[10:] = -np.inf  # a mask (e.g. a grammar) may forbid tokens on purpose
    draws = {Sampler(replace(params, seed=i))(masked) for i in range(20)}
    assert draws <= set(range(10)) and (draws == {9} if greedy else len(draws) > 1)
    with pytest.raises(SamplingError, match="every token"):
        Sampler(params)(np.full(16, -np.inf, np.float32))


# -- text limits ---------------------------------------------------------------------------------


class CountingTokenizer:
    """Wraps a Tokenizer, counting the ids decoded."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens)


@pytest.fixture(scope="module")
def byte_tokenizer(text_artifact):
    return Tokenizer(text_artifact / "tokenizer.json", text_artifact / "tokenizer_config.json")


@pytest.mark.parametrize("kind", ["special", "invalid-bytes"])
def test_detokenizing_runs_of_empty_or_partial_tokens_is_linear(byte_tokenizer, kind):
    """20k special tokens (decoded to "") or stray UTF-8 continuation bytes (U+FFFD) cost O(1) each."""
    counting = CountingTokenizer(byte_tokenizer)
    detok = IncrementalDetokenizer(counting)
    if kind == "special":
        token = 256  # <bos>, skipped
    else:
        token = byte_tokenizer.encode("é", add_special_tokens=False)[1]  # a lone continuation byte
    out = [detok.push(token) for _ in range(20_000)]
    out.append(detok.flush())
    assert counting.decoded < 20_000 * 40, counting.decoded  # bounded window, not a growing one
    assert detok.window_size <= 2 * IncrementalDetokenizer.MAX_HELD + 1
    text = "".join(out)
    if kind == "special":
        assert text == ""
    else:
        assert set(text) == {"\ufffd"} and len(text) == 20_000


def test_detokenizer_output_is_unchanged_for_text_and_multibyte(byte_tokenizer):
    text = "plain words, héllo wörld — 你好, 🎉🎉 done " * 20
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    # special tokens among the text are skipped, the text around them intact
    detok = IncrementalDetokenizer(byte_tokenizer)
    mixed = [*ids[:7], *[256] * 50, *ids[7:40]]
    assert "".join(detok.push(i) for i in mixed) + detok.flush() == byte_tokenizer.decode(mixed)


@pytest.mark.parametrize(
    "source, what",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "time limit"),
        (
            "{% for a in [1,2,3,4,5,6,7,8,9,10] %}{% for b in [1,2,3,4,5,6,7,8,9,10] %}{% for c in range(100000) %}"
            "{% endfor %}{% endfor %}{% endfor %}",
            "time limit",
        ),
        (
            "{% macro f(n) %}{% for i in [1,2,3,4,5,6,7,8,9,10] %}{{ f(n - 1) if n else '' }}{% endfor %}"
            "{% endmacro %}{{ f(12) }}",
            "time limit",
        ),
        ("{% for i in range(10**7) %}{% endfor %}", "range"),
        ("{{ 'a' * 10**9 }}", "size limit.*'\\*' would build 1000000000 items"),
        ("{{ [1, 2] * 10**9 }}", "size limit"),
        ("{{ 2 ** (10 ** 9) }}", "size limit.*bit integer"),
        ("{% set s = 'a' * 10000000 %}{{ s ~ s }}", "size limit.*'~'"),
        (
            "{% set s = namespace(v='x') %}{% for i in range(40) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
            "size limit.*'~'",
        ),
        ("{% set s = 'a' * 10000000 %}{{ s + s }}", "size limit.*'\\+'"),
        ("{{ 'a'|center(1000000000) }}", "size limit.*center"),
        ("{{ 'a'.ljust(1000000000) }}", "size limit.*ljust"),
        ("{{ '{:>999999999}'.format(1) }}", "size limit.*format"),
        ("{{ '%999999999s' % 1 }}", "size limit.*'%'"),
        ("{{ ('a' * 1000000)|replace('a', 'b' * 100) }}", "size limit.*replace"),
        ("{{ ('a' * 100000).join(['x'] * 1000) }}", "size limit.*join"),
        ("{{ (['a' * 100000] * 1000)|join }}", "size limit.*join"),
        ("{% for i in range(100000) %}{{ 'a' * 1000 }}{% endfor %}", "output limit"),
    ],
)
def test_chat_template_is_capped(source, what):
    start = time.perf_counter()
    with pytest.raises(TextError, match=rf"chat template (exceeded|failed).*{what}"):
        ChatTemplate(source, "<s>", "</s>", time_limit=1.0).render([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - start < 5
    assert threading.active_count() < 50  # nothing left running


def test_real_chat_templates_render_unchanged_and_fast():
    """The DeepSeek-R1 template renders exactly as jinja2's plain sandbox renders it, well within the cap."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = (Path(__file__).parent / "data" / "deepseek_r1_chat_template.jinja").read_text()
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    capped = ChatTemplate(template, "<s>", "</s>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "347+58 " * 2000}]
    messages += [{"role": "assistant", "content": "<think>x</think>405"}]
    for i in range(200):
        messages += [{"role": "user", "content": f"and {i}?"}, {"role": "assistant", "content": f"<think>y</think>{i}"}]
    for gen in (True, False):
        start = time.perf_counter()
        out = capped.render(messages, add_generation_prompt=gen)
        assert time.perf_counter() - start < 1.0
        want = plain.from_string(template).render(
            messages=messages, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>"
        )
        assert out == want and out.count("and ") >= 200


# -- backends that are not thread-safe are serialized --------------------------------------------


class Overlap:
    """Counts how many threads are inside a wrapped call at once (each call lingers a little)."""

    def __init__(self):
        self.inside = self.most = 0
        self.lock = threading.Lock()

    def wrap(self, fn):
        def call(*args, **kwargs):
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            try:
                time.sleep(0.003)
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.inside -= 1

        return call


def generate_in_threads(model, prompts, n: int = 6) -> list[list[int]]:
    got: dict[int, list[int]] = {}

    def work(i):
        got[i] = model.session().generate(prompts[i], max_new_tokens=n, ignore_eos=True).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [got[i] for i in range(len(prompts))]


def test_the_tvm_vm_is_called_from_one_thread_at_a_time(tiny_artifact, tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm not installed")
    import shutil

    from moeport.backends.tvm import TvmBackend

    art = shutil.copytree(tiny_artifact, tmp_path / "art")
    model = load(art, backend=TvmBackend())
    want = [alone(model, p, 6) for p in PROMPTS]
    overlap = Overlap()
    vm = model.program.vm

    class ProbedVM:
        def __getitem__(self, name):
            return overlap.wrap(vm[name])

    model.program.vm = ProbedVM()
    assert generate_in_threads(model, PROMPTS) == want
    assert overlap.most == 1


def test_the_npu_program_creates_each_graph_once_and_runs_one_at_a_time(tiny_artifact, tmp_path):
    import shutil

    art = shutil.copytree(tiny_artifact, tmp_path / "art")
    model = load(art, backend="npu-sim", buckets="4,16", cache_capacity=64, progress=False)
    want = [alone(model, p, 6) for p in PROMPTS]
    program = model.program
    program._sessions.clear()  # graphs are created on first use: let the threads race for them
    made: list[str] = []
    runs = Overlap()
    make = program._make_session

    class ProbedSession:
        def __init__(self, inner):
            self.run = runs.wrap(inner.run)

    def slow_make(graph):
        made.append(Path(graph).stem)
        time.sleep(0.05)
        return ProbedSession(make(graph))

    program._make_session = slow_make
    assert generate_in_threads(model, PROMPTS) == want
    assert sorted(made) == sorted(set(made))  # no graph built twice
    assert runs.most == 1
