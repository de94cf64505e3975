"""Arithmetic problems for the bundled tiny reasoner: generate, ask through the chat template, score."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from moeport.models import zoo
from moeport.runtime.generate import Completion
from moeport.runtime.model import Model


@dataclass(frozen=True)
class Problem:
    prompt: str  # the bare expression, e.g. "347+58"
    answer: int


def random_problems(n: int, seed: int = 0) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, op = rng.randint(0, 999), rng.randint(0, 999), rng.choice("+-")
        out.append(Problem(f"{a}{op}{b}", a + b if op == "+" else a - b))
    return out


def heldout_problems(name: str = "tiny-reasoner") -> list[Problem]:
    """The problems kept out of the model's training data (shipped with the model)."""
    path = zoo.resolve(f"zoo:{name}") / "heldout.json"
    return [Problem(p["prompt"], int(p["answer"])) for p in json.loads(Path(path).read_text())]


def parse_answer(completion: Completion) -> int | None:
    try:
        return int((completion.content or "").strip())
    except ValueError:
        return None


@dataclass
class Evaluation:
    correct: int
    total: int
    generated_tokens: int
    seconds: float
    completions: list[Completion]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def evaluate(model: Model, problems: list[Problem], max_batch: int = 32, **sampling) -> Evaluation:
    """Ask every problem as a one-message chat, greedily unless ``sampling`` says otherwise, in continuous batches."""
    gen = model.batch(max_batch)
    params = model.sampling_params(**{"temperature": 0.0, **sampling})
    t0 = time.perf_counter()
    reqs = [
        gen.submit(model.session(), model.chat_ids([{"role": "user", "content": p.prompt}]), params) for p in problems
    ]
    gen.run()
    seconds = time.perf_counter() - t0
    completions = [r.result() for r in reqs]
    correct = sum(parse_answer(c) == p.answer for c, p in zip(completions, problems, strict=True))
    return Evaluation(correct, len(problems), sum(len(c.tokens) for c in completions), seconds, completions)
