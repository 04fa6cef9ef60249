"""FastVLM on MLX: `model, processor = load(path)`, then `generate` / `stream_generate`.

`fastvlm_mlx.generate` is the generate module (`import fastvlm_mlx.generate as g` gives it);
calling it, `fastvlm_mlx.generate(model, processor, ...)`, calls its `generate` function, as
mlx-lm's `mlx_lm.generate(...)` does. `fastvlm_mlx.convert` is the same.
"""

import warnings

# `python -m fastvlm_mlx.generate` (and .convert, .chat) runs a module that this package has
# already imported eagerly; runpy then warns that the module "found in sys.modules ... may result
# in unpredictable behaviour". Each tool's `__main__` block calls the package's copy of its
# main(), so nothing is unpredictable; the warning would only be noise on every run.
warnings.filterwarnings(
    "ignore", category=RuntimeWarning,
    message=r"'fastvlm_mlx\.\w+' found in sys\.modules after import of package 'fastvlm_mlx'",
)

from . import convert, generate  # noqa: E402
from .batch import RunningBatch, batch_generate  # noqa: E402
from .chat import ChatSession  # noqa: E402
from .feature_cache import FeatureCache  # noqa: E402
from .generate import GenerationOptions, GenerationResponse, GenerationResult, stream_generate  # noqa: E402
from .loader import load  # noqa: E402
from .model import Model  # noqa: E402
from .timing import Timings  # noqa: E402

__all__ = [
    "load", "convert", "generate", "stream_generate", "batch_generate", "RunningBatch", "ChatSession",
    "Model", "FeatureCache", "Timings", "GenerationOptions", "GenerationResponse", "GenerationResult",
]
__version__ = "0.1.0"
