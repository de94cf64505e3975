"""Bad input gets a clear error naming the problem, and leaves nothing half-written behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moeport.backends import BackendError
from moeport.exporter import ArtifactError, ExportError, export
from moeport.models import CheckpointError, ConfigError
from moeport.runtime import GenerationError, load
from moeport.tools.checkpoints import write_safetensors
from moeport.tools.cli import main


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    from moeport.models import Checkpoint

    c = Checkpoint(path.parent)
    return {n: np.array(c.raw(n)) for n in c.names()}


def assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was created by a failed export"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")], "temp dir left behind"


def export_fails(ckpt: Path, tmp_path: Path, error: type, match: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        export(ckpt, out)
    assert_nothing_left(out)


# -- checkpoints ----------------------------------------------------------------------------------


def test_missing_safetensors(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    export_fails(ckpt, tmp_path, CheckpointError, "no model.safetensors")


def test_truncated_safetensors(ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    export_fails(ckpt, tmp_path, CheckpointError, r"model.safetensors: truncated")


def test_corrupt_safetensors_header(ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"
    f.write_bytes(bytes(data))
    export_fails(ckpt, tmp_path, CheckpointError, r"model.safetensors: corrupt")


def test_tiny_file_is_reported_as_truncated(ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"\x01\x02")
    export_fails(ckpt, tmp_path, CheckpointError, "truncated")


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", r"missing tensor\(s\): model.layers.1.mlp.experts.3.up_proj.weight"),
        ("extra", r"unexpected tensor\(s\).*model.layers.0.self_attn.surprise.weight"),
        ("shape", r"wrong shape: model.layers.2.self_attn.o_proj.weight \(64, 63\) \(expected \(64, 64\)\)"),
    ],
)
def test_tensor_missing_extra_or_misshapen_is_named(ckpt, tmp_path, change, message):
    f = ckpt / "model.safetensors"
    tensors = read_tensors(f)
    if change == "missing":
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    elif change == "extra":
        tensors["model.layers.0.self_attn.surprise.weight"] = np.zeros((2, 2), np.float32)
    else:
        tensors["model.layers.2.self_attn.o_proj.weight"] = np.zeros((64, 63), np.float32)
    write_safetensors(f, tensors, "F32")
    export_fails(ckpt, tmp_path, CheckpointError, message)


def test_mtp_layer_is_ignored(ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    tensors = read_tensors(f)
    tensors["model.layers.3.eh_proj.weight"] = np.zeros((64, 128), np.float32)  # num_hidden_layers = 3
    write_safetensors(f, tensors, "F32")
    art = export(ckpt, tmp_path / "out")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["ignored_tensors"] == ["model.layers.3.eh_proj.weight"]


def test_unsupported_model_type(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    export_fails(ckpt, tmp_path, ConfigError, "unsupported model_type 'llama'")


def test_auto_map_is_ignored_and_never_executed(ckpt, tmp_path):
    marker = tmp_path / "remote_code_ran"
    (ckpt / "configuration_deepseek.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (ckpt / "modeling_deepseek.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    }
    (ckpt / "config.json").write_text(json.dumps(cfg))
    art = export(ckpt, tmp_path / "out")
    load(art).session().prefill([1, 2, 3])
    assert not marker.exists()
    assert json.loads((art / "manifest.json").read_text())["model"]["config"]["ignored_keys"] == ["auto_map"]


def test_pickle_only_checkpoint_is_refused(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    export_fails(
        ckpt, tmp_path, CheckpointError, r"only pickle weights found \(pytorch_model.bin\).*never loads pickle"
    )


def test_missing_or_broken_config(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{not json")
    export_fails(ckpt, tmp_path, ConfigError, "config.json: not valid JSON")
    (ckpt / "config.json").unlink()
    export_fails(ckpt, tmp_path, ConfigError, "config.json: missing")


def test_missing_checkpoint_directory(tmp_path):
    export_fails(tmp_path / "nope", tmp_path, ConfigError, "checkpoint directory not found")


# -- safetensors headers from strangers: every malformed header is a CheckpointError naming the file ------
# and the tensor, never a traceback, and nothing inconsistent is accepted (as the safetensors library)

NORM = "model.norm.weight"  # shape (64,), float32


def split_file(f: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (as a dict) and its data bytes."""
    blob = f.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_file(f: Path, header: dict | str, data: bytes) -> None:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + data)


def change_header(ckpt: Path, change) -> None:
    header, data = split_file(ckpt / "model.safetensors")
    change(header)
    write_file(ckpt / "model.safetensors", header, data)


def refused(ckpt: Path, match: str) -> None:
    from moeport.models import Checkpoint

    with pytest.raises(CheckpointError, match=match):
        Checkpoint(ckpt)


