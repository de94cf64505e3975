"""Make DeepSeek-architecture checkpoints with random weights (numpy + safetensors, no torch).

Presets are plain dicts of config.json fields. The weights are random, so the text is meaningless;
they exist to exercise the whole path (export, backends, runtime) and to benchmark it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from moeport.exporter.outdir import (
    OutputError,
    OutputLock,
    describe_os_error,
    fsync_file,
    naming,
    output_path,
    publish,
    remove_leftovers,
    temp_dir,
)
from moeport.models.config import DeepseekConfig, parse_config
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
# issue C's benchmark model: DeepSeek-V3 architecture, ~0.82B parameters, ~0.14B active per token, bf16
PRESETS["bench"] = dict(
    PRESETS["tiny"],
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_shared_experts=2,
    n_group=8,
    topk_group=4,
    first_k_dense_replace=1,
    q_lora_rank=384,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    max_position_embeddings=4096,
    rope_scaling=dict(
        type="yarn",
        factor=4.0,
        original_max_position_embeddings=1024,
        beta_fast=32,
        beta_slow=1,
        mscale=1.0,
        mscale_all_dim=1.0,
    ),
)
# the same active size with only 8 routed experts: decode time should not depend on the expert count
PRESETS["bench-e8"] = dict(PRESETS["bench"], n_routed_experts=8, n_group=1, topk_group=1)
# real 16B-class shapes, as published on the Hugging Face hub (random weights; `--layers N` keeps the
# first N layers: the figures of issue I are reproducible at full depth or sliced)
PRESETS["v2-lite"] = dict(  # deepseek-ai/DeepSeek-V2-Lite: 15.7B parameters, 2.4B active, 27 layers
    model_type="deepseek_v2",
    architectures=["DeepseekV2ForCausalLM"],
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    num_experts_per_tok=6,
    routed_scaling_factor=1.0,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    moe_layer_freq=1,
    first_k_dense_replace=1,
    norm_topk_prob=False,
    scoring_func="softmax",
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=163840,
    rms_norm_eps=1e-6,
    rope_theta=10000,
    rope_scaling=dict(
        type="yarn",
        factor=40,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
        mscale=0.707,
        mscale_all_dim=0.707,
    ),
    tie_word_embeddings=False,
    bos_token_id=100000,
    eos_token_id=100001,
    torch_dtype="bfloat16",
)
PRESETS["moonlight"] = dict(  # moonshotai/Moonlight-16B-A3B: 15.96B parameters, 2.58B active, 27 layers
    PRESETS["v2-lite"],  # the same widths and depth, on DeepSeek-V3's architecture and routing
    model_type="deepseek_v3",
    architectures=["DeepseekV3ForCausalLM"],
    vocab_size=163840,
    intermediate_size=11264,
    routed_scaling_factor=2.446,
    topk_method="noaux_tc",
    norm_topk_prob=True,
    scoring_func="sigmoid",
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
    rope_scaling=None,
    bos_token_id=163584,
    eos_token_id=163585,
)
PRESET_DTYPES = {"tiny": "fp32", "bench": "bf16", "bench-e8": "bf16", "v2-lite": "bf16", "moonlight": "bf16"}

_DTYPES = {"fp32": (np.float32, "F32"), "bf16": (ml_dtypes.bfloat16, "BF16"), "fp16": (np.float16, "F16")}


def make_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str | None = None,
    overrides: dict | None = None,
    layers: int | None = None,
) -> Path:
    """Write config.json, model.safetensors and generation_config.json for ``preset`` into ``out_dir``.

    Tensors are generated and written one at a time, so even the bench preset needs little memory.
    The files are written to a temporary directory beside ``out_dir``, fsynced and renamed into
    place when complete, so an interrupted run leaves no half-written checkpoint (and the next run
    removes its temporary directory). Raises :class:`OutputError` (one line) if ``out_dir`` is a
    file, a symbolic link or a non-empty directory, if another run is writing it, or if writing fails.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    raw = {**PRESETS[preset], **(overrides or {})}
    if layers is not None:
        if not 1 <= layers <= raw["num_hidden_layers"]:
            raise ValueError(f"--layers {layers} must be between 1 and the preset's {raw['num_hidden_layers']} layers")
        raw["num_hidden_layers"] = layers
    cfg = parse_config(raw)
    out = output_path(out_dir)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with OutputLock(out, "make-checkpoint"):
            remove_leftovers(out)
            _check_output(out)
            tmp = temp_dir(out)
            try:
                _write_checkpoint(tmp, raw, cfg, seed, dtype or PRESET_DTYPES[preset])
                publish(tmp, out, replace=False)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:
        raise OutputError(f"writing checkpoint {out} failed: {describe_os_error(exc, out, tmp)}") from exc
    return out


def _check_output(out: Path) -> None:
    if out.is_symlink():
        raise OutputError(f"{out} is a symbolic link; give the real path of a new or empty directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"{out} exists and is not empty")


def _write_checkpoint(out: Path, raw: dict, cfg: DeepseekConfig, seed: int, dtype: str) -> None:
    rng = np.random.default_rng(seed)
    np_dtype, st_dtype = _DTYPES[dtype]

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight") or "layernorm" in name:
            x = 1.0 + 0.1 * x
        elif name.endswith("e_score_correction_bias"):
            x = 0.05 * x
        elif name.endswith("gate.weight"):
            x = 0.5 * x
        else:
            x /= np.sqrt(shape[-1])
        return x.astype(np_dtype)

    shapes = expected_tensors(cfg)
    with naming(out / "model.safetensors"):
        write_safetensors(out / "model.safetensors", shapes, st_dtype, (tensor(n, s) for n, s in shapes.items()))
    gen = {"bos_token_id": raw.get("bos_token_id"), "eos_token_id": raw.get("eos_token_id"), "do_sample": False}
    for name, data in (("config.json", raw), ("generation_config.json", gen)):
        with naming(out / name):
            (out / name).write_text(json.dumps(data, indent=2))
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        fsync_file(out / name)


def write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]] | dict[str, np.ndarray], st_dtype: str, tensors=None
) -> None:
    """Minimal safetensors writer (a JSON header, then raw little-endian bytes in header order).

    ``shapes`` maps names to shapes (then ``tensors`` yields the arrays in that order) or to arrays.
    """
    arrays = None
    if tensors is None:
        arrays = shapes
        shapes = {n: a.shape for n, a in arrays.items()}
        tensors = iter(arrays.values())
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}[st_dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, shape), arr in zip(shapes.items(), tensors, strict=True):
            if tuple(arr.shape) != tuple(shape) or arr.dtype.itemsize != itemsize:
                raise ValueError(f"{name}: array {arr.shape}/{arr.dtype} does not match {shape}/{st_dtype}")
            f.write(np.ascontiguousarray(arr).tobytes())
