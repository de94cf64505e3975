"""The engine thread behind `moeport serve`: admission and the queue bound, and a loop that nothing a
request does (or a bug in the metrics, the prefix cache or the loop itself) can stop."""

from __future__ import annotations

import threading
import time

import pytest

from moeport.runtime import RequestFailed, SamplingParams, load
from moeport.runtime.engine import ChoiceEvent, Engine, EngineClosed, EngineObserver, QueueFull
from moeport.runtime.generate import GenerationError as InvalidRequest

PROMPTS = [[256, 104, 105], [256, 98, 121, 101], [256, 120], [256, 111, 107, 33, 32]]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(text_artifact):
    return load(text_artifact, threads=1)


@pytest.fixture(scope="module")
def alone(model) -> list[list[int]]:
    return [model.session().generate(p, GREEDY).tokens for p in PROMPTS]


class Gate:
    """Holds every model call until ``release`` is set (a request provably running)."""

    def __init__(self, program):
        self.program, self.inside, self.release = program, threading.Event(), threading.Event()
        self.input_names, self.output_names = program.input_names, program.output_names

    def run(self, feeds):
        self.inside.set()
        assert self.release.wait(30)
        return self.program.run(feeds)


def test_max_queue_counts_only_requests_that_wait_for_a_slot(text_artifact):
    model = load(text_artifact, threads=1)
    gate = Gate(model.program)
    model.program = gate
    engine = Engine(model, max_batch=1, max_queue=0)
    try:
        first = engine.submit(PROMPTS[0], GREEDY)  # a free slot: it starts, it does not wait
        assert gate.inside.wait(30)
        with pytest.raises(QueueFull, match="--max-queue 0"):
            engine.submit(PROMPTS[1], GREEDY)
        gate.release.set()
        assert first.wait(30) and first.results()[0].finish_reason == "length"
        assert engine.submit(PROMPTS[1], GREEDY).wait(30)
    finally:
        gate.release.set()
        engine.close(timeout=5)


def test_requests_that_could_never_run_are_refused_naming_the_culprit(model):
    engine = Engine(model, max_batch=4)
    try:
        cases = [
            (dict(prompt=[]), "prompt"),
            (dict(prompt=[999]), "prompt"),
            (dict(prompt=[1] * model.max_seq_len), "prompt"),
            (dict(prompt=[1], n=5), "n"),
            (dict(prompt=[1], params=SamplingParams(max_new_tokens=model.max_seq_len)), "max_tokens"),
        ]
        for kw, param in cases:
            with pytest.raises(InvalidRequest) as info:
                engine.submit(**{"params": GREEDY, **kw})
            assert info.value.param == param
        assert engine.queue_depth == 0
    finally:
        engine.close(timeout=5)


class Broken(EngineObserver):
    def admitted(self, request, queued_seconds):
        raise RuntimeError("metrics broken")

    first_token = tokens = finished = step = admitted  # type: ignore[assignment]


def test_a_broken_observer_and_prefix_cache_cost_no_request(model, alone):
    engine = Engine(model, observer=Broken())

    def broken_insert(*args, **kw):
        raise MemoryError("prefix cache full of holes")

    engine.prefix_cache.insert = broken_insert
    try:
        reqs = [engine.submit(p, GREEDY) for p in PROMPTS]
        assert all(r.wait(30) for r in reqs)
        assert [r.results()[0].tokens for r in reqs] == alone
    finally:
        engine.close(timeout=5)


def test_a_bug_in_the_loop_ends_the_requests_in_flight_and_the_engine_goes_on(model, alone):
    engine = Engine(model)
    real_step = engine._gen.step
    calls = {"n": 0}

    def step_with_a_bug():
        calls["n"] += 1
        if calls["n"] == 3:
            raise ZeroDivisionError("engine bug")
        return real_step()

    engine._gen.step = step_with_a_bug
    try:
        events: list[ChoiceEvent] = []
        hit = engine.submit(PROMPTS[0], GREEDY, on_event=events.append)
        assert hit.wait(30), "a request hangs after a bug in the loop"
        with pytest.raises(RequestFailed, match="engine bug"):
            hit.results()
        assert events[-1].finish_reason == "error" and "engine bug" in str(events[-1].error)
        assert engine._thread.is_alive() and engine.running == 0
        after = engine.submit(PROMPTS[1], GREEDY)
        assert after.wait(30) and after.results()[0].tokens == alone[1]
    finally:
        engine.close(timeout=5)


def test_a_choice_that_cannot_start_leaves_no_orphan_in_the_batch(model, alone, monkeypatch):
    """n=3, and the second fork fails: the request fails whole, the choice already forked does not keep a
    batch slot, and the next request runs normally."""
    engine = Engine(model, max_batch=3)
    from moeport.runtime import model as model_module

    real_fork, forks = model_module.Session.fork, {"n": 0}

    def fork(self):
        forks["n"] += 1
        if forks["n"] == 2:
            raise MemoryError("no room for another cache")
        return real_fork(self)

    monkeypatch.setattr(model_module.Session, "fork", fork)
    try:
        bad = engine.submit(PROMPTS[0], GREEDY, n=3)
        assert bad.wait(30)
        with pytest.raises(MemoryError):
            bad.results()
        assert not engine._gen.busy
        monkeypatch.setattr(model_module.Session, "fork", real_fork)
        good = engine.submit(PROMPTS[2], GREEDY, n=3)
        assert good.wait(30) and [c.tokens for c in good.results()] == [alone[2]] * 3
    finally:
        engine.close(timeout=5)


def test_a_consumer_that_raises_ends_only_its_own_request(model, alone):
    engine = Engine(model)

    def broken(event):
        raise BrokenPipeError("client gone")

    try:
        bad = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True), on_event=broken)
        good = [engine.submit(p, GREEDY) for p in PROMPTS[1:]]
        assert bad.wait(30) and all(r.wait(30) for r in good)
        assert bad.choices[0].finish_reason == "cancelled" and len(bad.choices[0].tokens) < 200
        assert [r.results()[0].tokens for r in good] == alone[1:]
    finally:
        engine.close(timeout=5)


def test_events_carry_the_text_as_generated(model):
    """Each event's raw text (for /v1/completions) joins into the completion's text, <think> tags and all."""
    engine = Engine(model)
    events: list[ChoiceEvent] = []
    try:
        r = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=40, ignore_eos=True), on_event=events.append)
        assert r.wait(30)
    finally:
        engine.close(timeout=5)
    assert "".join(e.text for e in events) == r.results()[0].text
    assert [t for e in events for t in e.tokens] == r.results()[0].tokens


def test_close_finishes_or_cancels_and_then_refuses(model):
    engine = Engine(model)
    long = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=400, ignore_eos=True))
    waiting = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=400, ignore_eos=True))
    while not long.choices:
        time.sleep(0.001)
    start = time.monotonic()
    engine.close(timeout=0)
    assert time.monotonic() - start < 10
    assert long.done and long.choices[0].finish_reason == "cancelled"
    assert waiting.done
    with pytest.raises(EngineClosed):
        engine.submit(PROMPTS[1], GREEDY)
