"""Make DeepSeek-architecture checkpoints with random weights (numpy + safetensors, no torch).

Presets are plain dicts of config.json fields. The weights are random, so the text is meaningless;
they exist to exercise the whole path (export, backends, runtime) and to benchmark it.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from moeport.models.config import parse_config
from moeport.models.deepseek import expected_tensors

PRESETS: dict[str, dict] = {
    # a few hundred KB: the default of `moeport demo` until a trained model ships
    "tiny": dict(
        model_type="deepseek_v3",
        architectures=["DeepseekV3ForCausalLM"],
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        rope_scaling=dict(
            type="yarn",
            factor=4.0,
            original_max_position_embeddings=128,
            beta_fast=32,
            beta_slow=1,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
    ),
}

_DTYPES = {"fp32": (np.float32, "F32"), "bf16": (ml_dtypes.bfloat16, "BF16"), "fp16": (np.float16, "F16")}


def make_checkpoint(
    out_dir: str | Path, preset: str = "tiny", seed: int = 0, dtype: str = "fp32", overrides: dict | None = None
) -> Path:
    """Write config.json, model.safetensors and generation_config.json for ``preset`` into ``out_dir``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    raw = {**PRESETS[preset], **(overrides or {})}
    cfg = parse_config(raw)
    rng = np.random.default_rng(seed)
    np_dtype, st_dtype = _DTYPES[dtype]
    tensors: dict[str, np.ndarray] = {}
    for name, shape in expected_tensors(cfg).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("e_score_correction_bias"):
            arr = 0.05 * rng.standard_normal(shape)
        elif name.endswith("gate.weight"):
            arr = 0.5 * rng.standard_normal(shape)
        else:
            arr = rng.standard_normal(shape) / np.sqrt(shape[-1])
        tensors[name] = arr.astype(np.float32).astype(np_dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", tensors, st_dtype)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    gen = {"bos_token_id": raw.get("bos_token_id"), "eos_token_id": raw.get("eos_token_id"), "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], st_dtype: str) -> None:
    """Minimal safetensors writer (the format is a JSON header + raw little-endian bytes)."""
    header, offset = {}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": st_dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
