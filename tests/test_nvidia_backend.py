"""The ``nvidia`` backend: ONNX Runtime's CUDA execution provider.

Without a GPU the backend must say why it is unavailable; its graph preparation (the fused kernels it
picks for CUDA) is checked on ORT's CPU provider against the reference bodies. On a machine with
onnxruntime-gpu and a CUDA device the last tests run the real thing against the cpu backend.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from moeport.backends import nvidia
from moeport.backends.cpu import OrtProgram
from moeport.backends.nvidia import NvidiaBackend, prepare_for_cuda, session_for
from moeport.exporter.manifest import read_artifact
from moeport.runtime import load
from moeport.runtime.model import Model
from moeport.tools.cli import main

PROMPT = [1, 5, 9, 33, 70, 2, 8, 100, 200, 3]
STATUS = NvidiaBackend().availability()
needs_gpu = pytest.mark.skipif(not STATUS.available, reason=f"nvidia backend unavailable: {STATUS.reason}")


def test_backends_lists_nvidia_with_the_reason_it_is_unavailable():
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(main, ["backends", "--json"]).stdout)}
    row = rows["nvidia"]
    assert row["available"] == STATUS.available
    if not row["available"]:
        reasons = ("onnxruntime-gpu not installed", "no NVIDIA driver", "no CUDA device", "failed to initialize")
        assert any(r in row["reason"] for r in reasons), row["reason"]


def test_each_missing_piece_is_named(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(nvidia, "cuda_devices", lambda: (0, "no CUDA device"))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    reason = NvidiaBackend().availability().reason
    assert "onnxruntime-gpu not installed" in reason and "moeport[nvidia]" in reason and "no CUDA device" in reason
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert NvidiaBackend().availability() == nvidia.Availability(False, "no CUDA device")
    monkeypatch.setattr(nvidia, "cuda_devices", lambda: (2, ""))
    status = NvidiaBackend().availability()
    assert status.available and "2 CUDA device(s)" in status.reason


def _ops(model: onnx.ModelProto) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type.split("_")[0]) for n in model.graph.node}


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_cuda_graph_uses_fused_kernels_and_matches_the_reference(tiny_checkpoint, tmp_path, weights):
    """The graph the CUDA provider gets, run on ORT's CPU provider: same greedy tokens as the reference."""
    from moeport.exporter import export

    art = export(tiny_checkpoint, tmp_path / "art", weights=weights)
    graph = prepare_for_cuda(onnx.load(str(art / "model.onnx"), load_external_data=False))
    ops = _ops(graph)
    assert not any(d == "ai.moeport" for d, _ in ops)  # every moeport op rewritten or inlined
    if weights == "int4":
        assert ("com.microsoft", "MatMulNBits") in ops and ("com.microsoft", "QMoE") not in ops
    else:
        assert ("com.microsoft", "MoE") in ops
    artifact = read_artifact(art)
    program = OrtProgram(session_for(artifact, graph, ["CPUExecutionProvider"]))
    got = Model(artifact, program, "nvidia-on-cpu").session().generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    want = load(art, backend="cpu", reference=True).session().generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    assert got.tokens == want.tokens


def test_a_bad_moe_kernels_option_is_refused(tiny_artifact):
    with pytest.raises(nvidia.BackendError, match="moe_kernels must be auto, fused or reference"):
        prepare_for_cuda(onnx.load(str(tiny_artifact / "model.onnx"), load_external_data=False), "fast")


@needs_gpu
@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_gpu_greedy_tokens_and_logits_match_cpu(tiny_checkpoint, tmp_path, weights):
    from moeport.exporter import export

    art = export(tiny_checkpoint, tmp_path / "art", weights=weights)
    gpu = load(art, backend="nvidia")
    cpu = load(art, backend="cpu", reference=True)
    ref, out = cpu.session().forward(PROMPT), gpu.session().forward(PROMPT)
    assert np.abs(out - ref).max() <= 1e-3 * float(np.abs(ref).max())
    want = cpu.session().generate(PROMPT, max_new_tokens=16, ignore_eos=True).tokens
    assert gpu.session().generate(PROMPT, max_new_tokens=16, ignore_eos=True).tokens == want
