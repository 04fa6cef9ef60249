"""Convert a FastVLM checkpoint (Apple, transformers or MLX layout) into a fastvlm_mlx directory.

    python -m fastvlm_mlx.convert --model SRC --out DST [--dtype float16] [-q --q-bits 4] [--force]

The layout is detected from the tensors' names, never from the directory's name. The output is
written to a temporary directory beside DST and renamed into place, so an interrupted run leaves
nothing half-made.
"""

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import _cli
from ._callable_module import make_callable
from .checkpoint import (
    ConvertError,
    build_config,
    check_source,
    read_source_weights,
    resolve_source,
    source_layout,
)
from .config import DTYPES
from .model import Model, build_model
from .weights import WeightError, cast_floating, sanitize

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json",
)


def save_converted(dst: Path, model: Model, config: dict, tokenizer_src: Optional[Path]) -> None:
    """Write config.json, model*.safetensors (mlx-lm's sharding) and the tokenizer files."""
    from mlx_lm.utils import save_config, save_model

    save_model(dst, model)
    save_config(dict(config), dst / "config.json", keep_vision_config=True)
    if tokenizer_src is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_src / name).is_file():
                shutil.copy2(tokenizer_src / name, dst / name)


def quantize_model(model: Model, config: dict, q_bits: int, q_group_size: int) -> dict:
    """Quantize the decoder and connector in place with mlx-lm; returns the config with its
    `quantization` block. The vision tower stays in its dtype: its convs have no quantized
    kernels, and it is a small share of the weights."""
    from mlx_lm.utils import quantize_model as mlx_lm_quantize

    _, config = mlx_lm_quantize(
        model, config, q_group_size, q_bits,
        quant_predicate=lambda p, m: p.startswith(("language_model.", "multi_modal_projector.")),
    )
    config["quantization"] = {
        k: v for k, v in config["quantization"].items() if k in ("group_size", "bits", "mode")
    }
    return config


def convert(
    src,
    dst,
    dtype: str = "float16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
) -> Path:
    """Convert SRC (directory or hub id) into the fastvlm_mlx directory DST; returns DST."""
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r} (float16, bfloat16 or float32)")
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise ConvertError(f"{dst} exists and is not empty: pass --force to replace it")
    src = resolve_source(src)
    check_source(src)
    raw = read_source_weights(src)
    if not ((src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file()):
        raise ConvertError(f"{src} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    layout = source_layout(src, raw)
    try:
        weights = sanitize(raw, layout)
        del raw
        config = build_config(src, layout, weights)
        if config.quantization and quantize:
            raise ConvertError(f"{src} is already quantized ({config.quantization['bits']} bits)")
        weights = cast_floating(weights, DTYPES[dtype])
        model = build_model(config, weights)
    except WeightError as e:
        raise ConvertError(str(e)) from None
    del weights
    out_config = config.to_dict()
    if quantize:
        out_config = quantize_model(model, out_config, q_bits, q_group_size)
    mx.eval(model.parameters())
    write_atomically(dst, lambda tmp: save_converted(tmp, model, out_config, src))
    return dst


def write_atomically(dst: Path, write) -> None:
    """`write(tmp)` into a temporary directory beside DST, then rename it into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    old = dst.with_name(f".{dst.name}.old")
    try:
        write(tmp)
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def build_parser():
    p = _cli.ArgumentParser(prog="fastvlm-convert", description=__doc__.splitlines()[0])
    p.add_argument("--model", "--hf-path", dest="model", required=True,
                   help="the source: a checkpoint directory (any layout above) or a hub id")
    p.add_argument("--out", "--mlx-path", dest="out", required=True, help="the output directory")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES),
                   help="the dtype of every floating tensor (each cast once)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize the decoder and connector (mlx-lm's quantization)")
    p.add_argument("--q-bits", type=int, choices=(4, 8), default=None,
                   help="bits per quantized weight (default 4; implies -q)")
    p.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64,
                   help="quantization group size")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def run_cli(a) -> int:
    out = convert(
        a.model, a.out, a.dtype, quantize=a.quantize or a.q_bits is not None,
        q_bits=a.q_bits or 4, q_group_size=a.q_group_size, force=a.force,
    )
    print(f"converted {a.model} -> {out}", file=sys.stderr)
    return 0


main = _cli.main_of(build_parser, run_cli)
make_callable(__name__)  # fastvlm_mlx.convert(...) calls convert()


if __name__ == "__main__":  # the package's own copy of this module (see __init__)
    from fastvlm_mlx.convert import main as package_main

    sys.exit(package_main())
