"""The command line as a user runs it: export, run --json, backends, inspect, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
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
    """The newcomer's command: the bundled reasoner exported, run, reasoning shown, answers scored."""
    import re

    r = subprocess.run(
        [sys.executable, "-m", "moeport.tools.cli", "demo", "--problems", "2", "--eval", "40"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "<think>" not in r.stdout and "</think>" not in r.stdout  # reasoning is shown as its own part
    assert r.stdout.count("correct") >= 2 and "watched: 2/2 correct" in r.stdout
    right, total = map(int, re.search(r"held-out: (\d+)/(\d+) correct", r.stdout).groups())
    assert total == 40 and right >= 38
    assert re.search(r"\d+ tok/s in continuous batches", r.stdout)


def test_help_explains_every_flag():
    r = CliRunner().invoke(main, ["run", "--help"])
    for flag in ("--backend", "--prompt", "--prompt-ids", "--max-new-tokens", "--temperature", "--json"):
        assert flag in r.output
    r = CliRunner().invoke(main, ["export", "--help"])
    for flag in ("--weights", "--max-seq-len", "--force"):
        assert flag in r.output


# -- text generation from the command line ------------------------------------------------------


def test_run_streams_text_and_json_has_the_parts(text_artifact):
    runner = CliRunner()
    args = [
        "run",
        str(text_artifact),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--seed",
        "3",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
    ]
    streamed = runner.invoke(main, args)
    assert streamed.exit_code == 0, streamed.output
    as_json = json.loads(runner.invoke(main, [*args, "--json"]).output)
    assert len(as_json["tokens"]) == 12
    assert as_json["reasoning"] is None and as_json["content"] == as_json["text"].strip()
    assert streamed.output.startswith(as_json["text"].rstrip())  # same seed, same text, streamed


def test_run_chat_uses_the_template(text_artifact):
    r = CliRunner().invoke(
        main, ["run", str(text_artifact), "--prompt", "hi", "--chat", "--max-new-tokens", "3", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["prompt_tokens"] == len("<bos>") // 5 + len("[user]hi[assistant]")


def test_stop_flag(text_artifact):
    runner = CliRunner()
    base = ["run", str(text_artifact), "--prompt", "hi", "--max-new-tokens", "30", "--ignore-eos", "--json"]
    full = json.loads(runner.invoke(main, base).output)["text"]
    stop = next(full[i : i + 2] for i in range(4, len(full)) if "\ufffd" not in full[i : i + 2])
    cut = json.loads(runner.invoke(main, [*base, "--stop", stop]).output)
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.index(stop)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "-2"], "top_k must be an integer >= 0"),
        (["--seed", "abc"], "'abc' is not a valid integer"),
        (["--stop", ""], "stop strings must be non-empty"),
    ],
)
def test_bad_sampling_flags(text_artifact, args, message):
    r = CliRunner().invoke(main, ["run", str(text_artifact), "--prompt", "hi", *args])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_chat_flag_without_a_template_is_refused(text_artifact, tmp_path):
    import shutil

    art = shutil.copytree(text_artifact, tmp_path / "art")
    cfg = json.loads((art / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (art / "tokenizer_config.json").write_text(json.dumps(cfg))
    m = json.loads((art / "manifest.json").read_text())  # keep the checksums honest for the edited file
    from moeport.exporter.manifest import sha256_file

    m["files"]["tokenizer_config.json"] = {
        "sha256": sha256_file(art / "tokenizer_config.json"),
        "size": (art / "tokenizer_config.json").stat().st_size,
    }
    (art / "manifest.json").write_text(json.dumps(m))
    for cmd in (["run", str(art), "--prompt", "hi", "--chat"], ["chat", str(art)]):
        r = CliRunner().invoke(main, cmd, input="hello\n")
        assert r.exit_code != 0 and "no chat template" in r.output, r.output


def test_interactive_chat_keeps_history_and_reuses_the_cache(text_artifact):
    r = CliRunner().invoke(
        main,
        ["chat", str(text_artifact), "--max-new-tokens", "4", "--ignore-eos"],
        input="hello\nsecond turn\n/reset\nagain\n/exit\n",
    )
    assert r.exit_code == 0, r.output
    assert "(conversation cleared)" in r.output
