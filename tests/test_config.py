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


# -- configs from strangers: exact types and bounds, checked before anything is derived --------------------

# published config.json values of real DeepSeek-architecture releases (the fields moeport reads)
DEEPSEEK_V2 = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 60,
    "num_attention_heads": 128,
    "n_shared_experts": 2,
    "n_routed_experts": 160,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 3,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "routed_scaling_factor": 16.0,
    "topk_method": "group_limited_greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
}
DEEPSEEK_V2_LITE = {
    **DEEPSEEK_V2,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "n_routed_experts": 64,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": None,
    "routed_scaling_factor": 1.0,
    "topk_method": "greedy",
}
DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "first_k_dense_replace": 3,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "routed_scaling_factor": 2.5,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}
MOONLIGHT = {
    **DEEPSEEK_V3,
    "vocab_size": 163840,
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": None,
    "max_position_embeddings": 8192,
    "routed_scaling_factor": 2.446,
    "rms_norm_eps": 1e-5,
    "rope_theta": 50000.0,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "rope_scaling": None,
    "quantization_config": None,
}
KIMI_K2 = {  # model_type "kimi_k2" in the release; the architecture (and these values) is DeepSeek-V3's
    **DEEPSEEK_V3,
    "vocab_size": 163840,
    "num_attention_heads": 64,
    "n_routed_experts": 384,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.827,
    "max_position_embeddings": 262144,
    "rope_theta": 50000.0,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}


@pytest.mark.parametrize(
    "raw",
    [DEEPSEEK_V2, DEEPSEEK_V2_LITE, DEEPSEEK_V3, MOONLIGHT, KIMI_K2],
    ids=["v2", "v2-lite", "v3", "moonlight", "kimi-k2"],
)
def test_real_releases_are_within_bounds_and_survive_the_manifest(raw):
    from moeport.models.config import DeepseekConfig

    cfg = parse_config(raw)
    assert DeepseekConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_every_config_the_project_ships_or_tests_parses():
    from pathlib import Path

    import oracle

    from moeport.tools.checkpoints import PRESETS

    zoo = Path(__file__).parents[1] / "models" / "zoo" / "tiny-reasoner"
    load_config(zoo)
    for preset in PRESETS.values():
        parse_config(preset)
    for spec in oracle.SPECS.values():
        parse_config({"model_type": spec.model_type, **spec.config})


