"""The ``moeport`` command line."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import click
from moeport.backends.base import BackendError, best_backend, discover
from moeport.exporter.export import WEIGHT_CHOICES, ExportError, export
from moeport.exporter.manifest import ArtifactError, read_artifact
from moeport.models.checkpoint import CheckpointError
from moeport.models.config import ConfigError
from moeport.runtime.model import GenerationError, load

from moeport import __version__

USER_ERRORS = (ConfigError, CheckpointError, ExportError, ArtifactError, BackendError, GenerationError)


class _Group(click.Group):
    """Turns the project's user-facing errors into one clean ``Error: ...`` line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="moeport")
@click.option("-v", "--verbose", is_flag=True, help="Log what the exporter and runtime do.")
def main(verbose: bool) -> None:
    """moeport: run DeepSeek-style MoE models (V2/V3/R1) on any backend.

    Export a Hugging Face checkpoint once (`moeport export`), then run the artifact on any backend
    (`moeport run --backend cpu`).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def _progress(desc: str):
    from tqdm import tqdm

    def start(total: int):
        bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, leave=False, dynamic_ncols=True)
        return bar.update

    return start


@main.command("export")
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option(
    "--weights",
    type=click.Choice(WEIGHT_CHOICES),
    default="fp32",
    show_default=True,
    help="Storage dtype of the weights in the artifact (computed in float32 where a backend lacks kernels).",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Longest sequence (prompt + generated) the artifact accepts. Default: max_position_embeddings.",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists and is not empty.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_cmd(
    checkpoint_dir: Path, output_dir: Path, weights: str, max_seq_len: int | None, force: bool, quiet: bool
) -> None:
    """Export a Hugging Face DeepSeek CHECKPOINT_DIR (safetensors, incl. FP8) to an artifact in OUTPUT_DIR."""
    t0 = time.perf_counter()
    out = export(
        checkpoint_dir,
        output_dir,
        weights=weights,
        max_seq_len=max_seq_len,
        force=force,
        progress=None if quiet else _progress("exporting"),
    )
    art = read_artifact(out, verify=False)
    size = sum(f["size"] for f in art.manifest["files"].values())
    click.echo(
        f"exported {checkpoint_dir} -> {out} ({size / 1e6:.1f} MB, weights {weights}) "
        f"in {time.perf_counter() - t0:.1f}s"
    )


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--prompt-ids") from exc


@main.command("run")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--backend", default="cpu", show_default=True, help="Backend name (see `moeport backends`), or 'auto'.")
@click.option("--prompt", help="Prompt text (needs the artifact's tokenizer.json).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Number of tokens to generate (fewer if EOS comes first).",
)
@click.option(
    "--temperature",
    type=float,
    default=0.0,
    show_default=True,
    help="Sampling temperature; 0 is greedy (the only mode so far).",
)
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text, timings.")
def run_cmd(
    artifact_dir: Path,
    backend: str,
    prompt: str | None,
    prompt_ids: str | None,
    max_new_tokens: int,
    temperature: float,
    ignore_eos: bool,
    threads: int | None,
    as_json: bool,
) -> None:
    """Generate from ARTIFACT_DIR on a backend."""
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    if temperature < 0:
        raise click.BadParameter("must be >= 0", param_hint="--temperature")
    if temperature > 0:
        raise click.BadParameter(
            "sampling is not implemented yet; use --temperature 0 (greedy)", param_hint="--temperature"
        )
    t0 = time.perf_counter()
    model = load(artifact_dir, backend=backend, threads=threads)
    load_s = time.perf_counter() - t0
    tok = model.tokenizer
    if prompt is not None:
        if tok is None:
            raise click.UsageError(f"{artifact_dir} has no tokenizer.json; use --prompt-ids")
        if prompt == "":
            raise GenerationError("empty prompt: at least one token is needed")
        ids = tok.encode(prompt).ids
    else:
        ids = _parse_ids(prompt_ids)
    session = model.session()
    result = session.generate(ids, max_new_tokens, stop_at_eos=not ignore_eos)
    text = tok.decode(result.tokens) if tok is not None else None
    if as_json:
        out = {
            "tokens": result.tokens,
            "prompt_tokens": len(ids),
            "backend": model.backend_name,
            "stop_reason": result.stop_reason,
            "load_seconds": round(load_s, 4),
            "prefill_seconds": round(result.prefill_seconds, 4),
            "decode_seconds": round(result.decode_seconds, 4),
            "prefill_tokens_per_second": round(result.prefill_tokens_per_second, 2),
            "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
        }
        if text is not None:
            out["text"] = text
        click.echo(json.dumps(out))
    else:
        click.echo(text if text is not None else " ".join(map(str, result.tokens)))
        click.echo(
            f"[{len(result.tokens)} tokens, prefill {result.prefill_tokens_per_second:.1f} tok/s, "
            f"decode {result.decode_tokens_per_second:.1f} tok/s, backend {model.backend_name}]",
            err=True,
        )


@main.command("backends")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def backends_cmd(as_json: bool) -> None:
    """List every registered backend, available or not, and why."""
    rows = []
    for name, entry in sorted(discover().items()):
        status = entry.availability()
        desc = getattr(entry.backend, "description", "") if entry.backend else ""
        rows.append(
            {
                "name": name,
                "available": status.available,
                "reason": status.reason,
                "description": desc,
                "plugin": entry.target,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "available  " if r["available"] else "unavailable"
        click.echo(f"{r['name']:<10} {mark}  {r['description'] or r['plugin']}  ({r['reason']})")


@main.command("inspect")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip checking the files' sha256 against the manifest.")
def inspect_cmd(artifact_dir: Path, no_verify: bool) -> None:
    """Describe an artifact: model, weights, cache layout, files (checksums verified)."""
    art = read_artifact(artifact_dir, verify=not no_verify)
    m, cfg = art.manifest, art.config
    total = sum(f["size"] for f in m["files"].values())
    click.echo(f"artifact     {art.directory} (format v{m['format_version']}, {m['producer']})")
    click.echo(
        f"model        {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {cfg.n_routed_experts} routed experts (top {cfg.num_experts_per_tok}), "
        f"{cfg.n_shared_experts} shared"
    )
    click.echo(f"weights      {m['weights']['dtype']} ({m['weights']['bytes'] / 1e6:.1f} MB)")
    c = m["cache"]
    click.echo(
        f"cache        {c['kind']}: {c['layers']} layers x {c['dim']} ({c['kv_lora_rank']} latent + "
        f"{c['qk_rope_head_dim']} rope) {c['dtype']} = {c['bytes_per_token']} bytes/token"
    )
    click.echo(f"max seq len  {m['max_seq_len']}")
    click.echo(f"files        {total / 1e6:.1f} MB, checksums {'skipped' if no_verify else 'ok'}")
    for name, f in m["files"].items():
        click.echo(f"  {name:<26} {f['size']:>12,d}  {f['sha256'][:16]}")


@main.command("demo")
@click.option("--backend", default="auto", show_default=True, help="Backend to run on ('auto' = best available).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
def demo_cmd(backend: str, max_new_tokens: int) -> None:
    """Build a small DeepSeek-V3-architecture checkpoint, export it, run it and show tokens and tok/s."""
    from moeport.tools.checkpoints import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="moeport-demo-") as tmp:
        ckpt = make_checkpoint(Path(tmp) / "checkpoint", "tiny", seed=0)
        click.echo(
            f"1. checkpoint: random-weight DeepSeek-V3 architecture (MLA, 8 routed experts top-2 in 4 groups, "
            f"YaRN) at {ckpt}"
        )
        t0 = time.perf_counter()
        art = export(ckpt, Path(tmp) / "artifact")
        click.echo(f"2. exported to ONNX in {time.perf_counter() - t0:.2f}s")
        name = best_backend().name if backend == "auto" else backend
        model = load(art, backend=name)
        click.echo(f"3. loaded on backend '{model.backend_name}' in {model.load_seconds:.2f}s")
        prompt = [0, 17, 42, 99, 7]
        result = model.session().generate(prompt, max_new_tokens, stop_at_eos=False)
        click.echo(f"4. prompt ids {prompt} -> {len(result.tokens)} greedy tokens:")
        click.echo("   " + " ".join(map(str, result.tokens)))
        click.echo(
            f"   prefill {result.prefill_tokens_per_second:.1f} tok/s, decode "
            f"{result.decode_tokens_per_second:.1f} tok/s"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
