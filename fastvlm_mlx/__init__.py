"""FastVLM on MLX: `model, processor = load(path)`."""

from .loader import load
from .model import Model

__all__ = ["load", "Model"]
__version__ = "0.1.0"
