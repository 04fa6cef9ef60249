"""FastVLM on MLX: `model, processor = load(path)`, then `generate` / `stream_generate`.

Names are imported on first use, so that command-line tools start (and fail on bad input) fast.
As in mlx-lm, `fastvlm_mlx.generate` is the function; `fastvlm_mlx.generate` the module is in
`sys.modules` (`from fastvlm_mlx.generate import ChatSession` works).
"""

import importlib
import sys
import types

_EXPORTS = {
    "load": "loader",
    "Model": "model",
    "generate": "generate",
    "stream_generate": "generate",
    "ChatSession": "generate",
    "FeatureCache": "generate",
    "GenerationResult": "generate",
    "GenerationResponse": "generate",
    "Timings": "generate",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    # Importing the submodule `generate` binds it on the package; keep the function there instead.
    def __setattr__(self, name, value):
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
