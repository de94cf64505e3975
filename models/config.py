"""DeepSeek-V2/V3 `config.json` parsing with the semantics transformers gives each `model_type`.

Configs in the wild come in two styles: DeepSeek's own (``rope_scaling``, ``scoring_func``,
``topk_method``, ``auto_map`` pointing at remote code) and transformers 5 (``rope_parameters``,
``rope_interleave``, no ``scoring_func``). Both are read into one :class:`DeepseekConfig`.
``auto_map`` is recorded as ignored and never executed.

A config comes from whoever published the checkpoint, so every field moeport reads is checked against
:data:`CONFIG_BOUNDS` (exact type and range) before anything is derived from it, then for consistency
(top-k within the experts, token ids within the vocabulary, ...). The ranges admit every released
DeepSeek-architecture model (DeepSeek-V2/V2-Lite/V2.5/V3/R1/V3.1, Moonlight, Kimi-K2) with room to
spare and refuse what would only exhaust memory. Keys moeport does not read are allowed.

A release that ships the deepseek_v3 architecture under its own model_type (Kimi-K2's "kimi_k2") is read
as deepseek_v3 when its ``architectures`` says so and it has no key DeepSeek-V3 lacks; the name is kept
in ``published_model_type``. Releases of the family that are not the same maths (DeepSeek-V3.2's sparse
attention) are refused by name with the reason, whatever model_type they claim.
"""

from __future__ import annotations

import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .checkpoint import load_json_bounded, short_repr
from .paths import UnsafePathError, hub_blobs, read_inside

log = logging.getLogger("moeport.models")

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
#: ``architectures`` entry of each supported model_type in DeepSeek's releases.
ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}
#: Releases that ship the deepseek_v3 architecture under their own model_type (Kimi-K2 sets "kimi_k2"
#: so that engines can tell it apart; its modelling code is DeepSeek-V3's). Accepted only with
#: architectures ["DeepseekV3ForCausalLM"] and no key that DeepSeek-V3 does not have.
ALIASED_MODEL_TYPES = {"kimi_k2": "deepseek_v3"}
#: Keys a deepseek_v3 config.json carries: transformers' DeepseekV3Config, the keys of DeepSeek's own
#: configuration_deepseek.py, and what every Hugging Face config has. An aliased model_type with any
#: other key is refused, since that key may be maths moeport would not do.
DEEPSEEK_V3_KEYS = frozenset(
    """architectures attention_bias attention_dropout auto_map aux_loss_alpha bos_token_id dtype eos_token_id
    ep_size first_k_dense_replace head_dim hidden_act hidden_size initializer_range intermediate_size
    kv_lora_rank max_position_embeddings model_type moe_intermediate_size moe_layer_freq n_group
    n_routed_experts n_shared_experts norm_topk_prob num_attention_heads num_experts_per_tok
    num_hidden_layers num_key_value_heads num_nextn_predict_layers pad_token_id pretraining_tp q_lora_rank
    qk_head_dim qk_nope_head_dim qk_rope_head_dim quantization_config rms_norm_eps rope_interleave
    rope_parameters rope_scaling rope_theta routed_scaling_factor scoring_func seq_aux tie_word_embeddings
    topk_group topk_method torch_dtype transformers_version use_cache v_head_dim vocab_size""".split()
)
#: DeepSeek-architecture releases that are not the same maths, refused by name with the reason.
DIFFERENT_MATHS = {
    "deepseek_v32": (
        "DeepSeek-V3.2's DeepSeek Sparse Attention: a lightning indexer (index_n_heads, index_head_dim) "
        "picks the index_topk keys each query attends to, where MLA attends to all of them; exported as "
        "DeepSeek-V3 it would silently give different outputs"
    ),
}
_DIFFERENT_ARCHITECTURES = {"DeepseekV32ForCausalLM": "deepseek_v32"}
_DIFFERENT_KEYS = {"index_topk": "deepseek_v32", "index_n_heads": "deepseek_v32", "index_head_dim": "deepseek_v32"}
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # real configs are a few KB
MAX_ROUTED_EXPERTS_TOTAL = 2**18  # layers x routed experts; Kimi-K2 has 61 x 384 = 23424


class ConfigError(ValueError):
    """The checkpoint's config.json is missing, unreadable or describes an unsupported model."""


