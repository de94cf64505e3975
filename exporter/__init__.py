"""Checkpoint -> backend-neutral ONNX artifact."""

from .export import WEIGHT_CHOICES, ExportError, check_checkpoint, export
from .manifest import Artifact, ArtifactError, read_artifact

__all__ = ["export", "check_checkpoint", "ExportError", "WEIGHT_CHOICES", "Artifact", "ArtifactError", "read_artifact"]
