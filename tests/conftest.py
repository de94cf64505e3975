"""Shared fixtures: tiny checkpoints made by transformers (the oracle) and their exported artifacts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


class _Cache:
    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, object] = {}
        self.artifacts: dict[tuple[str, str], Path] = {}

    def checkpoint(self, name: str) -> tuple[Path, object]:
        """(checkpoint dir, float32 transformers reference model) for an oracle spec."""
        import oracle

        path = self.root / "ckpt" / name
        if name not in self.models:
            self.models[name] = oracle.make_checkpoint(oracle.SPECS[name], path)
        return path, self.models[name]

    def artifact(self, name: str, weights: str = "fp32") -> Path:
        from moeport.exporter import export

        key = (name, weights)
        if key not in self.artifacts:
            ckpt, _ = self.checkpoint(name)
            self.artifacts[key] = export(ckpt, self.root / "art" / f"{name}-{weights}", weights=weights)
        return self.artifacts[key]


@pytest.fixture(scope="session")
def oracle_cache(tmp_path_factory) -> _Cache:
    return _Cache(tmp_path_factory.mktemp("oracle"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight DeepSeek-V3 checkpoint made with numpy only (no torch): for input-handling tests."""
    from moeport.tools.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint, tmp_path_factory) -> Path:
    from moeport.exporter import export

    return export(tiny_checkpoint, tmp_path_factory.mktemp("tinyart") / "art")


BYTE_VOCAB = 256
BOS, EOS = "<bos>", "<eos>"


def write_byte_tokenizer(directory: Path, chat_template: str | None = None) -> None:
    """A byte-level tokenizer: one token per byte, so multibyte characters span several tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "add_bos_token": True}
    if chat_template:
        cfg["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


def byte_model(root: Path, seed: int, chat_template: str | None = None, **overrides) -> Path:
    """The numpy ``tiny`` preset with a 258-token vocabulary and the byte-level tokenizer, exported into
    ``root/art`` (``overrides``: more config.json fields, e.g. a longer max_position_embeddings)."""
    from moeport.exporter import export
    from moeport.tools.checkpoints import make_checkpoint

    ckpt = make_checkpoint(
        root / "ckpt",
        "tiny",
        seed=seed,
        overrides={"vocab_size": BYTE_VOCAB + 2, "eos_token_id": 257, "bos_token_id": 256, **overrides},
    )
    write_byte_tokenizer(ckpt, chat_template=chat_template)
    return export(ckpt, root / "art")


@pytest.fixture(scope="session")
def text_artifact(tmp_path_factory) -> Path:
    """The numpy tiny model with a 258-token vocabulary and the byte-level tokenizer."""
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    return byte_model(tmp_path_factory.mktemp("text"), seed=3, chat_template=template)
