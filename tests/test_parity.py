"""Exported models on the cpu backend agree with transformers' DeepSeek classes (float32)."""

from __future__ import annotations

import numpy as np
import pytest

import moeport
from moeport.runtime import load

SPECS = ["v3", "v2", "v3_bf16", "v3_sharded", "v3_fp8", "v3_tied", "v3_noqlora_ropeplain"]
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
GREEDY_STEPS = 32


def assert_logits_close(got: np.ndarray, want: np.ndarray, rel: float = 1e-4) -> None:
    """max |got - want| <= rel * logit scale (the largest reference logit magnitude, at least 1)."""
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x logit scale {scale:.3g}"


@pytest.mark.parametrize("spec", SPECS)
def test_prompt_logits_match_transformers(oracle_cache, spec):
    import oracle

    _, ref_model = oracle_cache.checkpoint(spec)
    model = load(oracle_cache.artifact(spec), backend="cpu")
    got = model.session().forward(PROMPT)
    want = oracle.reference_logits(ref_model, PROMPT)
    assert got.shape == want.shape
    assert_logits_close(got, want)


@pytest.mark.parametrize("spec", SPECS)
def test_32_greedy_tokens_identical_to_transformers(oracle_cache, spec):
    import oracle

    _, ref_model = oracle_cache.checkpoint(spec)
    want = oracle.reference_greedy(ref_model, PROMPT, GREEDY_STEPS)
    model = moeport.load(oracle_cache.artifact(spec), backend="cpu")
    got = model.session().generate(PROMPT, max_new_tokens=GREEDY_STEPS, ignore_eos=True).tokens
    assert got == want
    assert len(set(want)) > 3, "degenerate reference: the test model repeats one token"


@pytest.mark.parametrize("spec", ["v3", "v2"])
def test_prefill_then_steps_equals_one_long_prefill(oracle_cache, spec):
    model = load(oracle_cache.artifact(spec), backend="cpu")
    whole = model.session().forward(PROMPT)
    s = model.session()
    first = s.prefill(PROMPT[:3])
    stepped = [first] + [s.step(t) for t in PROMPT[3:]]
    assert s.position == len(PROMPT)
    np.testing.assert_allclose(np.stack(stepped), whole[2:], atol=1e-4 * max(1.0, np.abs(whole).max()))
    # reset starts a fresh sequence
    s.reset()
    assert s.position == 0
    np.testing.assert_allclose(s.prefill(PROMPT), whole[-1], atol=1e-5 * max(1.0, np.abs(whole).max()))


def test_bf16_checkpoint_exported_as_bf16_is_lossless(oracle_cache):
    """bf16 source weights stored as bf16 are the same numbers: same greedy tokens as the fp32 reference."""
    import oracle

    _, ref_model = oracle_cache.checkpoint("v3_bf16")
    want = oracle.reference_greedy(ref_model, PROMPT, GREEDY_STEPS)
    art = oracle_cache.artifact("v3_bf16", "bf16")
    model = load(art, backend="cpu")
    assert model.artifact.manifest["weights"]["dtype"] == "bf16"
    assert_logits_close(model.session().forward(PROMPT), oracle.reference_logits(ref_model, PROMPT))
    assert model.session().generate(PROMPT, max_new_tokens=GREEDY_STEPS, ignore_eos=True).tokens == want


def test_fp16_weights_stay_close(oracle_cache):
    """fp16 storage rounds the weights: logits move by roughly fp16 precision, not more."""
    import oracle

    _, ref_model = oracle_cache.checkpoint("v3")
    art = oracle_cache.artifact("v3", "fp16")
    fp32_bytes = load(oracle_cache.artifact("v3"), backend="cpu").artifact.manifest["weights"]["bytes"]
    model = load(art, backend="cpu")
    assert model.artifact.manifest["weights"]["bytes"] < 0.6 * fp32_bytes
    assert_logits_close(model.session().forward(PROMPT), oracle.reference_logits(ref_model, PROMPT), rel=2e-2)
