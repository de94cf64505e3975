"""The cpu backend's fast paths: routed experts only, the latent cache only, quantized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from moeport.exporter import export
from moeport.exporter.ops import dequantize_blocks, quantize_blocks
from moeport.runtime import load
from moeport.tools.checkpoints import make_checkpoint

PROMPT = list(range(2, 40))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # dims divisible by the block sizes below, so every Linear is quantized
    return make_checkpoint(
        tmp_path_factory.mktemp("q") / "ckpt",
        "tiny",
        seed=4,
        overrides={"moe_intermediate_size": 32, "intermediate_size": 128},
    )


def poisoned_copy(art: Path, dest: Path, layer: int, expert: int) -> Path:
    """A copy of a float32 artifact with one expert's gate/up rows overwritten by NaN."""
    out = Path(shutil.copytree(art, dest))
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == f"model.layers.{layer}.mlp.experts.gate_up.weight")
    info = {e.key: e.value for e in t.external_data}
    per_expert = int(info["length"]) // t.dims[0]
    with open(out / "model.onnx.data", "r+b") as f:
        f.seek(int(info["offset"]) + expert * per_expert)
        f.write(np.full(per_expert // 4, np.nan, np.float32).tobytes())
    return out


def test_a_decode_step_reads_only_the_routed_experts(ckpt, tmp_path):
    """Poison one expert at a time with NaN: only the token's k routed experts per layer can reach the logits."""
    clean = export(ckpt, tmp_path / "clean")
    model = load(clean)
    cfg = model.config
    base = model.session()
    base.prefill(PROMPT)
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        poisoned_by = []
        for expert in range(cfg.n_routed_experts):
            art = poisoned_copy(clean, tmp_path / f"p{layer}_{expert}", layer, expert)
            s = load(art, verify=False).session()
            s.cache = base.cache.copy()
            s.tokens = list(base.tokens)
            if not np.isfinite(s.step(7)).all():
                poisoned_by.append(expert)
            shutil.rmtree(art)
        assert len(poisoned_by) == cfg.num_experts_per_tok, (layer, poisoned_by)


def test_prefill_skips_experts_no_token_chose(ckpt, tmp_path):
    """In prefill too, the fused kernel and the reference body both leave experts no token chose untouched."""
    clean = export(ckpt, tmp_path / "clean")
    for reference in (False, True):
        model = load(clean, reference=reference)
        cfg = model.config
        finite = []
        for expert in range(cfg.n_routed_experts):
            art = poisoned_copy(clean, tmp_path / f"e{expert}-{reference}", cfg.num_hidden_layers - 1, expert)
            finite.append(
                bool(np.isfinite(load(art, verify=False, reference=reference).session().forward(PROMPT[:3])).all())
            )
            shutil.rmtree(art)
        # 3 tokens x top-2: at most 6 experts are used in the last layer, so some stay untouched
        assert any(finite) and not all(finite)


def test_cache_holds_only_the_latent(ckpt, tmp_path):
    art = export(ckpt, tmp_path / "a")
    model = load(art)
    cfg = model.config
    manifest = json.loads((art / "manifest.json").read_text())
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert manifest["cache"]["bytes_per_token"] == per_token
    s = model.session()
    s.prefill(PROMPT)
    s.step(3)
    assert s.cache.nbytes == (len(PROMPT) + 1) * per_token
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    dims = [d.dim_value for d in next(i for i in graph.input if i.name == "past_latent.0").type.tensor_type.shape.dim]
    assert dims[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int4"])
def test_fast_kernels_equal_the_reference_decomposition(ckpt, tmp_path, weights):
    """MatMulNBits / fused MoE compute what the artifact's reference functions define."""
    art = export(ckpt, tmp_path / weights, weights=weights, block_size=32 if weights == "int4" else None)
    fast = load(art, accuracy_level=0).session().forward(PROMPT)  # float32 activations: exact kernels
    ref = load(art, reference=True).session().forward(PROMPT)
    np.testing.assert_allclose(fast, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("bits, block", [(8, 32), (8, 128), (4, 16), (4, 32)])
def test_block_quantization_round_trip(bits, block):
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    codes, scales = quantize_blocks(w, bits, block)
    assert codes.shape == (64, 256 * bits // 8) and scales.shape == (64, 256 // block)
    err = dequantize_blocks(codes, scales, bits, block) - w
    # the plain absmax quantizer as the yardstick: ours (which may shrink the scale) is never worse in RMS
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(64, -1, block)
    step = np.abs(blocks).max(-1, keepdims=True) / qmax
    plain = np.clip(np.round(blocks / step), -qmax - 1, qmax) * step - blocks
    assert np.sqrt((err**2).mean()) <= np.sqrt((plain**2).mean()) + 1e-9
    # and close to rounding noise, uniform over one step: RMS = step / sqrt(12)
    assert np.sqrt((err**2).mean()) <= 1.05 * np.sqrt((step**2).mean() / 12)


def test_quantized_artifacts_are_smaller(ckpt, tmp_path):
    sizes = {
        w: json.loads((export(ckpt, tmp_path / w, weights=w) / "manifest.json").read_text())["weights"]["bytes"]
        for w in ("fp32", "bf16", "int8", "int4")
    }
    assert sizes["int4"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]
