"""Deploying a tvm-compiled artifact: runtime-only apache-tvm (no compiler), libraries trusted by signature
(never by the artifact's own manifest), cross-compiling for an AArch64 board."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm", reason="apache-tvm not installed (pip install 'moeport[tvm]')")

from click.testing import CliRunner  # noqa: E402

from moeport.backends.tvm_target import CROSS_CC_ENV, TargetError, cross_linker, elf_machine  # noqa: E402
from moeport.exporter import export  # noqa: E402
from moeport.runtime import load  # noqa: E402
from moeport.tools.cli import main  # noqa: E402

PROMPT = [1, 5, 9, 33, 70, 2, 8, 100, 200, 3]
AARCH64 = "llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod"
EM_AARCH64 = 183

# Runs on "the board": TVM's runtime library only (TVM_USE_RUNTIME_LIB=1) and an empty per-user cache,
# so nothing this machine recorded as built here applies.
BOARD = """
import json, sys
from moeport.runtime import load
model = load(sys.argv[1], backend="tvm", trust_compiled=sys.argv[3] == "trust")
tokens = model.session().generate(json.loads(sys.argv[2]), max_new_tokens=16, ignore_eos=True).tokens
maps = open("/proc/self/maps").read()
print(json.dumps({"tokens": tokens, "cache_hit": model.program.cache_hit,
                  "compiler_mapped": "libtvm_compiler" in maps, "runtime_mapped": "libtvm_runtime" in maps,
                  "relax_imported": "tvm.relax" in sys.modules}))
"""


def _board_env(tmp_path: Path, trusted_keys: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", XDG_CACHE_HOME=str(tmp_path / "board-cache"))
    env["MOEPORT_TRUSTED_KEYS"] = str(trusted_keys or tmp_path / "no-trusted-keys")
    env.pop(CROSS_CC_ENV, None)
    return env


def _compile(art: Path, *extra: str):
    result = CliRunner().invoke(main, ["compile", str(art), "--backend", "tvm", *extra])
    assert result.exit_code == 0, result.output
    return result


def _signing_key(directory: Path) -> tuple[Path, Path]:
    """An Ed25519 key pair as `ssh-keygen -t ed25519 -N ''` writes it: (private key, trusted-keys file)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = directory / "id_ed25519"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    trusted = directory / "trusted_keys"
    trusted.write_text(public.decode() + " build-machine\n")
    return private, trusted


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    pytest.importorskip("cryptography", reason="signatures need pip install 'moeport[sign]'")
    return _signing_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def shipped(tiny_checkpoint, tmp_path_factory, keys) -> Path:
    """An artifact after `moeport compile --backend tvm --sign-key KEY` (host target)."""
    art = export(tiny_checkpoint, tmp_path_factory.mktemp("ship") / "art")
    _compile(art, "--sign-key", str(keys[0]))
    return art