V3 = V3_TRANSFORMERS_STYLE


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"num_experts_per_tok": "8"},
            r"num_experts_per_tok='8' is not allowed; expected null or an integer in \[1, 4096\]",
        ),
        ({"hidden_size": 10**9}, r"hidden_size=1000000000 is not allowed; expected an integer in \[1, 65536\]"),
        ({"hidden_size": "7168"}, r"hidden_size='7168' is not allowed; expected an integer"),
        ({"hidden_size": 8.5}, r"hidden_size=8.5 is not allowed; expected an integer"),
        ({"hidden_size": True}, r"hidden_size=True is not allowed; expected an integer"),
        ({"num_attention_heads": 0}, r"num_attention_heads=0 is not allowed; expected an integer in \[1, 1024\]"),
        ({"num_experts_per_tok": -3}, r"num_experts_per_tok=-3 is not allowed; expected null or an integer in \[1, "),
        (
            {"num_experts_per_tok": 300},
            r"num_experts_per_tok=300 is not allowed; expected an integer in \[1, n_routed_experts=256\]",
        ),
        ({"rms_norm_eps": -1}, r"rms_norm_eps=-1 is not allowed; expected a finite number in \(0, 1\)"),
        ({"rms_norm_eps": float("nan")}, r"rms_norm_eps=nan is not allowed; expected a finite number in \(0, 1\)"),
        ({"rms_norm_eps": 10**400}, r"rms_norm_eps=1000000.*0000 is not allowed; expected a finite number in \(0, 1\)"),
        ({"vocab_size": 10**12}, r"vocab_size=1000000000000 is not allowed; expected an integer in \[1, 4194304\]"),
        ({"num_hidden_layers": 2000}, r"num_hidden_layers=2000 is not allowed; expected an integer in \[1, 1024\]"),
        (
            {"n_routed_experts": 5000},
            r"n_routed_experts=5000 is not allowed; expected null or an integer in \[0, 4096\]",
        ),
        (
            {"max_position_embeddings": 2**25},
            r"max_position_embeddings=33554432 is not allowed; expected an integer in \[1, 16777216\]",
        ),
        (
            {"routed_scaling_factor": float("inf")},
            r"routed_scaling_factor=inf is not allowed; expected a finite number in \(0, 10000\)",
        ),
        ({"routed_scaling_factor": 0}, r"routed_scaling_factor=0 is not allowed"),
        (
            {"rope_parameters": {**V3["rope_parameters"], "rope_theta": -5}},
            r"rope_parameters.rope_theta=-5 is not allowed; expected null or a finite number in \(1, 1000000000000\)",
        ),
        (
            {"rope_parameters": {**V3["rope_parameters"], "factor": 0.5}},
            r"rope_parameters.factor=0.5 is not allowed; expected null or a finite number in \[1, 10000\]",
        ),
        (
            {"rope_parameters": {**V3["rope_parameters"], "factor": None, "original_max_position_embeddings": 10**6}},
            r"rope factor=0.16384 is not allowed; expected a finite number in \[1, 10000\]",
        ),
        (
            {"rope_parameters": {**V3["rope_parameters"], "beta_slow": 5e-324}},
            r"rope_parameters.beta_slow=5e-324 is not allowed; expected null or a finite number in \[0.001, 10000\]",
        ),
        (
            {"first_k_dense_replace": 100},
            r"first_k_dense_replace=100 is not allowed; expected an integer in \[0, num_hidden_layers=61\]",
        ),
        (
            {"eos_token_id": 129280},
            r"eos_token_id=129280 is outside the vocabulary \(expected an integer in \[0, 129279\]\)",
        ),
        ({"bos_token_id": -1}, r"bos_token_id=-1 is not allowed; expected null or an integer in \[0, "),
        ({"eos_token_id": [1, "2"]}, r"eos_token_id=\[1, '2'\] is not allowed; expected a token id or a list of them"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}},
            r"quantization_config.weight_block_size=\[128\] is not allowed; expected two integers in \[1, 65536\]",
        ),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": ["a", 1]}},
            r"quantization_config.weight_block_size=\['a', 1\] is not allowed",
        ),
        ({"quantization_config": ["fp8"]}, r"quantization_config must be an object, got \['fp8'\]"),
        (
            {"rope_parameters": ["yarn"], "rope_scaling": {"type": "yarn", **YARN}},
            r"rope_parameters must be an object, got \['yarn'\]",
        ),
        (
            {"n_routed_experts": 512, "num_hidden_layers": 1024},
            r"num_hidden_layers x n_routed_experts = 1024 x 512 routed experts is more than 262144 allowed",
        ),
        ({"norm_topk_prob": "yes"}, r"norm_topk_prob='yes' is not allowed; expected null or true or false"),
    ],
)
def test_values_of_the_wrong_type_or_out_of_bounds_are_named(change, message):
    with pytest.raises(ConfigError, match=r"^config.json: " + message):
        parse_config({**V3, **change})


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"model_type": "deepseek_v3", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", r"nested 100001 levels deep"),
        ('{"model_type": "deepseek_v3", "hidden_size": 64, "hidden_size": 7168}', r"duplicate key 'hidden_size'"),
    ],
)
def test_config_json_nested_too_deeply_or_with_duplicate_keys_is_refused(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(" + message):
        load_config(tmp_path)


def stored_v3() -> dict:
    from moeport.models.config import DeepseekConfig

    cfg = parse_config(V3_DEEPSEEK_STYLE)
    stored = json.loads(json.dumps(cfg.to_dict()))
    assert DeepseekConfig.from_dict(stored) == cfg
    return stored


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["rope"].update(surprise=1), r"unknown key\(s\) rope.'surprise'"),
        (lambda d: d.update(surprise=1), r"unknown key\(s\) 'surprise'"),
        (lambda d: d.pop("vocab_size"), r"missing key\(s\) vocab_size"),
        (lambda d: d.update(vocab_size="x"), r"vocab_size='x' is not allowed; expected an integer"),
        (lambda d: d.update(num_hidden_layers=10**9), r"num_hidden_layers=1000000000 is not allowed"),
        (
            lambda d: d.update(scoring_func="relu"),
            r"scoring_func='relu' is not allowed; expected one of 'sigmoid', 'softmax'",
        ),
        (lambda d: d.update(eos_token_ids=[10**6]), r"eos_token_id=1000000 is outside the vocabulary"),
        (lambda d: d["rope"].update(theta=float("nan")), r"rope.theta=nan is not allowed"),
        (lambda d: d.update(rope=[]), r"rope must be an object"),
    ],
)
def test_stored_config_with_unknown_missing_or_bad_keys_is_refused(change, message):
    from moeport.models.config import DeepseekConfig

    stored = stored_v3()
    change(stored)
    with pytest.raises(ConfigError, match=r"^manifest.json model.config: " + message):
        DeepseekConfig.from_dict(stored)


@pytest.mark.parametrize(
    "preset, published, billions, digits",
    [("v2-lite", DEEPSEEK_V2_LITE, 15.7, 1), ("moonlight", MOONLIGHT, 15.96, 2)],
)
def test_make_checkpoint_presets_have_the_published_shapes(preset, published, billions, digits):
    """`moeport make-checkpoint --preset v2-lite|moonlight` builds the released models' shapes (the
    parameter counts their model cards give), and `--layers` slices them at the same widths."""
    from moeport.models.deepseek import expected_tensors
    from moeport.tools.checkpoints import PRESETS

    cfg, real = parse_config(PRESETS[preset]), parse_config(published)
    shape_fields = {k: v for k, v in real.to_dict().items() if not k.startswith(("bos_token", "eos_token"))}
    assert {k: cfg.to_dict()[k] for k in shape_fields} == shape_fields
    total = sum(int(np.prod(s)) for s in expected_tensors(cfg).values())
    assert round(total / 1e9, digits) == billions


def test_make_checkpoint_layers_slices_a_preset(tmp_path):
    import json as _json

    from moeport.tools.checkpoints import make_checkpoint

    out = make_checkpoint(tmp_path / "ck", "tiny", layers=2)
    assert _json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="--layers 9 must be between 1 and the preset's 3 layers"):
        make_checkpoint(tmp_path / "ck2", "tiny", layers=9)
    assert not (tmp_path / "ck2").exists()
