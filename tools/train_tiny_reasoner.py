"""Train the bundled tiny *reasoning* MoE: a DeepSeek-V3-architecture model that adds and subtracts.

Development-only (needs torch and transformers; the moeport runtime does not). Fully seeded and CPU
friendly: the default run takes roughly 15-25 minutes on 2 CPU cores.

The model answers DeepSeek-R1-style chat prompts whose user message is a bare expression over
non-negative integers of up to 3 digits, e.g. ``347+58`` or ``91-406``. The assistant first writes a
digit-by-digit scratchpad inside ``<think>...</think>`` and then the integer answer:

    <think>
    347+058          the operands, zero-padded to 3 digits
    7+8+0=15         one line per digit, least significant first: x+y+carry = carry_out digit
    4+5+1=10
    3+0+1=04
    </think>

    405

    <think>
    091-406          subtraction: the padded operands,
    <><              each digit of the first compared with the second's, most significant first,
    -(406-091)       the sign (that of the first non-'=') and the operands ordered larger first,
    6-1-0=05         x-y-borrow = borrow_out digit   (borrow_out 1 means 10 was borrowed)
    0-9-0=11
    4-0-1=03
    </think>

    -315

The answer is mechanical: the sign, then (for addition) the last line's carry if 1, then the
result digits from the last line back to the first, leading zeros dropped.

Usage:
    python tools/train_tiny_reasoner.py [--out models/zoo/tiny-reasoner] [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
UNK = "<unk>"
SPECIALS = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK, UNK]  # ids 0..6
CHARS = list("0123456789+-=<>() \n")

CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

MAX_POS = 128
MAX_NEW_TOKENS = 64

MODEL = dict(
    model_type="deepseek_v3",
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=32,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    hidden_act="silu",
    max_position_embeddings=MAX_POS,
    rms_norm_eps=1e-6,
    rope_interleave=True,
    tie_word_embeddings=False,
    initializer_range=0.02,
    attention_bias=False,
)

# --------------------------------------------------------------------------------------------------
# data


def scratchpad(a: int, op: str, b: int) -> str:
    """The reasoning text between ``<think>\\n`` and ``\\n</think>``."""
    pa, pb = f"{a:03d}", f"{b:03d}"
    lines = [f"{pa}{op}{pb}"]
    if op == "+":
        x, y = pa, pb
    else:
        lines.append("".join("<" if x < y else ">" if x > y else "=" for x, y in zip(pa, pb, strict=True)))
        if a < b:
            lines.append(f"-({pb}-{pa})")
            x, y = pb, pa
        else:
            lines.append(f"+({pa}-{pb})")
            x, y = pa, pb
    carry = 0
    for i in (2, 1, 0):
        dx, dy = int(x[i]), int(y[i])
        if op == "+":
            s = dx + dy + carry
            out, digit = s // 10, s % 10
        else:
            s = dx - dy - carry
            out, digit = (1, s + 10) if s < 0 else (0, s)
        lines.append(f"{dx}{op}{dy}{op}{carry}={out}{digit}")
        carry = out
    return "\n".join(lines)


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def assistant_text(a: int, op: str, b: int) -> str:
    return f"{THINK}\n{scratchpad(a, op, b)}\n{END_THINK}\n\n{answer(a, op, b)}"


def answer_from_scratchpad(pad: str) -> int:
    """Read the answer off a scratchpad mechanically (documents and checks the format)."""
    lines = pad.split("\n")
    op = lines[0][3]
    sign = -1 if (op == "-" and lines[2][0] == "-") else 1
    digit_lines = lines[-3:]
    digits = "".join(line[-1] for line in reversed(digit_lines))
    if op == "+":
        digits = digit_lines[-1][-2] + digits
    return sign * int(digits)


def uniform_problem(rng: random.Random) -> tuple[int, str, int]:
    return rng.randrange(1000), rng.choice("+-"), rng.randrange(1000)


def train_problem(rng: random.Random) -> tuple[int, str, int]:
    """Training mix: half uniform, half with digit lengths drawn uniformly (short operands are rare
    under the uniform draw), plus some near-equal pairs so the subtraction's comparison is learned."""
    r = rng.random()
    op = rng.choice("+-")
    if r < 0.5:
        return rng.randrange(1000), op, rng.randrange(1000)

    def by_len() -> int:
        n = rng.choice((1, 2, 3))
        return rng.randrange(0 if n == 1 else 10 ** (n - 1), 10**n)

    a = by_len()
    if r < 0.85:
        return a, op, by_len()
    # near-equal: share the first k padded digits (k = 1, 2) or be equal
    k = rng.choice((1, 2, 3))
    pa = f"{a:03d}"
    rest = "".join(rng.choice("0123456789") for _ in range(3 - k))
    return a, op, int(pa[:k] + rest)


