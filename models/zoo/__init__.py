"""Checkpoints shipped inside moeport, addressable as ``zoo:NAME`` (e.g. ``moeport export zoo:tiny-reasoner OUT``).

Each entry is a Hugging Face layout folder next to this file.
"""

from __future__ import annotations

from pathlib import Path

PREFIX = "zoo:"
ROOT = Path(__file__).parent


class ZooError(ValueError):
    """An unknown ``zoo:`` name."""


def names() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())


def resolve(path: str | Path) -> Path:
    """``zoo:NAME`` -> the bundled checkpoint folder; any other path is returned unchanged."""
    text = str(path)
    if not text.startswith(PREFIX):
        return Path(path)
    name = text[len(PREFIX) :]
    folder = ROOT / name
    if not (folder / "config.json").is_file():
        raise ZooError(f"unknown zoo model {name!r}; bundled: {', '.join(names()) or 'none'}")
    return folder
