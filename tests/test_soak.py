"""Soak tests: many threads on one model give the serial tokens; a long generation keeps memory flat."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import byte_model

from moeport.runtime import load

THREADS, SESSIONS, STEPS = 8, 4, 200


def decode_greedily(session, prompt: list[int], steps: int) -> list[int]:
    """Prefill ``prompt`` then ``steps`` greedy decode steps on the Session API; the tokens chosen."""
    logits = session.prefill(prompt)
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = session.step(tokens[-1])
    return tokens


def test_threads_times_sessions_give_the_serial_tokens(tiny_artifact):
    """8 threads x 4 sessions x 200 greedy steps, interleaved, on one loaded model: exactly the tokens of
    running each session alone, one after the other."""
    model = load(tiny_artifact)
    prompts = [[(7 * i + j) % 250 + 2 for j in range(1 + i % 9)] for i in range(THREADS * SESSIONS)]
    serial = [decode_greedily(model.session(), p, STEPS) for p in prompts]

    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        try:
            mine = range(t * SESSIONS, (t + 1) * SESSIONS)
            sessions = {i: model.session() for i in mine}
            logits = {i: sessions[i].prefill(prompts[i]) for i in mine}
            tokens: dict[int, list[int]] = {i: [] for i in mine}
            start.wait()
            for _ in range(STEPS):  # round-robin over this thread's sessions
                for i in mine:
                    tokens[i].append(int(np.argmax(logits[i])))
                    logits[i] = sessions[i].step(tokens[i][-1])
            got.update(tokens)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[0]
    assert [got[i] for i in range(len(prompts))] == serial


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def long_text_artifact(tmp_path_factory) -> Path:
    """The tiny model with a 16k-token context and the byte-level tokenizer (text is detokenized too)."""
    return byte_model(tmp_path_factory.mktemp("long"), seed=4, max_position_embeddings=16384)


def test_a_10k_token_generation_keeps_memory_flat(long_text_artifact):
    """RSS after the first 1k tokens grows < 5% over the next 9k, the latent cache's rows counted out (they
    are the context: 3 layers x 40 floats per token here). What remains is the generation's own text and
    token lists and the allocator keeping the cache's outgrown buffers for reuse. Prints the curve."""
    model = load(long_text_artifact)
    total, every = 10_000, 1_000
    session = model.session()
    gen = model.batch(1)
    req = gen.submit(
        session, "The soak test begins here: ", max_new_tokens=total, ignore_eos=True, temperature=0.8, seed=1
    )
    curve: list[tuple[int, int, int]] = []  # (tokens, RSS, bytes of cache rows)
    while gen.busy:
        gen.step()
        req.take_deltas()  # a streaming consumer
        n = len(req.tokens)
        if n % every == 0 and (not curve or curve[-1][0] != n):
            curve.append((n, rss_bytes(), session.cache.nbytes))
    result = req.result()
    assert len(result.tokens) == total and result.finish_reason == "length"
    assert len(result.text) > 0
    mb = 1 << 20
    print("\ntokens   RSS MB   cache rows MB   RSS - cache MB")
    for n, rss, cache in curve:
        print(f"{n:6d} {rss / mb:8.1f} {cache / mb:15.2f} {(rss - cache) / mb:16.1f}")
    base = curve[0][1] - curve[0][2]
    worst = max(rss - cache for _, rss, cache in curve[1:])
    assert (worst - base) / base < 0.05, curve
