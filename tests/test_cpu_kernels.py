"""moeport's native kernels for bf16/fp16 and int8/int4 weights (backends/csrc) and the cpu backend's use
of them.

Each code path (portable C, AVX-512, AVX512-VNNI, AMX-BF16 where the CPU has them) is checked against
float64 numpy on the same stored weights, then whole models against transformers (float32), against
the float32-widening path the backend takes without the kernels, and quantized models against the
artifact's reference decomposition.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moeport.backends import cpu
from moeport.runtime import load

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def lib_path() -> Path:
    path, why = cpu.kernels_library()
    if path is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail(f"a C compiler is present but the kernels were not built: {why}")
        pytest.skip(why)
    return path


def _isa_paths(lib_path: Path) -> list[str]:
    best = cpu.kernels_isa(lib_path)
    x86 = platform.machine() in ("x86_64", "AMD64")
    avx2 = x86 and all(f in open("/proc/cpuinfo").read().split() for f in ("avx2", "fma", "f16c"))
    paths = ["generic"] + (["avx2"] if avx2 else []) + (["avx512"] if best.startswith("avx512") else [])
    return paths + (["vnni"] if "vnni" in best else []) + (["amx"] if "amx" in best else [])


def test_every_code_path_matches_numpy(lib_path):
    """Linear and MoE on every ISA this CPU has, bf16 and fp16, shapes with K/N/M tails (subprocesses: the
    path is chosen once per process)."""
    paths = _isa_paths(lib_path)
    if platform.machine() in ("x86_64", "AMD64"):
        flags = open("/proc/cpuinfo").read().split()
        # the fast paths are taken where they can be
        assert "avx512" in paths or "avx512f" not in flags
        assert "avx2" in paths or "avx2" not in flags
    for isa in paths:
        env = dict(os.environ, MOEPORT_KERNELS_ISA="" if isa == "amx" else isa)
        out = subprocess.run(
            [sys.executable, str(HERE / "kernel_check.py"), str(lib_path)], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout.strip().splitlines()[-1])
        want = {
            "generic": "generic",
            "avx2": "avx2",
            "avx512": "avx512",
            "vnni": "avx512+vnni",
            "amx": "avx512+vnni+amx-bf16",
        }
        assert report["isa"] == want[isa], report["isa"]
        # float32 accumulation of exactly-stored weights; the AMX path splits x (and dequantized weights)
        # in bf16 hi+lo (2^-17); VNNI keeps 15 bits of x per weight block
        tol = 2e-5 if isa == "amx" else 2e-6
        assert report["linear_max_rel_err"] < tol, report
        assert report["moe_max_rel_err"] < tol, report
        # vnni/amx and avx2's decode keep 15 bits of x per weight block
        qtol = 1e-4 if isa in ("vnni", "amx", "avx2") else 2e-6
        assert report["quantized_linear_max_rel_err"] < qtol, report
        assert report["quantized_moe_max_rel_err"] < qtol, report
        # the A8 ops: on avx2, 4-bit decode rounds x to int8 per block (as llama.cpp's Q4 x Q8 products and
        # MatMulNBits at accuracy level 4 do); other paths ignore the permission
        assert report["quantized_int8_activations_max_rel_err"] < (3e-2 if isa == "avx2" else qtol), report
        assert report["bad_index_error"] == "expert index 9 out of range [0, 8) (token 2)", report
        assert report["attention_max_rel_err"] < 1e-5, report  # float32 sums over up to 2049 keys
        assert report["heads_matmul_max_rel_err"] < 2e-6, report


def test_scratch_of_exited_threads_is_freed_and_the_pool_trimmed(lib_path):
    """Per-thread scratch goes with its thread; after a prefill-sized MoE call, decode-sized calls leave the
    pool holding only what they use, while a run of large calls keeps reusing its buffer (fresh process)."""
    out = subprocess.run(
        [sys.executable, str(HERE / "kernel_check.py"), str(lib_path), "--memory"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["scratch_before"] == [0, 0]
    threads, held = report["scratch_while_running"]
    assert threads == 6 and held > 0, report
    assert report["scratch_after_exit"] == [0, 0], report
    mb = 1 << 20
    buffers, pooled, allocs = report["pool_after_prefill"]
    assert pooled >= 30 * mb, report  # the prefill's workspace is kept for the next large call...
    assert report["pool_after_decode"][1] < 16 * mb, report  # ...and let go once calls are decode-sized
    (_, first_bytes, first_allocs), (_, bytes_after, allocs_after) = report["pool_large_run"]
    assert first_bytes >= 512 * mb and allocs_after == first_allocs and bytes_after == first_bytes, report
    assert report["pool_after_small"][1] < 16 * mb, report


def test_operator_errors_from_threads_keep_their_own_message(lib_path):
    """Shape errors raised on several threads at once each name their own shapes (the message was built in
    one static buffer shared by every thread; the race is narrow, so this guards more than it reproduces)."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    sess = _session(
        lib_path,
        [helper.make_node("LinearFp16", ["x", "wt"], ["y"], domain=cpu.KERNELS_DOMAIN)],
        [helper.make_tensor_value_info("x", f, ["m", "k"])],
        [helper.make_tensor_value_info("y", f, None)],
        [numpy_helper.from_array(rng.standard_normal((5, 32)).astype(np.float16), "wt")],
    )
    wrong: list[str] = []

    def hammer(features: int) -> None:
        x = np.zeros((1, features), np.float32)
        for _ in range(100):
            try:
                sess.run(None, {"x": x})
            except Exception as exc:  # noqa: BLE001 - the message is what is checked
                if f"x has {features} features" not in str(exc):
                    wrong.append(str(exc))

    threads = [threading.Thread(target=hammer, args=(n,)) for n in (17, 18, 19, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:3]


def test_bf16_artifact_runs_on_the_kernels_and_matches_transformers(oracle_cache, lib_path):
    import oracle

    _, ref_model = oracle_cache.checkpoint("v3_bf16")
    art = oracle_cache.artifact("v3_bf16", "bf16")
    model = load(art, backend="cpu")
    assert model.program.half_kernels
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(graph)
    cpu.rewrite_for_ort(rewritten, half_kernels=True)
    ops = {n.op_type for n in rewritten.graph.node if n.domain == cpu.KERNELS_DOMAIN}
    assert ops == {"LinearBf16", "MoEBf16", "HeadsMatMulBf16"}
    # no float32 copy of a 2-D weight, of the experts or of the absorbed kv_b_proj halves is made any more
    inits = {t.name: t for t in rewritten.graph.initializer}
    big_casts = [
        n
        for n in rewritten.graph.node
        if n.op_type == "Cast" and n.input[0] in inits and len(inits[n.input[0]].dims) >= 2
    ]
    assert not [n for n in big_casts if "embed" not in n.input[0]], big_casts

    want = oracle.reference_logits(ref_model, PROMPT)
    got = model.session().forward(PROMPT)
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= 1e-4 * scale
    assert model.session().generate(PROMPT, max_new_tokens=32, ignore_eos=True).tokens == oracle.reference_greedy(
        ref_model, PROMPT, 32
    )


def _prefill_then_steps(fast, other, one, seed: int, tol: float) -> None:
    """A 40-token prompt (prefill-sized products), then 4 greedy steps (decode-sized): ``fast`` stays within
    ``tol`` x logit scale of ``other``, and ``one`` (the same model on 1 thread) gives the same bits."""
    prompt = [int(t) for t in np.random.default_rng(seed).integers(1, 100, 40)]
    a, b, c = fast.session(), other.session(), one.session()
    la, lb, lc = a.prefill(prompt), b.prefill(prompt), c.prefill(prompt)
    for _ in range(4):
        token = int(np.argmax(lb))
        scale = max(1.0, float(np.abs(lb).max()))
        assert float(np.abs(la - lb).max()) <= tol * scale
        np.testing.assert_array_equal(la, lc)
        la, lb, lc = a.step(token), b.step(token), c.step(token)


@pytest.mark.parametrize("weights", ["bf16", "fp16"])
def test_kernels_equal_the_float32_widening_path(oracle_cache, lib_path, weights):
    """Same artifact, with and without the kernels: a long prompt (prefill-sized products, AMX where
    present), then decode steps; and 1 thread gives the same bits as 2."""
    art = oracle_cache.artifact("v3", weights)
    fast = load(art, backend="cpu", threads=2)
    slow = load(art, backend="cpu", half_kernels=False)
    one = load(art, backend="cpu", threads=1)
    assert fast.program.half_kernels and not slow.program.half_kernels
    _prefill_then_steps(fast, slow, one, seed=1, tol=1e-4)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_kernels_equal_the_reference_decomposition(tmp_path, lib_path, weights):
    """int8/int4 artifacts run on LinearQ*/MoEQ* (reading the stored codes, no MatMulNBits/QMoE) and
    compute what the artifact's reference functions define: a prefill-sized prompt (AMX where present),
    then decode steps (VNNI where present); 1 thread gives the same bits as 2. At accuracy level 0 x
    keeps 15 bits everywhere; the default (4) lets AVX2 round x to int8 for 4-bit products (Q4A8 ops,
    checked against numpy in test_every_code_path_matches_numpy)."""
    from moeport.exporter import export
    from moeport.tools.checkpoints import make_checkpoint

    # dims divisible by the block size, so every Linear and the experts are quantized
    ckpt = make_checkpoint(
        tmp_path / "ckpt", "tiny", seed=5, overrides={"moe_intermediate_size": 32, "intermediate_size": 128}
    )
    art = export(ckpt, tmp_path / weights, weights=weights, block_size=32)
    bits = weights[-1]
    fast = load(art, backend="cpu", threads=2, accuracy_level=0)
    one = load(art, backend="cpu", threads=1, accuracy_level=0)
    ref = load(art, backend="cpu", reference=True)
    assert fast.program.quant_kernels and not ref.program.quant_kernels
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False)
    cpu.rewrite_for_ort(graph, quant_kernels=True, accuracy_level=0)
    ops = {n.op_type for n in graph.graph.node if n.domain == cpu.KERNELS_DOMAIN}
    assert ops == {f"LinearQ{bits}", f"MoEQ{bits}", "LinearQ8"}  # int4 artifacts keep the head at 8 bits
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False)
    cpu.rewrite_for_ort(graph, quant_kernels=True)  # the default accuracy level, 4
    a8 = "A8" if bits == "4" else ""
    assert {n.op_type for n in graph.graph.node if n.domain == cpu.KERNELS_DOMAIN} == {
        f"LinearQ{bits}{a8}",
        f"MoEQ{bits}{a8}",
        "LinearQ8",
    }
    assert not [n for n in graph.graph.node if n.op_type in ("MatMulNBits", "QMoE")]
    _prefill_then_steps(fast, ref, one, seed=2, tol=2e-4)


