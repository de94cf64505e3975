"""Checkpoint directory -> artifact directory, streamed and atomic."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from moeport import __version__
from moeport.models import zoo
from moeport.models.checkpoint import MTP_PATTERN, Checkpoint, CheckpointError
from moeport.models.config import DeepseekConfig, load_config
from moeport.models.deepseek import CACHE_INPUT, CACHE_OUTPUT, DeepseekGraph, expected_tensors

from .graph import OPSET, STORAGE_DTYPES, GraphBuilder, WeightFile
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file

log = logging.getLogger("moeport.exporter")

GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
QUANTIZED = {"int8": 8, "int4": 4}
WEIGHT_CHOICES = (*STORAGE_DTYPES, *QUANTIZED)
DEFAULT_BLOCK = {"int8": 128, "int4": 32}


class ExportError(ValueError):
    """Export refused: bad arguments or an output directory that must not be touched."""


def check_checkpoint(cfg: DeepseekConfig, ckpt: Checkpoint) -> list[str]:
    """Compare the checkpoint's tensors with what the config needs; returns the names ignored.

    Raises :class:`CheckpointError` naming missing tensors, unexpected ones and wrong shapes.
    """
    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in ckpt]
    wrong = [
        f"{n} {ckpt.shape(n)} (expected {expected[n]})" for n in expected if n in ckpt and ckpt.shape(n) != expected[n]
    ]
    ignored, extra = [], []
    for name in ckpt.names():
        if name in expected:
            continue
        base = name.removesuffix("_scale_inv")
        layer = MTP_PATTERN.match(name)
        if name != base and base in expected and ckpt.tensors[base].dtype == "F8_E4M3":
            continue
        if layer and int(layer.group(1)) >= cfg.num_hidden_layers:
            ignored.append(name)  # multi-token-prediction module: not part of the causal LM
        elif name == "lm_head.weight" and cfg.tie_word_embeddings or name.endswith("rotary_emb.inv_freq"):
            ignored.append(name)
        else:
            extra.append(name)
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {_few(missing)}")
    if wrong:
        problems.append(f"wrong shape: {_few(wrong)}")
    if extra:
        problems.append(f"unexpected tensor(s) (not in a {cfg.model_type} model of this config): {_few(extra)}")
    if problems:
        raise CheckpointError(f"{ckpt.directory}: checkpoint does not match config.json: " + "; ".join(problems))
    for name in expected:
        if ckpt.tensors[name].dtype == "F8_E4M3" and name + "_scale_inv" not in ckpt:
            raise CheckpointError(f"{name}: FP8 weight without its scale tensor {name}_scale_inv")
    if ignored:
        mtp = [n for n in ignored if MTP_PATTERN.match(n)]
        if mtp:
            log.info("ignoring %d tensor(s) of the MTP layer(s) (index >= %d)", len(mtp), cfg.num_hidden_layers)
    return ignored


def _few(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def export(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    weights: str = "fp32",
    max_seq_len: int | None = None,
    force: bool = False,
    progress: Callable[[int], Callable[[], None]] | None = None,
    block_size: int | None = None,
) -> Path:
    """Export a Hugging Face DeepSeek checkpoint (a directory, or ``zoo:NAME``) to a moeport artifact directory.

    ``weights`` picks the stored dtype (fp32/fp16/bf16; computed in float32) or weight-only block
    quantization of every Linear (int8/int4, ``block_size`` values per scale along the input
    dimension; other tensors are then stored as bf16). The output is written
    to a temporary directory beside ``output_dir`` and renamed into place only when complete.
    ``progress(total)`` may return a callback called once per checkpoint tensor read.
    """
    if weights not in WEIGHT_CHOICES:
        raise ExportError(f"--weights {weights!r} is not one of {', '.join(WEIGHT_CHOICES)}")
    if block_size is not None and weights not in QUANTIZED:
        raise ExportError(f"--block-size only applies to --weights int8/int4, not {weights}")
    if weights in QUANTIZED:
        block_size = block_size or DEFAULT_BLOCK[weights]
        if block_size < 16 or block_size & (block_size - 1):
            raise ExportError(f"--block-size {block_size} must be a power of two >= 16")
    try:
        src = zoo.resolve(checkpoint_dir)
    except zoo.ZooError as exc:
        raise ExportError(str(exc)) from exc
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"output directory {out} exists and is not empty (use --force to replace it)")
    if out.resolve() == src.resolve():
        raise ExportError("output directory must differ from the checkpoint directory")

    cfg = load_config(src)
    ckpt = Checkpoint(src)
    ignored = check_checkpoint(cfg, ckpt)
    limit = cfg.max_position_embeddings
    if max_seq_len is None:
        max_seq_len = limit
    if not 1 <= max_seq_len <= limit:
        raise ExportError(f"--max-seq-len {max_seq_len} must be between 1 and max_position_embeddings ({limit})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tick = progress(tensor_count(cfg)) if progress else None
        _write_artifact(cfg, ckpt, tmp, weights, block_size, max_seq_len, ignored, src, tick)
        if out.exists():  # --force: move the old output aside, put the new one in place, then delete the old
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_artifact(
    cfg: DeepseekConfig,
    ckpt: Checkpoint,
    tmp: Path,
    weights: str,
    block_size: int | None,
    max_seq_len: int,
    ignored: list[str],
    src: Path,
    tick: Callable[[], None] | None,
) -> None:
    wf = WeightFile(tmp / WEIGHTS_FILE)
    try:
        quant = (QUANTIZED[weights], block_size) if weights in QUANTIZED else None
        b = GraphBuilder(wf, storage="bf16" if quant else weights)
        model_graph = DeepseekGraph(cfg, b, lambda n: ckpt.read(n, cfg.fp8_block_size), tick, quant=quant)
        model_graph.build()
    finally:
        wf.close()
    model = b.model("moeport_deepseek", doc=f"{cfg.model_type} exported by moeport {__version__}")
    onnx.save_model(model, tmp / GRAPH_FILE)
    onnx.checker.check_model(str(tmp / GRAPH_FILE))

    side = [n for n in SIDE_FILES if (src / n).is_file()]
    for name in side:
        shutil.copyfile(src / name, tmp / name)
    files = {}
    for name in [GRAPH_FILE, WEIGHTS_FILE, *side]:
        path = tmp / name
        files[name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    layers = cfg.num_hidden_layers
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": f"moeport {__version__}",
        "model": {"config": cfg.to_dict(), "source": str(src.resolve()), "ignored_tensors": ignored},
        "weights": {
            "dtype": weights,
            "compute_dtype": "float32",
            "bytes": wf.nbytes,
            **({"block_size": block_size, "unquantized": model_graph.unquantized} if quant else {}),
        },
        "max_seq_len": max_seq_len,
        "graph": {
            "file": GRAPH_FILE,
            "weights_file": WEIGHTS_FILE,
            "opset": OPSET,
            "inputs": {
                "input_ids": ["int64", ["batch", "seq"]],
                "position_ids": ["int64", ["batch", "seq"]],
                "attention_mask": ["int64", ["batch", "past+seq"]],
                "logits_to_keep": ["int64", [1]],
                CACHE_INPUT.format("{i}"): ["float32", ["batch", "past", cfg.latent_dim]],
            },
            "outputs": {
                "logits": ["float32", ["batch", "logits_to_keep", cfg.vocab_size]],
                CACHE_OUTPUT.format("{i}"): ["float32", ["batch", "seq", cfg.latent_dim]],
            },
        },
        "cache": {
            "kind": "mla_latent",
            "layers": layers,
            "input": CACHE_INPUT.format("{i}"),
            "output": CACHE_OUTPUT.format("{i}"),
            "dim": cfg.latent_dim,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "dtype": "float32",
            "layout": ["batch", "position", "dim"],
            "update": "append",  # the graph returns only the new rows; the runtime appends them
            "bytes_per_token": layers * cfg.latent_dim * 4,
        },
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def tensor_count(cfg: DeepseekConfig) -> int:
    """Tensor reads during export (for progress): every checkpoint tensor once."""
    return len(expected_tensors(cfg))
