"""Checkpoint directory -> artifact directory, streamed and atomic."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from moeport import __version__
from moeport.models import zoo
from moeport.models.checkpoint import MTP_PATTERN, Checkpoint, CheckpointError
from moeport.models.config import DeepseekConfig, load_config
from moeport.models.deepseek import CACHE_INPUT, CACHE_OUTPUT, DeepseekGraph, expected_tensors

from .graph import OPSET, STORAGE_DTYPES, GraphBuilder, WeightFile
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, read_artifact, sha256_file
from .outdir import (
    OutputError,
    OutputLock,
    describe_os_error,
    fsync_file,
    naming,
    output_path,
    publish,
    remove_leftovers,
    restore_interrupted_swap,
    temp_dir,
)
from .sizes import DEFAULT_BLOCK, QUANTIZED, free_bytes, graph_bytes_estimate, stored_tensors, weights_file_bytes

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
WEIGHT_CHOICES = (*STORAGE_DTYPES, *QUANTIZED)
_MAX_MANIFEST_BYTES = 16 << 20
SLICE_BYTES = 32 << 20  # float32 bytes of one row slice of a weight: what is read, converted, quantized at once
WORKERS = 4  # at most this many threads (and the CPUs this process may use) produce slices at once


class ExportError(ValueError):
    """Export refused: bad arguments or an output directory that must not be touched."""


def _output_to_replace(out: Path, force: bool) -> bool:
    """Whether ``out`` is an artifact to replace (True) or missing or empty (False); anything else is refused."""
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; moeport only replaces its own artifacts (give the real path)")
    if not out.exists():
        return False
    if not out.is_dir():
        raise ExportError(
            f"{out} exists and is not a directory; moeport only replaces its own artifacts "
            "(remove it or choose another path)"
        )
    if not any(out.iterdir()):
        return False
    why_not = _why_not_an_artifact(out)
    if not force:
        if why_not is None:
            raise ExportError(f"output directory {out} exists and is not empty (use --force to replace it)")
        raise ExportError(
            f"output directory {out} exists and is not empty, and is not a moeport artifact ({why_not}); "
            "moeport only replaces its own artifacts"
        )
    if why_not is not None:
        raise ExportError(
            f"refusing to replace {out}: it is not a moeport artifact ({why_not}); --force only replaces "
            "moeport's own artifacts"
        )
    return True


def _why_not_an_artifact(directory: Path) -> str | None:
    """None if ``directory`` has a moeport manifest (format only: a damaged artifact may be replaced), else why not."""
    path = directory / MANIFEST
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
            return f"{MANIFEST} is not a regular file of at most {_MAX_MANIFEST_BYTES >> 20} MiB"
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, RecursionError) as exc:
        return f"{MANIFEST} is not readable JSON ({type(exc).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f'{MANIFEST} does not say "format": "{FORMAT}"'
    return None


def _is_complete_artifact(directory: Path) -> bool:
    try:
        read_artifact(directory, verify=True)
    except Exception:  # noqa: BLE001 - whatever is wrong with it, it is not a complete artifact
        return False
    return True


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
    progress: Callable[[int], Callable[[int], object]] | None = None,
    block_size: int | None = None,
    check_space: bool = True,
) -> Path:
    """Export a Hugging Face DeepSeek checkpoint (a directory, or ``zoo:NAME``) to a moeport artifact directory.

    ``weights`` picks the stored dtype (fp32/fp16/bf16; computed in float32) or weight-only block
    quantization of every Linear (int8/int4, ``block_size`` values per scale along the input
    dimension; other tensors are then stored as bf16). The output is written to a temporary
    directory beside ``output_dir``, fsynced, and swapped into place only when complete, under a
    lock that refuses a concurrent export to the same path. ``force`` replaces an existing moeport
    artifact, never anything else. ``progress(total)`` (``total``: the bytes of checkpoint tensors
    the export reads) may return a callback called with the bytes of each slice read (from the
    export's threads, one call at a time). Before anything is written, the artifact's size (known
    from the config) is checked against the free space at ``output_dir``; ``check_space=False`` tries
    anyway.

    Every tensor is read, converted or quantized, and written in row slices of at most
    :data:`SLICE_BYTES` (as float32), so memory does not grow with the model or any tensor in it.
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
    try:
        out = output_path(output_dir)
    except OutputError as exc:
        raise ExportError(str(exc)) from exc
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
    if check_space:
        _check_space(cfg, weights, block_size, src, out)

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with OutputLock(out, "export"):  # a live export holds it: what is left beside out is a killed one's
            restore_interrupted_swap(out, _is_complete_artifact)
            remove_leftovers(out)
            replace = _output_to_replace(out, force)
            tmp = temp_dir(out)
            try:
                tick = progress(bytes_to_read(cfg, ckpt)) if progress else None
                _write_artifact(cfg, ckpt, tmp, weights, block_size, max_seq_len, ignored, src, tick)
                publish(tmp, out, replace)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OutputError as exc:
        raise ExportError(str(exc)) from exc
    except OSError as exc:  # disk full, permissions, I/O errors: one line naming the file
        raise ExportError(f"export to {out} failed: {describe_os_error(exc, out, tmp)}") from exc
    return out


def artifact_bytes(cfg: DeepseekConfig, weights: str, block_size: int | None, src: Path) -> int:
    """Bytes the artifact will take on disk: the weights file exactly, the graph at most, the copied side files."""
    side = sum((src / n).stat().st_size for n in SIDE_FILES if (src / n).is_file())
    return weights_file_bytes(stored_tensors(cfg, weights, block_size)) + graph_bytes_estimate(cfg) + side


def _check_space(cfg: DeepseekConfig, weights: str, block_size: int | None, src: Path, out: Path) -> None:
    """Refuse, before the long work, an export that would fill the disk an hour in (an artifact being
    replaced stays until the new one is complete, so today's free space is what the new one gets)."""
    need = artifact_bytes(cfg, weights, block_size, src)
    try:
        free = free_bytes(out.parent)
    except OSError:
        return  # the export itself reports what is wrong with the path
    if need > free:
        raise ExportError(
            f"the {weights} artifact needs {need / 1e9:.2f} GB and {out.parent} has {free / 1e9:.2f} GB free; "
            "free some space or export elsewhere (--ignore-space to try anyway)"
        )


def _write_artifact(
    cfg: DeepseekConfig,
    ckpt: Checkpoint,
    tmp: Path,
    weights: str,
    block_size: int | None,
    max_seq_len: int,
    ignored: list[str],
    src: Path,
    tick: Callable[[int], object] | None,
) -> None:
    """Write every file of the artifact into ``tmp``, each fsynced (the caller renames ``tmp`` into place)."""
    wf = WeightFile(tmp / WEIGHTS_FILE)
    try:
        quant = (QUANTIZED[weights], block_size) if weights in QUANTIZED else None
        b = GraphBuilder(wf, storage="bf16" if quant else weights, workers=_workers())
        source = SlicedReader(ckpt, cfg.fp8_block_size, tick)
        model_graph = DeepseekGraph(cfg, b, source, quant=quant)
        model_graph.build()
        wf.close(sync=True)
    finally:
        wf.discard()
    model = b.model("moeport_deepseek", doc=f"{cfg.model_type} exported by moeport {__version__}")
    with naming(tmp / GRAPH_FILE):
        onnx.save_model(model, tmp / GRAPH_FILE)
    fsync_file(tmp / GRAPH_FILE)
    onnx.checker.check_model(str(tmp / GRAPH_FILE))

    side = [n for n in SIDE_FILES if (src / n).is_file()]
    for name in side:
        with naming(tmp / name):
            shutil.copyfile(src / name, tmp / name)
        fsync_file(tmp / name)
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
    with naming(tmp / MANIFEST), open(tmp / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=2))
        f.flush()
        os.fsync(f.fileno())


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(WORKERS, cpus))


