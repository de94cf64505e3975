"""The config.json files of released DeepSeek-architecture models, as published (test data only).

Every key of each release is kept, including those moeport does not read (auto_map, aux_loss_alpha,
ep_size, seq_aux, ...), since "accepted as published" means the file as shipped parses.

Provenance: written down from the Hugging Face repositories' config.json as copied into public code
(tests and tools of megatron-bridge, parameter counters, engine ports found with the code search of this
workspace; no network here). Values that could not be confirmed against a second copy are marked
``UNCONFIRMED`` in a comment; none of them changes the maths (token ids, transformers_version).
"""

from __future__ import annotations

import copy
from typing import Any

_V2_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV2Config",
    "AutoModel": "modeling_deepseek.DeepseekV2Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
}
_V3_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}
_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
_YARN_V2 = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
}
_YARN_V3 = {**_YARN_V2, "mscale": 1.0, "mscale_all_dim": 1.0}

# deepseek-ai/DeepSeek-V2-Lite (15.7B, 2.4B active): no q-LoRA, 64 experts in one group, greedy top-6.
DEEPSEEK_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": _V2_AUTO_MAP,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": _YARN_V2,
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}
# deepseek-ai/DeepSeek-V2-Lite-Chat: the same file (UNCONFIRMED that nothing but the weights differ).
DEEPSEEK_V2_LITE_CHAT = DEEPSEEK_V2_LITE

# deepseek-ai/DeepSeek-V2 (236B, 21B active): q-LoRA, 160 experts in 8 groups, device-limited routing
# (group_limited_greedy, top 3 groups), routed_scaling_factor 16.
DEEPSEEK_V2: dict[str, Any] = {
    **DEEPSEEK_V2_LITE,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "n_group": 8,
    "n_routed_experts": 160,
    "num_attention_heads": 128,
    "num_hidden_layers": 60,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "routed_scaling_factor": 16.0,
    "topk_group": 3,
    "topk_method": "group_limited_greedy",
    "transformers_version": "4.39.3",
}
# deepseek-ai/DeepSeek-V2.5 (and V2-Chat-0628, V2.5-1210): V2's shapes with ep_size and YaRN mscale
# 1.0 instead of 0.707 (two copies agree on 1.0 for V2.5; UNCONFIRMED for V2-Chat-0628 and V2.5-1210,
# taken as V2.5's).
DEEPSEEK_V2_5: dict[str, Any] = {**DEEPSEEK_V2, "ep_size": 1, "rope_scaling": _YARN_V3}
DEEPSEEK_V2_CHAT_0628 = DEEPSEEK_V2_5
DEEPSEEK_V2_5_1210 = DEEPSEEK_V2_5

# deepseek-ai/DeepSeek-V3 (671B, 37B active): FP8 e4m3 weights in 128x128 blocks, one MTP layer
# (model.layers.61), sigmoid scoring with the noaux_tc bias, 8 groups / top 4, 3 dense layers.
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": _V3_AUTO_MAP,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": _FP8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": _YARN_V3,
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
# deepseek-ai/DeepSeek-R1: V3's file, saved by transformers 4.46.3.
DEEPSEEK_R1: dict[str, Any] = {**DEEPSEEK_V3, "transformers_version": "4.46.3"}
# deepseek-ai/DeepSeek-V3-0324 and DeepSeek-R1-0528: the same maths (transformers_version UNCONFIRMED).
DEEPSEEK_V3_0324 = DEEPSEEK_R1
DEEPSEEK_R1_0528 = DEEPSEEK_R1
# deepseek-ai/DeepSeek-V3.1 (and V3.1-Terminus): V3's shapes; quantization_config adds scale_fmt "ue8m0"
# (the FP8 scales are powers of two; the stored weight_scale_inv are still float32, dequantization
# unchanged). transformers_version UNCONFIRMED.
DEEPSEEK_V3_1: dict[str, Any] = {
    **DEEPSEEK_V3,
    "quantization_config": {**_FP8, "scale_fmt": "ue8m0"},
    "transformers_version": "4.44.2",
}
DEEPSEEK_V3_1_TERMINUS = DEEPSEEK_V3_1

