"""Export in row slices: memory bounded by the slice, bytes independent of how tensors are split.

The oracles: the whole-tensor block quantizer as it was before it worked in chunks (kept below, verbatim),
whole-tensor reads of the checkpoint, and artifacts exported with every tensor in one slice.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from moeport.exporter.export import export
from moeport.exporter.ops import quantize_blocks
from moeport.models.checkpoint import Checkpoint, CheckpointError

export_module = importlib.import_module("moeport.exporter.export")  # the package exports a function of that name


def reference_quantize_blocks(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The exporter's quantizer as it was, on the whole tensor at once: what artifacts hold."""
    *lead, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(*lead, k // block_size, block_size).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    amax = np.where(amax == 0, 1.0, amax)
    best_scale, best_err = None, None
    for f in (1.0, 0.95, 0.9, 0.85, 0.8) if bits == 4 else (1.0,):
        scale = amax * f / qmax
        q = np.clip(np.round(blocks / scale), -qmax - 1, qmax)
        err = ((q * scale - blocks) ** 2).sum(axis=-1, keepdims=True)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.minimum(err, best_err)
    q = np.clip(np.round(blocks / best_scale), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    codes = q.reshape(*lead, k).astype(np.uint8)
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return codes, best_scale[..., 0].astype(np.float32)


def assert_same_bits(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert g.tobytes() == w.tobytes()


def weights(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "bf16":  # what a bf16 checkpoint holds: few distinct mantissas, many near-ties between scales
        return (rng.standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16).astype(np.float32)
    if kind == "outliers":  # heavy tails, zero blocks and exact halves (round half to even)
        w = rng.standard_t(2, shape).astype(np.float32)
        flat = w.reshape(-1, w.shape[-1])
        flat[::7, :32] = 0
        flat[1::5, 3] = 1e4
        flat[2::3] = np.round(flat[2::3] * 2) / 2
        return w
    if kind == "ints":  # small integers: every block has ties at the candidate scales
        return rng.integers(-16, 17, shape).astype(np.float32)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["normal", "bf16", "outliers", "ints"])
@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 16), (4, 128), (8, 128), (8, 32)])
def test_chunked_quantizer_gives_the_bits_of_the_whole_tensor_quantizer(kind, bits, block):
    for shape in [(1, block), (37, 4 * block), (3, 5, 2 * block), (700, 256)]:
        if shape[-1] % block:
            continue
        w = weights(kind, shape, seed=len(shape) * 1000 + shape[0])
        assert_same_bits(quantize_blocks(w, bits, block), reference_quantize_blocks(w, bits, block))


@pytest.mark.parametrize(("bits", "block"), [(4, 32), (8, 128)])
def test_any_split_of_the_rows_quantizes_to_the_same_bits(bits, block):
    w = weights("bf16", (301, 512), seed=3)
    whole = reference_quantize_blocks(w, bits, block)
    for step in (1, 7, 64, 300):
        parts = [quantize_blocks(w[r : r + step], bits, block) for r in range(0, len(w), step)]
        assert_same_bits(tuple(np.concatenate(p) for p in zip(*parts, strict=True)), whole)


def test_the_chunk_size_does_not_change_the_bits(monkeypatch):
    from moeport.exporter import ops

    w = weights("outliers", (97, 384), seed=5)
    want = reference_quantize_blocks(w, 4, 32)
    for chunk in (1, 384, 1000, 1 << 20):
        monkeypatch.setattr(ops, "_CHUNK", chunk)
        assert_same_bits(quantize_blocks(w, 4, 32), want)


# -- reading row slices ----------------------------------------------------------------------------------------


def write_mixed_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file whose tensors have their own dtypes ({name: (dtype, array)})."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


