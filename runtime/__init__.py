"""Load an artifact on a backend and run it: ``load(dir, backend="cpu").session()``."""

from .constraints import ConstraintError
from .generate import BatchGenerator, Completion, GenerationError, Request, RequestFailed
from .model import Model, Session, load
from .sampling import Sampler, SamplingError, SamplingParams
from .text import ReasoningSplitter, TextDelta, TextError, Tokenizer

__all__ = [
    "load",
    "Model",
    "Session",
    "BatchGenerator",
    "Request",
    "Completion",
    "GenerationError",
    "RequestFailed",
    "SamplingParams",
    "Sampler",
    "SamplingError",
    "Tokenizer",
    "TextDelta",
    "TextError",
    "ReasoningSplitter",
    "ConstraintError",
]
