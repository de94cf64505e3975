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
