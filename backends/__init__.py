"""Backends: turn the neutral artifact into a runnable program (registry via entry points)."""

from .base import API_VERSION, Availability, Backend, BackendError, Program, best_backend, discover, get_backend

__all__ = [
    "API_VERSION",
    "Availability",
    "Backend",
    "BackendError",
    "Program",
    "best_backend",
    "discover",
    "get_backend",
]