def test_deeply_nested_header_is_refused_before_parsing(ckpt):
    _, data = split_file(ckpt / "model.safetensors")
    write_file(ckpt / "model.safetensors", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", data)
    refused(ckpt, r"^model.safetensors: corrupt safetensors header \(nested 100001 levels deep \(at most 8")


def first_tensor(header: dict) -> str:
    return min((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda h: h[NORM].update(data_offsets=[str(o) for o in h[NORM]["data_offsets"]]),
            r"tensor 'model.norm.weight': data_offsets must be two non-negative ints, got \['",
        ),
        (lambda h: h[NORM].update(shape=[64.0]), r"tensor 'model.norm.weight': shape must hold ints in \[0, "),
        (lambda h: h[NORM].update(shape=[True, 64]), r"tensor 'model.norm.weight': shape must hold ints"),
        (lambda h: h[NORM].update(shape="64"), r"tensor 'model.norm.weight': shape must be a list"),
        (lambda h: h[NORM].update(shape=[-64, -1]), r"tensor 'model.norm.weight': shape must hold ints in \[0, "),
        (lambda h: h[NORM].update(dtype=["F32"]), r"tensor 'model.norm.weight': unsupported dtype \['F32'\]"),
        (
            lambda h: h[first_tensor(h)].update(data_offsets=[False, h[first_tensor(h)]["data_offsets"][1]]),
            r"tensor 'model.embed_tokens.weight': data_offsets must be two non-negative ints, got \[False",
        ),
        (lambda h: h.update(__metadata__={"format": 1}), r"__metadata__ must map strings to strings"),
        (lambda h: h[NORM].pop("dtype"), r"tensor 'model.norm.weight': header entry lacks dtype"),
    ],
    ids=["string offsets", "float dim", "bool dim", "string shape", "negative shape", "list dtype", "bool offset",
         "metadata", "no dtype"],
)  # fmt: skip
def test_malformed_header_entry_is_named(ckpt, change, message):
    change_header(ckpt, change)
    refused(ckpt, r"^model.safetensors: " + message)


def test_shape_whose_element_count_overflows_int64_is_refused(ckpt):
    # 2**32 x 2**32 elements wrap to 0 in int64, which matched an empty byte range before
    def add(h: dict) -> None:
        end = max(e["data_offsets"][1] for n, e in h.items() if n != "__metadata__")
        h["evil"] = {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [end, end]}

    change_header(ckpt, add)
    refused(ckpt, r"tensor 'evil': shape \[4294967296, 4294967296\] has 18446744073709551616 elements, more than")


def test_overlapping_byte_ranges_are_refused(ckpt):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    change_header(ckpt, lambda h: h[b].update(data_offsets=h[a]["data_offsets"]))
    refused(ckpt, rf"tensors '{a}' and '{b}' overlap")


def test_duplicate_tensor_names_in_one_header_are_refused(ckpt):
    header, data = split_file(ckpt / "model.safetensors")
    text = json.dumps(header)[:-1] + f', "{NORM}": ' + json.dumps(header[NORM]) + "}"
    write_file(ckpt / "model.safetensors", text, data)
    refused(ckpt, r"corrupt safetensors header \(duplicate key 'model.norm.weight'\)")


def test_bytes_the_header_does_not_describe_are_refused(ckpt):
    header, data = split_file(ckpt / "model.safetensors")
    write_file(ckpt / "model.safetensors", header, data + bytes(16))
    refused(ckpt, r"^model.safetensors: 16 bytes after the last tensor")


def test_tensors_are_mapped_from_the_file_that_was_checked(ckpt):
    """Replacing the file after it was opened changes nothing: the open descriptor is mapped."""
    from moeport.models import Checkpoint

    c = Checkpoint(ckpt)
    before = np.array(c.raw(NORM))
    header, data = split_file(ckpt / "model.safetensors")
    swapped = ckpt / "swapped"
    write_file(swapped, header, bytes(len(data)))  # all zeros
    swapped.replace(ckpt / "model.safetensors")
    now = c.raw(NORM)
    np.testing.assert_array_equal(now, before)
    assert not now.flags.writeable and not now.flags.owndata  # a read-only map, not a copy
    c.close()


# -- shard indexes: names stay inside the checkpoint, and the index agrees with the shards -----------------


def shard(ckpt: Path, weight_map: dict | None = None) -> dict[str, str]:
    """Split the checkpoint's model.safetensors into two shards with an index (``weight_map`` if given)."""
    tensors = read_tensors(ckpt / "model.safetensors")
    names, computed = list(tensors), {}
    for k, part in enumerate((names[::2], names[1::2])):
        name = f"model-0000{k + 1}-of-00002.safetensors"
        write_safetensors(ckpt / name, {n: tensors[n] for n in part}, "F32")
        computed.update(dict.fromkeys(part, name))
    (ckpt / "model.safetensors").unlink()
    write_index(ckpt, computed if weight_map is None else weight_map)
    return computed


