"""DeepSeek-V2/V3 `config.json` parsing with the semantics transformers gives each `model_type`.

Configs in the wild come in two styles: DeepSeek's own (``rope_scaling``, ``scoring_func``,
``topk_method``, ``auto_map`` pointing at remote code) and transformers 5 (``rope_parameters``,
``rope_interleave``, no ``scoring_func``). Both are read into one :class:`DeepseekConfig`.
``auto_map`` is recorded as ignored and never executed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("moeport.models")

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    """The checkpoint's config.json is missing, unreadable or describes an unsupported model."""


# transformers' defaults per model_type (DeepseekV3Config / DeepseekV2Config, transformers 5).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=8,
        topk_group=4,
        num_experts_per_tok=8,
        first_k_dense_replace=3,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        rope_interleave=True,
        attention_bias=False,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
    ),
    "deepseek_v2": dict(
        vocab_size=102400,
        hidden_size=4096,
        intermediate_size=11008,
        moe_intermediate_size=1407,
        num_hidden_layers=32,
        num_attention_heads=32,
        n_shared_experts=2,
        n_routed_experts=64,
        routed_scaling_factor=1.0,
        kv_lora_rank=512,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_nope_head_dim=128,
        n_group=None,
        topk_group=None,
        num_experts_per_tok=None,
        first_k_dense_replace=0,
        norm_topk_prob=False,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rope_interleave=True,
        attention_bias=False,
        scoring_func="softmax",
        topk_method="greedy",
    ),
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalized from ``rope_scaling`` or ``rope_parameters``."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class DeepseekConfig:
    """Everything the exporter needs to know about a DeepSeek-V2/V3 checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    scoring_func: str  # "sigmoid" (V3) | "softmax" (V2)
    topk_method: str  # "noaux_tc" (V3) | "greedy" | "group_limited_greedy" (V2)
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_interleave: bool
    attention_bias: bool
    rope: RopeConfig
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    fp8_block_size: tuple[int, int] | None = None
    ignored_keys: tuple[str, ...] = field(default=())

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Numbers cached per token per layer: the compressed KV plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (as transformers does)."""
        scale = self.qk_head_dim**-0.5
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor or 1.0, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeepseekConfig:
        data = dict(data)
        data["rope"] = RopeConfig(**data["rope"])
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        data["ignored_keys"] = tuple(data.get("ignored_keys", ()))
        if data.get("fp8_block_size") is not None:
            data["fp8_block_size"] = tuple(data["fp8_block_size"])
        return cls(**data)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def load_config(checkpoint_dir: str | Path) -> DeepseekConfig:
    """Read and validate ``config.json`` of a Hugging Face DeepSeek checkpoint directory."""
    path = Path(checkpoint_dir) / "config.json"
    if not Path(checkpoint_dir).is_dir():
        raise ConfigError(f"checkpoint directory not found: {checkpoint_dir}")
    if not path.is_file():
        raise ConfigError(f"{path}: missing; a Hugging Face checkpoint needs config.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> DeepseekConfig:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: unsupported model_type {model_type!r}; moeport supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (DeepSeek-V2/V2-Lite/V3/R1 and compatible)"
        )
    ignored = []
    if "auto_map" in raw:
        log.info("%s: ignoring auto_map (remote code is never executed)", source)
        ignored.append("auto_map")
    cfg = {**_DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None or k == "q_lora_rank"}}

    # transformers ignores scoring_func/topk_method for V3 (always sigmoid + noaux_tc) and always uses
    # softmax for V2; only V2's topk_method ("greedy" | "group_limited_greedy") changes the routing.
    if model_type == "deepseek_v3":
        scoring, topk_method = "sigmoid", "noaux_tc"
        if raw.get("scoring_func") not in (None, "sigmoid"):
            raise ConfigError(f"{source}: deepseek_v3 with scoring_func={raw['scoring_func']!r} is not supported")
    else:
        scoring = "softmax"
        topk_method = cfg.get("topk_method") or "greedy"
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"{source}: deepseek_v2 topk_method {topk_method!r} is not supported")
        if raw.get("norm_topk_prob"):
            log.warning("%s: deepseek_v2 norm_topk_prob is ignored, as in transformers", source)

    n_routed = int(cfg.get("n_routed_experts") or 0)
    top_k = cfg.get("num_experts_per_tok")
    if n_routed and not top_k:
        raise ConfigError(f"{source}: num_experts_per_tok is required when n_routed_experts > 0")
    n_group = int(cfg.get("n_group") or 1)
    topk_group = int(cfg.get("topk_group") or n_group)
    if n_routed and (n_routed % n_group or not 1 <= topk_group <= n_group):
        raise ConfigError(
            f"{source}: n_routed_experts={n_routed} must split into n_group={n_group} groups "
            f"with 1 <= topk_group={topk_group} <= n_group"
        )
    if n_routed and top_k > topk_group * (n_routed // n_group):
        raise ConfigError(f"{source}: num_experts_per_tok={top_k} exceeds the experts in topk_group groups")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported")
    if cfg["qk_rope_head_dim"] % 2:
        raise ConfigError(f"{source}: qk_rope_head_dim must be even")

    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    qcfg = raw.get("quantization_config") or {}
    fp8_block = None
    if qcfg:
        if qcfg.get("quant_method") != "fp8":
            raise ConfigError(
                f"{source}: quantization_config.quant_method {qcfg.get('quant_method')!r} is not supported "
                "(only DeepSeek's block fp8)"
            )
        fp8_block = tuple(int(x) for x in qcfg.get("weight_block_size", (128, 128)))
    try:
        return DeepseekConfig(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            n_routed_experts=n_routed,
            num_experts_per_tok=int(top_k or 0),
            routed_scaling_factor=float(cfg["routed_scaling_factor"]),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            q_lora_rank=None if cfg.get("q_lora_rank") is None else int(cfg["q_lora_rank"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            n_group=n_group,
            topk_group=topk_group,
            first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob")) and model_type == "deepseek_v3",
            scoring_func=scoring,
            topk_method=topk_method,
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings")),
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            attention_bias=False,
            rope=_parse_rope(raw, cfg, source),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            fp8_block_size=fp8_block,
            ignored_keys=tuple(ignored),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad or missing field ({exc})") from exc


def _parse_rope(raw: dict[str, Any], cfg: dict[str, Any], source: str) -> RopeConfig:
    # as in transformers, a legacy rope_scaling wins over rope_parameters when both are present
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters/rope_scaling must be an object")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(
        params.get("rope_theta")
        or raw.get("rope_theta")
        or (raw.get("rope_parameters") or {}).get("rope_theta")
        or 10000.0
    )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default, yarn)")
    original = int(
        raw.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or cfg["max_position_embeddings"]
    )
    factor = params.get("factor")
    if factor is None:
        factor = cfg["max_position_embeddings"] / original
    return RopeConfig(
        rope_type="yarn",
        theta=theta,
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=params.get("beta_fast"),
        beta_slow=params.get("beta_slow"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )
