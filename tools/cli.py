"""The ``moeport`` command line."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import click

from moeport import __version__
from moeport.backends.base import BackendError, best_backend, discover
from moeport.exporter.export import WEIGHT_CHOICES, ExportError, export
from moeport.exporter.manifest import ArtifactError, read_artifact
from moeport.models.checkpoint import CheckpointError
from moeport.models.config import ConfigError
from moeport.runtime.constraints import ConstraintError, check_response_format
from moeport.runtime.generate import GenerationError
from moeport.runtime.model import load
from moeport.runtime.sampling import SamplingError, SamplingParams
from moeport.runtime.text import TextError

USER_ERRORS = (
    ConfigError,
    CheckpointError,
    ExportError,
    ArtifactError,
    BackendError,
    GenerationError,
    SamplingError,
    TextError,
    ConstraintError,
)


DEBUG_ENV = "MOEPORT_DEBUG"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:2000] if text else type(exc).__name__


def error_line(exc: BaseException) -> str:
    """What the user sees for ``exc``: the project's errors as they are, anything else named by kind."""
    if isinstance(exc, USER_ERRORS):
        return _one_line(exc)
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or _one_line(exc)}{where}"
    if isinstance(exc, MemoryError):
        return "out of memory (the model, the context or the batch is too large for this machine)"
    if isinstance(exc, RecursionError):
        return "input nested too deeply to process"
    return (
        f"internal error ({type(exc).__name__}: {_one_line(exc)}); run with --debug for the traceback "
        "and please report it"
    )


