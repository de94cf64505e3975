"""Load generator for OpenAI-compatible servers (``moeport serve``, vLLM, llama-server, ...).

``--concurrency N`` streams at a time, ``--requests M`` in all, through the official ``openai`` client
(AsyncOpenAI, streaming ``/v1/completions``). Prompts are token ids drawn from a fixed seed, so a run is
reproducible and exactly ``--prompt-tokens`` long (the server needs no tokenizer); the first
``--shared-prefix-tokens`` of them are the same in every request (a system prompt, to exercise a prefix
cache). ``ignore_eos`` (an extension vLLM and moeport accept) makes every request generate ``--max-tokens``.

Prints throughput (aggregate decode tokens/s over the whole run and while all N streams decode at once,
output tokens/s, requests/s) and time-to-first-token, inter-token latency and time-per-output-token
percentiles; ``--json`` prints one object instead, with every request's figures. Only loopback addresses
unless ``--allow-remote``::

    python -m moeport.tools.loadgen --base-url http://127.0.0.1:8000/v1 --concurrency 8 --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse


@dataclass
class RequestResult:
    """One request as the client saw it (seconds from its own send)."""

    index: int
    prompt_tokens: int
    output_tokens: int = 0
    sent: float = 0.0  # on the run's clock
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each token, from `sent`
    cached_tokens: int | None = None
    error: str | None = None

    @property
    def done(self) -> float:
        return self.token_times[-1] if self.token_times else 0.0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


def prompts(count: int, tokens: int, shared: int, seed: int, low: int, high: int) -> list[list[int]]:
    """``count`` prompts of ``tokens`` ids in [low, high); the first ``shared`` ids are the same in all."""
    if not 0 <= shared <= tokens:
        raise ValueError(f"--shared-prefix-tokens {shared} must be between 0 and --prompt-tokens {tokens}")
    prefix_rng = random.Random(seed)
    prefix = [prefix_rng.randrange(low, high) for _ in range(shared)]
    out = []
    for i in range(count):
        rng = random.Random(f"{seed}/{i}")
        out.append(prefix + [rng.randrange(low, high) for _ in range(tokens - shared)])
    return out


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles (None without values)."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in points:
        out[f"p{p}"] = ordered[max(0, min(len(ordered) - 1, -(-p * len(ordered) // 100) - 1))] if ordered else None
    return out


async def one_request(client: Any, model: str, index: int, prompt: list[int], args: Any, t0: float) -> RequestResult:
    result = RequestResult(index, len(prompt))
    result.sent = time.perf_counter() - t0
    start = time.perf_counter()
    request = dict(
        model=model,
        prompt=prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed + index,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": args.ignore_eos, "return_token_ids": True},
    )
    try:
        if args.raw:  # the same client and HTTP stack, chunks read as JSON instead of typed SDK objects
            return await _one_raw(client, request, result, start)
        stream = await client.completions.create(**request)
        async for chunk in stream:
            now = time.perf_counter() - start
            if chunk.usage is not None:
                result.output_tokens = chunk.usage.completion_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                result.cached_tokens = getattr(details, "cached_tokens", None) if details else None
            for choice in chunk.choices:
                ids = getattr(choice, "token_ids", None)
                n = len(ids) if ids is not None else (1 if choice.text else 0)
                if n and result.ttft is None:
                    result.ttft = now
                result.token_times.extend([now] * n)
        result.output_tokens = result.output_tokens or len(result.token_times)
    except Exception as exc:  # noqa: BLE001 - reported per request, the run goes on
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _one_raw(client: Any, request: dict[str, Any], result: RequestResult, start: float) -> RequestResult:
    async with client.completions.with_streaming_response.create(**request) as response:
        async for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            now = time.perf_counter() - start
            chunk = json.loads(line[5:])
            usage = chunk.get("usage")
            if usage:
                result.output_tokens = usage.get("completion_tokens")
                result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids")
                n = len(ids) if ids is not None else (1 if choice.get("text") else 0)
                if n and result.ttft is None:
                    result.ttft = now
                result.token_times.extend([now] * n)
    result.output_tokens = result.output_tokens or len(result.token_times)
    return result


async def run(args: Any) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0, timeout=args.timeout)
    model = args.model or (await client.models.list()).data[0].id
    low, high = args.token_range
    warm = prompts(args.warmup, args.prompt_tokens, 0, args.seed + 10_000, low, high)
    work = prompts(args.requests, args.prompt_tokens, args.shared_prefix_tokens, args.seed, low, high)
    for i, w in enumerate(warm):  # first calls allocate buffers and fault in the weights: not what we measure
        warmed = await one_request(client, model, args.requests + i, w, args, time.perf_counter())
        if warmed.error:
            raise SystemExit(f"loadgen: the warm-up request failed: {warmed.error}")
    gate = asyncio.Semaphore(args.concurrency)
    t0 = time.perf_counter()

    async def limited(i: int, prompt: list[int]) -> RequestResult:
        async with gate:
            return await one_request(client, model, i, prompt, args, t0)

    if args.concurrency == 1:  # strictly one after another (the prefix-cache check needs the order)
        results = [await limited(i, p) for i, p in enumerate(work)]
    else:
        results = await asyncio.gather(*(limited(i, p) for i, p in enumerate(work)))
    duration = time.perf_counter() - t0
    await client.close()
    return summarize(args, model, results, duration)


def summarize(args: Any, model: str, results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.token_times]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [b - a for r in ok for a, b in itertools.pairwise(r.token_times) if b > a]
    tpot = [t for r in ok if (t := r.tpot) is not None]
    output = sum(r.output_tokens for r in ok)
    decoded = sum(len(r.token_times) - 1 for r in ok)
    spans = [(r.sent + r.token_times[0], r.sent + r.token_times[-1]) for r in ok if len(r.token_times) > 1]
    later = [r.sent + t for r in ok for t in r.token_times[1:]]  # every token after its request's first
    decoding = busy_time(spans, 1)
    full = busy_time(spans, args.concurrency)

    def ms(d: dict[str, float | None]) -> dict[str, float | None]:
        return {k: None if v is None else round(1000 * v, 2) for k, v in d.items()}

    return {
        "model": model,
        "base_url": args.base_url,
        "concurrency": args.concurrency,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "prompt_tokens": args.prompt_tokens,
        "shared_prefix_tokens": args.shared_prefix_tokens,
        "max_tokens": args.max_tokens,
        "duration_s": round(duration, 3),
        "output_tokens": output,
        # every token after each request's first, over the time some request was decoding (stalls while
        # others' prompts are prefilled included)
        "decode_tokens_per_second": round(decoded / total(decoding), 2) if total(decoding) else None,
        # the same while all `concurrency` streams were decoding at once (steady state)
        "steady_decode_tokens_per_second": round(tokens_in(later, full) / total(full), 2) if total(full) else None,
        "output_tokens_per_second": round(output / duration, 2) if duration else None,
        "requests_per_second": round(len(ok) / duration, 3) if duration else None,
        "ttft_ms": ms(percentiles(ttft)),
        "itl_ms": ms(percentiles(itl)),
        "tpot_ms": ms(percentiles(tpot)),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "per_request": [
            {
                "index": r.index,
                "ttft_ms": None if r.ttft is None else round(1000 * r.ttft, 2),
                "tpot_ms": None if r.tpot is None else round(1000 * r.tpot, 3),
                "output_tokens": r.output_tokens,
                "cached_tokens": r.cached_tokens,
                "error": r.error,
            }
            for r in results
        ],
    }


def busy_time(spans: list[tuple[float, float]], at_least: int) -> list[tuple[float, float]]:
    """The periods during which at least ``at_least`` of the (start, end) spans are open."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], -e[1]))
    periods, open_, since = [], 0, 0.0
    for t, step in edges:
        if open_ < at_least <= open_ + step:
            since = t
        elif open_ >= at_least > open_ + step and t > since:
            periods.append((since, t))
        open_ += step
    return periods