def bytes_to_read(cfg: DeepseekConfig, ckpt: Checkpoint) -> int:
    """Bytes of checkpoint tensors an export reads (for progress): every tensor the model uses once,
    with the scales of FP8 ones."""
    total = 0
    for name in expected_tensors(cfg):
        total += ckpt.nbytes(name)
        if ckpt.tensors[name].dtype == "F8_E4M3":
            total += ckpt.nbytes(name + "_scale_inv")
    return total


class SlicedReader:
    """The checkpoint as the model graph reads it: float32 row slices of at most :data:`SLICE_BYTES`.

    ``advance(nbytes)`` is told the stored bytes of each slice read (an FP8 weight's scales with its
    last slice), one call at a time from whichever thread reads."""

    def __init__(
        self, ckpt: Checkpoint, fp8_block: tuple[int, int] | None, advance: Callable[[int], object] | None = None
    ):
        self.ckpt, self.fp8_block = ckpt, fp8_block
        self._advance = advance
        self._lock = threading.Lock()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(name)

    def slices(self, name: str, share: int = 1) -> list[tuple[int, int]]:
        shape = self.ckpt.shape(name)
        rows = self.ckpt.rows(name)
        row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * 4 * share)
        step = max(1, SLICE_BYTES // row_bytes)
        return [(start, min(rows, start + step)) for start in range(0, rows, step)] or [(0, 0)]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        rows = self.ckpt.rows(name)
        stop = rows if stop is None else stop
        arr = self.ckpt.read(name, self.fp8_block, start, stop)
        if self._advance is not None:
            nbytes = self.ckpt.nbytes(name) // max(rows, 1) * (stop - start)
            if stop == rows and self.ckpt.tensors[name].dtype == "F8_E4M3":  # its scales with the last slice
                nbytes += self.ckpt.nbytes(name + "_scale_inv")
            with self._lock:
                self._advance(nbytes)
        return arr