def test_attention_kernel_equals_the_reference_decomposition(oracle_cache, lib_path):
    """LatentAttention runs as one fused operator per layer (no Softmax or attention MatMul left) and
    computes what its reference body defines, on a prompt (prefill blocks) and decode steps; 1 thread
    gives the same bits as 2. Batches with padded rows go through it in test_generation's batch tests."""
    art = oracle_cache.artifact("v3", "fp32")
    fast = load(art, backend="cpu", threads=2)
    ref = load(art, backend="cpu", attention_kernels=False)
    one = load(art, backend="cpu", threads=1)
    assert fast.program.attention_kernels and not ref.program.attention_kernels
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False)
    cpu.rewrite_for_ort(graph, attention_kernels=True)
    fused = [n for n in graph.graph.node if n.domain == cpu.KERNELS_DOMAIN and n.op_type == "LatentAttention"]
    assert len(fused) == fast.config.num_hidden_layers
    assert not [n for n in graph.graph.node if n.domain == "ai.moeport" or n.op_type == "Softmax"]
    _prefill_then_steps(fast, ref, one, seed=3, tol=1e-5)


def _session(lib_path: Path, nodes, inputs, outputs, inits) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(cpu.KERNELS_DOMAIN, 1)], ir_version=8
    )
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib_path))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_operator_errors_name_the_problem(lib_path):
    """Bad inputs reaching the ONNX Runtime operators fail the run with a message, never crash."""
    rng = np.random.default_rng(0)
    gu = numpy_helper.from_array(rng.standard_normal((8, 2 * 16, 32)).astype(ml_dtypes.bfloat16), "gu")
    dn = numpy_helper.from_array(rng.standard_normal((8, 32, 16)).astype(ml_dtypes.bfloat16), "dn")
    f = TensorProto.FLOAT
    sess = _session(
        lib_path,
        [helper.make_node("MoEBf16", ["x", "idx", "w", "gu", "dn"], ["y"], domain=cpu.KERNELS_DOMAIN)],
        [
            helper.make_tensor_value_info("x", f, ["t", 32]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["t", 2]),
            helper.make_tensor_value_info("w", f, ["t", 2]),
        ],
        [helper.make_tensor_value_info("y", f, None)],
        [gu, dn],
    )
    x = rng.standard_normal((3, 32)).astype(np.float32)
    w = np.full((3, 2), 0.5, np.float32)
    ok = sess.run(None, {"x": x, "idx": np.array([[0, 1], [2, 3], [7, 4]]), "w": w})[0]
    assert ok.shape == (3, 32) and np.isfinite(ok).all()
    with pytest.raises(Exception, match=r"MoEBf16: expert index 8 out of range \[0, 8\) \(token 1\)"):
        sess.run(None, {"x": x, "idx": np.array([[0, 1], [8, 3], [7, 4]]), "w": w})
    with pytest.raises(Exception, match=r"MoEBf16: inconsistent shapes"):
        sess.run(None, {"x": x, "idx": np.array([[0, 1], [2, 3]]), "w": w[:2]})

    lin = _session(
        lib_path,
        [helper.make_node("LinearFp16", ["x", "wt"], ["y"], domain=cpu.KERNELS_DOMAIN)],
        [helper.make_tensor_value_info("x", f, ["m", "k"])],
        [helper.make_tensor_value_info("y", f, None)],
        [numpy_helper.from_array(rng.standard_normal((5, 32)).astype(np.float16), "wt")],
    )
    with pytest.raises(Exception, match=r"LinearFp16: x has 31 features but the weight \[5, 32\] expects 32"):
        lin.run(None, {"x": np.zeros((2, 31), np.float32)})

    codes = numpy_helper.from_array(rng.integers(0, 255, (5, 16), dtype=np.uint8), "codes")
    scales = numpy_helper.from_array(np.ones((5, 1), np.float32), "scales")
    q4 = _session(
        lib_path,
        [helper.make_node("LinearQ4", ["x", "codes", "scales"], ["y"], domain=cpu.KERNELS_DOMAIN)],
        [helper.make_tensor_value_info("x", f, ["m", "k"])],
        [helper.make_tensor_value_info("y", f, None)],
        [codes, scales],
    )
    assert q4.run(None, {"x": np.ones((1, 32), np.float32)})[0].shape == (1, 5)
    with pytest.raises(Exception, match=r"LinearQ4: x has 30 features, which 4-bit codes with 16 bytes per row"):
        q4.run(None, {"x": np.zeros((2, 30), np.float32)})

    names = ["q", "past", "new", "allowed", "scale"]
    attn = _session(
        lib_path,
        [helper.make_node("LatentAttention", names, ["y"], domain=cpu.KERNELS_DOMAIN)],
        [helper.make_tensor_value_info(n, TensorProto.BOOL if n == "allowed" else f, None) for n in names],
        [helper.make_tensor_value_info("y", f, None)],
        [],
    )
    feeds = {
        "q": np.ones((1, 2, 1, 8), np.float32),
        "past": np.ones((1, 3, 8), np.float32),
        "new": np.ones((1, 1, 8), np.float32),
        "allowed": np.ones((1, 1, 1, 4), bool),
        "scale": np.array(0.5, np.float32),
    }
    np.testing.assert_allclose(attn.run(None, feeds)[0], np.ones((1, 2, 1, 8)), rtol=1e-6)
    with pytest.raises(Exception, match=r"LatentAttention: inconsistent shapes: q \[1, 2, 1, 8\], past \[1, 3, 7\]"):
        attn.run(None, dict(feeds, past=np.ones((1, 3, 7), np.float32)))
    with pytest.raises(Exception, match=r"LatentAttention: expects q \[B, H, S, D\]"):
        attn.run(None, dict(feeds, q=np.ones((2, 1, 8), np.float32)))


def test_backends_lists_the_kernels(lib_path):
    from click.testing import CliRunner

    from moeport.tools.cli import main

    out = CliRunner().invoke(main, ["backends"])
    assert out.exit_code == 0
    line = next(ln for ln in out.output.splitlines() if ln.startswith("cpu"))
    assert f"moeport kernels: {cpu.kernels_isa(lib_path)}" in line
