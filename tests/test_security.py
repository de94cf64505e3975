"""Artifacts from strangers: nothing is read outside the artifact, nothing unverified is used, no native
code from an artifact runs unless this machine built it, a trusted key signed it, or the user says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from moeport.exporter.manifest import ArtifactError, read_artifact, sha256_file
from moeport.runtime import load
from moeport.tools.cli import main

PROMPT = [1, 5, 9, 33]


@pytest.fixture
def art(tiny_artifact, tmp_path) -> Path:
    """A private copy of the tiny artifact that a test may damage."""
    return Path(shutil.copytree(tiny_artifact, tmp_path / "art"))


def edit_manifest(art: Path, change) -> None:
    m = json.loads((art / "manifest.json").read_text())
    change(m)
    (art / "manifest.json").write_text(json.dumps(m))


def relist(art: Path, name: str) -> None:
    """Keep the manifest's sha256 honest for a file the test rewrote (an attacker controls both)."""
    path = art / name

    def change(m):
        m["files"][name] = {"sha256": sha256_file(path), "size": path.stat().st_size}

    edit_manifest(art, change)


# -- manifest names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname", "sub/../../outside.json", "a\\b"])
def test_listed_names_outside_the_artifact_are_refused(art, name):
    (art.parent / "outside.json").write_text("{}")
    edit_manifest(art, lambda m: m["files"].update({name: {"sha256": "0" * 64, "size": 2}}))
    with pytest.raises(ArtifactError, match="plain relative path|absolute path|backslash"):
        read_artifact(art)


def test_a_listed_symlink_leaving_the_artifact_is_refused(art):
    secret = art.parent / "secret.json"
    secret.write_text('{"eos_token_id": 1}')
    (art / "generation_config.json").unlink()
    (art / "generation_config.json").symlink_to(secret)
    relist(art, "generation_config.json")  # even with the right checksum
    with pytest.raises(ArtifactError, match="outside"):
        read_artifact(art)


def test_graph_and_external_data_must_be_listed(art):
    edit_manifest(art, lambda m: m["graph"].update(file="unlisted.onnx"))
    with pytest.raises(ArtifactError, match="graph.file 'unlisted.onnx' is not listed"):
        read_artifact(art)


def test_external_data_named_inside_the_graph_must_be_a_listed_file(art):
    (art.parent / "stolen.bin").write_bytes(b"\0" * 4096)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "location":
            e.value = "../stolen.bin"
    onnx.save(model, str(art / "model.onnx"))
    relist(art, "model.onnx")
    with pytest.raises(ArtifactError, match="not a plain relative path"):
        load(art)
    for e in t.external_data:
        if e.key == "location":
            e.value = "other.bin"
    (art / "other.bin").write_bytes(b"\0" * 4096)
    onnx.save(model, str(art / "model.onnx"))
    relist(art, "model.onnx")
    with pytest.raises(ArtifactError, match="reads external data from 'other.bin', which manifest.json does not list"):
        load(art)


def test_external_data_ranges_must_lie_inside_the_file(art):
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "offset":
            e.value = str(10**12)
    onnx.save(model, str(art / "model.onnx"))
    relist(art, "model.onnx")
    with pytest.raises(ArtifactError, match="reads bytes 1000000000000"):
        load(art)


@pytest.mark.parametrize("backend", ["cpu", "npu-sim"])
def test_an_empty_file_list_is_refused_by_every_backend(art, backend):
    edit_manifest(art, lambda m: m.update(files={}))
    with pytest.raises(ArtifactError, match="'files' is empty"):
        load(art, backend=backend)