@dataclass(frozen=True)
class Bound:
    """A field's exact type and inclusive range: ``kind`` is int (not bool, not "8", not 8.0), float
    (an int is fine), bool or str (then optionally one of ``choices``)."""

    kind: type
    low: float | None = None
    high: float | None = None
    nullable: bool = False
    exclusive: bool = False  # both ends open (for eps, scaling factors, theta)
    choices: tuple[str, ...] = ()

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind is bool or self.kind is str:
            return type(value) is self.kind and (not self.choices or value in self.choices)
        if type(value) is not int and not (self.kind is float and type(value) is float):
            return False
        if type(value) is float and not math.isfinite(value):  # an int of any size compares exactly
            return False
        if self.exclusive:
            return self.low < value < self.high
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind is bool:
            what = "true or false"
        elif self.kind is str:
            what = "one of " + ", ".join(map(repr, self.choices)) if self.choices else "a string"
        else:
            kind = "an integer" if self.kind is int else "a finite number"
            low, high = _number(self.low), _number(self.high)
            what = f"{kind} in " + (f"({low}, {high})" if self.exclusive else f"[{low}, {high}]")
        return f"null or {what}" if self.nullable else what


def _number(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x:g}"


def _int(low: int, high: int, nullable: bool = False) -> Bound:
    return Bound(int, low, high, nullable)


def _float(low: float, high: float, nullable: bool = False, exclusive: bool = True) -> Bound:
    return Bound(float, low, high, nullable, exclusive)


_BOOL, _STR = Bound(bool), Bound(str)

#: config.json fields that moeport reads (after transformers' defaults are filled in), and their bounds.
#: Real values for scale: V3 hidden 7168, 61 layers, 128 heads, 256 experts (top 8), vocab 129280;
#: Kimi-K2 384 experts, vocab 163840, 131072-262144 positions; V2 routed_scaling_factor 16.
CONFIG_BOUNDS: dict[str, Bound] = {
    "vocab_size": _int(1, 2**22),
    "hidden_size": _int(1, 65536),
    "intermediate_size": _int(1, 2**20),
    "moe_intermediate_size": _int(1, 2**20),
    "num_hidden_layers": _int(1, 1024),
    "num_attention_heads": _int(1, 1024),
    "n_shared_experts": _int(0, 64, nullable=True),
    "n_routed_experts": _int(0, 4096, nullable=True),
    "num_experts_per_tok": _int(1, 4096, nullable=True),  # and <= n_routed_experts
    "routed_scaling_factor": _float(0, 1e4),
    "kv_lora_rank": _int(1, 65536),
    "q_lora_rank": _int(1, 65536, nullable=True),
    "qk_rope_head_dim": _int(2, 4096),
    "qk_nope_head_dim": _int(1, 4096),
    "v_head_dim": _int(1, 4096),
    "n_group": _int(1, 4096, nullable=True),
    "topk_group": _int(1, 4096, nullable=True),
    "first_k_dense_replace": _int(0, 1024, nullable=True),  # and <= num_hidden_layers
    "norm_topk_prob": Bound(bool, nullable=True),
    "hidden_act": _STR,
    "max_position_embeddings": _int(1, 2**24),
    "rms_norm_eps": _float(0, 1),
    "bos_token_id": _int(0, 2**22, nullable=True),  # and < vocab_size
    "tie_word_embeddings": Bound(bool, nullable=True),
    "rope_interleave": _BOOL,
    "attention_bias": Bound(bool, nullable=True),
    "scoring_func": Bound(str, nullable=True),
    "topk_method": Bound(str, nullable=True),
    "rope_theta": _float(1, 1e12, nullable=True),  # YaRN divides by log(theta)
    "original_max_position_embeddings": _int(1, 2**24, nullable=True),
}

#: fields of ``rope_scaling`` / ``rope_parameters`` (and of the stored :class:`RopeConfig`).
ROPE_BOUNDS: dict[str, Bound] = {
    "rope_type": Bound(str, nullable=True),
    "type": Bound(str, nullable=True),
    "rope_theta": _float(1, 1e12, nullable=True),
    "factor": _float(1, 1e4, nullable=True, exclusive=False),  # YaRN stretches, never shrinks
    "original_max_position_embeddings": _int(1, 2**24, nullable=True),
    "beta_fast": _float(1e-3, 1e4, nullable=True, exclusive=False),  # rotations (real: 1 to 32); YaRN
    "beta_slow": _float(1e-3, 1e4, nullable=True, exclusive=False),  # divides the context by them
    "mscale": _float(0, 1e3, nullable=True, exclusive=False),
    "mscale_all_dim": _float(0, 1e3, nullable=True, exclusive=False),
    "attention_factor": _float(0, 1e3, nullable=True),
    "truncate": Bound(bool, nullable=True),
}
_TOKEN_ID = _int(0, 2**22)
_BLOCK = _int(1, 65536)  # quantization_config.weight_block_size entries (DeepSeek: 128)