def write_index(ckpt: Path, weight_map) -> None:
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


SHARD1 = "model-00001-of-00002.safetensors"


def test_sharded_checkpoint_exports(ckpt, tmp_path):
    shard(ckpt)
    load(export(ckpt, tmp_path / "out")).session().prefill([1, 2, 3])


def test_shard_in_a_subdirectory_is_a_plain_name(ckpt, tmp_path):
    weight_map = shard(ckpt)
    (ckpt / "weights").mkdir()
    (ckpt / SHARD1).rename(ckpt / "weights" / SHARD1)
    write_index(ckpt, {t: f"weights/{s}" if s == SHARD1 else s for t, s in weight_map.items()})
    load(export(ckpt, tmp_path / "out")).session().prefill([1, 2, 3])


@pytest.mark.parametrize(
    "weight_map, message",
    [
        (["model-00001-of-00002.safetensors"], r"weight_map must be an object of tensor -> shard name, got list"),
        ({NORM: 5}, r"shard of tensor 'model.norm.weight' must be a file name, got 5"),
    ],
)
def test_index_weight_map_of_the_wrong_type_is_refused(ckpt, weight_map, message):
    shard(ckpt)
    write_index(ckpt, weight_map)
    refused(ckpt, r"^model.safetensors.index.json: " + message)


@pytest.mark.parametrize("where", ["../outside.safetensors", "absolute"])
def test_shard_name_outside_the_directory_is_refused_by_name(ckpt, tmp_path, where):
    weight_map = shard(ckpt)
    outside = tmp_path / "outside.safetensors"
    (ckpt / SHARD1).rename(outside)
    name = where if where != "absolute" else str(outside)
    write_index(ckpt, {t: name if s == SHARD1 else s for t, s in weight_map.items()})
    refused(ckpt, rf"^model.safetensors.index.json: tensor '.*': shard name '{name[:30]}.* is (not a plain rel|an abs)")


@pytest.mark.parametrize("name", [SHARD1, "model.safetensors.index.json"])
def test_shard_or_index_symlinked_outside_the_directory_is_refused(ckpt, tmp_path, name):
    shard(ckpt)
    (ckpt / name).rename(tmp_path / name)
    (ckpt / name).symlink_to(tmp_path / name)
    refused(ckpt, rf"{name}' resolves to .*, outside .*ckpt \(a symlink leaving it\?\)")


def test_model_safetensors_symlinked_outside_the_directory_is_refused(ckpt, tmp_path, tiny_checkpoint):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(tiny_checkpoint / "model.safetensors")
    refused(ckpt, r"weight file 'model.safetensors' resolves to .*, outside")


def test_config_symlinked_outside_the_directory_is_refused(ckpt, tiny_checkpoint):
    from moeport.models import load_config

    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(tiny_checkpoint / "config.json")
    with pytest.raises(ConfigError, match=r"config.json: config 'config.json' resolves to .*, outside"):
        load_config(ckpt)


def test_hugging_face_hub_cache_snapshot_with_symlinks_into_blobs_exports(ckpt, tmp_path):
    """A hub-cache snapshot's files are symlinks into ../../blobs: allowed, and only there."""
    shard(ckpt)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for k, f in enumerate(sorted(ckpt.iterdir())):
        f.rename(repo / "blobs" / f"blob{k}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{k}")
    load(export(snapshot, tmp_path / "out")).session().prefill([1, 2, 3])


@pytest.mark.parametrize(
    "change, message",
    [
        ("moved", r"maps tensor 'model.norm.weight' to model-00001-of-00002.safetensors, but it is in model-00002"),
        ("phantom", r"maps tensor 'phantom.weight' to model-00001-of-00002.safetensors, which does not contain it"),
        ("unlisted", r"does not list tensor 'model.norm.weight' of model-00002-of-00002.safetensors"),
    ],
)
def test_index_that_disagrees_with_the_shards_is_refused(ckpt, change, message):
    weight_map = shard(ckpt)
    assert weight_map[NORM] == "model-00002-of-00002.safetensors"
    if change == "moved":
        weight_map[NORM] = SHARD1
    elif change == "phantom":
        weight_map["phantom.weight"] = SHARD1
    else:
        del weight_map[NORM]
    write_index(ckpt, weight_map)
    refused(ckpt, r"^model.safetensors.index.json " + message)


# -- output directory -----------------------------------------------------------------------------