def test_onnxruntime_itself_refuses_external_data_outside_the_model_folder(tmp_path):
    """The onnxruntime floor (pyproject) is a version that refuses traversal on its own, for models given as
    bytes too: a second line of defence behind moeport's own checks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    (tmp_path / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (tmp_path / "model").mkdir()
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        t.external_data.add(key=k, value=v)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [y], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path / "model"))
    with pytest.raises(Exception, match="External data path"):
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# -- verification on the open file ---------------------------------------------------------------------


def test_a_graph_swapped_after_verification_is_not_the_one_used(art, monkeypatch):
    """The graph is read from the descriptor that was hashed: replacing the path afterwards changes nothing."""
    from moeport.exporter import manifest

    want = load(art).session().generate(PROMPT, max_new_tokens=6, ignore_eos=True).tokens
    real_verify = manifest.VerifiedFiles.verify

    def verify_then_swap(self, use_cache=True):
        real_verify(self, use_cache)
        bad = onnx.load(str(art / "model.onnx"), load_external_data=False)
        bad.graph.node[0].op_type = "NoSuchOp"
        onnx.save(bad, str(art / "swapped.onnx"))
        os.replace(art / "swapped.onnx", art / "model.onnx")  # a new file at the same path

    monkeypatch.setattr(manifest.VerifiedFiles, "verify", verify_then_swap)
    got = load(art).session().generate(PROMPT, max_new_tokens=6, ignore_eos=True).tokens
    assert got == want


def test_weights_swapped_after_verification_are_refused(art, monkeypatch):
    """ONNX Runtime maps the weights by path; after it loaded them, the path must still name the verified file."""
    from moeport.exporter import manifest

    real_verify = manifest.VerifiedFiles.verify

    def verify_then_swap(self, use_cache=True):
        real_verify(self, use_cache)
        data = (art / "model.onnx.data").read_bytes()
        (art / "evil.data").write_bytes(data[::-1])
        os.replace(art / "evil.data", art / "model.onnx.data")

    monkeypatch.setattr(manifest.VerifiedFiles, "verify", verify_then_swap)
    with pytest.raises(ArtifactError, match="model.onnx.data was replaced or modified while the artifact was loading"):
        load(art)


def test_an_in_place_rewrite_with_its_mtime_restored_is_caught(art, tmp_path, monkeypatch):
    """The 'already verified' stamp includes ctime, which os.utime cannot set back."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    load(art)  # hashes everything and records the stamps
    path = art / "model.onnx.data"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    with open(path, "r+b") as f:  # same inode, same size
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino
    with pytest.raises(ArtifactError, match="checksum of model.onnx.data does not match"):
        load(art)


# -- manifest values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["cache"].update(layers=10**9), r"cache.*'layers' = 1000000000 is outside"),
        (lambda m: m["cache"].update(layers=2), "cache.layers 2 differs from the model's num_hidden_layers 3"),
        (lambda m: m["cache"].update(dim=7), "cache.dim 7 differs from the model's latent size"),
        (lambda m: m["cache"].update(input="past.{i.__class__}"), "must be a plain name containing"),
        (lambda m: m.update(max_seq_len=10**12), "'max_seq_len' = 1000000000000 is outside"),
        (lambda m: m.pop("files"), "missing field 'files'"),
        (lambda m: m["files"]["model.onnx"].update(sha256="abc"), "not 64 lowercase hex digits"),
        (lambda m: m["files"]["model.onnx"].update(size="12"), "'size' must be int"),
        (lambda m: m["weights"].update(dtype="int3"), "weights.dtype 'int3'"),
    ],
)
def test_absurd_manifest_values_are_refused_before_anything_is_loaded(art, change, message):
    edit_manifest(art, change)
    with pytest.raises(ArtifactError, match=message):
        load(art)


def test_a_vocabulary_that_disagrees_with_the_graph_is_refused(art):
    def change(m):
        m["model"]["config"]["vocab_size"] = 300

    edit_manifest(art, change)
    with pytest.raises(ArtifactError, match="logits has last dimension 256, the manifest says 300"):
        load(art)


# -- reads outside the artifact (audit hook) ----------------------------------------------------------------