def check_bounds(values: dict[str, Any], bounds: dict[str, Bound], source: str, prefix: str = "") -> None:
    """ConfigError naming the field, its value and the allowed range for the first value out of bounds."""
    for name, bound in bounds.items():
        if name in values and not bound.admits(values[name]):
            value = short_repr(values[name])
            raise ConfigError(f"{source}: {prefix}{name}={value} is not allowed; expected {bound.describe()}")


def _check_token_ids(ids: Any, source: str, name: str) -> tuple[int, ...]:
    listed = ids if isinstance(ids, list) else [ids]
    if len(listed) > 1024 or not all(_TOKEN_ID.admits(i) for i in listed):
        raise ConfigError(
            f"{source}: {name}={short_repr(ids)} is not allowed; expected a token id or a list of them "
            f"(integers in [0, {2**22}])"
        )
    return tuple(listed)


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
    published_model_type: str | None = None  # e.g. "kimi_k2" for the deepseek_v3 architecture under its name

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
    def from_dict(cls, data: Any, source: str = "manifest.json model.config") -> DeepseekConfig:
        """The inverse of :meth:`to_dict`, for a config stored in an artifact's manifest: unknown or
        missing keys, wrong types and values out of bounds are a :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected an object, got {type(data).__name__}")
        _check_keys(data, cls, source)
        check_bounds(data, _STORED_BOUNDS, source)
        rope = data["rope"]
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope must be an object, got {short_repr(rope)}")
        _check_keys(rope, RopeConfig, source, "rope.")
        check_bounds(rope, _STORED_ROPE_BOUNDS, source, "rope.")
        eos = data.get("eos_token_ids", [])
        if not isinstance(eos, list | tuple):
            raise ConfigError(f"{source}: eos_token_ids must be a list of token ids, got {short_repr(eos)}")
        ignored = data.get("ignored_keys", [])
        if not isinstance(ignored, list | tuple) or not all(isinstance(k, str) for k in ignored):
            raise ConfigError(f"{source}: ignored_keys must be a list of strings, got {short_repr(ignored)}")
        cfg = cls(
            **{
                **data,
                "rope": RopeConfig(**rope),
                "eos_token_ids": _check_token_ids(list(eos), source, "eos_token_ids"),
                "ignored_keys": tuple(ignored),
                "fp8_block_size": _check_block(data.get("fp8_block_size"), source, "fp8_block_size"),
            }
        )
        check_consistency(cfg, source)
        return cfg


_STORED_BOUNDS: dict[str, Bound] = {
    **{f.name: CONFIG_BOUNDS[f.name] for f in fields(DeepseekConfig) if f.name in CONFIG_BOUNDS},
    "model_type": Bound(str, choices=SUPPORTED_MODEL_TYPES),
    "n_shared_experts": _int(0, 64),
    "n_routed_experts": _int(0, 4096),
    "num_experts_per_tok": _int(0, 4096),  # 0 in a model without routed experts
    "n_group": _int(1, 4096),
    "topk_group": _int(1, 4096),
    "first_k_dense_replace": _int(0, 1024),
    "norm_topk_prob": _BOOL,
    "tie_word_embeddings": _BOOL,
    "attention_bias": _BOOL,
    "scoring_func": Bound(str, choices=("sigmoid", "softmax")),
    "topk_method": Bound(str, choices=("noaux_tc", "greedy", "group_limited_greedy")),
    "published_model_type": Bound(str, nullable=True, choices=tuple(ALIASED_MODEL_TYPES)),
}
_STORED_ROPE_BOUNDS: dict[str, Bound] = {
    **{f.name: ROPE_BOUNDS[f.name] for f in fields(RopeConfig) if f.name in ROPE_BOUNDS},
    "rope_type": Bound(str, choices=("default", "yarn")),
    "theta": _float(1, 1e12),
    "truncate": _BOOL,
}


def _check_keys(data: dict[str, Any], cls: type, source: str, prefix: str = "") -> None:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + repr(k) for k in unknown)[:200]}")
    required = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(prefix + n for n in missing)}")


def _check_block(block: Any, source: str, name: str) -> tuple[int, int] | None:
    if block is None:
        return None
    if not isinstance(block, list | tuple) or len(block) != 2 or not all(_BLOCK.admits(b) for b in block):
        raise ConfigError(
            f"{source}: {name}={short_repr(block)} is not allowed; expected two integers in [1, {_number(_BLOCK.high)}]"
        )
    return (block[0], block[1])


def check_consistency(cfg: DeepseekConfig, source: str) -> None:
    """The rules that relate fields to each other (each field is already within its own bounds)."""
    n_routed, n_group, topk_group, top_k = (
        cfg.n_routed_experts,
        cfg.n_group,
        cfg.topk_group,
        cfg.num_experts_per_tok,
    )
    if n_routed:
        if not top_k:
            raise ConfigError(f"{source}: num_experts_per_tok is required when n_routed_experts > 0")
        if n_routed % n_group or not 1 <= topk_group <= n_group:
            raise ConfigError(
                f"{source}: n_routed_experts={n_routed} must split into n_group={n_group} groups "
                f"with 1 <= topk_group={topk_group} <= n_group"
            )
        if top_k > n_routed:
            raise ConfigError(
                f"{source}: num_experts_per_tok={top_k} is not allowed; expected an integer in "
                f"[1, n_routed_experts={n_routed}]"
            )
        if top_k > topk_group * (n_routed // n_group):
            raise ConfigError(f"{source}: num_experts_per_tok={top_k} exceeds the experts in topk_group groups")
        if cfg.num_hidden_layers * n_routed > MAX_ROUTED_EXPERTS_TOTAL:
            raise ConfigError(
                f"{source}: num_hidden_layers x n_routed_experts = {cfg.num_hidden_layers} x {n_routed} routed "
                f"experts is more than {MAX_ROUTED_EXPERTS_TOTAL} allowed"
            )
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        raise ConfigError(
            f"{source}: first_k_dense_replace={cfg.first_k_dense_replace} is not allowed; expected an integer in "
            f"[0, num_hidden_layers={cfg.num_hidden_layers}]"
        )
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"{source}: qk_rope_head_dim must be even")
    named = [("bos_token_id", cfg.bos_token_id)] + [("eos_token_id", t) for t in cfg.eos_token_ids]
    for name, token in named:
        if token is not None and not 0 <= token < cfg.vocab_size:
            raise ConfigError(
                f"{source}: {name}={token} is outside the vocabulary (expected an integer in [0, {cfg.vocab_size - 1}])"
            )
    rope = cfg.rope
    if rope.rope_type == "yarn":
        if rope.factor is None or not 1 <= rope.factor <= 1e4:
            raise ConfigError(
                f"{source}: rope factor={rope.factor!r} is not allowed; expected a finite number in [1, 10000] "
                "(max_position_embeddings / original_max_position_embeddings when not given)"
            )
        if rope.original_max_position_embeddings is None:
            raise ConfigError(f"{source}: yarn rope needs original_max_position_embeddings")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def load_config(checkpoint_dir: str | Path) -> DeepseekConfig:
    """Read and validate ``config.json`` of a Hugging Face DeepSeek checkpoint directory.

    The file is opened through :mod:`moeport.models.paths`: a ``config.json`` symlink leaving the
    directory is refused (except into the ``blobs/`` of a Hugging Face hub-cache snapshot)."""
    directory = Path(checkpoint_dir)
    path = directory / "config.json"
    if not directory.is_dir():
        raise ConfigError(f"checkpoint directory not found: {checkpoint_dir}")
    blobs = hub_blobs(directory)
    try:
        data = read_inside(directory, "config.json", "config", MAX_CONFIG_BYTES, also=[blobs] if blobs else [])
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; a Hugging Face checkpoint needs config.json") from None
    except UnsafePathError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        raw = load_json_bounded(data, max_depth=32, allow_nan=True)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config.json") -> DeepseekConfig:
    """A :class:`DeepseekConfig` from a config.json object; :class:`ConfigError` names the first field
    that is missing, of the wrong type, out of bounds or inconsistent with the others."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    model_type = _architecture(raw, source)
    published = raw["model_type"] if raw["model_type"] != model_type else None
    ignored = []
    if "auto_map" in raw:
        log.info("%s: ignoring auto_map (remote code is never executed)", source)
        ignored.append("auto_map")
    cfg = {**_DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None or k == "q_lora_rank"}}
    check_bounds(cfg, CONFIG_BOUNDS, source)  # before anything is derived from them
    rope_params = _rope_params(raw, source)
    eos = cfg.get("eos_token_id")
    eos_ids = () if eos is None else _check_token_ids(eos, source, "eos_token_id")
    fp8_block = _parse_quantization(raw.get("quantization_config"), source)

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
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported")
    if raw.get("moe_layer_freq", 1) not in (None, 1) or type(raw.get("moe_layer_freq", 1)) is bool:
        # DeepSeek's modelling code makes only every moe_layer_freq-th layer MoE; transformers ignores it
        raise ConfigError(
            f"{source}: moe_layer_freq={short_repr(raw['moe_layer_freq'])} is not supported (every released "
            "model has 1: every layer from first_k_dense_replace on is MoE)"
        )

    n_group = cfg.get("n_group") or 1
    config = DeepseekConfig(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        n_shared_experts=cfg.get("n_shared_experts") or 0,
        n_routed_experts=cfg.get("n_routed_experts") or 0,
        num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
        routed_scaling_factor=float(cfg["routed_scaling_factor"]),
        kv_lora_rank=cfg["kv_lora_rank"],
        q_lora_rank=cfg.get("q_lora_rank"),
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        n_group=n_group,
        topk_group=cfg.get("topk_group") or n_group,
        first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob")) and model_type == "deepseek_v3",
        scoring_func=scoring,
        topk_method=topk_method,
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=float(cfg["rms_norm_eps"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings")),
        rope_interleave=cfg.get("rope_interleave", True),
        attention_bias=False,
        rope=_parse_rope(raw, cfg, rope_params, source),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        fp8_block_size=fp8_block,
        ignored_keys=tuple(ignored),
        published_model_type=published,
    )
    check_consistency(config, source)
    return config


def _architecture(raw: dict[str, Any], source: str) -> str:
    """The supported model_type whose maths ``raw`` describes, or a ConfigError naming why it is refused."""
    model_type = raw.get("model_type")
    architectures = raw.get("architectures")
    named = list(architectures) if isinstance(architectures, list) else []
    different = (
        (model_type if model_type in DIFFERENT_MATHS else None)
        or next((_DIFFERENT_ARCHITECTURES[a] for a in named if a in _DIFFERENT_ARCHITECTURES), None)
        or next((_DIFFERENT_KEYS[k] for k in raw if k in _DIFFERENT_KEYS), None)
    )
    if different:
        raise ConfigError(f"{source}: {different} is not supported: {DIFFERENT_MATHS[different]}")
    if isinstance(model_type, str) and model_type in SUPPORTED_MODEL_TYPES:
        if any(ARCHITECTURES.get(a, model_type) != model_type for a in named):
            raise ConfigError(
                f"{source}: model_type {model_type!r} with architectures {short_repr(architectures)}: "
                "they name different architectures"
            )
        return model_type
    if isinstance(model_type, str) and model_type in ALIASED_MODEL_TYPES:
        target = ALIASED_MODEL_TYPES[model_type]
        expected = [a for a, t in ARCHITECTURES.items() if t == target]
        if named != expected:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is accepted as the {target} architecture only with "
                f"architectures {expected}, got {short_repr(architectures)}"
            )
        extra = sorted(k for k in raw if k not in DEEPSEEK_V3_KEYS)
        if extra:
            raise ConfigError(
                f"{source}: model_type {model_type!r} has key(s) that {target} does not: "
                f"{', '.join(map(repr, extra))[:200]} (they may be maths moeport does not do)"
            )
        return target
    raise ConfigError(
        f"{source}: unsupported model_type {short_repr(model_type)}; moeport supports "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (DeepSeek-V2/V2-Lite/V3/R1 and compatible) and "
        f"{', '.join(ALIASED_MODEL_TYPES)} (the deepseek_v3 architecture under another name)"
    )


def _rope_params(raw: dict[str, Any], source: str) -> dict[str, Any]:
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be an object, got {short_repr(value)}")
        check_bounds(value or {}, ROPE_BOUNDS, source, prefix=f"{key}.")
    # as in transformers, a legacy rope_scaling wins over rope_parameters when both are present
    return raw.get("rope_scaling") or raw.get("rope_parameters") or {}


def _parse_quantization(qcfg: Any, source: str) -> tuple[int, int] | None:
    if not qcfg:
        return None
    if not isinstance(qcfg, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {short_repr(qcfg)}")
    if qcfg.get("quant_method") != "fp8":
        raise ConfigError(
            f"{source}: quantization_config.quant_method {short_repr(qcfg.get('quant_method'))} is not supported "
            "(only DeepSeek's block fp8)"
        )
    return _check_block(qcfg.get("weight_block_size", [128, 128]), source, "quantization_config.weight_block_size")


def _parse_rope(raw: dict[str, Any], cfg: dict[str, Any], params: dict[str, Any], source: str) -> RopeConfig:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(
        params.get("rope_theta")
        or cfg.get("rope_theta")
        or (raw.get("rope_parameters") or {}).get("rope_theta")
        or 10000.0
    )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "yarn":
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default, yarn)")
    original = (
        cfg.get("original_max_position_embeddings")
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
        truncate=params.get("truncate", True) is not False,
    )