def total(periods: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in periods)


def tokens_in(times: list[float], periods: list[tuple[float, float]]) -> int:
    return sum(1 for t in times if any(a < t <= b for a, b in periods))


def report(summary: dict[str, Any]) -> str:
    def row(name: str, d: dict[str, float | None]) -> str:
        return f"  {name:<22} " + "  ".join(f"{k} {v if v is not None else '-':>9}" for k, v in d.items())

    s = summary
    lines = [
        f"{s['model']} at {s['base_url']}: {s['requests']} requests ({s['failed']} failed), concurrency "
        f"{s['concurrency']}, {s['prompt_tokens']} prompt tokens ({s['shared_prefix_tokens']} shared), "
        f"{s['max_tokens']} max tokens",
        f"  duration               {s['duration_s']} s",
        f"  decode (aggregate)     {s['decode_tokens_per_second']} tok/s; with all {s['concurrency']} streams "
        f"decoding: {s['steady_decode_tokens_per_second']} tok/s",
        f"  output                 {s['output_tokens_per_second']} tok/s ({s['output_tokens']} tokens)",
        f"  requests               {s['requests_per_second']} /s",
        row("TTFT (ms)", s["ttft_ms"]),
        row("inter-token (ms)", s["itl_ms"]),
        row("per output token (ms)", s["tpot_ms"]),
    ]
    lines += [f"  error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def is_loopback_url(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    p.add_argument("--allow-remote", action="store_true", help="allow a base URL that is not a loopback address")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name [default: the server's first model]")
    p.add_argument("--concurrency", type=int, default=1, help="streams at a time")
    p.add_argument(
        "--raw",
        action="store_true",
        help="read the streamed chunks as plain JSON (the openai client's streaming response) instead of typed "
        "SDK objects: a lighter client, for a load generator that shares the server's cores",
    )
    p.add_argument("--requests", type=int, default=8, help="requests in all")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--shared-prefix-tokens", type=int, default=0, help="leading prompt tokens common to all requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let requests stop at EOS")
    p.add_argument("--token-range", default="100:1000", help="prompt ids are drawn from LOW:HIGH [100:1000]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="requests sent (with other prompts) before measuring")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        low, high = (int(x) for x in args.token_range.split(":"))
    except ValueError:
        p.error(f"--token-range: expected LOW:HIGH, got {args.token_range!r}")
    if not 0 <= low < high:
        p.error(f"--token-range: expected 0 <= LOW < HIGH, got {args.token_range!r}")
    args.token_range = (low, high)
    if args.concurrency < 1 or args.requests < 1 or args.prompt_tokens < 1 or args.max_tokens < 1:
        p.error("--concurrency, --requests, --prompt-tokens and --max-tokens must be >= 1")
    if not 0 <= args.shared_prefix_tokens <= args.prompt_tokens:
        p.error("--shared-prefix-tokens must be between 0 and --prompt-tokens")
    if not args.allow_remote and not is_loopback_url(args.base_url):
        p.error(f"--base-url {args.base_url} is not a loopback address (pass --allow-remote to load it anyway)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    if args.json:
        print(json.dumps(summary))
    else:
        print(report(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