AUDIT = textwrap.dedent(
    """
    import json, os, sys
    art, mode = sys.argv[1], sys.argv[2]
    from moeport.runtime import load  # imports first: module files are not the artifact's business
    import onnxruntime, tokenizers, jinja2  # noqa
    # the artifact, moeport's per-user cache, and installed code and its metadata (entry points)
    allowed = [os.path.realpath(art), os.path.realpath(os.environ["XDG_CACHE_HOME"])]
    import moeport
    code = [*sys.path, sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(moeport.__file__))]
    allowed += [os.path.realpath(p) for p in code if p]
    opened = []
    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(args[0])))
    sys.addaudithook(hook)
    try:
        model = load(art, backend="cpu")
        if mode == "text":
            model.session().generate("hi", max_new_tokens=4)
        else:
            model.session().generate([1, 2, 3], max_new_tokens=4)
        error = None
    except Exception as exc:
        error = type(exc).__name__ + ": " + str(exc)
    outside = [p for p in opened if not any(p == a or p.startswith(a + os.sep) for a in allowed)]
    outside = [p for p in outside if not p.startswith("/proc/self/") and not p.endswith(".py")]
    print(json.dumps({"outside": outside, "error": error, "opened": len(opened)}))
    """
)


def _audit(art: Path, tmp_path: Path, mode: str = "ids") -> dict:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-c", AUDIT, str(art), mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_and_generating_opens_nothing_outside_the_artifact(text_artifact, tmp_path):
    got = _audit(text_artifact, tmp_path, "text")
    assert got["error"] is None and got["opened"] > 0
    assert got["outside"] == []


def test_a_hostile_artifact_opens_nothing_outside_it(art, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"eos_token_id": 1}')
    (art / "generation_config.json").unlink()
    (art / "generation_config.json").symlink_to(secret)
    relist(art, "generation_config.json")
    edit_manifest(art, lambda m: m["files"].update({"tokenizer.json": {"sha256": "0" * 64, "size": 5}}))
    got = _audit(art, tmp_path)
    assert got["error"] and "outside" in got["error"]
    assert got["outside"] == []


# -- native code in compiled/ -----------------------------------------------------------------------------------

PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char* path = getenv("MOEPORT_PLANTED_MARKER");
    FILE* f = fopen(path ? path : "/tmp/moeport-planted-marker", "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""


def _planted_library(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the planted library")
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    lib = tmp_path / "planted.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def test_a_planted_library_never_runs_unless_the_user_trusts_it(tiny_checkpoint, tmp_path, monkeypatch):
    """A stranger's artifact with a library in compiled/ whose sha256 its own manifest lists: its constructor
    must never run on load or inspect; with --trust-compiled (the user's explicit choice) it would."""
    pytest.importorskip("tvm")
    from moeport.exporter import export

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "builder-cache"))
    art = export(tiny_checkpoint, tmp_path / "art")
    assert CliRunner().invoke(main, ["compile", str(art), "--backend", "tvm"]).exit_code == 0
    lib = next((art / "compiled").glob("tvm-*/lib.so"))
    planted = lib.with_name("planted.so")
    shutil.copyfile(_planted_library(tmp_path), planted)
    planted.replace(lib)  # a new file: the library this process built and mapped stays intact
    edit_manifest(
        art,
        lambda m: m["compiled"].update(
            {
                lib.relative_to(art).as_posix(): {
                    **m["compiled"][lib.relative_to(art).as_posix()],
                    "sha256": sha256_file(lib),
                    "size": lib.stat().st_size,
                }
            }
        ),
    )
    marker = tmp_path / "marker"
    env = dict(
        os.environ,
        XDG_CACHE_HOME=str(tmp_path / "victim-cache"),  # the victim's machine built nothing
        MOEPORT_PLANTED_MARKER=str(marker),
        MOEPORT_TRUSTED_KEYS=str(tmp_path / "none"),
        TVM_USE_RUNTIME_LIB="1",  # nothing to rebuild with: the only way to run is to load the library
    )
    cli = [sys.executable, "-m", "moeport.tools.cli"]
    run = [*cli, "run", str(art), "--backend", "tvm", "--prompt-ids", "1,2", "--max-new-tokens", "1"]
    for cmd in (run, [*cli, "inspect", str(art)], [*cli, "compile", str(art), "--backend", "tvm"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in out.stderr
        assert not marker.exists(), f"{cmd[3]} ran the planted library"
    assert "refusing to load" in subprocess.run(run, env=env, capture_output=True, text=True).stderr
    # control: the test can tell when the library runs
    subprocess.run([*run, "--trust-compiled"], env=env, capture_output=True, text=True, timeout=120)
    assert marker.exists()


def test_a_library_built_here_loads_and_inspect_says_why(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    from moeport.exporter import export

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("MOEPORT_TRUSTED_KEYS", str(tmp_path / "none"))
    art = export(tiny_checkpoint, tmp_path / "art")
    first = load(art, backend="tvm", progress=False)
    assert not first.program.cache_hit
    assert load(art, backend="tvm", progress=False).program.cache_hit  # built here: reused
    out = CliRunner().invoke(main, ["inspect", str(art)])
    assert out.exit_code == 0 and "would load: built on this machine" in out.output, out.output
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    out = CliRunner().invoke(main, ["inspect", str(art)])
    assert "would NOT load: it was not built on this machine and is not signed" in out.output, out.output


# -- the CLI's error boundary --------------------------------------------------------------------------------


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeport.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_every_bad_input_is_one_line_without_a_traceback(art, tmp_path):
    ids = ["--prompt-ids", "1,2", "--max-new-tokens", "2"]
    no_files = Path(shutil.copytree(art, tmp_path / "nofiles"))
    edit_manifest(no_files, lambda m: m.pop("files"))
    bad_rope = Path(shutil.copytree(art, tmp_path / "badrope"))
    edit_manifest(bad_rope, lambda m: m["model"]["config"]["rope"].update(surprise=1))
    broken = Path(shutil.copytree(art, tmp_path / "broken"))
    model = onnx.load(str(broken / "model.onnx"), load_external_data=False)
    model.graph.node[-1].op_type = "NoSuchOp"  # parses, but ONNX Runtime refuses it
    onnx.save(model, str(broken / "model.onnx"))
    relist(broken, "model.onnx")
    cases = [
        (["run", str(no_files), *ids], 1, "missing field 'files'"),
        (["run", str(bad_rope), *ids], 1, "surprise"),
        (["run", str(art), *ids, "--seed", "-1"], 2, "--seed"),
        (["run", str(art), *ids, "-o", "threads=1", "--threads", "2"], 2, "disagree"),
        (["run", str(art), *ids, "-o", "accuracy_level=abc"], 1, "cpu: accuracy_level must be a whole number"),
        (["run", str(art), *ids, "-o", "no_such_option=1"], 1, "cpu: unknown option 'no_such_option'"),
        (["run", str(art), *ids, "-o", "verify=false"], 2, "-o verify is not a backend option"),
        (["run", str(broken), *ids], 1, "cpu: onnxruntime could not load"),
    ]
    for args, code, message in cases:
        out = _cli(args)
        assert out.returncode == code, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr + out.stdout, (args, out.stderr)
        assert len([line for line in out.stderr.splitlines() if line.startswith("Error")]) == 1, out.stderr


def test_matching_threads_flags_are_accepted(art):
    out = _cli(["run", str(art), "--prompt-ids", "1,2", "--max-new-tokens", "2", "-o", "threads=1", "--threads", "1"])
    assert out.returncode == 0, out.stderr


def test_an_internal_error_is_one_line_and_debug_shows_the_traceback(art, monkeypatch):
    from moeport.runtime import model as runtime_model

    def boom(*a, **k):
        raise RuntimeError("something broke inside")

    monkeypatch.setattr(runtime_model.Model, "session", boom)
    args = ["run", str(art), "--prompt-ids", "1,2", "--max-new-tokens", "2"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1
    assert "internal error (RuntimeError: something broke inside); run with --debug" in out.output
    debug = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(debug.exception, RuntimeError)
