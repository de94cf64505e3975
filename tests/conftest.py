"""Shared fixtures: tiny checkpoints made by transformers (the oracle) and their exported artifacts."""

from __future__ import annotations

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
