"""The optional dependencies, by the extra that installs them (pyproject.toml).

The runtime (generate, chat, caption, convert, the Python API) needs none of them. A feature that
needs one checks for it first, without importing it, and a missing one is one line that names the
`pip install "fastvlm-mlx[EXTRA]"` that adds it: never a bare ModuleNotFoundError.
"""

import importlib.util
import sys
from typing import Sequence

# What each extra must provide, by import name (pyproject.toml's extras hold the packages).
EXTRAS = {
    "server": ("fastapi", "uvicorn"),
    "plot": ("matplotlib",),
    "verify": ("torch", "timm", "transformers"),
    "video": ("av",),
}


class MissingDependency(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def install_line(extra: str) -> str:
    return f'pip install "fastvlm-mlx[{extra}]"'


def missing(modules: Sequence[str]) -> list:
    """The MODULES that cannot be imported here (looked up, not imported: cheap, and silent)."""
    out = []
    for name in modules:
        if sys.modules.get(name) is not None:  # imported already (mlx-vlm's bare package too)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or sys.modules[name] = None
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, feature: str, modules: Sequence[str] = ()) -> None:
    """Raise MissingDependency, naming EXTRA, when FEATURE's MODULES (default: all of EXTRA's)
    are not all installed."""
    absent = missing(modules or EXTRAS[extra])
    if absent:
        verb = "is" if len(absent) == 1 else "are"
        raise MissingDependency(f"{feature} needs {', '.join(absent)}, which {verb} not installed: "
                                f"{install_line(extra)}")