def test_nonempty_output_dir_is_refused_unless_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(tiny_checkpoint, out)
    with pytest.raises(ExportError, match="not a moeport artifact"):  # --force replaces only moeport's artifacts
        export(tiny_checkpoint, out, force=True)
    assert (out / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_export_with_force_keeps_the_old_artifact(tiny_checkpoint, ckpt, tmp_path):
    out = export(tiny_checkpoint, tmp_path / "out")
    before = (out / "manifest.json").read_text()
    (ckpt / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError):
        export(ckpt, out, force=True)
    assert (out / "manifest.json").read_text() == before
    load(out)  # still valid, checksums and all


def test_bad_weights_choice_and_max_seq_len(tiny_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="--weights 'int3'"):
        export(tiny_checkpoint, tmp_path / "a", weights="int3")
    with pytest.raises(ExportError, match="--max-seq-len 100000 must be between 1 and max_position_embeddings"):
        export(tiny_checkpoint, tmp_path / "b", max_seq_len=100000)
    assert_nothing_left(tmp_path / "a")
    assert_nothing_left(tmp_path / "b")


# -- running --------------------------------------------------------------------------------------


def test_token_id_out_of_vocab(tiny_artifact):
    s = load(tiny_artifact).session()
    with pytest.raises(GenerationError, match=r"token id 256 is out of the vocabulary \(0..255\)"):
        s.prefill([1, 256])
    with pytest.raises(GenerationError, match="token id -1"):
        s.step(-1)
    assert s.position == 0  # the failed calls changed nothing


def test_empty_prompt(tiny_artifact):
    with pytest.raises(GenerationError, match="empty prompt"):
        load(tiny_artifact).session().prefill([])


def test_prompt_plus_new_tokens_beyond_max_seq_len(tiny_checkpoint, tmp_path):
    art = export(tiny_checkpoint, tmp_path / "short", max_seq_len=16)
    s = load(art).session()
    with pytest.raises(
        GenerationError, match=r"prompt \(10 tokens\) \+ max_new_tokens \(7\) exceeds the max sequence length 16"
    ):
        s.generate(list(range(10)), max_new_tokens=7)
    assert len(s.generate([1] * 10, max_new_tokens=6, ignore_eos=True).tokens) == 6
    assert s.position == 15  # the last generated token is not fed back until the next step
    s.step(1)
    with pytest.raises(GenerationError, match=r"context too long: 16 cached \+ 1 new tokens > max sequence length 16"):
        s.step(1)


def test_unknown_backend(tiny_artifact):
    with pytest.raises(BackendError, match=r"unknown backend 'warp-drive'; registered backends: .*cpu"):
        load(tiny_artifact, backend="warp-drive")


def test_artifact_from_newer_format_version(tiny_artifact, tmp_path):
    art = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format version 99 is newer than this moeport supports"):
        load(art)


def test_checksum_mismatch(tiny_artifact, tmp_path):
    art = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))
    data = bytearray((art / "model.onnx.data").read_bytes())
    data[5000] ^= 0xFF
    (art / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum of model.onnx.data does not match"):
        load(art)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="not a moeport artifact"):
        load(tmp_path)


def test_session_after_close(tiny_artifact):
    model = load(tiny_artifact)
    s = model.session()
    model.close()
    with pytest.raises(GenerationError, match="model was closed"):
        s.prefill([1])


# -- the same errors through the CLI: one clean line, exit code 1 ---------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "{art}", "--prompt-ids", "1,999"], "token id 999 is out of the vocabulary"),
        (["run", "{art}", "--prompt-ids", ""], "empty prompt"),
        (["run", "{art}", "--prompt-ids", "1", "--backend", "nope"], "unknown backend 'nope'"),
        (["run", "{art}", "--prompt-ids", "1", "--max-new-tokens", "600"], "exceeds the max sequence length 512"),
        (["run", "{art}", "--prompt", "hi"], "has no tokenizer.json; give token ids instead of text"),
        (["run", "{art}", "--prompt-ids", "1,x"], "expected comma-separated integers"),
        (["run", "{art}"], "give exactly one of --prompt or --prompt-ids"),
        (["export", "{ckpt}", "{art}"], "exists and is not empty"),
    ],
)
def test_cli_errors(tiny_artifact, tiny_checkpoint, args, message):
    args = [a.format(art=tiny_artifact, ckpt=tiny_checkpoint) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_output_path_that_is_a_file(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    for force in (False, True):  # --force replaces only moeport's artifacts, never a file
        with pytest.raises(ExportError, match="exists and is not a directory"):
            export(tiny_checkpoint, out, force=force)
    assert out.read_text() == "not a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp, old or lock files left


def test_a_number_beyond_a_double_in_a_header_is_refused_as_the_safetensors_library_does(ckpt, tmp_path):
    """Found by tools/fuzz.py: Python's json takes 10**400, the safetensors library (serde_json) refuses it."""
    f = ckpt / "model.safetensors"
    blob = f.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header).replace(f'"{name}": {{', f'"{name}": {{"extra": 1{"0" * 400}, ', 1).encode()
    text += b" " * ((-len(text)) % 8)
    f.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n :])
    export_fails(ckpt, tmp_path, CheckpointError, "out of range")
