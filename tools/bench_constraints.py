"""Measurements behind docs/structured-output.md: what constrained decoding costs.

    python tools/bench_constraints.py train-bpe OUT.json --vocab 32000     # a BPE tokenizer from local text
    python tools/bench_constraints.py engines TOKENIZER.json...            # compile and mask times per engine
    python tools/bench_constraints.py decode ARTIFACT [--batch 1 8]        # constrained vs free decode tok/s

``decode`` interleaves the variants (free, constrained with masks in the worker thread, constrained
with masks inline) round by round, rotating their order, so that other load on the machine hits them
alike. It prints each variant's tokens/s (median and range), its ratio to the free run of the same
round (median and range), and a steadier estimate: the free step time against that step plus the
extra time the variant spends in ``Request.accept`` (sampling, mask, text: all that a constraint adds
to a step; the model call is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SCHEMAS = {
    "nested_object": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        "geo": {
                            "type": "object",
                            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                            "required": ["lat", "lon"],
                        },
                    },
                    "required": ["street", "zip", "geo"],
                },
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["name", "address", "tags"],
        },
        {
            "name": "Ada Lovelace",
            "address": {"street": "12 Analytical Engine Road", "zip": "12345", "geo": {"lat": 51.5, "lon": -0.12}},
            "tags": ["math", "computing", "poetry"],
        },
    ),
    "array_of_enums": (
        {
            "type": "array",
            "items": {"enum": ["red", "green", "blue", "cyan", "magenta"]},
            "minItems": 1,
            "maxItems": 12,
        },
        ["red", "green", "blue", "cyan", "magenta", "red", "green", "blue"],
    ),
    "bounded_numbers": (
        {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "score": {"type": "number", "minimum": 0, "maximum": 1},
                "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000000},
            },
            "required": ["age", "score", "count"],
        },
        {"age": 42, "score": 0.875, "count": 123456},
    ),
    "bounded_integer": ({"type": "integer", "minimum": -999, "maximum": 1998}, 405),  # the tiny reasoner's too
}
# long enough that no request completes its JSON within the measured tokens: every step is masked
DECODE_SCHEMA = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "maxItems": 3},
            "note": {"type": "string"},
        },
        "required": ["name", "age", "tags", "note"],
        "additionalProperties": False,
    },
}


def train_bpe(out: str, vocab: int, limit: int = 60_000_000) -> None:
    """A byte-level BPE (DeepSeek's special tokens first) trained on text files found on this machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def corpus():
        total = 0
        for root in (os.path.dirname(os.__file__), "/usr/share/doc"):
            for dirpath, _, files in os.walk(root):
                for f in files:
                    if f.endswith((".py", ".md", ".txt", ".rst", ".html")):
                        try:
                            with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                                text = fh.read()
                        except (OSError, UnicodeDecodeError):
                            continue
                        total += len(text)
                        yield text
                        if total > limit:
                            return

    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<think>", "</think>"]
    specials += [f"<｜tool▁{x}｜>" for x in ("calls▁begin", "calls▁end", "call▁begin", "call▁end", "sep")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    data = json.loads(tok.to_str())
    for t in data["added_tokens"]:  # as in DeepSeek's tokenizer: only BOS/EOS are special
        t["special"] = t["content"] in specials[:2]
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(data, fh, ensure_ascii=False)
    print(f"{out}: {tok.get_vocab_size()} tokens")


def engines(paths: list[str]) -> None:
    """Compile time and per-token mask time of each schema's instance, for llguidance (and xgrammar
    when it is importable)."""
    import numpy as np
    from tokenizers import Tokenizer

    from moeport.runtime.constraints import ConstraintCompiler, json_schema_with_options

    def eos_of(hf):
        for name in ("<eos>", "<｜end▁of▁sentence｜>"):
            if hf.token_to_id(name) is not None:
                return hf.token_to_id(name)
        return 0

    for path in paths:
        text = open(path, encoding="utf-8").read()
        hf = Tokenizer.from_str(text)
        eos, n = eos_of(hf), hf.get_vocab_size()
        t = time.perf_counter()
        compiler = ConstraintCompiler(text, n, [eos])
        print(f"{path} ({n} tokens): llguidance tokenizer {1e3 * (time.perf_counter() - t):.1f} ms")
        compiler.overlap = False
        cases = {k: v for k, v in SCHEMAS.items() if hf.decode(hf.encode(json.dumps(v[1])).ids) == json.dumps(v[1])}
        for name, (schema, value) in cases.items():
            ids = hf.encode(json.dumps(value), add_special_tokens=False).ids
            t = time.perf_counter()
            compiled = compiler.compile({"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
            compile_s = time.perf_counter() - t
            c = compiled.start()
            times = []
            for tid in ids:
                t = time.perf_counter()
                c._fill()
                times.append(time.perf_counter() - t)
                c._mask_current = True
                c.advance(tid)
            print(
                f"  llguidance {name:16s} compile {1e3 * compile_s:7.2f} ms  mask median "
                f"{1e6 * statistics.median(times):7.1f} us  max {1e6 * max(times):7.1f} us  ({len(ids)} tokens)"
            )
        try:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            continue
        info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=hf), vocab_size=n)
        for name, (schema, value) in cases.items():
            ids = hf.encode(json.dumps(value), add_special_tokens=False).ids
            compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            t = time.perf_counter()
            opts = json_schema_with_options(schema)
            cg = compiler.compile_json_schema(json.dumps(opts), any_whitespace=False, separators=(", ", ": "))
            m = xgr.GrammarMatcher(cg)
            compile_s = time.perf_counter() - t
            mask = np.full(xgr.get_bitmask_shape(1, n), -1, np.int32)
            times = []
            for tid in ids:
                t = time.perf_counter()
                m.fill_next_token_bitmask(mask)
                times.append(time.perf_counter() - t)
                m.accept_token(tid)
            print(
                f"  xgrammar   {name:16s} compile {1e3 * compile_s:7.2f} ms  mask median "
                f"{1e6 * statistics.median(times):7.1f} us  max {1e6 * max(times):7.1f} us  ({len(ids)} tokens)"
            )


def decode(artifact: str, batches: list[int], rounds: int, new_tokens: int, threads: int | None) -> None:
    from moeport.runtime import Request, load
    from moeport.runtime.constraints import compiler_for

    accept_seconds = [0.0]  # time in Request.accept (sampling, masks, text): the step's Python side
    plain_accept = Request.accept

    def timed_accept(self, logits):
        t = time.perf_counter()
        try:
            return plain_accept(self, logits)
        finally:
            accept_seconds[0] += time.perf_counter() - t

    Request.accept = timed_accept

    model = load(artifact, **({"threads": threads} if threads else {}))
    tok = model.require_tokenizer()
    text = "Return the people in the registry as a JSON array of objects with their names, ages and tags. "
    prompts = [tok.encode(text * (1 + i % 3)) for i in range(max(batches))]
    rf = {"type": "json_schema", "json_schema": {"name": "people", "schema": DECODE_SCHEMA}}
    compiler = compiler_for(model)

    def run(batch: int, variant: str) -> tuple[float, float, float]:
        """(tokens/s, ms per step, ms of accept per step) of the decode steps."""
        compiler.overlap = variant != "json inline"
        gen = model.batch(batch)
        fmt = None if variant == "free" else rf
        reqs = [
            gen.submit(
                model.session(),
                p,
                max_new_tokens=new_tokens,
                temperature=1.0,
                seed=i,
                ignore_eos=True,
                response_format=fmt,
            )
            for i, p in enumerate(prompts[:batch])
        ]
        gen.step()  # the prefills (and each first token)
        start, before, steps = time.perf_counter(), sum(len(r.tokens) for r in reqs), 0
        accept_seconds[0] = 0.0
        while gen.busy:
            gen.step()
            steps += 1
        seconds = time.perf_counter() - start
        assert all(r.finish_reason == "length" for r in reqs), [r.finish_reason for r in reqs]
        return (
            (sum(len(r.tokens) for r in reqs) - before) / seconds,
            1e3 * seconds / steps,
            1e3 * accept_seconds[0] / steps,
        )

    variants = ["free", "json worker", "json inline"]
    for batch in batches:
        run(batch, "json worker")  # warm: compiles the grammar, fills caches
        results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        for k in range(rounds):
            for v in variants[k % 3 :] + variants[: k % 3]:  # each variant takes each place in turn
                results[v].append(run(batch, v))
        free_step = statistics.median(x[1] for x in results["free"])
        free_accept = statistics.median(x[2] for x in results["free"])
        for v in variants:
            r = [x[0] for x in results[v]]
            paired = [x[0] / f[0] for x, f in zip(results[v], results["free"], strict=True)]  # same round
            accept = statistics.median(x[2] for x in results[v])
            added = free_step / (free_step + accept - free_accept)  # the free step plus what accept adds
            print(
                f"batch {batch} {v:12s} {statistics.median(r):6.1f} tok/s ({min(r):.1f}-{max(r):.1f}); "
                f"ratio to free in the same round: median {statistics.median(paired):.3f} "
                f"({min(paired):.3f}-{max(paired):.3f}); accept {accept:5.2f} ms/step of {free_step:6.2f} ms "
                f"-> {added:.3f}"
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-bpe")
    t.add_argument("out")
    t.add_argument("--vocab", type=int, default=32000)
    e = sub.add_parser("engines")
    e.add_argument("tokenizers", nargs="+")
    d = sub.add_parser("decode")
    d.add_argument("artifact")
    d.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--new-tokens", type=int, default=64)
    d.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.cmd == "train-bpe":
        train_bpe(a.out, a.vocab)
    elif a.cmd == "engines":
        engines(a.tokenizers)
    else:
        decode(a.artifact, a.batch, a.rounds, a.new_tokens, a.threads)


if __name__ == "__main__":
    sys.exit(main())
