"""`moeport plan`: what a model needs before anyone exports it — artifact size, resident memory, cache,
whether it fits this machine, and the decode speed the memory bandwidth allows.

The sizes come from :mod:`moeport.exporter.sizes` (the exporter's tensors, byte for byte); how a backend
holds them from :func:`moeport.tools.bandwidth.held_bytes` (measured on the cpu backend: anonymous vs
file-backed memory after a load). Resident memory = weights as held + the latent cache for
``context * batch`` tokens + activations of prefilling ``prompt`` tokens at once + a fixed allowance for
the interpreter, ONNX Runtime and its arenas.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moeport.exporter.sizes import (
    DEFAULT_BLOCK,
    QUANTIZED,
    free_bytes,
    graph_bytes_estimate,
    stored_tensors,
    weights_file_bytes,
)
from moeport.models.config import DeepseekConfig
from moeport.models.deepseek import expected_tensors

from .bandwidth import held_bytes, read_bandwidth, read_bytes

WEIGHTS = ("fp32", "fp16", "bf16", "int8", "int4")
BACKENDS = ("cpu", "tvm", "npu", "npu-sim")
# Python, numpy, the ONNX Runtime library, its arenas and the graph: ~100 MB measured on the bench preset
OVERHEAD_BYTES = 256 << 20
DEFAULT_CONTEXT = 4096


class PlanError(ValueError):
    """A plan that cannot be made: a bad number, an unknown backend or weights choice."""


@dataclass(frozen=True)
class Machine:
    """What this machine offers: memory (from /proc/meminfo) and free disk where the artifact would go."""

    mem_total: int
    mem_available: int
    disk_free: int | None = None
    disk_path: str | None = None


def machine_facts(disk_path: str | Path | None = None) -> Machine:
    """This machine's memory and (if ``disk_path`` is given) the free space of the file system holding it."""
    total = available = None
    try:
        with open("/proc/meminfo") as f:
            info = {k: v for k, _, v in (line.partition(":") for line in f)}
        total = int(info["MemTotal"].split()[0]) * 1024
        available = int(info.get("MemAvailable", info["MemFree"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: physical memory, all of it counted available
        total = available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    disk = str(Path(disk_path).absolute()) if disk_path is not None else None
    return Machine(total, available, free_bytes(disk) if disk else None, disk)


def cpu_kernels() -> bool:
    """Whether moeport's cpu kernels are built here (bf16/fp16 and int8/int4 weights read in place)."""
    from moeport.backends.cpu import kernels_library

    return kernels_library()[0] is not None


def parameters(cfg: DeepseekConfig) -> tuple[int, int]:
    """(parameters of the checkpoint's causal LM, parameters one token uses: all but the unrouted experts and,
    as DeepSeek and Moonshot count them, the embedding table (a tied one is also the head, so it counts))."""
    total = sum(_numel(s) for s in expected_tensors(cfg).values())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    if not cfg.tie_word_embeddings:
        idle += cfg.vocab_size * cfg.hidden_size
    return total, total - idle


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cache_bytes_per_token(cfg: DeepseekConfig) -> int:
    """The latent cache of one token: every layer's ``kv_lora_rank + qk_rope_head_dim`` float32 numbers."""
    return cfg.num_hidden_layers * cfg.latent_dim * 4


def activation_bytes(cfg: DeepseekConfig, tokens: int) -> int:
    """An estimate of the float32 activations alive while ``tokens`` are prefilled in one call (one layer's
    intermediates at a time: ONNX Runtime reuses buffers across layers; the fused attention kernel keeps
    no [positions x positions] scores), plus one row of logits."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    attn = 6 * h + nh * cfg.qk_head_dim + 2 * nh * cfg.latent_dim + nh * cfg.v_head_dim
    inter = cfg.moe_intermediate_size
    moe = 3 * inter * (cfg.num_experts_per_tok + cfg.n_shared_experts) + cfg.n_routed_experts
    dense = 3 * cfg.intermediate_size if cfg.first_k_dense_replace or not cfg.n_routed_experts else 0
    return 4 * (tokens * (attn + max(moe, dense)) + cfg.vocab_size)


def _held(t, backend: str, kernels: bool) -> tuple[int, bool, int]:
    """(bytes held, mapped in place, bytes a token reads if it reads it whole) of one stored tensor on ``backend``."""
    if backend == "cpu":
        return (*held_bytes(t, half_kernels=kernels, quant_kernels=kernels), read_bytes(t, kernels, kernels))
    n, mapped = _held_elsewhere(t, backend)
    return n, mapped, n


def _held_elsewhere(t, backend: str) -> tuple[int, bool]:
    if backend == "tvm":  # constants loaded into memory: float weights as float32, quantized codes as stored
        return (t.nbytes if t.use == "quant" or t.dtype == "fp32" else 2 * t.nbytes), False
    # npu / npu-sim: half precision everywhere (quantized weights dequantized), norms and router float32
    return (4 * t.params if t.dtype == "fp32" and t.use != "quant" else 2 * t.params), False


def plan(
    config: DeepseekConfig,
    weights: str,
    block_size: int | None = None,
    backend: str = "cpu",
    context: int | None = None,
    batch: int = 1,
    machine: Machine | None = None,
    bandwidth: float | None = None,
    prompt: int | None = None,
    kernels: bool | None = None,
    artifact_files: dict[str, int] | None = None,
    side_bytes: int = 0,
    measure_bandwidth: bool = True,
) -> dict[str, Any]:
    """What running ``config`` exported with ``weights`` takes on ``backend``, and whether this machine has it.

    ``context``: tokens cached per sequence (default min(4096, max_position_embeddings)); ``batch``:
    sequences at once; ``prompt``: tokens prefilled in one call (default ``context``, the worst case).
    ``bandwidth``: read bandwidth in bytes/s (measured with all cores when None). ``machine``: memory and
    disk facts (:func:`machine_facts` when None). ``artifact_files``: an exported artifact's real file
    sizes, which replace the computed ones; ``side_bytes``: the tokenizer and other files an export copies.
    Without ``bandwidth`` and with ``measure_bandwidth`` False, no decode bound is given (None).
    """
    if weights not in WEIGHTS:
        raise PlanError(f"weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    if backend not in BACKENDS:
        raise PlanError(f"plan has no memory model for backend {backend!r}; it knows {', '.join(BACKENDS)}")
    if block_size is not None and weights not in QUANTIZED:
        raise PlanError(f"a block size only applies to int8/int4 weights, not {weights}")
    if weights in QUANTIZED:
        block_size = block_size or DEFAULT_BLOCK[weights]
        if block_size < 16 or block_size & (block_size - 1):
            raise PlanError(f"block size {block_size} must be a power of two >= 16")
    limit = config.max_position_embeddings
    context = min(DEFAULT_CONTEXT, limit) if context is None else context
    prompt = context if prompt is None else prompt
    for name, value, low, high in (("context", context, 1, limit), ("batch", batch, 1, 1 << 16)):
        if not isinstance(value, int) or not low <= value <= high:
            raise PlanError(f"{name} {value!r} must be a whole number between {low} and {high}")
    if not isinstance(prompt, int) or not 1 <= prompt <= context:
        raise PlanError(f"prompt {prompt!r} must be a whole number between 1 and the context ({context})")
    if bandwidth is not None and not bandwidth > 0:
        raise PlanError(f"bandwidth {bandwidth!r} must be a positive number of bytes per second")
    machine = machine or machine_facts()
    kernels = (cpu_kernels() if backend == "cpu" else False) if kernels is None else kernels

    tensors = stored_tensors(config, weights, block_size)
    total_params, active_params = parameters(config)
    weights_bytes = sum(t.nbytes for t in tensors)
    if artifact_files is not None:
        files = dict(artifact_files)
    else:
        files = {"model.onnx.data": weights_file_bytes(tensors), "model.onnx": graph_bytes_estimate(config)}
        if side_bytes:
            files["other files"] = side_bytes
    artifact_bytes = sum(files.values())

    mapped = materialized = 0
    active = 0.0
    for t in tensors:
        n, in_place, read = _held(t, backend, kernels)
        if in_place:
            mapped += n
        else:
            materialized += n
        active += read * t.active
    per_token = cache_bytes_per_token(config)
    cache = per_token * context * batch
    activations = activation_bytes(config, prompt) * batch
    anonymous = materialized + cache + activations + OVERHEAD_BYTES
    resident = anonymous + mapped

    measured = bandwidth is None and measure_bandwidth
    if measured:
        bandwidth = read_bandwidth(threads=os.cpu_count() or 1, megabytes=512, repeats=3)
    bound = round(bandwidth / active, 2) if bandwidth else None

    if resident <= machine.mem_available:
        fits, verdict = "ram", "fits in memory"
    elif anonymous <= machine.mem_available and mapped:
        fits = "mapped"
        verdict = (
            f"larger than the available memory by {_gb(resident - machine.mem_available)}: runs memory-mapped, "
            "the routed experts paged in from disk as they are needed (decode then bounded by the disk's read "
            "speed, not the memory bandwidth)"
        )
    else:
        fits = "no"
        verdict = (
            f"does not fit: {_gb(anonymous)} must be held in memory (weights this backend copies, cache, "
            f"activations) and {_gb(machine.mem_available)} is available"
        )
    disk_fits = None
    if artifact_files is None and machine.disk_free is not None:
        disk_fits = artifact_bytes <= machine.disk_free
        if not disk_fits:
            verdict = (
                f"export needs {_gb(artifact_bytes)} and {machine.disk_path} has {_gb(machine.disk_free)} free; "
                + verdict
            )
    return {
        "model": {
            "model_type": config.model_type,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
            "routed_experts": config.n_routed_experts,
            "experts_per_token": config.num_experts_per_tok,
            "shared_experts": config.n_shared_experts,
        },
        "weights": weights,
        "block_size": block_size,
        "backend": backend,
        "kernels": kernels,
        "parameters": total_params,
        "active_parameters": active_params,
        "artifact_bytes": artifact_bytes,
        "artifact_files": files,
        "artifact_files_measured": artifact_files is not None,
        "weights_bytes": weights_bytes,
        "tensors": len(tensors),
        "context": context,
        "batch": batch,
        "prompt": prompt,
        "cache_bytes_per_token": per_token,
        "cache_bytes": cache,
        "resident": {
            "weights_mapped": mapped,
            "weights_copied": materialized,
            "cache": cache,
            "activations": activations,
            "overhead": OVERHEAD_BYTES,
            "total": resident,
            "anonymous": anonymous,
        },
        "active_bytes_per_token": round(active),
        "bandwidth_bytes_per_second": round(bandwidth) if bandwidth else None,
        "bandwidth_measured": measured,
        "decode_tokens_per_second_bound": bound,
        "machine": asdict(machine),
        "fits": fits,
        "fits_disk": disk_fits,
        "verdict": verdict,
    }


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def plan_source(
    source: str | Path,
    weights: str | None = None,
    block_size: int | None = None,
    output: str | Path | None = None,
    context: int | None = None,
    machine: Machine | None = None,
    bandwidth: float | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Plans for a checkpoint directory (or ``zoo:NAME``), one per weights choice (all of them unless
    ``weights`` is given), with the free space at ``output`` (default: the current directory) checked for
    the export; or for an exported artifact directory, with its manifest's weights and real file sizes.
    ``options`` go to :func:`plan` (backend, batch, prompt, kernels)."""
    from moeport.exporter.export import SIDE_FILES
    from moeport.exporter.manifest import MANIFEST, read_artifact
    from moeport.models import zoo
    from moeport.models.config import load_config

    try:
        path = zoo.resolve(source)
    except zoo.ZooError as exc:
        raise PlanError(str(exc)) from exc
    if not path.is_dir():
        raise PlanError(f"{source}: no such directory (give a checkpoint directory, zoo:NAME or an artifact)")
    if (path / MANIFEST).exists():
        art = read_artifact(path, verify=False)  # ArtifactError names what is wrong with it
        w = art.manifest["weights"]
        if weights is not None and weights != w["dtype"]:
            raise PlanError(
                f"{source} is an artifact of {w['dtype']} weights; plan its checkpoint for --weights {weights}"
            )
        if context is not None and context > art.max_seq_len:
            raise PlanError(f"context {context} is longer than the artifact's max sequence length {art.max_seq_len}")
        files = {name: int(f["size"]) for name, f in art.files.items()}
        machine = machine or machine_facts()
        context = min(DEFAULT_CONTEXT, art.max_seq_len) if context is None else context
        return [
            plan(
                art.config,
                w["dtype"],
                w.get("block_size"),
                context=context,
                machine=machine,
                bandwidth=bandwidth,
                artifact_files=files,
                **options,
            )
        ]
    if not (path / "config.json").exists():
        raise PlanError(f"{source}: neither a checkpoint (no config.json) nor a moeport artifact (no {MANIFEST})")
    cfg = load_config(path)  # ConfigError names what is wrong with it
    side = sum((path / n).stat().st_size for n in SIDE_FILES if (path / n).is_file())
    machine = machine or machine_facts(output if output is not None else Path.cwd())
    choices = [weights] if weights else [w for w in WEIGHTS if block_size is None or w in QUANTIZED]
    plans = []
    for w in choices:
        plans.append(
            plan(cfg, w, block_size, context=context, machine=machine, bandwidth=bandwidth, side_bytes=side, **options)
        )
        bandwidth = plans[-1]["bandwidth_bytes_per_second"]  # measured once, for every row
    return plans
