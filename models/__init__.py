"""Model families: config parsing, checkpoint reading, and the model written against the graph builder."""

from .checkpoint import Checkpoint, CheckpointError
from .config import ConfigError, DeepseekConfig, load_config

__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "DeepseekConfig", "load_config"]
