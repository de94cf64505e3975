"""Test oracle: tiny random DeepSeek-V3/V2 checkpoints and reference outputs.

This module is test-only.  It builds very small, randomly initialised Hugging
Face ``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM`` models, writes them
to disk in the usual Hugging Face layout (``config.json``,
``generation_config.json``, ``model.safetensors`` or shards plus
``model.safetensors.index.json``) and computes reference logits and greedy
continuations with ``transformers`` itself.

Every checkpoint comes with a float32 reference model whose weights are
exactly what a faithful loader of the written files computes in float32:

* ``fp32`` storage: the weights as written;
* ``bf16`` storage: the bf16-rounded weights, upcast to float32;
* ``fp8`` storage: the block-wise dequantised weights (``q.float() * scale``),
  in DeepSeek-V3's release format (``float8_e4m3fn`` weights with a float32
  ``<name>_scale_inv`` companion per quantised weight, ``quantization_config``
  in ``config.json``).  Unquantised tensors (embeddings, ``lm_head``, norms,
  router) stay float32, and an extra multi-token-prediction layer
  ``model.layers.{num_hidden_layers}.*`` is included that loaders must skip.

Nothing here imports from ``moeport``; the oracle is independent of the code
under test.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    PreTrainedModel,
)

__all__ = [
    "CheckpointSpec",
    "SPECS",
    "FP8_BLOCK",
    "FP8_MAX",
    "make_checkpoint",
    "reference_logits",
    "reference_greedy",
    "quantize_fp8_blockwise",
    "dequantize_fp8_blockwise",
]

#: Block size ``[rows, cols]`` used by the ``fp8`` checkpoints.  The real
#: DeepSeek-V3 release uses ``[128, 128]``; the tiny test tensors need smaller
#: blocks so that there is more than one block (and partial blocks) per weight.
FP8_BLOCK: tuple[int, int] = (16, 16)

#: Largest finite magnitude of ``torch.float8_e4m3fn``.
FP8_MAX: float = 448.0

_CONFIG_CLASSES: dict[str, type] = {
    "deepseek_v3": DeepseekV3Config,
    "deepseek_v2": DeepseekV2Config,
}

_YARN: dict[str, Any] = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "rope_theta": 10000.0,
}

_AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}


@dataclass(frozen=True)
class CheckpointSpec:
    """Recipe for one tiny random checkpoint.

    Attributes:
        name: Key of the spec in :data:`SPECS`.
        model_type: ``"deepseek_v3"`` or ``"deepseek_v2"``.
        config: Keyword arguments for ``DeepseekV3Config`` /
            ``DeepseekV2Config``.
        storage: On-disk weight format: ``"fp32"``, ``"bf16"`` or ``"fp8"``.
        shards: Whether to split the weights over several safetensors shards
            (with a ``model.safetensors.index.json``).
        seed: Seed for all random weights.
        deepseek_style_config: Rewrite ``config.json`` the way the
            ``deepseek-ai`` releases spell it (``rope_scaling`` with
            ``"type"``, top-level ``rope_theta``, ``scoring_func``,
            ``topk_method``, ``auto_map``) instead of the transformers-5
            ``rope_parameters`` layout.  The meaning is unchanged.
    """

    name: str
    model_type: str
    config: dict[str, Any]
    storage: str
    shards: bool
    seed: int
    deepseek_style_config: bool = field(default=False)


def _v3_config(**overrides: Any) -> dict[str, Any]:
    """Tiny DeepSeek-V3 config kwargs (MLA with q-LoRA, sigmoid routing, YaRN)."""
    cfg: dict[str, Any] = {
        "vocab_size": 113,
        "hidden_size": 48,
        "intermediate_size": 80,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 24,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_parameters": dict(_YARN),
        "rope_interleave": True,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def _v2_config(**overrides: Any) -> dict[str, Any]:
    """Tiny DeepSeek-V2 config kwargs (plain q_proj, softmax group routing)."""
    cfg: dict[str, Any] = {
        "vocab_size": 101,
        "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "norm_topk_prob": False,
        "routed_scaling_factor": 16.0,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


SPECS: dict[str, CheckpointSpec] = {
    spec.name: spec
    for spec in (
        CheckpointSpec(
            name="v3",
            model_type="deepseek_v3",
            config=_v3_config(),
            storage="fp32",
            shards=False,
            seed=29,
            deepseek_style_config=True,
        ),
        CheckpointSpec(
            name="v2",
            model_type="deepseek_v2",
            config=_v2_config(),
            storage="fp32",
            shards=False,
            seed=18,
        ),
        CheckpointSpec(
            name="v3_bf16",
            model_type="deepseek_v3",
            config=_v3_config(),
            storage="bf16",
            shards=False,
            seed=35,
        ),
        CheckpointSpec(
            name="v3_sharded",
            model_type="deepseek_v3",
            config=_v3_config(),
            storage="fp32",
            shards=True,
            seed=22,
        ),
        CheckpointSpec(
            name="v3_fp8",
            model_type="deepseek_v3",
            config=_v3_config(),
            storage="fp8",
            shards=False,
            seed=31,
            deepseek_style_config=True,
        ),
        CheckpointSpec(
            name="v3_tied",
            model_type="deepseek_v3",
            config=_v3_config(tie_word_embeddings=True),
            storage="fp32",
            shards=False,
            seed=38,
        ),
        CheckpointSpec(
            name="v3_noqlora_ropeplain",
            model_type="deepseek_v3",
            config=_v3_config(
                q_lora_rank=None,
                rope_interleave=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            storage="fp32",
            shards=False,
            seed=26,
        ),
    )
}

# Shard size for ``shards=True`` specs (bytes); small enough for >= 3 shards.
_SHARD_BYTES = 64 * 1024

# Scales of the random initialisation.
_EMBED_STD = 1.0
_TIED_EMBED_GAIN = 1.5
_LM_HEAD_GAIN = 2.0
_ROUTER_STD = 0.5
_NORM_NOISE = 0.1
_SCORE_BIAS_STD = 0.1


# --------------------------------------------------------------------------
# FP8 block quantisation (DeepSeek-V3 format)
# --------------------------------------------------------------------------


def _expand_blocks(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Broadcast a per-block ``scale`` [ceil(R/br), ceil(C/bc)] to ``shape`` [R, C]."""
    rows, cols = shape
    full = scale.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return full[:rows, :cols]


