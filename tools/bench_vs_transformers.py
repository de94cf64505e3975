"""Side-by-side speed of transformers and moeport on the same checkpoint, in one run (dev tool: needs torch).

    python tools/bench_vs_transformers.py CHECKPOINT ART_BF16 [ART_INT8 ART_INT4 ...] \\
        [--threads 2] [--prompt-len 128] [--new-tokens 64] [--json out.json]

Each measurement runs in its own process (so peak RSS is per engine), one after the other; each
engine gets a full-size warm-up and reports the best of 3 prefills and of 3 decodes. The ratios to
the first transformers variant are printed as a table. transformers runs DeepseekV3ForCausalLM with a
KV cache and a greedy loop (no sampling, no logits processors), the fairest fast path it offers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def transformers_bench(
    checkpoint: str, variant: str, threads: int, prompt_len: int, new_tokens: int, repeats: int = 3
) -> dict:
    """``variant`` is ``dtype`` or ``dtype:experts_implementation`` (eager, grouped_mm, batched_mm)."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    dtype, _, experts = variant.partition(":")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    kwargs = {"experts_implementation": experts} if experts else {}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), **kwargs).eval()
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, model.config.vocab_size, (1, prompt_len), generator=gen)
    warm = torch.randint(2, model.config.vocab_size, (1, prompt_len), generator=gen)
    prefill_s = decode_s = float("inf")
    with torch.inference_mode():
        out = model(warm, use_cache=True)  # warm-up at full size, as moeport bench does
        for _ in range(4):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
        for _ in range(repeats):  # best of `repeats`, like moeport bench
            t1 = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefill_s = min(prefill_s, time.perf_counter() - t1)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            decode_s = min(decode_s, time.perf_counter() - t2)
    return {
        "engine": f"transformers {variant}",
        "load_seconds": round(load_s, 3),
        "prefill_tokens_per_second": round(prompt_len / prefill_s, 2),
        "decode_tokens_per_second": round(new_tokens / decode_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("artifacts", nargs="*")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument(
        "--transformers",
        default="bfloat16:eager,bfloat16:grouped_mm,bfloat16:batched_mm,float32:eager",
        help="transformers variants dtype[:experts_implementation]; the first is the baseline of the ratios",
    )
    p.add_argument("--json", dest="json_out")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:  # one measurement, in this (fresh) process
        kind, target = a._child
        if kind == "transformers":
            r = transformers_bench(a.checkpoint, target, a.threads, a.prompt_len, a.new_tokens)
        else:
            from moeport.tools.bench import run_bench

            r = run_bench(target, "cpu", a.prompt_len, a.new_tokens, a.threads)
            r["engine"] = f"moeport {r['weights']}"
        print(json.dumps(r))
        return
    common = [
        a.checkpoint,
        "--threads",
        str(a.threads),
        "--prompt-len",
        str(a.prompt_len),
        "--new-tokens",
        str(a.new_tokens),
    ]
    rows = [_child([__file__, *common, "--_child", "transformers", d]) for d in a.transformers.split(",")]
    rows += [_child([__file__, *common, "--_child", "moeport", art]) for art in a.artifacts]
    base = rows[0]
    print(f"threads {a.threads}, prompt {a.prompt_len}, decode {a.new_tokens}; ratios to {base['engine']}")
    print(
        f"{'engine':<22}{'prefill tok/s':>14}{'ratio':>8}{'decode tok/s':>14}{'ratio':>8}{'load s':>9}"
        f"{'peak RSS MB':>13}"
    )
    for r in rows:
        pr = r["prefill_tokens_per_second"] / base["prefill_tokens_per_second"]
        dr = r["decode_tokens_per_second"] / base["decode_tokens_per_second"]
        r["prefill_ratio"], r["decode_ratio"] = round(pr, 3), round(dr, 3)
        print(
            f"{r['engine']:<22}{r['prefill_tokens_per_second']:>14.1f}{pr:>8.2f}{r['decode_tokens_per_second']:>14.2f}"
            f"{dr:>8.2f}{r['load_seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}"
        )
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
