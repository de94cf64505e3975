"""Config parsing follows transformers' semantics for each model_type, in both config styles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moeport.models.config import ConfigError, load_config, parse_config
from moeport.models.deepseek import rope_inv_freq

YARN = {
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
V3_DEEPSEEK_STYLE = {
    "model_type": "deepseek_v3",
    "rope_theta": 10000,
    "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", **YARN},
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
}
V3_TRANSFORMERS_STYLE = {
    "model_type": "deepseek_v3",
    "max_position_embeddings": 163840,
    "rope_interleave": True,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, **YARN},
}


def test_both_config_styles_mean_the_same_model():
    a, b = parse_config(V3_DEEPSEEK_STYLE), parse_config(V3_TRANSFORMERS_STYLE)
    assert a.rope == b.rope
    assert (a.scoring_func, a.topk_method) == (b.scoring_func, b.topk_method) == ("sigmoid", "noaux_tc")
    assert a.ignored_keys == ("auto_map",) and b.ignored_keys == ()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_defaults_are_transformers_defaults(model_type):
    from transformers import DeepseekV2Config, DeepseekV3Config

    ref = (DeepseekV3Config if model_type == "deepseek_v3" else DeepseekV2Config)()
    ours = parse_config({"model_type": model_type, "num_experts_per_tok": ref.num_experts_per_tok or 6})
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "n_shared_experts",
        "n_routed_experts",
        "routed_scaling_factor",
        "kv_lora_rank",
        "q_lora_rank",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "v_head_dim",
        "first_k_dense_replace",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope.theta == ref.rope_parameters["rope_theta"]


@pytest.mark.parametrize(
    "raw",
    [
        V3_DEEPSEEK_STYLE,
        V3_TRANSFORMERS_STYLE,
        {
            "model_type": "deepseek_v2",
            "num_experts_per_tok": 6,
            "rope_scaling": {
                "type": "yarn",
                "factor": 40,
                "original_max_position_embeddings": 4096,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        },
    ],
)
def test_yarn_frequencies_and_scales_equal_transformers(raw):
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = parse_config(raw)
    hf = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "auto_map"})
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    ours, our_factor = rope_inv_freq(cfg)
    np.testing.assert_allclose(ours, inv.numpy(), rtol=3e-7)  # float32 pow may differ by 1 ulp
    assert our_factor == pytest.approx(factor, rel=1e-12)
    mod = __import__(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}", fromlist=["x"])
    assert cfg.softmax_scale() == pytest.approx(mod.yarn_apply_mscale(hf.rope_parameters, cfg.qk_head_dim**-0.5))


def test_refuses_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(
        ConfigError, match="unsupported model_type 'mixtral'; moeport supports deepseek_v3, deepseek_v2"
    ):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_group": 3}, "must split into n_group=3 groups"),
        ({"num_experts_per_tok": 200}, "exceeds the experts in topk_group groups"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope type 'dynamic' is not supported"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quant_method 'gptq' is not supported"),
    ],
)
def test_unsupported_settings_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**V3_TRANSFORMERS_STYLE, **change})