class _Group(click.Group):
    """The error boundary: any exception becomes one ``Error: ...`` line and exit code 1 (click's usage
    errors: 2); the traceback is shown only with ``--debug`` (or MOEPORT_DEBUG=1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None
        except BrokenPipeError:  # e.g. `moeport run ... | head`: the reader is gone, nothing to say
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - python would complain again at exit
            raise click.exceptions.Exit(1) from None
        except Exception as exc:
            if ctx.meta.get("moeport.debug"):
                raise
            raise click.ClickException(error_line(exc)) from exc


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="moeport")
@click.option("-v", "--verbose", is_flag=True, help="Log what the exporter and runtime do.")
@click.option(
    "--debug", is_flag=True, envvar=DEBUG_ENV, help="Show the full traceback of an error (also MOEPORT_DEBUG=1)."
)
@click.pass_context
def main(ctx: click.Context, verbose: bool, debug: bool) -> None:
    """moeport: run DeepSeek-style MoE models (V2/V3/R1) on any backend.

    Export a Hugging Face checkpoint once (`moeport export`), then run the artifact on any backend
    (`moeport run --backend cpu`).
    """
    ctx.meta["moeport.debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


def _progress(desc: str):
    """A progress bar in bytes (with rate and ETA) on stderr: ``start(total)`` returns ``advance(nbytes)``."""
    from tqdm import tqdm

    def start(total: int):
        bar = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
            smoothing=0.05,
        )
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
    help="Weights in the artifact: fp32/fp16/bf16 storage (computed in float32 where a backend lacks kernels), "
    "or int8/int4 block-wise weight-only quantization of every Linear.",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Longest sequence (prompt + generated) the artifact accepts. Default: max_position_embeddings.",
)
@click.option(
    "--block-size",
    type=int,
    default=None,
    help="With int8/int4: weights per quantization scale along the input dimension "
    "(power of two >= 16) [default: 128 for int8, 32 for int4].",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it is a moeport artifact (never anything else).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--ignore-space", is_flag=True, help="Export even if the artifact looks larger than the free disk space.")
def export_cmd(
    checkpoint_dir: Path,
    output_dir: Path,
    weights: str,
    max_seq_len: int | None,
    force: bool,
    quiet: bool,
    block_size: int | None,
    ignore_space: bool,
) -> None:
    """Export a Hugging Face DeepSeek CHECKPOINT_DIR (safetensors, incl. FP8) to an artifact in OUTPUT_DIR.

    CHECKPOINT_DIR may also name a bundled model, e.g. zoo:tiny-reasoner. An export larger than the free
    disk space is refused before it starts; one too large to run in this machine's memory gets a warning.
    """
    t0 = time.perf_counter()
    warning = _memory_warning(checkpoint_dir, weights, block_size, max_seq_len)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    out = export(
        checkpoint_dir,
        output_dir,
        weights=weights,
        max_seq_len=max_seq_len,
        force=force,
        progress=None if quiet else _progress("exporting"),
        block_size=block_size,
        check_space=not ignore_space,
    )
    art = read_artifact(out, verify=False)
    size = sum(f["size"] for f in art.manifest["files"].values())
    click.echo(
        f"exported {checkpoint_dir} -> {out} ({size / 1e6:.1f} MB, weights {weights}) "
        f"in {time.perf_counter() - t0:.1f}s"
    )


def _memory_warning(checkpoint_dir: Path, weights: str, block_size: int | None, max_seq_len: int | None) -> str:
    """One line if the artifact will not run in this machine's memory (cheap: no bandwidth measurement);
    empty when it will, or when the inputs are bad (the export then says what is wrong)."""
    from moeport.models import zoo
    from moeport.models.config import load_config
    from moeport.tools import plan as planning

    try:
        cfg = load_config(zoo.resolve(checkpoint_dir))
        context = min(planning.DEFAULT_CONTEXT, max_seq_len or cfg.max_position_embeddings)
        p = planning.plan(
            cfg,
            weights,
            block_size,
            context=context,
            prompt=min(context, 512),
            measure_bandwidth=False,
            machine=planning.machine_facts(),
        )
    except (ValueError, OSError):
        return ""
    if p["fits"] == "ram":
        return ""
    need, have = p["resident"]["total"] / 1e9, p["machine"]["mem_available"] / 1e9
    if p["fits"] == "mapped":
        return (
            f"the {weights} artifact needs ~{need:.1f} GB to run and {have:.1f} GB of memory is available: it will "
            "run memory-mapped, routed experts paged in from disk (slower; see `moeport plan`)"
        )
    return (
        f"the {weights} artifact needs ~{need:.1f} GB to run and {have:.1f} GB of memory is available: it will not "
        "run on this machine (see `moeport plan`)"
    )


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--prompt-ids") from exc


def _parse_backend_options(ctx, param, values) -> dict:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--backend-option")
        low = value.lower()
        is_int = value.isascii() and value.lstrip("-").isdigit()  # not '²' or '١', which str.isdigit accepts
        out[key] = int(value) if is_int else (low == "true" if low in ("true", "false") else value)
    return out


def backend_options_with(backend_options: dict, threads: int | None = None, trust_compiled: bool = False) -> dict:
    """The -o options plus the dedicated flags (a flag and the same -o key must agree)."""
    if "verify" in backend_options:
        raise click.UsageError(
            "-o verify is not a backend option: moeport always checks an artifact's files before loading it"
        )
    out = dict(backend_options)
    for key, value in (("threads", threads), ("trust_compiled", trust_compiled or None)):
        if value is None:
            continue
        if key in out and out[key] != value:
            raise click.UsageError(f"--{key.replace('_', '-')} {value} and -o {key}={out[key]} disagree; give one")
        out[key] = value
    return out


trust_option = click.option(
    "--trust-compiled",
    is_flag=True,
    help="Load compiled native code found in the artifact even if this machine did not build it and no trusted "
    "key signed it (only for artifacts from a source you trust).",
)


backend_option = click.option(
    "-o",
    "--backend-option",
    "backend_options",
    multiple=True,
    callback=_parse_backend_options,
    help="A backend compile option KEY=VALUE (repeatable), e.g. accuracy_level=0 for float32 activations in the "
    "cpu backend's quantized kernels, reference=true for the reference operator bodies.",
)


_NPU_FLAGS = ("buckets", "cache_capacity", "npu_dtype", "device_id", "npu_mem_limit", "precision_mode", "cann_graph")


def npu_options(f):
    """The npu/npu-sim backend's flags; given ones are added to the backend options."""
    options = [
        click.option("--buckets", default=None, help="npu: prefill bucket sizes, increasing (default 32,128,512)."),
        click.option(
            "--cache-capacity",
            type=click.IntRange(min=2),
            default=None,
            help="npu: rows of the fixed-capacity latent cache (default: the artifact's max sequence length).",
        ),
        click.option(
            "--npu-dtype", type=click.Choice(["float16", "bfloat16"]), default=None, help="npu: compute dtype."
        ),
        click.option("--device-id", type=click.IntRange(min=0), default=None, help="npu: the Ascend device to use."),
        click.option(
            "--npu-mem-limit", type=click.IntRange(min=1), default=None, help="npu: CANN memory arena limit in bytes."
        ),
        click.option(
            "--precision-mode",
            default=None,
            help="npu: CANN precision mode (default must_keep_origin_dtype: the graphs' own mixed precision).",
        ),
        click.option(
            "--enable-cann-graph/--disable-cann-graph",
            "cann_graph",
            default=None,
            help="npu: run whole graphs on CANN's graph engine (default) or operator by operator.",
        ),
    ]

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        given = {k: kwargs.pop(k) for k in _NPU_FLAGS}
        names = {"npu_dtype": "dtype", "cann_graph": "enable_cann_graph"}
        extra = {names.get(k, k): v for k, v in given.items() if v is not None}
        kwargs["backend_options"] = {**(kwargs.get("backend_options") or {}), **extra}
        return f(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def sampling_options(f):
    """The sampling/stop flags shared by `run` and `chat` (unset flags fall back to generation_config.json)."""
    options = [
        click.option(
            "--max-new-tokens",
            type=click.IntRange(min=0),
            default=None,
            help="Most tokens to generate [default: generation_config.json's, else 256].",
        ),
        click.option(
            "--temperature",
            type=float,
            default=None,
            help="Sampling temperature, 0 = greedy [default: generation_config.json's, else 0].",
        ),
        click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens only (0 = off)."),
        click.option(
            "--top-p", type=float, default=None, help="Nucleus sampling: smallest set with this mass, in (0, 1]."
        ),
        click.option(
            "--min-p", type=float, default=None, help="Drop tokens below min-p x the top probability, in [0, 1)."
        ),
        click.option(
            "--repetition-penalty", type=float, default=None, help="> 1 discourages repeating tokens (1 = off)."
        ),
        click.option(
            "--seed",
            type=click.IntRange(min=0, max=2**64 - 1),
            default=None,
            help="Random seed (>= 0): the same seed gives the same sample.",
        ),
        click.option("--stop", multiple=True, help="Stop when the output contains this text (repeatable)."),
        click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens."),
        click.option(
            "--on-context-limit",
            type=click.Choice(["error", "stop"]),
            default="error",
            show_default=True,
            help="When prompt + max-new-tokens exceed the context: refuse up front, or stop cleanly when full.",
        ),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores)."),
        backend_option,
        trust_option,
        npu_options,
        click.option(
            "--backend",
            default="cpu",
            show_default=True,
            help="Backend name (see `moeport backends`), or 'auto' for the best available.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _sampling(
    model,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    min_p,
    repetition_penalty,
    seed,
    stop,
    ignore_eos,
    on_context_limit,
):
    defaults = {"max_new_tokens": 256, **model.generation_defaults}
    return SamplingParams().with_defaults(
        defaults,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos or None,
        on_context_limit=on_context_limit,
    )


def _response_format(json_schema: Path | None, regex: str | None) -> dict | None:
    """The response_format of ``--json-schema FILE`` / ``--regex R``, checked before the model loads."""
    if json_schema is not None and regex is not None:
        raise click.UsageError("give at most one of --json-schema and --regex")
    if json_schema is not None:
        try:
            schema = json.loads(json_schema.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError too
            raise ConstraintError(f"{json_schema}: not a JSON file ({exc})") from None
        fmt = {"type": "json_schema", "json_schema": {"name": json_schema.stem, "schema": schema}}
    elif regex is not None:
        fmt = {"type": "regex", "regex": regex}
    else:
        return None
    try:
        check_response_format(fmt)
    except ConstraintError as exc:
        raise ConstraintError(f"{json_schema}: {exc}" if json_schema is not None else str(exc)) from None
    return fmt


def _generate(session, prompt, params: SamplingParams, echo: bool, response_format: dict | None = None):
    """Run one generation; with ``echo``, stream it to stdout (reasoning dimmed, then a blank line, content)."""
    last = None
    stream = session.stream(prompt, params, response_format=response_format)
    while True:
        try:
            d = next(stream)
        except StopIteration as done:
            return done.value
        if echo:
            if d.part == "content" and last == "reasoning":
                click.echo("\n", nl=False)
            last = d.part
            click.echo(click.style(d.text, dim=True) if d.part == "reasoning" else d.text, nl=False)


@main.command("run")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text (needs the artifact's tokenizer.json).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--chat", is_flag=True, help="Apply the model's chat template to --prompt as one user message.")
@click.option("--system", help="With --chat: a system message before the user message.")
@click.option(
    "--json-schema",
    "json_schema",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Constrain the answer (after any reasoning) to JSON valid against the JSON Schema in FILE.",
)
@click.option("--regex", help="Constrain the answer (after any reasoning) to text matching this regular expression.")
@sampling_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object: tokens, text, reasoning, content, finish_reason, timings.",
)
def run_cmd(
    artifact_dir: Path,
    prompt: str | None,
    prompt_ids: str | None,
    chat: bool,
    system: str | None,
    json_schema: Path | None,
    regex: str | None,
    as_json: bool,
    threads: int | None,
    backend: str,
    backend_options: dict,
    trust_compiled: bool,
    **sampling,
) -> None:
    """Generate from ARTIFACT_DIR on a backend, streaming the text (reasoning dimmed)."""
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    if chat and prompt is None:
        raise click.UsageError("--chat needs --prompt (text)")
    response_format = _response_format(json_schema, regex)
    t0 = time.perf_counter()
    model = load(artifact_dir, backend=backend, **backend_options_with(backend_options, threads, trust_compiled))
    load_s = time.perf_counter() - t0
    params = _sampling(model, **sampling)
    if prompt is not None:
        if prompt == "":
            raise GenerationError("empty prompt: at least one token is needed")
        tok = model.require_tokenizer()
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    stream = not as_json and model.tokenizer is not None
    ids = prompt if prompt is not None else _parse_ids(prompt_ids)
    result = _generate(model.session(), ids, params, stream, response_format)
    if as_json:
        out = {
            "tokens": result.tokens,
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
            "backend": model.backend_name,
            "load_seconds": round(load_s, 4),
            "prefill_seconds": round(result.prefill_seconds, 4),
            "decode_seconds": round(result.decode_seconds, 4),
            "prefill_tokens_per_second": round(result.prefill_tokens_per_second, 2),
            "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
        }
        if result.text is not None:
            out.update(text=result.text, reasoning=result.reasoning, content=result.content)
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    if not stream:
        click.echo(" ".join(map(str, result.tokens)), nl=False)
    click.echo()
    click.echo(
        f"[{len(result.tokens)} tokens, {result.finish_reason}; prefill {result.prefill_tokens_per_second:.1f} "
        f"tok/s, decode {result.decode_tokens_per_second:.1f} tok/s, backend {model.backend_name}]",
        err=True,
    )


@main.command("chat")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--system", help="A system message for the whole conversation.")
@sampling_options
def chat_cmd(
    artifact_dir: Path,
    system: str | None,
    threads: int | None,
    backend: str,
    backend_options: dict,
    trust_compiled: bool,
    **sampling,
) -> None:
    """Talk with ARTIFACT_DIR: multi-turn, reasoning shown dimmed and dropped from the history.

    Type a message and press Enter; /reset starts over, /exit (or Ctrl-D) quits.
    """
    model = load(artifact_dir, backend=backend, **backend_options_with(backend_options, threads, trust_compiled))
    tok = model.require_tokenizer()
    if tok.chat_template is None:
        raise TextError(f"{artifact_dir} has no chat template; use `moeport run --prompt` instead")
    params = _sampling(model, **sampling)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    session = model.session()
    click.echo(f"moeport chat: {model.config.model_type} on {model.backend_name}. /reset, /exit or Ctrl-D.", err=True)
    while True:
        try:
            line = input(click.style(">>> ", bold=True) if sys.stdin.isatty() else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if system else []
            session.reset()
            click.echo("(conversation cleared)", err=True)
            continue
        messages = [*history, {"role": "user", "content": text}]
        ids = model.chat_ids(messages)
        session.truncate(_common_prefix(session.tokens, ids))  # reuse the cached prefix of the conversation
        try:
            reply = _generate(session, ids[session.position :], params, echo=True)
        except GenerationError as exc:
            click.echo(f"{click.style('error:', fg='red')} {exc}", err=True)
            continue
        click.echo()
        # DeepSeek recommends dropping the reasoning from the history: keep only the answer
        history = [*messages, {"role": "assistant", "content": reply.content or ""}]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return min(n, len(b) - 1)  # keep at least one new token to feed


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


@main.command("compile")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--backend", required=True, help="Backend to compile for (see `moeport backends`).")
@click.option(
    "--target",
    default=None,
    help="Compiler target where the backend has one, e.g. tvm's 'llvm' (this CPU) or "
    "'llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod' (cross-compile for an Arm board).",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Sign the compiled library with this Ed25519 private key (e.g. ~/.ssh/id_ed25519), so that machines "
    "trusting its public key load it without building it themselves.",
)
@backend_option
@trust_option
@npu_options
def compile_cmd(
    artifact_dir: Path,
    backend: str,
    target: str | None,
    sign_key: Path | None,
    backend_options: dict,
    trust_compiled: bool,
) -> None:
    """Compile ARTIFACT_DIR ahead of time for a backend; the result is cached in the artifact when the
    backend caches builds (tvm: ARTIFACT_DIR/compiled/, listed in the manifest's inventory), so
    `moeport run` starts without compiling. A library runs elsewhere only where this machine's build is
    trusted: sign it with --sign-key (see README, "Security model")."""
    options = {"ship": True, **backend_options_with(backend_options, None, trust_compiled)}
    if target:
        options["target"] = target
    if sign_key:
        options["sign_key"] = str(sign_key)
    click.echo(f"compiling {artifact_dir} for {backend}{f' ({target})' if target else ''} ...", err=True)
    model = load(artifact_dir, backend=backend, **options)
    hit = getattr(model.program, "cache_hit", None)
    how = "cached build reused" if hit else "compiled"
    library = getattr(model.program, "library", None)
    where = f": {library}" if library else ""
    click.echo(f"{how} for backend '{model.backend_name}' in {model.load_seconds:.2f}s{where}")


@main.command("inspect")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--no-verify", is_flag=True, help="Skip checking the files' sha256 against the manifest.")
def inspect_cmd(artifact_dir: Path, no_verify: bool) -> None:
    """Describe an artifact: model, weights, cache layout, files (checksums verified), and which compiled
    libraries a load would use, and why."""
    from moeport.backends.trust import compiled_inventory

    art = read_artifact(artifact_dir, verify=False)
    if not no_verify:
        art.verify(use_cache=False)
        art.load_graph()  # the graph's inputs/outputs and external data must match the manifest
    m, cfg = art.manifest, art.config
    total = sum(f["size"] for f in m["files"].values())
    click.echo(f"artifact     {art.directory} (format v{m['format_version']}, {m.get('producer', 'unknown producer')})")
    click.echo(
        f"model        {cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {cfg.n_routed_experts} routed experts (top {cfg.num_experts_per_tok}), "
        f"{cfg.n_shared_experts} shared"
    )
    click.echo(f"weights      {m['weights']['dtype']} ({m['weights']['bytes'] / 1e6:.1f} MB)")
    c = m["cache"]
    click.echo(
        f"cache        {c['kind']}: {c['layers']} layers x {c['dim']} ({cfg.kv_lora_rank} latent + "
        f"{cfg.qk_rope_head_dim} rope) {c['dtype']} = {c['layers'] * c['dim'] * 4} bytes/token"
    )
    click.echo(f"max seq len  {m['max_seq_len']}")
    click.echo(f"files        {total / 1e6:.1f} MB, checksums {'skipped' if no_verify else 'ok'}")
    for name, f in m["files"].items():
        click.echo(f"  {name:<26} {f['size']:>12,d}  {f['sha256'][:16]}")
    inventory = compiled_inventory(art)
    if inventory:
        click.echo(
            "compiled     native libraries (loaded only if built here, signed by a trusted key, or --trust-compiled)"
        )
        for rel, size, decision in inventory:
            verdict = "would load" if decision.allowed else "would NOT load"
            click.echo(f"  {rel:<40} {size:>12,d}  {verdict}: {decision.reason}")


@main.command("plan")
@click.argument("source")
@click.option(
    "--weights",
    type=click.Choice(WEIGHT_CHOICES),
    default=None,
    help="Weights to plan for [default: every choice for a checkpoint, an artifact's own].",
)
@click.option(
    "--block-size", type=int, default=None, help="With int8/int4: weights per quantization scale (as `export`)."
)
@click.option("--backend", default="cpu", show_default=True, help="Backend to run on (cpu, tvm, npu, npu-sim).")
@click.option(
    "--context",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens cached per sequence [default: 4096, or less if the model's maximum is smaller].",
)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Sequences at once.")
@click.option(
    "--prompt",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens prefilled in one call, for the activations [default: the whole context, the worst case].",
)
@click.option(
    "--bandwidth",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Memory read bandwidth in GB/s [default: measured now, all cores, about a second].",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="For a checkpoint: where the artifact would be written (its disk's free space) [default: .].",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per weights choice.")
def plan_cmd(
    source: str,
    weights: str | None,
    block_size: int | None,
    backend: str,
    context: int | None,
    batch: int,
    prompt: int | None,
    bandwidth: float | None,
    output: Path | None,
    as_json: bool,
) -> None:
    """Before exporting: artifact size, resident and cache memory, whether it fits this machine, and the
    decode tok/s the memory bandwidth allows, for SOURCE: a checkpoint directory (config.json; every
    weights choice; only config.json is read, so a plan needs no weights downloaded), zoo:NAME, or an exported
    artifact (its manifest's real sizes)."""
    from moeport.tools.plan import PlanError, plan_source

    try:
        plans = plan_source(
            source,
            weights,
            block_size,
            output=output,
            context=context,
            bandwidth=bandwidth * 1e9 if bandwidth else None,
            backend=backend,
            batch=batch,
            prompt=prompt,
        )
    except PlanError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(plans, indent=2))
        return
    _print_plans(source, plans)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _print_plans(source: str, plans: list[dict]) -> None:
    p, mc = plans[0], plans[0]["machine"]
    m = p["model"]
    click.echo(
        f"{source}: {m['model_type']}, {m['layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}, "
        f"{m['routed_experts']} routed experts (top {m['experts_per_token']}) + {m['shared_experts']} shared"
    )
    click.echo(f"parameters  {p['parameters'] / 1e9:.3f} B, {p['active_parameters'] / 1e9:.3f} B active per token")
    disk = f", {_gb(mc['disk_free'])} free at {mc['disk_path']}" if mc["disk_free"] is not None else ""
    click.echo(f"machine     {_gb(mc['mem_total'])} RAM, {_gb(mc['mem_available'])} available{disk}")
    if p["bandwidth_bytes_per_second"]:
        how = "measured now, all cores" if p["bandwidth_measured"] else "given"
        click.echo(f"bandwidth   {p['bandwidth_bytes_per_second'] / 1e9:.1f} GB/s read ({how})")
    click.echo(
        f"cache       {p['cache_bytes_per_token']:,d} bytes/token x context {p['context']} x batch {p['batch']} = "
        f"{_gb(p['cache_bytes'])}"
    )
    kernels = "with moeport's kernels" if p["kernels"] else "without moeport's kernels"
    click.echo(
        f"backend     {p['backend']}" + (f" ({kernels})" if p["backend"] == "cpu" else " (estimate, not measured)")
    )
    click.echo(
        f"resident    = weights as held + cache + activations of a {p['prompt']}-token prefill "
        f"+ {p['resident']['overhead'] >> 20} MiB runtime allowance"
    )
    click.echo("")
    click.echo(
        f"{'weights':<8} {'artifact':>10} {'resident':>10} {'(mapped)':>10} {'read/token':>11} {'decode <=':>12}  fits"
    )
    for q in plans:
        r = q["resident"]
        bound = q["decode_tokens_per_second_bound"]
        bound_text = f"{bound:.1f} tok/s" if bound is not None else "-"
        art = _gb(q["artifact_bytes"])
        fits = {"ram": "yes", "mapped": "mapped", "no": "NO"}[q["fits"]]
        if q["fits_disk"] is False:
            fits += ", NO disk"
        click.echo(
            f"{q['weights']:<8} {art:>10} {_gb(r['total']):>10} {_gb(r['weights_mapped']):>10} "
            f"{_gb(q['active_bytes_per_token']):>11} {bound_text:>12}  {fits}"
        )
    click.echo("")
    for q in plans:
        click.echo(f"{q['weights']}: {q['verdict']}")
    if not plans[0]["artifact_files_measured"]:
        click.echo(
            "(artifact: weights file exact, graph file an upper estimate; decode bound = bandwidth / bytes read)"
        )


@main.command("make-checkpoint")
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option(
    "--preset",
    type=click.Choice(["tiny", "bench", "bench-e8", "v2-lite", "moonlight"]),
    default="tiny",
    show_default=True,
    help="tiny: a few hundred KB; bench: DeepSeek-V3 architecture, 0.82B params (0.14B active), bf16; "
    "bench-e8: the same active size with 8 routed experts; v2-lite: DeepSeek-V2-Lite's shape (15.7B, "
    "2.4B active, 31 GB bf16); moonlight: Moonlight-16B-A3B's shape (16B, 2.6B active, 32 GB bf16).",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Keep only the first N decoder layers of the preset (a slice of a real shape, same widths).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed of the weights.")
@click.option(
    "--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="Stored dtype [default: the preset's]."
)
def make_checkpoint_cmd(output_dir: Path, preset: str, seed: int, dtype: str | None, layers: int | None) -> None:
    """Write a random-weight DeepSeek-architecture checkpoint (numpy only) to OUTPUT_DIR, for tests and benchmarks."""
    from moeport.exporter.outdir import OutputError
    from moeport.tools.checkpoints import make_checkpoint

    t0 = time.perf_counter()
    try:  # an occupied OUTPUT_DIR is a state of the disk, not a usage error: exit 1 as `export` does
        out = make_checkpoint(output_dir, preset, seed=seed, dtype=dtype, layers=layers)
    except (OutputError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    size = sum(f.stat().st_size for f in out.iterdir())
    click.echo(f"wrote {preset} checkpoint to {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")


@main.command("bench")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--backend", default="cpu", show_default=True, help="Backend to measure.")
@click.option(
    "--prompt-len",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Prompt tokens to prefill (random ids).",
)
@click.option(
    "--new-tokens",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Tokens to decode after the prompt (greedy).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@backend_option
@trust_option
@npu_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_cmd(
    artifact_dir: Path,
    backend: str,
    prompt_len: int,
    new_tokens: int,
    threads: int | None,
    backend_options: dict,
    trust_compiled: bool,
    as_json: bool,
) -> None:
    """Measure prefill and decode tok/s, load seconds and peak RSS of ARTIFACT_DIR on a backend."""
    from moeport.tools.bench import run_bench

    options = backend_options_with(backend_options, threads, trust_compiled)
    threads = options.pop("threads", None)
    try:
        r = run_bench(artifact_dir, backend, prompt_len, new_tokens, threads, **options)
    except ValueError as exc:
        if isinstance(exc, USER_ERRORS):
            raise
        raise click.UsageError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"{r['artifact']} on {r['backend']} (weights {r['weights']}, {r['weight_bytes'] / 1e6:.0f} MB)")
    click.echo(f"  load     {r['load_seconds']:.2f} s")
    click.echo(f"  prefill  {r['prefill_tokens_per_second']:.1f} tok/s ({r['prompt_len']} tokens)")
    click.echo(
        f"  decode   {r['decode_tokens_per_second']:.2f} tok/s ({r['new_tokens']} tokens, "
        f"{r['decode_ms_per_token']:.1f} ms/token)"
    )
    click.echo(f"  peak RSS {r['peak_rss_mb']:.0f} MB")
    click.echo(
        f"  faults   {r['decode_major_faults_per_token']:.2f} major/token "
        f"({r['decode_major_faults_per_second']:.0f}/s), {r['decode_minor_faults_per_token']:.1f} minor/token "
        f"({r['decode_minor_faults_per_second']:.0f}/s) during decode"
    )
    click.echo(
        f"  weights  {r['active_weight_mb_per_token']:.0f} MB read per decoded token = "
        f"{r['decode_weight_gb_per_second']:.1f} GB/s"
    )


@main.command("serve")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--backend", default="cpu", show_default=True, help="Backend name, or 'auto' for the best available.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option(
    "--max-batch", type=click.IntRange(min=1), default=16, show_default=True, help="Sequences decoded together."
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Requests that may wait for a batch slot; more get HTTP 429 with Retry-After.",
)
@click.option(
    "--api-key",
    envvar="MOEPORT_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1 (also MOEPORT_API_KEY). Needed for a non-loopback --host.",
)
@click.option("--served-model-name", default=None, help="The model name clients use [default: the artifact's folder].")
@click.option(
    "--prefix-cache-mb",
    type=click.FloatRange(min=0),
    default=512,
    show_default=True,
    help="Memory for the automatic prefix cache (latent rows of shared prompt prefixes); 0 turns it off.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30,
    show_default=True,
    help="On SIGTERM: seconds to let requests in flight finish before they are cancelled.",
)
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without an API key.")
@click.option(
    "--tool-call-parser",
    type=click.Choice(["deepseek_v3", "deepseek_v31"]),
    default=None,
    help="DeepSeek's tool-call format: V3/R1 or V3.1 [default: read off the model's chat template].",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: all cores).")
@backend_option
@trust_option
@npu_options
def serve_cmd(
    artifact_dir: Path,
    backend: str,
    host: str,
    port: int,
    max_batch: int,
    max_queue: int,
    api_key: str | None,
    served_model_name: str | None,
    prefix_cache_mb: float,
    shutdown_timeout: float,
    insecure: bool,
    tool_call_parser: str | None,
    threads: int | None,
    backend_options: dict,
    trust_compiled: bool,
) -> None:
    """Serve ARTIFACT_DIR over OpenAI's HTTP API (chat completions with reasoning_content, completions,
    models, health, Prometheus metrics), every request in one continuous batch. Needs `pip install
    'moeport[serve]'`."""
    try:
        from moeport.runtime.server import ServeError, is_loopback, serve
    except ImportError as exc:
        raise click.ClickException(
            f"moeport serve needs the serve extra: pip install 'moeport[serve]' ({exc})"
        ) from exc
    if not is_loopback(host) and not api_key and not insecure:  # one line, exit 2 (a misused flag)
        click.echo(
            f"Error: --host {host} is reachable from other machines: give --api-key (or MOEPORT_API_KEY), or "
            "--insecure",
            err=True,
        )
        raise click.exceptions.Exit(2)
    model = load(artifact_dir, backend=backend, **backend_options_with(backend_options, threads, trust_compiled))
    name = served_model_name or Path(artifact_dir).resolve().name
    click.echo(
        f"moeport serve: {name} ({model.config.model_type}) on backend '{model.backend_name}', "
        f"http://{host}:{port}/v1 (max batch {max_batch}){' - API key required' if api_key else ''}",
        err=True,
    )
    try:
        serve(
            model,
            host=host,
            port=port,
            max_batch=max_batch,
            max_queue=max_queue,
            api_key=api_key,
            served_model_name=name,
            prefix_cache_mb=prefix_cache_mb,
            shutdown_timeout=shutdown_timeout,
            insecure=insecure,
            log_level="warning",
            tool_call_parser=tool_call_parser,
        )
    except ServeError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("demo")
@click.option("--backend", default="auto", show_default=True, help="Backend to run on ('auto' = best available).")
@click.option(
    "--problems",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Problems to solve while you watch (streamed).",
)
@click.option(
    "--eval",
    "n_eval",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Held-out problems to score in continuous batches afterwards (0 = skip).",
)
@click.option("--seed", type=int, default=None, help="Pick other problems to watch.")
def demo_cmd(backend: str, problems: int, n_eval: int, seed: int | None) -> None:
    """Export the bundled tiny reasoning MoE (zoo:tiny-reasoner), run it on the best backend, and watch it
    reason through arithmetic: reasoning (dimmed), answers, accuracy and tok/s."""
    from moeport.tools.arithmetic import evaluate, heldout_problems, parse_answer, random_problems

    with tempfile.TemporaryDirectory(prefix="moeport-demo-") as tmp:
        t0 = time.perf_counter()
        art = export("zoo:tiny-reasoner", Path(tmp) / "tiny-reasoner")
        export_s = time.perf_counter() - t0
        model = load(art, backend=best_backend().name if backend == "auto" else backend)
        cfg = model.config
        click.echo(
            f"tiny-reasoner: {cfg.model_type} architecture ({cfg.num_hidden_layers} layers, MLA, "
            f"{cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} in {cfg.n_group} groups, "
            f"{cfg.n_shared_experts} shared), trained on 3-digit addition/subtraction"
        )
        click.echo(
            f"exported to ONNX in {export_s:.2f}s, loaded on backend '{model.backend_name}' in "
            f"{model.load_seconds:.2f}s\n"
        )
        tok = model.require_tokenizer()
        params = model.sampling_params(temperature=0.0)
        watched, right, tokens, seconds = random_problems(problems, seed if seed is not None else 2026), 0, 0, 0.0
        for p in watched:
            click.echo(click.style(f">>> {p.prompt}", bold=True))
            prompt = tok.apply_chat_template([{"role": "user", "content": p.prompt}])
            result = _generate(model.session(), prompt, params, echo=True)
            ok = parse_answer(result) == p.answer
            right += ok
            tokens += len(result.tokens)
            seconds += result.prefill_seconds + result.decode_seconds
            mark = click.style("correct", fg="green") if ok else click.style(f"wrong, expected {p.answer}", fg="red")
            click.echo(f"   [{mark}; {len(result.tokens)} tokens at {result.decode_tokens_per_second:.0f} tok/s]\n")
        click.echo(f"watched: {right}/{len(watched)} correct, {tokens / seconds:.0f} tok/s one at a time")
        if n_eval:
            held = heldout_problems()[:n_eval]
            ev = evaluate(model, held, max_batch=32)
            click.echo(
                f"held-out: {ev.correct}/{ev.total} correct ({100 * ev.accuracy:.1f}%), "
                f"{ev.generated_tokens} tokens at {ev.tokens_per_second:.0f} tok/s in continuous batches of 32"
            )


if __name__ == "__main__":  # pragma: no cover
    main()
