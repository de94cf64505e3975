"""The ``tvm`` backend (Apache TVM Relax, target llvm) against the ``cpu`` backend on the tiny preset."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm not installed (pip install 'moeport[tvm]')")

from moeport.backends.tvm import TvmBackend  # noqa: E402
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


def test_compile_command_then_run_uses_the_cache(tmp_path):
    import json

    from click.testing import CliRunner

    from moeport.exporter import export
    from moeport.tools.cli import main

    art = export("zoo:tiny-reasoner", tmp_path / "art")
    runner = CliRunner()
    first = runner.invoke(main, ["compile", str(art), "--backend", "tvm"])
    assert first.exit_code == 0 and "compiled for backend 'tvm'" in first.output, first.output
    again = runner.invoke(main, ["compile", str(art), "--backend", "tvm"])
    assert "cached build reused" in again.output
    r = runner.invoke(main, ["run", str(art), "--backend", "tvm", "--prompt", "347+58", "--chat", "--json"])
    assert json.loads(r.output.strip().splitlines()[-1])["content"] == "405"
    bad = runner.invoke(main, ["compile", str(art), "--backend", "tvm", "--target", "not-a-target"])
    assert bad.exit_code != 0 and "could not compile" in bad.output
