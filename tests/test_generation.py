"""Runtime behaviour: batching, threads, fork, sampling, stops, streaming text, reasoning split."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import BOS, EOS

from moeport.exporter import export
from moeport.runtime import (
    GenerationError,
    ReasoningSplitter,
    Sampler,
    SamplingError,
    SamplingParams,
    TextDelta,
    load,
)
from moeport.runtime.text import IncrementalDetokenizer, StopStringMatcher, Tokenizer

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82], [1, 41, 42, 13, 56, 23, 9, 9, 9, 17, 100, 5], [7]]
# -- batching, threads, fork ---------------------------------------------------------------------


def test_batched_generation_equals_one_at_a_time(oracle_cache):
    """Sessions of different lengths join and leave a continuous batch; each gets its sequential result."""
    model = load(oracle_cache.artifact("v3"))
    lengths = [20, 5, 12, 9]
    alone = [
        model.session().generate(p, max_new_tokens=n, ignore_eos=True).tokens
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]

    gen = model.batch(max_batch=3)
    sessions = [model.session() for _ in PROMPTS]
    reqs = [
        gen.submit(sessions[0], PROMPTS[0], max_new_tokens=lengths[0], ignore_eos=True),
        gen.submit(sessions[1], PROMPTS[1], max_new_tokens=lengths[1], ignore_eos=True),
    ]
    for _ in range(3):  # the first two are decoding when the others arrive
        gen.step()
    reqs += [
        gen.submit(s, p, max_new_tokens=n, ignore_eos=True)
        for s, p, n in zip(sessions[2:], PROMPTS[2:], lengths[2:], strict=True)
    ]
    sizes = []
    while gen.busy:
        sizes.append(len(gen.active))
        gen.step()
    assert max(sizes) == 3 and min(sizes) >= 1  # capped at max_batch; the queue drained as sequences left
    assert [r.result().tokens for r in reqs] == alone
    assert [s.position for s in sessions] == [len(p) + n - 1 for p, n in zip(PROMPTS, lengths, strict=True)]


def test_batched_logits_match_sequential(oracle_cache):
    model = load(oracle_cache.artifact("v2"))
    solo = [model.session().forward(p) for p in PROMPTS]
    rows = model.forward_batch([(model.session(), p) for p in PROMPTS], logits_to_keep=max(map(len, PROMPTS)))
    for a, b in zip(rows, solo, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, np.abs(b).max()))


def test_sampled_batch_equals_sampled_sequential(oracle_cache):
    model = load(oracle_cache.artifact("v3"))
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, ignore_eos=True)
    alone = [model.session().generate(p, seed=i, **kw).tokens for i, p in enumerate(PROMPTS)]
    gen = model.batch()
    reqs = [gen.submit(model.session(), p, seed=i, **kw) for i, p in enumerate(PROMPTS)]
    gen.run()
    assert [r.result().tokens for r in reqs] == alone


def test_sessions_in_threads_give_sequential_tokens(oracle_cache):
    model = load(oracle_cache.artifact("v3"))
    want = [model.session().generate(p, max_new_tokens=16, ignore_eos=True).tokens for p in PROMPTS]
    got: dict[int, list[int]] = {}

    def work(i: int) -> None:
        got[i] = model.session().generate(PROMPTS[i], max_new_tokens=16, ignore_eos=True).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(PROMPTS))] == want


def test_fork_equals_re_prefill(oracle_cache):
    model = load(oracle_cache.artifact("v3"))
    system = [5, 6, 7, 8, 9, 10]
    base = model.session()
    base.prefill(system)
    for suffix in ([20, 21, 22], [30], [40, 41]):
        child = base.fork()
        forked = child.generate(suffix, max_new_tokens=10, ignore_eos=True).tokens
        fresh = model.session().generate(system + suffix, max_new_tokens=10, ignore_eos=True).tokens
        assert forked == fresh
    assert base.position == len(system)  # the parent is untouched by its children


def test_truncate_then_continue_equals_fresh(oracle_cache):
    model = load(oracle_cache.artifact("v3"))
    s = model.session()
    s.prefill(PROMPTS[0])
    s.truncate(4)
    np.testing.assert_allclose(s.prefill([50, 51]), model.session().prefill(PROMPTS[0][:4] + [50, 51]), atol=1e-4)
    with pytest.raises(GenerationError, match="cannot truncate"):
        s.truncate(99)


# -- sampling ------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_seed_sensitive(oracle_cache):
    model = load(oracle_cache.artifact("v3"))
    kw = dict(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    a = model.session().generate(PROMPTS[0], seed=1234, **kw).tokens
    b = model.session().generate(PROMPTS[0], seed=1234, **kw).tokens
    others = {tuple(model.session().generate(PROMPTS[0], seed=s, **kw).tokens) for s in range(5)}
    assert a == b
    assert len(others) > 1


def _hf_filtered(logits: np.ndarray, **kw) -> np.ndarray:
    """transformers' logits warpers as the oracle: which tokens survive top-k / top-p / min-p."""
    import torch
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = torch.tensor(logits, dtype=torch.float32)[None]
    if kw.get("top_k"):
        x = TopKLogitsWarper(kw["top_k"])(None, x)
    if kw.get("top_p", 1.0) < 1.0:
        x = TopPLogitsWarper(kw["top_p"])(None, x)
    if kw.get("min_p"):
        x = MinPLogitsWarper(kw["min_p"])(None, x)
    return np.isfinite(x[0].numpy())


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=8, top_p=0.5, min_p=0.05)])
def test_top_k_top_p_min_p_restrict_the_support_like_transformers(kw):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32) * 2
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7, **kw))
    support = sampler.probabilities(logits) > 0
    np.testing.assert_array_equal(support, _hf_filtered(logits, **kw))
    # a statistical check of the draws: only kept tokens, in proportion to their renormalized mass
    draws = np.array([sampler(logits) for _ in range(4000)])
    assert set(np.unique(draws)) <= set(np.flatnonzero(support))
    probs = sampler.probabilities(logits)
    freq = np.bincount(draws, minlength=logits.size) / draws.size
    assert np.abs(freq - probs).max() < 0.03


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.random.default_rng(1).normal(size=30).astype(np.float32)
    history = [3, 3, 7, 12, 29]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), torch.tensor(logits)[None])[0].numpy()
    probs = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.3)).probabilities(logits, history)
    e = np.exp(want - want.max())
    np.testing.assert_allclose(probs, e / e.sum(), rtol=1e-5)


