"""Load an artifact on a backend and run it: ``load(dir, backend="cpu").session()``."""

from .model import GenerationError, GenerationResult, Model, Session, load

__all__ = ["load", "Model", "Session", "GenerationError", "GenerationResult"]
