"""load(path): a converted MLX directory -> (model, processor).

A converted directory holds config.json (our schema, see config.py), model*.safetensors in our
parameter names and tensor layout, and the tokenizer files.
"""

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional, Tuple, Union

import mlx.core as mx

from .config import DTYPES, ModelConfig, ModelLoadError, is_converted
from .model import Model, build_model
from .processing import Processor
from .weights import WeightError, cast_floating


def read_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a model directory: it has no config.json")
    try:
        return ModelConfig.from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: {e}") from None


def read_weights(path: Path) -> dict:
    files = sorted(glob.glob(str(path / "model*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no model*.safetensors")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(f))
        except Exception as e:  # mlx raises RuntimeError/ValueError with the file's problem
            raise ModelLoadError(f"{f} cannot be read ({e})") from None
    return weights


def runtime_dtype(name: Optional[str] = None) -> Optional[mx.Dtype]:
    """The dtype the CLIs run in: NAME if given; else float32 when MLX runs on the CPU, whose
    half-precision matmul is 10-20x slower (BENCHMARKS.md); else None (as converted)."""
    if name:
        return DTYPES[name]
    return mx.float32 if mx.default_device() == mx.cpu else None


def load_converted(
    path: Union[str, Path], dtype: Optional[mx.Dtype] = None, lazy: bool = False
) -> Tuple[Model, Processor]:
    """Load a converted MLX directory (no conversion, no download)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory")
    config = read_config(path)
    weights = read_weights(path)
    if dtype is not None:
        weights = cast_floating(weights, dtype)
    try:
        model = build_model(config, weights)
    except WeightError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    # The checkpoint mirrors timm; for running, the layer scales are folded into the linears.
    model.vision_tower.fuse()
    if not lazy:
        mx.eval(model.parameters())
    processor = Processor.from_pretrained(path, config)
    model.limit_vocabulary(len(processor.tokenizer))
    return model, processor


def cache_root() -> Path:
    return Path(os.environ.get("FASTVLM_MLX_CACHE", Path.home() / ".cache" / "fastvlm_mlx"))


def _source_key(src: Path) -> str:
    """Names and sizes and mtimes of the source's files: a new snapshot, a new conversion."""
    h = hashlib.sha256(str(src.resolve()).encode())
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def converted_path(path_or_repo: Union[str, Path]) -> Path:
    """A converted directory for PATH_OR_REPO, converting (once, into the cache) when needed."""
    # The converter is imported only here: loading a converted directory does not need it.
    from .checkpoint import resolve_source
    from .convert import convert

    path = Path(path_or_repo).expanduser()
    if path.is_dir() and is_converted(path):
        return path
    src = resolve_source(path_or_repo)
    if is_converted(src):
        return src
    name = re.sub(r"[^\w.-]+", "--", str(path_or_repo)).strip("-")[-80:]
    dst = cache_root() / f"{name}-{_source_key(src)}"
    if not is_converted(dst):
        convert(src, dst, dtype="float16", force=True)
    return dst


def load(
    path_or_repo: Union[str, Path], dtype: Optional[mx.Dtype] = None, lazy: bool = False
) -> Tuple[Model, Processor]:
    """Load FastVLM: `model, processor = load("apple/FastVLM-0.5B")`.

    PATH_OR_REPO is a converted directory, or a checkpoint in any layout the converter reads
    (a directory or a hub id), which is converted once to float16 into the cache
    ($FASTVLM_MLX_CACHE, default ~/.cache/fastvlm_mlx) and reused after that. `dtype` casts the
    floating-point weights (float32, float16, bfloat16) after loading.
    """
    return load_converted(converted_path(path_or_repo), dtype=dtype, lazy=lazy)