# --------------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, USER, ASSISTANT, UNK)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    for t in SPECIALS:
        assert tok.token_to_id(t) == vocab[t], t
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POS,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def prompt_text(expr: str) -> str:
    """What the chat template renders for [user] with add_generation_prompt=True."""
    return f"{BOS}{USER}{expr}{ASSISTANT}"


# --------------------------------------------------------------------------------------------------
# training


def make_batch(tok, problems, torch):
    seqs, labels = [], []
    for a, op, b in problems:
        p = tok.encode(prompt_text(f"{a}{op}{b}")).ids
        c = tok.encode(assistant_text(a, op, b)).ids + [tok.token_to_id(EOS)]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    n = max(map(len, seqs))
    eos = tok.token_to_id(EOS)
    # right padding: with causal attention no real token sees a pad, so no attention mask is needed
    ids = torch.full((len(seqs), n), eos, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    real = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(y)] = torch.tensor(y)
        real[i, : len(s)] = True
    # labels are shifted inside the model (predict token t+1 from prefix ..t)
    return ids, lab, real


def greedy(model, tok, problems, torch, batch_size=256):
    """Greedy decode (KV cache, no padding: problems are bucketed by prompt length).
    Returns the generated assistant texts (up to, not including, EOS) in order."""
    from transformers import DynamicCache

    eos = tok.token_to_id(EOS)
    prompts = [tok.encode(prompt_text(f"{a}{op}{b}")).ids for a, op, b in problems]
    out: list[str] = [""] * len(problems)
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(len(p), []).append(i)
    model.eval()
    with torch.no_grad():
        for _, idx_all in sorted(buckets.items()):
            for s in range(0, len(idx_all), batch_size):
                idx = idx_all[s : s + batch_size]
                x = torch.tensor([prompts[i] for i in idx])
                cache = DynamicCache(config=model.config)
                gen = []
                done = torch.zeros(len(idx), dtype=torch.bool)
                for _ in range(MAX_NEW_TOKENS):
                    logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1]
                    nxt = logits.argmax(-1)
                    nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                    gen.append(nxt)
                    done |= nxt == eos
                    if bool(done.all()):
                        break
                    x = nxt[:, None]
                g = torch.stack(gen, 1).tolist()
                for j, i in enumerate(idx):
                    ids = g[j]
                    ids = ids[: ids.index(eos)] if eos in ids else ids
                    out[i] = tok.decode(ids, skip_special_tokens=False)
    return out


def parse_answer(text: str) -> int | None:
    if not text.startswith(THINK + "\n") or END_THINK not in text:
        return None
    tail = text.split(END_THINK)[-1].strip()
    try:
        return int(tail)
    except ValueError:
        return None


def score(problems, texts) -> tuple[float, float]:
    ok = sum(parse_answer(t) == answer(*p) for p, t in zip(problems, texts, strict=True))
    exact = sum(t == assistant_text(*p) for p, t in zip(problems, texts, strict=True))
    return ok / len(problems), exact / len(problems)