def quantize_fp8_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight to ``float8_e4m3fn`` with one scale per block.

    Returns ``(q, scale_inv)`` where ``q`` has the weight's shape and dtype
    ``torch.float8_e4m3fn`` and ``scale_inv`` is float32 with shape
    ``[ceil(rows / block[0]), ceil(cols / block[1])]``; the last block row and
    column may be partial.  ``scale_inv = amax(|block|) / 448`` and the
    weight is recovered by :func:`dequantize_fp8_blockwise`.

    Block ``(i, j)`` always covers rows ``[i*B0, (i+1)*B0)`` and columns
    ``[j*B1, (j+1)*B1)`` clipped to the weight, as in DeepSeek-V3's own
    ``inference/kernel.py:weight_dequant`` (fixed block, ``cdiv`` grid).  Note
    that transformers' ``Fp8Dequantize`` instead infers the block size as
    ``rows // scale_rows``, which only agrees when the dimensions are
    multiples of the block size; the tiny test weights deliberately are not.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    rows, cols = w.shape
    n_r, n_c = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(n_r * block[0], n_c * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.abs()
    amax = padded.view(n_r, block[0], n_c, block[1]).amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (w / _expand_blocks(scale_inv, w.shape, block)).clamp(-FP8_MAX, FP8_MAX)
    return scaled.to(torch.float8_e4m3fn), scale_inv.contiguous()


def dequantize_fp8_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_blockwise`: ``q.float() * scale`` per block."""
    return q.to(torch.float32) * _expand_blocks(scale_inv.to(torch.float32), q.shape, block)


def _is_fp8_weight(name: str, tensor: torch.Tensor) -> bool:
    """Whether an on-disk tensor is quantised in the DeepSeek-V3 fp8 release.

    Every 2-D linear weight inside the decoder layers is; embeddings,
    ``lm_head``, norms, the router ``mlp.gate.weight`` and
    ``e_score_correction_bias`` stay unquantised.
    """
    return (
        name.startswith("model.layers.")
        and name.endswith(".weight")
        and tensor.dim() == 2
        and not name.endswith(".mlp.gate.weight")
        and "norm" not in name.rsplit(".", 2)[-2]
    )


# --------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------


def _build_config(spec: CheckpointSpec) -> Any:
    """Instantiate the transformers config for ``spec``."""
    cls = _CONFIG_CLASSES[spec.model_type]
    return cls(**copy.deepcopy(spec.config))


@torch.no_grad()
def _randomize(model: PreTrainedModel, seed: int) -> None:
    """Overwrite every weight with deterministic random values.

    Linear weights get ``N(0, 1/fan_in)`` so activations stay O(1)
    (``lm_head`` twice that standard deviation, for logits with std ~2);
    embeddings ``N(0, 1)`` (``N(0, 1.5^2/hidden)`` when tied to
    ``lm_head``); RMSNorm weights ``1 + 0.1 * N(0, 1)``; the router weight
    ``N(0, 0.5^2)`` so routing is decisive; and the V3
    ``e_score_correction_bias`` ``N(0, 0.1^2)`` so it changes some choices.
    Parameters are visited in ``named_parameters()`` order with a generator
    seeded by ``seed``, so the result is reproducible.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    for name, param in model.named_parameters():
        shape = param.shape
        if param.dim() == 1:  # RMSNorm weights (no biases in these configs)
            value = 1.0 + _NORM_NOISE * randn(shape)
        elif name.endswith("embed_tokens.weight"):
            # Tied embeddings double as lm_head: scale them like a Linear.
            tied = model.config.tie_word_embeddings
            std = _TIED_EMBED_GAIN / math.sqrt(shape[-1]) if tied else _EMBED_STD
            value = std * randn(shape)
        elif name.endswith(".mlp.gate.weight"):
            value = _ROUTER_STD * randn(shape)
        elif name == "lm_head.weight":
            value = _LM_HEAD_GAIN * randn(shape) / math.sqrt(shape[-1])
        else:  # 2-D Linear [out, in] or fused 3-D experts [E, out, in]
            value = randn(shape) / math.sqrt(shape[-1])
        param.copy_(value)

    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(_SCORE_BIAS_STD * randn(buf.shape))


def _new_model(spec: CheckpointSpec) -> PreTrainedModel:
    """Create the randomly initialised float32 model for ``spec`` (eval mode)."""
    torch.manual_seed(spec.seed)
    config = _build_config(spec)
    model = AutoModelForCausalLM.from_config(
        config,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    _randomize(model, spec.seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _load_reference(path: pathlib.Path) -> PreTrainedModel:
    """Load a checkpoint directory as a float32 eager model in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    return model.eval()


# --------------------------------------------------------------------------
# config.json rewriting
# --------------------------------------------------------------------------


def _deepseek_style(cfg: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a transformers-5 V3 ``config.json`` dict in deepseek-ai's spelling."""
    out = dict(cfg)
    rope = dict(out.pop("rope_parameters"))
    out["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    out["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    out["scoring_func"] = "sigmoid"
    out["topk_method"] = "noaux_tc"
    out["auto_map"] = dict(_AUTO_MAP)
    return out


def _rewrite_config(spec: CheckpointSpec, out_dir: pathlib.Path, extra: dict[str, Any] | None = None) -> None:
    """Post-edit ``out_dir/config.json`` (DeepSeek-style keys, extra entries)."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    if spec.deepseek_style_config:
        cfg = _deepseek_style(cfg)
    if extra:
        cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def make_checkpoint(spec: CheckpointSpec, out_dir: pathlib.Path) -> PreTrainedModel:
    """Write the checkpoint for ``spec`` into ``out_dir``; return its reference.

    The directory receives ``config.json``, ``generation_config.json`` and
    either ``model.safetensors`` or several shards plus
    ``model.safetensors.index.json``.  Experts are stored per expert
    (``mlp.experts.{e}.{gate,up,down}_proj.weight``), as in the DeepSeek
    releases.

    Returns the float32 reference model (eval mode, eager attention and
    experts) whose weights are exactly what a faithful float32 loader of those
    files computes: bf16 storage gives the bf16-rounded weights upcast, fp8
    storage gives the dequantised weights.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _new_model(spec)

    if spec.storage == "fp32":
        max_shard = _SHARD_BYTES if spec.shards else "10GB"
        model.save_pretrained(out_dir, max_shard_size=max_shard)
        _rewrite_config(spec, out_dir)
        return model

    if spec.storage == "bf16":
        if spec.shards:
            raise NotImplementedError("sharded bf16 checkpoints are not needed")
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(torch.bfloat16).to(torch.float32))
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out_dir)
        _rewrite_config(spec, out_dir)
        return model

    if spec.storage == "fp8":
        if spec.shards:
            raise NotImplementedError("sharded fp8 checkpoints are not needed")
        return _make_fp8_checkpoint(spec, model, out_dir)

    raise ValueError(f"unknown storage {spec.storage!r}")


def _make_fp8_checkpoint(spec: CheckpointSpec, model: PreTrainedModel, out_dir: pathlib.Path) -> PreTrainedModel:
    """Write ``model`` in DeepSeek-V3's block-fp8 format; return the dequantised reference."""
    config = model.config
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = pathlib.Path(tmp)
        # Let transformers produce the on-disk (per-expert) tensor names.
        model.save_pretrained(tmp_dir)
        on_disk = load_file(tmp_dir / "model.safetensors")

        quantized: dict[str, torch.Tensor] = {}
        dequantized: dict[str, torch.Tensor] = {}
        for name, tensor in on_disk.items():
            if _is_fp8_weight(name, tensor):
                q, scale_inv = quantize_fp8_blockwise(tensor)
                quantized[name] = q
                quantized[f"{name}_scale_inv"] = scale_inv
                dequantized[name] = dequantize_fp8_blockwise(q, scale_inv)
            else:
                quantized[name] = tensor
                dequantized[name] = tensor

        # Real releases carry a multi-token-prediction layer after the last
        # decoder layer; a loader must ignore it.
        gen = torch.Generator().manual_seed(spec.seed + 10_000)
        mtp = f"model.layers.{config.num_hidden_layers}"
        hidden = config.hidden_size
        quantized[f"{mtp}.eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=gen)
        quantized[f"{mtp}.enorm.weight"] = torch.ones(hidden)
        quantized[f"{mtp}.hnorm.weight"] = torch.ones(hidden)
        mtp_q, mtp_s = quantize_fp8_blockwise(torch.randn(hidden, hidden, generator=gen))
        quantized[f"{mtp}.mlp.shared_experts.down_proj.weight"] = mtp_q
        quantized[f"{mtp}.mlp.shared_experts.down_proj.weight_scale_inv"] = mtp_s

        for fname in ("config.json", "generation_config.json"):
            shutil.copyfile(tmp_dir / fname, out_dir / fname)
        save_file(
            {k: v.contiguous() for k, v in sorted(quantized.items())},
            out_dir / "model.safetensors",
            metadata={"format": "pt"},
        )
        _rewrite_config(
            spec,
            out_dir,
            extra={
                "quantization_config": {
                    "activation_scheme": "dynamic",
                    "fmt": "e4m3",
                    "quant_method": "fp8",
                    "weight_block_size": list(FP8_BLOCK),
                }
            },
        )

        # Reference: the same model with the dequantised weights, loaded by
        # transformers from an fp32 copy (it maps per-expert names back).
        ref_dir = tmp_dir / "dequantized"
        ref_dir.mkdir()
        shutil.copyfile(tmp_dir / "config.json", ref_dir / "config.json")
        save_file(dequantized, ref_dir / "model.safetensors", metadata={"format": "pt"})
        reference = _load_reference(ref_dir)
    return reference


@torch.no_grad()
def reference_logits(model: PreTrainedModel, ids: list[int]) -> np.ndarray:
    """Logits for every position of ``ids`` from one cache-less forward pass.

    Returns a float32 array of shape ``[len(ids), vocab_size]``.
    """
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    out = model(input_ids=input_ids, use_cache=False)
    return out.logits[0].to(torch.float32).numpy().copy()


@torch.no_grad()
def reference_greedy(model: PreTrainedModel, prompt_ids: list[int], n: int) -> list[int]:
    """``n`` greedy (argmax) new tokens after ``prompt_ids``.

    A manual decode loop with ``past_key_values``: the prompt is prefilled in
    one pass, then one token per step.  There is no EOS handling, so exactly
    ``n`` tokens are returned even when EOS is the argmax.
    """
    if n <= 0:
        return []
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out = model(input_ids=input_ids, use_cache=True)
    tokens: list[int] = []
    for step in range(n):
        next_id = int(out.logits[0, -1].argmax())
        tokens.append(next_id)
        if step + 1 == n:
            break
        out = model(
            input_ids=torch.tensor([[next_id]], dtype=torch.long),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return tokens
