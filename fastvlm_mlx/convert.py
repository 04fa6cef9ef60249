"""Convert a FastVLM checkpoint (Apple, transformers or MLX layout) into a fastvlm_mlx directory.

    python -m fastvlm_mlx.convert --model SRC --out DST [--dtype float16] [-q --q-bits 4] [--force]

The layout is detected from the tensors' names, never from the directory's name. The output is
written to a hidden directory beside DST and put in its place in one step, so that a run killed at
any point leaves DST as it was or complete. An existing DST is replaced only when it is empty or
holds a converted model and nothing else (with --force); anything else there is never deleted.
"""

import ctypes
import errno
import os
import re
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
from .config import DTYPES, is_converted
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
    dst = destination(dst, force)
    remove_leftovers(dst)  # before the conversion, which may need their space
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
    write_atomically(dst, lambda tmp: save_converted(tmp, model, out_config, src), force)
    return dst


# -- the destination: checked, replaced in one step, leftovers of killed runs removed ----------


def _written_by_conversion(name: str) -> bool:
    """Whether NAME is a file a conversion writes (save_converted)."""
    return (name in ("config.json", "model.safetensors.index.json") or name in TOKENIZER_FILES
            or re.fullmatch(r"model.*\.safetensors", name) is not None)


def destination(dst, force: bool = False) -> Path:
    """The directory to write for --out DST, checked. A symlink is written through (its target
    is replaced, the link stays). Refused: a file; the current directory or one holding it;
    without FORCE anything not empty; with FORCE anything but a converted model (files a
    conversion does not write are never deleted)."""
    given = Path(dst).expanduser()
    try:
        dst = given.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise ConvertError(f"--out {given} cannot be resolved: {e}") from None
    cwd = Path.cwd().resolve()
    if dst == cwd or dst in cwd.parents:
        raise ConvertError(f"--out {given} is the current directory or holds it, and the output "
                           "replaces --out as a whole: name a directory to create, such as --out mlx/model")
    if not dst.exists():
        return dst
    if not dst.is_dir():
        raise ConvertError(f"--out {given} exists and is not a directory: refusing to replace it")
    names = sorted(p.name for p in dst.iterdir())
    if not names:
        return dst
    if not force:
        raise ConvertError(f"{given} exists and is not empty: pass --force to replace it")
    foreign = [n for n in names if not _written_by_conversion(n)]
    if foreign:
        raise ConvertError(f"{given} holds files a conversion does not write ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}): --force replaces only a converted "
                           "model, so move them or choose another --out")
    if not is_converted(dst):
        raise ConvertError(f"{given} holds no converted model (its config.json is not ours): "
                           "--force replaces only a converted model")
    return dst


_LEFTOVER = r"\.{name}\.(tmp|old)(?:-(\d+)-[^/]*|-[^/]*)?"


def _process_alive(pid: Optional[str]) -> bool:
    if pid is None:  # (named by an older version, without its PID)
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(dst: Path) -> None:
    """Delete the hidden `.NAME.tmp-PID-*` (and `.NAME.old-PID-*`) beside DST of runs that were
    killed (PID no longer running); a run killed between the two renames of the fallback below
    left DST absent and its old copy aside: that copy is put back first."""
    if not dst.parent.is_dir():
        return
    pattern = re.compile(_LEFTOVER.format(name=re.escape(dst.name)))
    stale = []
    for path in dst.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and not _process_alive(m.group(2)):
            stale.append((m.group(1), path))
    for kind, path in stale:
        if kind == "old" and not os.path.lexists(dst) and path.is_dir():
            path.rename(dst)
        else:
            _remove(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths A and B in one step (renameat2 RENAME_EXCHANGE on Linux, renamex_np
    RENAME_SWAP on macOS); False where the system or the file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    old, new = os.fsencode(a), os.fsencode(b)
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        failed = libc.renameat2(at_fdcwd, old, at_fdcwd, new, rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        failed = libc.renamex_np(old, new, rename_swap)
    else:
        return False
    if not failed:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_atomically(dst: Path, write, force: bool = True) -> None:
    """`write(tmp)` into a hidden directory beside DST (checked by `destination`, with FORCE),
    then put it in DST's place in one step:
    a rename when DST is absent, else an exchange of the two, after which the old one (now at the
    temporary name) is deleted. Wherever the process dies, DST is as it was or complete. Without
    an exchange (another system), DST is renamed aside first, and a run killed between the two
    renames leaves it aside, where the next run puts it back."""
    dst = destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dst)
    prefix = f".{dst.name}.tmp-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
    try:
        try:
            write(tmp)
        except (OSError, RuntimeError) as e:  # mlx's writer raises RuntimeError("[write] ...")
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConvertError(f"cannot write the converted model in {dst.parent}: {reason} "
                               "(is the disk full?)") from None
        destination(dst, force)  # as checked before the conversion: nothing else came there since
        if not os.path.lexists(dst):
            tmp.rename(dst)
        elif not _exchange(tmp, dst):
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-{os.getpid()}-", dir=dst.parent))
            old.rmdir()
            dst.rename(old)
            tmp.rename(dst)
            _remove(old)
    finally:
        _remove(tmp)  # the old model after an exchange; the half-written one after a failure


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
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty --out that holds a converted model (and nothing else)")
    return p


def run_cli(a) -> int:
    out = convert(
        a.model, a.out, a.dtype, quantize=a.quantize or a.q_bits is not None,
        q_bits=a.q_bits or 4, q_group_size=a.q_group_size, force=a.force,
    )
    print(f"converted {a.model} -> {out}", file=sys.stderr)
    return 0


# The one CLI policy: every failure (a refused source, a refused pickle's many lines, a full
# disk) is one `error:` line.
main = _cli.main_of(build_parser, run_cli, needs_stdout=False)
make_callable(__name__)  # fastvlm_mlx.convert(...) calls convert()


if __name__ == "__main__":  # the package's own copy of this module (see __init__)
    from fastvlm_mlx.convert import main as package_main

    sys.exit(package_main())
