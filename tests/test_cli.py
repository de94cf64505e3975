"""The command line as a user runs it: export, run --json, backends, inspect, demo."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from moeport.tools.cli import main

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def test_export_then_run_json_gives_the_reference_greedy_tokens(oracle_cache, tmp_path):
    """The issue's contract: `moeport export` + `moeport run --backend cpu --temperature 0 --json`."""
    import oracle

    ckpt, ref_model = oracle_cache.checkpoint("v3")
    out = tmp_path / "art"
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(ckpt), str(out), "--weights", "fp32", "--max-seq-len", "128"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        main,
        [
            "run",
            str(out),
            "--backend",
            "cpu",
            "--prompt-ids",
            ",".join(map(str, PROMPT)),
            "--max-new-tokens",
            "32",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["tokens"] == oracle.reference_greedy(ref_model, PROMPT, 32)
    assert result["prompt_tokens"] == len(PROMPT)
    for field in ("load_seconds", "prefill_seconds", "decode_seconds", "decode_tokens_per_second"):
        assert result[field] >= 0


def test_run_stops_at_eos_unless_ignored(tiny_artifact):
    """Greedy decoding ends at the generation config's EOS id; --ignore-eos keeps going."""
    runner = CliRunner()
    ids = "0,17,42,99,7"
    full = json.loads(
        runner.invoke(
            main, ["run", str(tiny_artifact), "--prompt-ids", ids, "--max-new-tokens", "40", "--ignore-eos", "--json"]
        ).output
    )
    assert len(full["tokens"]) == 40 and full["finish_reason"] == "length"
    gen = json.loads((tiny_artifact / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    if eos in full["tokens"]:
        stopped = json.loads(
            runner.invoke(
                main, ["run", str(tiny_artifact), "--prompt-ids", ids, "--max-new-tokens", "40", "--json"]
            ).output
        )
        assert stopped["tokens"] == full["tokens"][: full["tokens"].index(eos) + 1]
        assert stopped["finish_reason"] == "eos"


def test_backends_lists_cpu_as_available():
    r = CliRunner().invoke(main, ["backends", "--json"])
    assert r.exit_code == 0
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["cpu"]["available"] is True
    assert "onnxruntime" in rows["cpu"]["reason"]


def test_inspect_shows_model_cache_and_verified_files(tiny_artifact):
    r = CliRunner().invoke(main, ["inspect", str(tiny_artifact)])
    assert r.exit_code == 0, r.output
    assert "deepseek_v3: 3 layers" in r.output
    # latent cache: (kv_lora_rank 32 + rope 8) x 3 layers x 4 bytes
    assert "mla_latent: 3 layers x 40 (32 latent + 8 rope) float32 = 480 bytes/token" in r.output
    assert "checksums ok" in r.output


def test_demo_runs_end_to_end_as_a_console_script():
    r = subprocess.run(
        [sys.executable, "-m", "moeport.tools.cli", "demo", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "8 greedy tokens" in r.stdout
    assert "decode" in r.stdout and "tok/s" in r.stdout


def test_help_explains_every_flag():
    r = CliRunner().invoke(main, ["run", "--help"])
    for flag in ("--backend", "--prompt", "--prompt-ids", "--max-new-tokens", "--temperature", "--json"):
        assert flag in r.output
    r = CliRunner().invoke(main, ["export", "--help"])
    for flag in ("--weights", "--max-seq-len", "--force"):
        assert flag in r.output