def heldout_sets(seed: int):
    rng = random.Random(f"heldout-{seed}")
    seen: set = set()
    test, val = [], []
    while len(test) + len(val) < 700:
        p = uniform_problem(rng)
        if p in seen:
            continue
        seen.add(p)
        (test if len(test) < 200 else val).append(p)
    return test, val, seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/zoo/tiny-reasoner")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="{}", help="JSON overrides of the model config (experiments)")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    tok = build_tokenizer()
    for s in (
        prompt_text("91-406") + assistant_text(91, "-", 406) + EOS,
        prompt_text("7+5") + assistant_text(7, "+", 5),
    ):
        assert tok.decode(tok.encode(s).ids, skip_special_tokens=False) == s
        assert UNK not in tok.encode(s).tokens
    for a, op, b in [
        (347, "+", 58),
        (91, "-", 406),
        (999, "+", 999),
        (100, "-", 99),
        (0, "-", 0),
        (5, "-", 999),
        (70, "-", 62),
    ]:
        assert answer_from_scratchpad(scratchpad(a, op, b)) == answer(a, op, b)

    cfg_fields = {**MODEL, **json.loads(args.model)}
    cfg_fields.pop("model_type")
    config = DeepseekV3Config(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        architectures=["DeepseekV3ForCausalLM"],
        **cfg_fields,
    )
    model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="eager")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, vocab {config.vocab_size}", flush=True)

    test, val, excluded = heldout_sets(args.seed)
    rng = random.Random(args.seed)

    # aux-loss-free load balancing (DeepSeek-V3): nudge each router's e_score_correction_bias
    routers = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    loads: dict[int, torch.Tensor] = {}
    token_mask = {"m": None}

    def hook(mod, _inp, out):
        idx = out[2]
        m = token_mask["m"]
        if m is not None and idx.shape[0] == m.numel():
            idx = idx[m.reshape(-1)]
        loads[id(mod)] = loads.get(id(mod), 0) + torch.bincount(idx.reshape(-1), minlength=mod.num_experts).float()

    for r in routers:
        r.register_forward_hook(hook)
    bias_rate = 1e-3

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    t0 = time.time()
    ema = None
    for step in range(args.steps):
        batch = []
        while len(batch) < args.batch:
            p = train_problem(rng)
            if p not in excluded:
                batch.append(p)
        ids, lab, real = make_batch(tok, batch, torch)
        token_mask["m"] = real  # routing statistics over real tokens only
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loads.clear()
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for r in routers:
                c = loads[id(r)]
                r.e_score_correction_bias += bias_rate * torch.sign(c.mean() - c)
        token_mask["m"] = None
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(
                f"step {step:5d}  loss {loss.item():.4f}  ema {ema:.4f}  lr {lr_at(step):.2e}  {el:6.0f}s", flush=True
            )
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            acc, ex = score(val, greedy(model, tok, val, torch))
            print(f"  validation ({len(val)}): answer accuracy {acc:.4f}, exact {ex:.4f}", flush=True)
    train_s = time.time() - t0
    print(f"trained {args.steps} steps in {train_s:.0f}s", flush=True)
    biases = [[round(x, 4) for x in r.e_score_correction_bias.tolist()] for r in routers]
    print("router correction biases:", biases, flush=True)

    texts = greedy(model, tok, val, torch)
    val_acc, val_exact = score(val, texts)
    print(f"validation ({len(val)}): answer accuracy {val_acc:.4f}, exact {val_exact:.4f}", flush=True)

    # ---- write the folder (to a temporary sibling, then rename into place)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n")
        gen_cfg = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.eos_token_id,
            "do_sample": False,
            "max_new_tokens": MAX_NEW_TOKENS,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        (tmp / "heldout.json").write_text(
            json.dumps([{"prompt": f"{a}{op}{b}", "answer": answer(a, op, b)} for a, op, b in test], indent=0) + "\n"
        )

        # ---- reload with plain transformers and measure the held-out accuracy with generate()
        test_acc, test_exact, failures = evaluate_folder(tmp, test)
        print(f"held-out test (200, transformers generate): answer accuracy {test_acc:.4f}, exact {test_exact:.4f}")
        for f in failures[:10]:
            print("  FAIL", f)
        write_readme(tmp, args, config, n_params, train_s, val_acc, test_acc, test_exact)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print("wrote", out, sizes, "total", sum(sizes.values()))
    print(f"FINAL held-out accuracy: {test_acc:.4f}")
    return 0