def _board_python(board: Path, tmp_path: Path, trusted: Path | None = None, trust: bool = False):
    return subprocess.run(
        [sys.executable, "-c", BOARD, str(board), json.dumps(PROMPT), "trust" if trust else "no"],
        env=_board_env(tmp_path, trusted),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_copied_signed_artifact_runs_on_tvm_runtime_only_with_the_same_tokens(shipped, keys, tmp_path):
    board = shutil.copytree(shipped, tmp_path / "board" / "art")  # e.g. scp -r to the board
    out = _board_python(board, tmp_path, trusted=keys[1])  # the board trusts the build machine's key
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["runtime_mapped"] and not got["compiler_mapped"] and not got["relax_imported"]
    assert got["cache_hit"]  # the shipped library, no rebuild (there is no compiler to rebuild with)
    want = load(shipped, backend="cpu").session().generate(PROMPT, max_new_tokens=16, ignore_eos=True).tokens
    assert got["tokens"] == want


def test_a_library_listed_in_its_own_manifest_is_not_trusted_without_a_signature(shipped, tmp_path):
    """Whoever ships the artifact ships its manifest: a sha256 there proves nothing about the code."""
    board = shutil.copytree(shipped, tmp_path / "art")
    lib = next((board / "compiled").glob("tvm-*/lib.so"))
    assert json.loads((board / "manifest.json").read_text())["compiled"][lib.relative_to(board).as_posix()]
    out = _board_run(board, tmp_path)  # no trusted key on this board
    assert out.returncode == 1, out.stderr
    assert f"refusing to load {lib}" in out.stderr and "not in" in out.stderr and "--trust-compiled" in out.stderr
    assert "Traceback" not in out.stderr
    trusted = _board_python(board, tmp_path, trust=True)  # the user's explicit choice for this run
    assert trusted.returncode == 0, trusted.stderr


def _board_run(board: Path, tmp_path: Path, trusted: Path | None = None) -> subprocess.CompletedProcess:
    ids = ",".join(map(str, PROMPT))
    cmd = [sys.executable, "-m", "moeport.tools.cli", "run", str(board), "--backend", "tvm", "--prompt-ids", ids]
    return subprocess.run(
        [*cmd, "--max-new-tokens", "2"],
        env=_board_env(tmp_path, trusted),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_runtime_only_refuses_a_modified_library_even_with_a_trusted_signature(shipped, keys, tmp_path):
    board = shutil.copytree(shipped, tmp_path / "art")
    lib = next((board / "compiled").glob("tvm-*/lib.so"))
    lib.write_bytes(lib.read_bytes() + b"\0")  # still a loadable library, but not the one compiled
    out = _board_run(board, tmp_path, trusted=keys[1])
    assert out.returncode == 1
    assert f"refusing to load {lib}" in out.stderr and "does not match" in out.stderr, out.stderr
    assert "cannot be rebuilt" in out.stderr and "Traceback" not in out.stderr

    manifest = json.loads((board / "manifest.json").read_text())
    del manifest["compiled"]  # no manifest entry to compare with: the signature is for other content
    (board / "manifest.json").write_text(json.dumps(manifest))
    out = _board_run(board, tmp_path, trusted=keys[1])
    assert out.returncode == 1 and "signed, but for other content" in out.stderr, out.stderr


def test_runtime_only_without_a_compiled_library_says_how_to_make_one(shipped, tmp_path):
    board = shutil.copytree(shipped, tmp_path / "art", ignore=shutil.ignore_patterns("compiled"))
    out = _board_run(board, tmp_path)
    assert out.returncode == 1 and "has no compiled library for this machine" in out.stderr, out.stderr
    assert "moeport compile" in out.stderr


def _linkers() -> list:
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    zig = importlib.util.find_spec("ziglang") is not None
    why = "no AArch64 cross toolchain: pip install 'moeport[cross]' or apt-get install gcc-aarch64-linux-gnu"
    return [
        pytest.param(gcc, id="gcc", marks=pytest.mark.skipif(not gcc, reason=why)),
        pytest.param(
            f"{sys.executable} -m ziglang cc -target aarch64-linux-gnu",
            id="zig",
            marks=pytest.mark.skipif(not zig, reason=why + " (ziglang)"),
        ),
    ]


@pytest.mark.parametrize("linker", _linkers())
def test_cross_compile_writes_an_aarch64_library_the_manifest_lists(tiny_checkpoint, tmp_path, monkeypatch, linker):
    from moeport.backends.base import BackendError

    monkeypatch.setenv(CROSS_CC_ENV, linker)
    art = export(tiny_checkpoint, tmp_path / "art")
    result = _compile(art, "--target", AARCH64)
    lib = Path(result.stdout.strip().rsplit(": ", 1)[-1])
    assert lib.is_file() and lib.parent.parent == art / "compiled"
    assert elf_machine(lib) == EM_AARCH64
    entry = json.loads((art / "manifest.json").read_text())["compiled"][lib.relative_to(art).as_posix()]
    assert entry["arch"] == "aarch64" and entry["target"] == AARCH64
    assert "cached build reused" in _compile(art, "--target", AARCH64).stdout

    model = load(art, backend="tvm", target=AARCH64)  # loads fine here, but it cannot run here
    with pytest.raises(BackendError, match="holds aarch64 code"):
        model.session().prefill(PROMPT)
    # A runtime-only x86-64 machine never picks the aarch64 library, and says what the artifact has.
    out = _board_run(art, tmp_path, trusted=tmp_path / "none")
    assert out.returncode == 1 and "no compiled library for this machine" in out.stderr
    assert "aarch64/apache-tvm" in out.stderr


def test_cross_compile_without_a_toolchain_names_what_to_install(monkeypatch, tmp_path):
    import importlib.util as util

    monkeypatch.delenv(CROSS_CC_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-gcc
    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "ziglang" else real(name, *a))
    with pytest.raises(TargetError, match=r"pip install 'moeport\[cross\]'.*apt-get install gcc-aarch64-linux-gnu"):
        cross_linker({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