def test_greedy_ignores_the_seed(oracle_cache):
    model = load(oracle_cache.artifact("v3"))
    a = model.session().generate(PROMPTS[1], max_new_tokens=8, seed=1, ignore_eos=True).tokens
    b = model.session().generate(PROMPTS[1], max_new_tokens=8, seed=2, ignore_eos=True).tokens
    assert a == b


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
        (dict(seed="abc"), "seed must be an integer"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(stop=("",)), "stop strings must be non-empty"),
        (dict(stop="x"), "stop must be a list of strings"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    ],
)
def test_bad_sampling_parameters(kw, message):
    with pytest.raises(SamplingError, match=message):
        SamplingParams(**kw)


def test_generation_config_supplies_defaults(tiny_checkpoint, tmp_path):
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    (ckpt / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 7})
    )
    model = load(export(ckpt, tmp_path / "art"))
    p = model.sampling_params()
    assert (p.temperature, p.top_p, p.max_new_tokens) == (0.6, 0.95, 7)
    assert model.sampling_params(temperature=0).greedy
    assert len(model.session().generate([1, 2], ignore_eos=True).tokens) == 7


# -- stops ---------------------------------------------------------------------------------------


def test_context_limit_stop_or_error(tiny_checkpoint, tmp_path):
    model = load(export(tiny_checkpoint, tmp_path / "art", max_seq_len=12))
    with pytest.raises(GenerationError, match="exceeds the max sequence length 12"):
        model.session().generate([1, 2, 3, 4], max_new_tokens=20, ignore_eos=True)
    s = model.session()
    out = s.generate([1, 2, 3, 4], max_new_tokens=20, ignore_eos=True, on_context_limit="stop")
    assert out.finish_reason == "context"
    assert len(out.tokens) == 12 - 4 + 1 and s.position == 12  # the cache is exactly full


def test_eos_stops_and_is_reported(oracle_cache):
    model = load(oracle_cache.artifact("v3"))
    free = model.session().generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True).tokens
    out = model.session().generate(PROMPTS[0], max_new_tokens=10, stop_token_ids=(free[4],))
    assert out.finish_reason == "eos"
    assert out.tokens == free[: free.index(free[4]) + 1]


def test_stop_strings_cut_the_text(text_artifact):
    model = load(text_artifact)
    full = model.session().generate("hello", max_new_tokens=40, ignore_eos=True)
    start = next(i for i in range(5, len(full.text)) if "\ufffd" not in full.text[i : i + 3])
    stop = full.text[start : start + 3]
    assert len(stop) == 3
    out = model.session().generate("hello", max_new_tokens=40, ignore_eos=True, stop=(stop, "never-there"))
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text


def test_stop_string_matcher_holds_back_partial_matches():
    m = StopStringMatcher(["</end>", "STOP"])
    assert m.push("abc</") == ("abc", False)
    assert m.push("en") == ("", False)
    assert m.push("x more S") == ("</enx more ", False)
    assert m.push("TOP tail") == ("", True)
    m = StopStringMatcher(["ab"])
    assert m.push("xa") == ("x", False)
    assert m.flush() == "a"


# -- text ----------------------------------------------------------------------------------------