# deepseek-ai/DeepSeek-V3.2-Exp: DeepSeek Sparse Attention (a lightning indexer choosing 2048 keys per
# query). Not the same maths: refused by name.
DEEPSEEK_V3_2_EXP: dict[str, Any] = {
    **{k: v for k, v in DEEPSEEK_V3.items() if k != "auto_map"},
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 2048,
    "quantization_config": {**_FP8, "scale_fmt": "ue8m0"},
    "transformers_version": "4.44.2",
}

# moonshotai/Moonlight-16B-A3B-Instruct (16B, 3B active): the deepseek_v3 architecture without q-LoRA
# and without YaRN (no rope_scaling key), 64 experts in one group, bf16 weights, no MTP layer.
MOONLIGHT_16B_A3B_INSTRUCT: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": _V3_AUTO_MAP,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11264,
    "kv_lora_rank": 512,
    "max_position_embeddings": 8192,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05,
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.446,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}
# moonshotai/Moonlight-16B-A3B (base): the same but eos_token_id 163585 (UNCONFIRMED).
MOONLIGHT_16B_A3B: dict[str, Any] = {**MOONLIGHT_16B_A3B_INSTRUCT, "eos_token_id": 163585}

# moonshotai/Kimi-K2-Instruct (1T, 32B active): model_type "kimi_k2" with the DeepSeek-V3 architecture,
# 384 experts in one group, 64 heads, one dense layer, YaRN factor 32 with beta 1/1, FP8 weights,
# no MTP layer.
KIMI_K2_INSTRUCT: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": _V3_AUTO_MAP,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "pad_token_id": 163839,  # UNCONFIRMED
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": _FP8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}
# moonshotai/Kimi-K2-Instruct-0905: a 256K context (YaRN factor 64).
KIMI_K2_INSTRUCT_0905: dict[str, Any] = {
    **KIMI_K2_INSTRUCT,
    "max_position_embeddings": 262144,
    "rope_scaling": {**KIMI_K2_INSTRUCT["rope_scaling"], "factor": 64.0},
}

#: release name -> its config.json; every release moeport accepts.
RELEASES: dict[str, dict[str, Any]] = {
    "DeepSeek-V2-Lite": DEEPSEEK_V2_LITE,
    "DeepSeek-V2-Lite-Chat": DEEPSEEK_V2_LITE_CHAT,
    "DeepSeek-V2": DEEPSEEK_V2,
    "DeepSeek-V2-Chat-0628": DEEPSEEK_V2_CHAT_0628,
    "DeepSeek-V2.5": DEEPSEEK_V2_5,
    "DeepSeek-V2.5-1210": DEEPSEEK_V2_5_1210,
    "DeepSeek-V3": DEEPSEEK_V3,
    "DeepSeek-V3-0324": DEEPSEEK_V3_0324,
    "DeepSeek-R1": DEEPSEEK_R1,
    "DeepSeek-R1-0528": DEEPSEEK_R1_0528,
    "DeepSeek-V3.1": DEEPSEEK_V3_1,
    "DeepSeek-V3.1-Terminus": DEEPSEEK_V3_1_TERMINUS,
    "Moonlight-16B-A3B": MOONLIGHT_16B_A3B,
    "Moonlight-16B-A3B-Instruct": MOONLIGHT_16B_A3B_INSTRUCT,
    "Kimi-K2-Instruct": KIMI_K2_INSTRUCT,
    "Kimi-K2-Instruct-0905": KIMI_K2_INSTRUCT_0905,
}
#: release name -> config.json of a release that is not the same maths (refused by name).
REFUSED: dict[str, dict[str, Any]] = {"DeepSeek-V3.2-Exp": DEEPSEEK_V3_2_EXP}


def release(name: str) -> dict[str, Any]:
    """A deep copy of a release's config.json (so that a test cannot change the shared data)."""
    return copy.deepcopy({**RELEASES, **REFUSED}[name])
