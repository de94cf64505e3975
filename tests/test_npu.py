"""The npu backends: static-shape half-precision graphs, checked on the CPU (npu-sim) against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import moeport
from moeport.backends import npu
from moeport.backends.base import BackendError, discover
from moeport.runtime import GenerationError, load
from moeport.tools.cli import main

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
SMALL = dict(buckets="4,16", cache_capacity=96, progress=False)


def compiled_dirs(art: Path, capacity: int | None = None) -> list[Path]:
    found = sorted((art / "compiled").glob("npu-*")) if (art / "compiled").exists() else []
    if capacity is not None:
        found = [d for d in found if json.loads((d / "meta.json").read_text())["capacity"] == capacity]
    return found


@pytest.fixture(scope="module")
def v3_art(oracle_cache, tmp_path_factory) -> Path:
    """A private copy of the v3 test artifact (compiled graphs are cached inside it)."""
    dest = tmp_path_factory.mktemp("npu") / "v3"
    shutil.copytree(oracle_cache.artifact("v3"), dest)
    return dest


def test_every_graph_is_static_half_precision_and_covered(v3_art):
    model = load(v3_art, backend="npu-sim", **SMALL)
    (directory,) = compiled_dirs(v3_art, 96)
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["graphs"] == {"decode": 1, "prefill-4": 4, "prefill-16": 16}
    coverage = npu.load_coverage()
    for name, tokens in meta["graphs"].items():
        graph = onnx.load(str(directory / f"{name}.onnx"))
        # every value has a fully static shape, no operator depends on data for its shape
        assert npu.nonstatic_values(graph) == []
        for value in list(graph.graph.input) + list(graph.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims), value.name
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert shapes["input_ids"] == [1, tokens]
        assert shapes["past_latent.0"] == [1, 96, model.latent_dim]
        assert not {n.op_type for n in graph.graph.node} & {"NonZero", "Loop", "If", "Scan"}
        npu.check_coverage(graph, coverage, name)
        # the weights are half precision (the router and norms' small vectors may stay float32)
        by_type: dict[int, int] = {}
        for t in graph.graph.initializer:
            by_type[t.data_type] = by_type.get(t.data_type, 0) + int(np.prod(t.dims))
        assert by_type.get(onnx.TensorProto.FLOAT16, 0) > 0.9 * sum(by_type.values())
    # the graphs share one weights file, each tensor stored once: about half the fp32 bytes
    fp32_bytes = (v3_art / "model.onnx.data").stat().st_size
    assert (directory / "weights.bin").stat().st_size < 0.6 * fp32_bytes


@pytest.mark.parametrize("spec", ["v3", "v2"])
def test_npu_sim_agrees_with_transformers(oracle_cache, spec):
    """Top-1 agreement >= 97% over 64 teacher-forced positions; the first 16 greedy tokens identical."""
    import oracle

    _, ref = oracle_cache.checkpoint(spec)
    model = load(oracle_cache.artifact(spec), backend="npu-sim", **SMALL)
    greedy = oracle.reference_greedy(ref, PROMPT, 56)
    assert model.session().generate(PROMPT, max_new_tokens=16, ignore_eos=True).tokens == greedy[:16]
    seq = PROMPT + greedy  # 64 positions
    want = oracle.reference_logits(ref, seq)
    got = model.session().forward(seq)
    assert got.shape == want.shape == (64, model.vocab_size)
    agreement = float((got.argmax(-1) == want.argmax(-1)).mean())
    assert agreement >= 0.97, agreement


def test_a_prompt_longer_than_the_largest_bucket_is_prefilled_in_chunks(oracle_cache, v3_art):
    import oracle

    _, ref = oracle_cache.checkpoint("v3")
    ids = [int(t) for t in np.random.default_rng(3).integers(0, 100, 36)]
    model = load(v3_art, backend="npu-sim", **SMALL)  # largest bucket 16: 16 + 16 + 4
    s = model.session()
    last = s.prefill(ids)
    assert model.program.calls == {"decode": 0, "prefill-4": 1, "prefill-16": 2}
    want = oracle.reference_logits(ref, ids)
    scale = np.abs(want).max()
    assert np.abs(last - want[-1]).max() < 2e-2 * scale
    assert last.argmax() == want[-1].argmax()
    # the cache holds the whole prompt: the next step matches transformers too
    step = s.step(7)
    want_step = oracle.reference_logits(ref, ids + [7])[-1]
    assert np.abs(step - want_step).max() < 2e-2 * scale
    assert s.position == 37 and s.cache.capacity == 96


def test_a_decode_that_fills_the_cache_stops_or_errors_clearly(v3_art):
    model = load(v3_art, backend="npu-sim", buckets="4", cache_capacity=12, progress=False)
    assert model.max_seq_len == 12
    out = model.session().generate(PROMPT, max_new_tokens=50, ignore_eos=True, on_context_limit="stop")
    # the last sampled token is returned but needs no cache row: 12 - 8 + 1 tokens
    assert out.finish_reason == "context" and len(out.tokens) == 12 - len(PROMPT) + 1
    with pytest.raises(GenerationError, match="cache capacity"):
        model.session().generate(PROMPT, max_new_tokens=50, ignore_eos=True)
    s = model.session()
    s.prefill(PROMPT + [1, 2, 3, 4])
    with pytest.raises(GenerationError, match=r"12 cached \+ 1 new tokens > max sequence length 12"):
        s.step(5)
    assert s.position == 12  # the failed step changed nothing


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(buckets=""), "bucket list is empty"),
        (dict(buckets="16,4"), "strictly increasing"),
        (dict(buckets="4,x"), "whole numbers"),
        (dict(buckets="4,128", cache_capacity=64), "bucket 128 does not fit the cache capacity 64"),
        (dict(cache_capacity=10**6), "longer than the artifact's max sequence length"),
        (dict(dtype="int8"), "float16 or bfloat16"),
        (dict(precision_mode="fastest"), "unknown precision mode 'fastest'"),
        (dict(enable_cann_graph="maybe"), "enable_cann_graph must be true or false"),
    ],
)
def test_bad_npu_options_are_named_and_leave_nothing(oracle_cache, tmp_path, options, message):
    art = tmp_path / "art"
    shutil.copytree(oracle_cache.artifact("v3"), art, ignore=shutil.ignore_patterns("compiled"))
    with pytest.raises(BackendError, match=message):
        load(art, backend="npu-sim", progress=False, **options)
    assert compiled_dirs(art) == []


def test_an_operator_outside_the_coverage_list_is_named_with_its_layer(oracle_cache, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(oracle_cache.artifact("v3"), art, ignore=shutil.ignore_patterns("compiled"))
    coverage = json.loads(npu.COVERAGE_FILE.read_text())
    softmax = coverage["operators"].pop("Softmax")
    narrow = tmp_path / "coverage.json"
    narrow.write_text(json.dumps(coverage))
    with pytest.raises(BackendError, match=r"operator Softmax is not in the CANN coverage list \(node .* in layer 0 "):
        load(art, backend="npu-sim", coverage=str(narrow), **SMALL)
    coverage["operators"]["Softmax"] = {**softmax, "dtypes": ["float16"]}
    narrow.write_text(json.dumps(coverage))
    with pytest.raises(BackendError, match=r"Softmax on float32 tensors is not in the CANN coverage list"):
        load(art, backend="npu-sim", coverage=str(narrow), **SMALL)
    assert compiled_dirs(art) == []


def test_compiled_graphs_are_cached_and_a_damaged_cache_is_rebuilt(v3_art, capsys):
    load(v3_art, backend="npu-sim", **SMALL)
    (directory,) = compiled_dirs(v3_art, 96)
    stamp = (directory / "meta.json").stat().st_mtime_ns
    model = load(v3_art, backend="npu-sim", **{**SMALL, "progress": True})
    assert "specializing" not in capsys.readouterr().err  # reused, not rebuilt
    assert (directory / "meta.json").stat().st_mtime_ns == stamp
    first = model.session().prefill(PROMPT)
    with open(directory / "decode.onnx", "ab") as f:
        f.write(b"garbage")
    again = load(v3_art, backend="npu-sim", **SMALL)
    (rebuilt,) = compiled_dirs(v3_art, 96)
    assert rebuilt == directory and (directory / "meta.json").stat().st_mtime_ns != stamp
    np.testing.assert_array_equal(again.session().prefill(PROMPT), first)


def test_bfloat16_graphs(oracle_cache, tmp_path):
    import oracle

    _, ref = oracle_cache.checkpoint("v3")
    art = tmp_path / "art"
    shutil.copytree(oracle_cache.artifact("v3"), art, ignore=shutil.ignore_patterns("compiled"))
    model = load(art, backend="npu-sim", dtype="bfloat16", **SMALL)
    (directory,) = compiled_dirs(art)
    graph = onnx.load(str(directory / "decode.onnx"), load_external_data=False)
    weights = {t.data_type for t in graph.graph.initializer if int(np.prod(t.dims)) > 1000}
    assert weights == {onnx.TensorProto.BFLOAT16}
    got = model.session().forward(PROMPT)
    assert "MatMul" in model.program.emulated  # no bfloat16 MatMul kernel on the CPU: float32 between casts
    want = oracle.reference_logits(ref, PROMPT)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_npu_without_cann_says_what_is_missing(oracle_cache, monkeypatch):
    entry = discover()["npu"]
    status = entry.availability()
    assert not status.available and "onnxruntime-cann" in status.reason
    r = CliRunner().invoke(main, ["run", str(oracle_cache.artifact("v3")), "--backend", "npu", "--prompt-ids", "1,2"])
    assert r.exit_code != 0 and "onnxruntime-cann" in r.output
    # with the provider present but no CANN toolkit, the missing libraries are named
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CANNExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.delenv("ASCEND_HOME_PATH", raising=False)
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    monkeypatch.setattr(npu.ctypes.util, "find_library", lambda name: None)
    status = npu.cann_status()
    assert not status.available and "libascendcl.so" in status.reason and "set_env.sh" in status.reason


def test_npu_flags_become_cann_provider_options(oracle_cache, tmp_path, monkeypatch):
    """On an Ascend machine the same graphs go to CANNExecutionProvider with the flags as its options."""
    import onnxruntime as ort

    art = tmp_path / "art"
    shutil.copytree(oracle_cache.artifact("v3"), art)
    monkeypatch.setattr(npu, "cann_status", lambda: npu.Availability(True, "test"))
    seen = {}

    def fake_session(model, so, providers):
        seen["model"], seen["providers"] = model, providers
        raise RuntimeError("no device in this test")

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    runner = CliRunner()
    flags = [
        "--buckets",
        "4,16",
        "--cache-capacity",
        "96",
        "--device-id",
        "3",
        "--npu-mem-limit",
        "2147483648",
        "--precision-mode",
        "allow_mix_precision",
        "--disable-cann-graph",
    ]
    r = runner.invoke(
        main, ["run", str(art), "--backend", "npu", "--prompt-ids", "1,2", "--max-new-tokens", "4", *flags]
    )
    assert r.exit_code != 0 and "no device in this test" in r.output
    cann, options = seen["providers"][0]
    assert cann == "CANNExecutionProvider" and seen["providers"][1] == "CPUExecutionProvider"
    assert options == {
        "device_id": "3",
        "npu_mem_limit": "2147483648",
        "precision_mode": "allow_mix_precision",
        "enable_cann_graph": "0",
        "arena_extend_strategy": "kNextPowerOfTwo",
    }
    # the graph chosen for a 2-token prompt (given as the bytes read from its verified file)
    graph = onnx.load_model_from_string(seen["model"])
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [1, 4]


def test_cli_run_on_npu_sim_equals_the_python_api(v3_art):
    r = CliRunner().invoke(
        main,
        [
            "run",
            str(v3_art),
            "--backend",
            "npu-sim",
            "--buckets",
            "4,16",
            "--cache-capacity",
            "96",
            "--prompt-ids",
            ",".join(map(str, PROMPT)),
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    got = json.loads(r.output.strip().splitlines()[-1])
    assert got["backend"] == "npu-sim"
    model = moeport.load(v3_art, backend="npu-sim", **SMALL)
    assert got["tokens"] == model.session().generate(PROMPT, max_new_tokens=12, ignore_eos=True).tokens


def test_tiny_reasoner_keeps_its_accuracy_on_npu_sim(tmp_path):
    from moeport.exporter import export
    from moeport.tools.arithmetic import evaluate, heldout_problems

    art = export("zoo:tiny-reasoner", tmp_path / "reasoner")
    problems = heldout_problems()
    reference = evaluate(load(art, backend="cpu"), problems)
    on_npu = evaluate(load(art, backend="npu-sim", progress=False), problems)
    assert len(on_npu.completions) == len(problems) == 200
    assert on_npu.accuracy >= reference.accuracy - 0.02, (on_npu.correct, reference.correct)
    r = CliRunner().invoke(
        main, ["run", str(art), "--backend", "npu-sim", "--prompt", "347+58", "--chat", "--temperature", "0", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["content"] == "405"


def test_fork_and_batches_on_the_fixed_capacity_cache(v3_art):
    model = load(v3_art, backend="npu-sim", **SMALL)
    a = model.session()
    a.prefill(PROMPT)
    b = a.fork()
    assert b.cache.capacity == 96 and b.cache.dtype == np.float16
    np.testing.assert_array_equal(a.step(5), b.step(5))
    # continuous batching runs the sessions one by one on the static graphs: same tokens as alone
    prompts = [PROMPT, PROMPT[:3], [7, 8, 9, 10, 11]]
    alone = [model.session().generate(p, max_new_tokens=6, ignore_eos=True).tokens for p in prompts]
    gen = model.batch(max_batch=3)
    requests = [gen.submit(model.session(), p, max_new_tokens=6, ignore_eos=True) for p in prompts]
    gen.run()
    assert [r.result().tokens for r in requests] == alone