def test_incremental_detokenizer_never_emits_half_a_character(text_artifact):
    tok = Tokenizer(text_artifact / "tokenizer.json", text_artifact / "tokenizer_config.json")
    text = "héllo wörld — 你好, 🎉 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # one token per byte: multibyte characters span tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text
    assert deltas[ids.index(tok.encode("🎉", add_special_tokens=False)[0])] == ""  # held back mid-emoji


def test_streamed_text_equals_the_final_text(text_artifact):
    model = load(text_artifact)
    stream = model.session().stream("Zürich", max_new_tokens=30, ignore_eos=True, temperature=1.0, seed=5)
    deltas = []
    while True:
        try:
            deltas.append(next(stream))
        except StopIteration as done:
            result = done.value
            break
    assert "".join(d.text for d in deltas) == result.content
    assert result.text == model.tokenizer.decode(result.tokens)
    assert all(d.part == "content" for d in deltas)


def test_chat_prompt_uses_the_template_and_bos(text_artifact):
    model = load(text_artifact)
    ids = model.chat_ids([{"role": "user", "content": "hi"}])
    assert model.tokenizer.decode(ids, skip_special_tokens=False) == "<bos>[user]hi[assistant]"
    assert ids[0] == 256 and ids.count(256) == 1


def test_text_prompt_gets_bos_when_the_tokenizer_asks(text_artifact):
    model = load(text_artifact)
    s = model.session()
    s.generate("ab", max_new_tokens=1, ignore_eos=True)
    assert s.tokens[:3] == [256, *model.tokenizer.encode("ab", add_special_tokens=False)]


def _split(chunks: list[str], in_reasoning: bool = False) -> tuple[list[TextDelta], ReasoningSplitter]:
    sp = ReasoningSplitter(in_reasoning)
    out = [d for c in chunks for d in sp.push(c)] + sp.flush()
    return out, sp


def test_think_split_with_tags_across_deltas():
    out, sp = _split(["<th", "ink>\n7+8", "=15\n</", "thi", "nk>\n\n", "40", "5"])
    assert sp.reasoning_text == "7+8=15" and sp.content_text == "405"
    assert [d.part for d in out] == ["reasoning", "reasoning", "content", "content"]
    assert "".join(d.text for d in out if d.part == "reasoning") == "7+8=15"


def test_think_split_when_the_prompt_opened_the_think_block():
    _, sp = _split(["step 1\n", "</think>", "answer"], in_reasoning=True)
    assert (sp.reasoning_text, sp.content_text) == ("step 1", "answer")


def test_no_think_block_is_all_content():
    out, sp = _split(["a < b and <thin", "g>"])
    assert sp.reasoning_text == "" and sp.content_text == "a < b and <thing>"
    assert all(d.part == "content" for d in out)


def test_chat_template_renders_like_transformers(text_artifact):
    from transformers import PreTrainedTokenizerFast

    from moeport.runtime.text import ChatTemplate

    template = (Path(__file__).parent / "data" / "deepseek_r1_chat_template.jinja").read_text()
    ours_template = ChatTemplate(template, BOS, EOS)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(text_artifact / "tokenizer.json"), bos_token=BOS, eos_token=EOS)
    conversations = [
        [{"role": "user", "content": "347+58"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2"}],
        [
            {"role": "user", "content": "1+1"},
            {"role": "assistant", "content": "<think>\n1+1=2\n</think>\n\n2"},
            {"role": "user", "content": "and 2+2?"},
        ],
    ]
    for messages in conversations:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)
            assert ours_template.render(messages, add_generation_prompt=gen) == want


def test_batched_sessions_share_buffers_while_batched_and_get_their_rows_back(text_artifact):
    """A batch decodes in shared buffers (no copy of every cache at every step); a finished request's session
    holds its own rows again, equal to a lone run's, and keeps working alone."""
    model = load(text_artifact)
    prompts = [[256, 72, 105], [256, 72, 101, 108, 108, 111], [256, 33]]
    want = [model.session().generate(p, max_new_tokens=6 + i, ignore_eos=True).tokens for i, p in enumerate(prompts)]
    gen = model.batch()
    sessions = [model.session() for _ in prompts]
    reqs = [
        gen.submit(s, p, max_new_tokens=6 + i, ignore_eos=True)
        for i, (s, p) in enumerate(zip(sessions, prompts, strict=True))
    ]
    gen.step()
    gen.step()
    shared = {id(s.cache.slot[0]) for s in sessions if s.cache.slot is not None}
    assert len(shared) == 1 and all(s.cache.slot is not None for s in sessions)  # one set of buffers
    gen.run()
    assert [r.result().tokens for r in reqs] == want
    for s, p, w in zip(sessions, prompts, want, strict=True):
        assert s.cache.slot is None  # detached when its request ended
        alone = model.session()
        alone.prefill([*p, *w[:-1]])
        for got, ref in zip(s.cache.views(), alone.cache.views(), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        assert s.step(w[-1]).shape == (model.vocab_size,)