def evaluate_folder(folder: Path, problems):
    """Load the folder with Auto* classes (no remote code) and greedy-decode with generate()."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    prompts = []
    for a, op, b in problems:
        text = hf_tok.apply_chat_template(
            [{"role": "user", "content": f"{a}{op}{b}"}], tokenize=False, add_generation_prompt=True
        )
        assert text == prompt_text(f"{a}{op}{b}"), text
        ids = raw.encode(text).ids
        assert hf_tok(text, add_special_tokens=True)["input_ids"] == ids
        prompts.append(ids)
    eos = model.generation_config.eos_token_id
    texts = [""] * len(problems)
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(len(p), []).append(i)
    with torch.no_grad():
        for _, idx in sorted(buckets.items()):
            x = torch.tensor([prompts[i] for i in idx])
            g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False)
            for j, i in enumerate(idx):
                ids = g[j, x.shape[1] :].tolist()
                ids = ids[: ids.index(eos)] if eos in ids else ids
                texts[i] = hf_tok.decode(ids, skip_special_tokens=False)
    acc, exact = score(problems, texts)
    failures = [
        (f"{a}{op}{b}", answer(a, op, b), t)
        for (a, op, b), t in zip(problems, texts, strict=True)
        if parse_answer(t) != answer(a, op, b)
    ]
    return acc, exact, failures


def write_readme(folder: Path, args, config, n_params, train_s, val_acc, test_acc, test_exact):
    ex1 = assistant_text(347, "+", 58)
    ex2 = assistant_text(91, "-", 406)
    c = config
    text = f"""# tiny-reasoner

A tiny DeepSeek-V3-architecture mixture-of-experts model (`DeepseekV3ForCausalLM`, {n_params:,}
parameters, float32) trained from scratch to add and subtract non-negative integers of up to 3 digits,
DeepSeek-R1 style: it writes a digit-by-digit scratchpad inside `<think>...</think>` and then the
answer. It exists to test and demonstrate the runtime end to end with a model whose output can be
checked.

Architecture: hidden {c.hidden_size}, {c.num_hidden_layers} layers (first {c.first_k_dense_replace} dense,
intermediate {c.intermediate_size}), {c.num_attention_heads} heads, MLA with q_lora_rank {c.q_lora_rank},
kv_lora_rank {c.kv_lora_rank}, qk_nope {c.qk_nope_head_dim}, qk_rope {c.qk_rope_head_dim} (interleaved),
v_head {c.v_head_dim}; MoE layers with {c.n_shared_experts} shared + {c.n_routed_experts} routed experts
(intermediate {c.moe_intermediate_size}), top-{c.num_experts_per_tok} in {c.n_group} groups (top-{c.topk_group}
groups), sigmoid scores with `e_score_correction_bias` (trained by DeepSeek-V3's aux-loss-free
balancing), routed_scaling_factor {c.routed_scaling_factor}. Character-level vocabulary of {c.vocab_size}
tokens; context {c.max_position_embeddings}.

## Format

Prompt (the chat template with `add_generation_prompt=True`; the user message is the bare expression):

    <｜begin▁of▁sentence｜><｜User｜>347+58<｜Assistant｜>

The model then generates, greedily, up to `<｜end▁of▁sentence｜>`:

```
{ex1}
```

```
{ex2}
```

Scratchpad: the operands zero-padded to 3 digits; for subtraction, a line comparing the two padded
operands digit by digit (`<`, `=`, `>`, most significant first) and a line with the sign of the result
(that of the first digit that differs) and the operands ordered larger first; then one line per digit
from the least significant, `x+y+carry=CD` or `x-y-borrow=BD` (C/B: carry or borrow out, D: the result
digit). The answer is the sign, the final carry (addition), and the result digits from the last line
back to the first with leading zeros dropped. As in DeepSeek-R1, the chat template drops the reasoning
of earlier assistant turns.

## Accuracy

Greedy decoding with transformers (`generate(do_sample=False)`) on the 200 held-out problems in
`heldout.json` (uniform operands 0..999, `+`/`-` equally likely, never seen in training):
**{test_acc * 100:.1f}%** correct answers ({test_exact * 100:.1f}% reproduce the reference scratchpad exactly);
{val_acc * 100:.1f}% on 500 further validation problems.

## Training

Synthetic data generated on the fly (half uniform operands, half with the digit count drawn
uniformly, some near-equal pairs), loss on the assistant tokens only, AdamW (lr {args.lr}, cosine
decay, warmup {args.warmup}), batch {args.batch}, {args.steps} steps, seed {args.seed}, fp32 on CPU:
{train_s / 60:.0f} minutes on 2 CPU cores. Retrain with

    python tools/train_tiny_reasoner.py --out {args.out} --steps {args.steps} --seed {args.seed}
"""
    (folder / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