@pytest.fixture
def mixed_checkpoint(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    fp8 = (rng.standard_normal((300, 200)) * 100).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(1e-3, 1e-1, (-(-300 // 128), -(-200 // 128))).astype(np.float32)
    write_mixed_safetensors(
        tmp_path / "model.safetensors",
        {
            "fp8": ("F8_E4M3", fp8),
            "fp8_scale_inv": ("F32", scale),
            "bf16": ("BF16", rng.standard_normal((45, 3, 8)).astype(ml_dtypes.bfloat16)),
            "f32": ("F32", rng.standard_normal((10,)).astype(np.float32)),
            "scalar": ("F32", np.array(2.5, np.float32)),
        },
    )
    return tmp_path


def test_row_slices_read_the_values_of_the_whole_tensor(mixed_checkpoint):
    with Checkpoint(mixed_checkpoint) as ckpt:
        # the whole FP8 tensor from its memory map, dequantized by the block formula
        q = np.array(ckpt.raw("fp8")).astype(np.float32)
        s = np.array(ckpt.raw("fp8_scale_inv"))
        want = q * np.repeat(np.repeat(s, 128, 0), 128, 1)[:300, :200]
        np.testing.assert_array_equal(ckpt.read("fp8", (128, 128)), want)
        for start, stop in [(0, 128), (5, 133), (127, 129), (250, 300), (0, 300), (299, 300), (7, 7)]:
            np.testing.assert_array_equal(ckpt.read("fp8", (128, 128), start, stop), want[start:stop])
        bf16 = np.array(ckpt.raw("bf16")).astype(np.float32)
        for start, stop in [(0, 45), (3, 4), (10, 44)]:
            got = ckpt.read("bf16", None, start, stop)
            assert got.dtype == np.float32 and got.flags.writeable
            np.testing.assert_array_equal(got, bf16[start:stop])
        np.testing.assert_array_equal(ckpt.read("f32"), np.array(ckpt.raw("f32")))
        assert ckpt.read("scalar").shape == () and float(ckpt.read("scalar")) == 2.5
        with pytest.raises(ValueError, match=r"rows \[40, 46\) outside \[0, 45\)"):
            ckpt.read("bf16", None, 40, 46)


def test_a_non_finite_value_is_found_in_the_slice_that_holds_it(tmp_path):
    w = np.zeros((64, 16), np.float32)
    w[40, 3] = np.nan
    write_mixed_safetensors(tmp_path / "model.safetensors", {"w": ("F32", w)})
    with Checkpoint(tmp_path) as ckpt:
        ckpt.read("w", None, 0, 40)
        with pytest.raises(CheckpointError, match="^w: contains NaN or infinite values$"):
            ckpt.read("w", None, 32, 48)


def test_a_file_that_shrank_after_it_was_checked_is_an_error_not_a_crash(mixed_checkpoint):
    with Checkpoint(mixed_checkpoint) as ckpt:
        path = mixed_checkpoint / "model.safetensors"
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)  # the same file (inode) the checkpoint holds open
        with pytest.raises(CheckpointError, match=r"file shrank after it was opened \(tensor 'scalar'\)"):
            ckpt.read("scalar")


# -- whole exports ---------------------------------------------------------------------------------------------


def digest(artifact: Path) -> dict[str, str]:
    return {n: hashlib.sha256((artifact / n).read_bytes()).hexdigest() for n in ("model.onnx", "model.onnx.data")}


def export_sliced(monkeypatch, ckpt: Path, out: Path, weights: str, slice_bytes: int, workers: int, **kw):
    """Export with at most ``slice_bytes`` float32 bytes per slice; record every read's rows."""
    reads: list[tuple[str, int, int]] = []
    read = Checkpoint.read

    def recording_read(self, name, block_size=None, start=0, stop=None):
        arr = read(self, name, block_size, start, stop)
        reads.append((name, start, arr.size * 4))
        return arr

    monkeypatch.setattr(export_module, "SLICE_BYTES", slice_bytes)
    monkeypatch.setattr(export_module, "WORKERS", workers)
    monkeypatch.setattr(Checkpoint, "read", recording_read)
    try:
        return export(ckpt, out, weights=weights, **kw), reads
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("weights", ["int4", "int8", "bf16", "fp32"])
def test_an_artifact_exported_in_tiny_slices_is_byte_identical_to_one_exported_whole(
    tiny_checkpoint, tmp_path, monkeypatch, weights
):
    whole, whole_reads = export_sliced(monkeypatch, tiny_checkpoint, tmp_path / "whole", weights, 1 << 40, 1)
    sliced, sliced_reads = export_sliced(monkeypatch, tiny_checkpoint, tmp_path / "sliced", weights, 300, 3)
    assert digest(sliced) == digest(whole)
    assert len(sliced_reads) > 3 * len(whole_reads)  # the tiny model really was sliced
    with Checkpoint(tiny_checkpoint) as ckpt:
        for name, _, nbytes in sliced_reads:  # one row (300 bytes fit no row of hidden size 64), kv_b_proj whole
            row = int(np.prod(ckpt.shape(name)[1:])) * 4
            assert nbytes <= max(300, row) or name.endswith("kv_b_proj.weight"), (name, nbytes)


def test_an_fp8_checkpoint_exported_in_slices_is_byte_identical(oracle_cache, tmp_path, monkeypatch):
    ckpt, _ = oracle_cache.checkpoint("v3_fp8")
    for weights in ("int4", "bf16"):
        whole, _ = export_sliced(monkeypatch, ckpt, tmp_path / f"whole-{weights}", weights, 1 << 40, 1)
        # a few rows at a time: slices start inside the 16-row FP8 blocks
        sliced, reads = export_sliced(monkeypatch, ckpt, tmp_path / f"sliced-{weights}", weights, 1500, 2)
        assert digest(sliced) == digest(whole)
        assert any(start % 16 for name, start, _ in reads if name.endswith("q_b_proj.weight"))


def test_progress_counts_every_byte_the_export_reads(tiny_checkpoint, tmp_path, monkeypatch):
    seen: list[int] = []
    totals: list[int] = []

    def progress(total: int):
        totals.append(total)
        return seen.append

    monkeypatch.setattr(export_module, "SLICE_BYTES", 1024)
    export(tiny_checkpoint, tmp_path / "art", weights="int4", progress=progress)
    with Checkpoint(tiny_checkpoint) as ckpt:
        stored = sum(ckpt.nbytes(n) for n in ckpt.names())
    assert totals == [stored] and sum(seen) == stored and len(seen) > len(ckpt.names())
