"""The ``tvm`` backend (Apache TVM Relax, target llvm) against the ``cpu`` backend on the tiny preset."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm not installed (pip install 'moeport[tvm]')")

from moeport.backends.tvm import TvmBackend  # noqa: E402
from moeport.backends.tvm_target import host_arch  # noqa: E402
from moeport.exporter.manifest import sha256_file  # noqa: E402
from moeport.runtime import load  # noqa: E402

PROMPT = [1, 5, 9, 33, 70, 2, 8, 100, 200, 3]


@pytest.fixture(scope="module")
def tvm_artifact(tiny_artifact, tmp_path_factory):
    """A private copy of the tiny artifact (the compiled cache is written inside it)."""
    dst = tmp_path_factory.mktemp("tvmart") / "art"
    shutil.copytree(tiny_artifact, dst)
    return dst


def test_availability():
    status = TvmBackend().availability()
    assert status.available, status.reason


def test_greedy_tokens_match_cpu_and_cache_is_reused(tvm_artifact):
    start = time.perf_counter()
    first = load(tvm_artifact, backend=TvmBackend())
    first_s = time.perf_counter() - start
    assert not first.program.cache_hit
    cached = list((tvm_artifact / "compiled").glob("tvm-*/lib.so"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    meta = json.loads((cached[0].parent / "meta.json").read_text())
    assert meta["target"] == "llvm"

    start = time.perf_counter()
    second = load(tvm_artifact, backend=TvmBackend())
    second_s = time.perf_counter() - start
    assert second.program.cache_hit
    assert cached[0].stat().st_mtime_ns == mtime
    assert second_s < first_s / 5, (first_s, second_s)

    cpu = load(tvm_artifact, backend="cpu")
    want = cpu.session().generate(PROMPT, max_new_tokens=32, ignore_eos=True).tokens
    got = second.session().generate(PROMPT, max_new_tokens=32, ignore_eos=True).tokens
    assert len(want) == 32
    assert got == want


def test_prefill_and_decode_logits_match_cpu(tvm_artifact):
    tvm_model = load(tvm_artifact, backend=TvmBackend())
    cpu = load(tvm_artifact, backend="cpu")
    ref = cpu.session().forward(PROMPT)
    out = tvm_model.session().forward(PROMPT)  # all positions, past = 0
    scale = float(np.abs(ref).max())
    assert np.abs(out - ref).max() <= 1e-4 * scale
    a, b = cpu.session(), tvm_model.session()
    a.prefill(PROMPT[:4])
    b.prefill(PROMPT[:4])
    for t in PROMPT[4:]:  # decode steps with past > 0; shapes stay symbolic (one library)
        assert np.abs(a.step(t) - b.step(t)).max() <= 1e-4 * scale


def test_batched_sessions_match_cpu(tvm_artifact):
    tvm_model = load(tvm_artifact, backend=TvmBackend())
    cpu = load(tvm_artifact, backend="cpu")
    outs = []
    for model in (cpu, tvm_model):
        s1, s2 = model.session(), model.session()
        s1.prefill(PROMPT[:3])
        outs.append(model.forward_batch([(s1, PROMPT[3:5]), (s2, PROMPT[:6])], logits_to_keep=1))
    for ref, got in zip(*outs, strict=True):
        assert np.abs(ref - got).max() <= 1e-4 * float(np.abs(ref).max())


def test_int4_artifact_matches_cpu_reference(tiny_checkpoint, tmp_path):
    """Quantized weights: the inlined QLinear/QMoE bodies (BitwiseAnd, BitShift) import and build."""
    from moeport.exporter import export

    art = export(tiny_checkpoint, tmp_path / "art-int4", weights="int4")
    tvm_model = load(art, backend=TvmBackend())
    cpu = load(art, backend="cpu", reference=True)  # float32 activations, like the reference bodies
    want = cpu.session().generate(PROMPT, max_new_tokens=16, ignore_eos=True).tokens
    got = tvm_model.session().generate(PROMPT, max_new_tokens=16, ignore_eos=True).tokens
    assert got == want


def test_a_library_this_machine_did_not_build_is_never_loaded(tmp_path):
    """A compiled library is native code: one planted in an artifact is rebuilt, not loaded."""
    import shutil

    from moeport.exporter import export
    from moeport.runtime import load
    from moeport.tools.checkpoints import make_checkpoint

    art = export(make_checkpoint(tmp_path / "ckpt", "tiny", seed=2), tmp_path / "art")
    first = load(art, backend="tvm").program
    lib = next((art / "compiled").glob("tvm-*/lib.so"))
    planted = lib.read_bytes() + b"\0"  # any other bytes: not a library this machine recorded
    fake = lib.with_name("planted.so")
    fake.write_bytes(planted)
    fake.replace(lib)  # a new file: the library the first program mapped stays intact
    again = load(art, backend="tvm").program
    assert not again.cache_hit and first.cache_hit is False
    assert lib.read_bytes() != planted  # rebuilt in place
    shutil.rmtree(art / "compiled")


def test_run_compiles_on_first_use_then_compile_ships_the_same_library(tmp_path):
    from click.testing import CliRunner

    from moeport.exporter import export
    from moeport.tools.cli import main

    art = export("zoo:tiny-reasoner", tmp_path / "art")
    runner = CliRunner()
    chat = ["run", str(art), "--backend", "tvm", "--prompt", "347+58", "--chat", "--json"]
    first = runner.invoke(main, chat)
    assert first.exit_code == 0, first.output
    assert "tvm: compiling" in first.stderr  # the one-time build says so (stderr; stdout stays JSON)
    assert json.loads(first.stdout.strip().splitlines()[-1])["content"] == "405"
    assert "compiled" not in json.loads((art / "manifest.json").read_text())  # a run does not ship

    shipped = runner.invoke(main, ["compile", str(art), "--backend", "tvm"])
    assert shipped.exit_code == 0 and "cached build reused for backend 'tvm'" in shipped.stdout, shipped.output
    lib = next((art / "compiled").glob("tvm-*/lib.so"))
    entry = json.loads((art / "manifest.json").read_text())["compiled"][lib.relative_to(art).as_posix()]
    assert entry["sha256"] == sha256_file(lib) and entry["arch"] == host_arch() and entry["target"] == "llvm"
    again = runner.invoke(main, chat)
    assert "tvm: compiling" not in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["content"] == "405"


@pytest.mark.parametrize(
    "target, message",
    [
        ("not-a-target", 'Target kind "not-a-target" is not defined'),
        ("llvm -mtriple=nosuchcpu-linux-gnu", "TVM's LLVM has no 'nosuchcpu' architecture"),
        ("llvm -mcpu=nonsense", "LLVM knows no CPU 'nonsense'"),
        ("llvm -bogus-flag=1", "Unknown config option 'bogus-flag'"),
        ("-mtriple=aarch64-linux-gnu", "expected a kind first"),
    ],
)
def test_a_target_tvm_rejects_is_refused_before_building(tvm_artifact, target, message):
    from click.testing import CliRunner

    from moeport.tools.cli import main

    start = time.perf_counter()
    bad = CliRunner().invoke(main, ["compile", str(tvm_artifact), "--backend", "tvm", "--target", target])
    assert bad.exit_code == 1 and "could not compile" in bad.output and message in bad.output, bad.output
    assert "Traceback" not in bad.output and time.perf_counter() - start < 5  # refused up front, no build


@pytest.mark.parametrize("field, value", [("tvm", "0.0.1"), ("target_json", '{"kind": "llvm", "mcpu": "x"}')])
def test_a_library_built_for_another_tvm_or_target_is_rebuilt_never_loaded(
    tiny_checkpoint, tmp_path, monkeypatch, field, value
):
    import tvm

    from moeport.exporter import export

    art = export(tiny_checkpoint, tmp_path / "art")
    load(art, backend="tvm", progress=False)
    meta_path = next((art / "compiled").glob("tvm-*/meta.json"))
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    loaded = []
    real = tvm.runtime.load_module

    def spy(path, *args):
        loaded.append((path, json.loads(meta_path.read_text())[field]))  # the meta of what is loaded
        return real(path, *args)

    monkeypatch.setattr(tvm.runtime, "load_module", spy)
    again = load(art, backend="tvm", progress=False).program
    assert not again.cache_hit
    assert len(loaded) == 1 and loaded[0][1] != value  # only the rebuilt library (current meta) was loaded


def test_tvm_not_installed_names_the_extra(monkeypatch):
    import sys

    from moeport.backends.base import BackendError, get_backend

    for name in [m for m in sys.modules if m == "tvm" or m.startswith("tvm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tvm", None)  # import tvm -> ImportError
    status = TvmBackend().availability()
    assert not status.available and "pip install 'moeport[tvm]'" in status.reason
    with pytest.raises(BackendError, match=r"backend 'tvm' is not available: apache-tvm not installed"):
        get_backend("tvm")


def _run_kernel(src, *arrays, out_shape):
    import tvm
    import tvm.script

    func = tvm.script.from_source(src).with_attr("global_symbol", "main")
    kernel = tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"]
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (*arrays, np.zeros(out_shape, np.float32))]
    kernel(*args)
    return args[-1].numpy()


@pytest.mark.parametrize("bits, signed", [(0, False), (8, False), (8, True), (4, False), (4, True)])
def test_kernels_match_the_operator_semantics(bits, signed):
    """The TIR kernels (QLinear / MoE / QMoE, float and block-quantized) against numpy, prefill-sized rows."""
    from moeport.backends.tvm import _Kind, _linear_src, _moe_act_src, _moe_down_src
    from moeport.exporter.ops import dequantize_blocks, quantize_blocks

    rng = np.random.default_rng(0)
    bs, e, hidden, inter, topk, rows = 32, 5, 64, 32, 2, 3

    def weights(w):
        if bits == 0:
            return [w], w
        codes, scales = quantize_blocks(w, bits, bs)
        flipped = (codes ^ np.uint8(0x80 if bits == 8 else 0x88)).view(np.int8) if signed else codes
        return [flipped, scales], dequantize_blocks(codes, scales, bits, bs)

    def feed(x):  # 4-bit kernels read the even and odd columns apart
        return np.stack([x[:, 0::2], x[:, 1::2]], 1) if bits == 4 else x

    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    w, wd = weights(rng.standard_normal((48, hidden)).astype(np.float32))
    y = _run_kernel(_linear_src(_Kind(bits, bs, hidden, signed), 48), feed(x), *w, out_shape=(rows, 48))
    np.testing.assert_allclose(y, x @ wd.T, rtol=1e-5, atol=1e-4)

    gate_up, gud = weights(rng.standard_normal((e, 2 * inter, hidden)).astype(np.float32))
    down, dnd = weights(rng.standard_normal((e, hidden, inter)).astype(np.float32))
    idx = np.array([[4, 1], [0, 4], [2, 3]], np.int64)
    wt = rng.random((rows, topk)).astype(np.float32)
    src = _moe_act_src(_Kind(bits, bs, hidden, signed), e, inter, topk)
    act = _run_kernel(src, feed(x), idx, *gate_up, out_shape=(rows * topk, inter))
    src = _moe_down_src(_Kind(bits, bs, inter, signed), e, hidden, topk)
    y = _run_kernel(src, feed(act), idx, wt, *down, out_shape=(rows, hidden))
    want = np.zeros((rows, hidden), np.float32)
    for m in range(rows):
        for j in range(topk):
            h = gud[idx[m, j]] @ x[m]  # rows interleaved: 2i gate_i, 2i + 1 up_i
            a = h[0::2] / (1 + np.exp(-h[0::2])) * h[1::2]
            np.testing.assert_allclose(act[m * topk + j], a, rtol=1e-4, atol=1e-4)
            want[m] += wt[m, j] * (dnd[idx[m, j]] @ a)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-3)


def test_the_build_uses_the_kernels(tvm_artifact):
    """The artifact's MoE and linear layers run as the hand-written kernels, not the reference bodies."""
    import onnx

    from moeport.backends.tvm import _import, inline_all_but_kernel_ops, prepare_graph

    model, ops = inline_all_but_kernel_ops(onnx.load(str(tvm_artifact / "model.onnx")))
    assert "MoE" in ops
    prepare_graph(model)
    names = {gv.name_hint for gv in _import(model, ops).get_global_vars()}
    assert any(n.startswith("moeport_moe_act_f32") for n in names), names
    assert any(n.startswith("moeport_linear_f32") for n in names), names
