"""The one policy of every command-line tool (generate, chat, server, convert, benchmark, verify).

- Usage errors: one `error: ...` line and exit 2 (no argparse usage block); `--help` shows every
  default.
- Any other failure: one `error: ...` line on stderr and exit 1 (never a traceback); Ctrl+C is
  130; a reader that goes away (`| head`) ends it quietly with 1.
- A closed stdin or stderr (`0<&-`) is read as /dev/null; a closed stdout (`>&-`) is an error
  for the tools whose output is their product.
- Warnings print as one `warning: ...` line.
- The flags several tools share (model, dtype, resolution, max pixels, mlx-lm's KV-cache flags)
  are defined here once.
"""

import argparse
import os
import sys
import warnings
from typing import Callable, Optional, Sequence

from .extras import MissingDependency

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_MODEL = "apple/FastVLM-0.5B"
DTYPE_NAMES = ("float32", "float16", "bfloat16")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every default shown; descriptions and epilogs laid out as written.

    A flag's default is appended as "(default: X)" unless its help already says what the default
    is (a None default means "what the model or the environment says", which only words can
    tell), or the flag is a switch (off unless given) or required."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or action.required or not action.option_strings
                or default is None or default is False or default is argparse.SUPPRESS
                or default == []):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults in --help and usage errors in one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print_error(f"{message} (see --help)")
        sys.exit(EXIT_USAGE)


def print_error(message) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def install_warning_hook() -> None:
    """Warnings as one `warning:` line; transformers' chatter off."""
    warnings.showwarning = _show_warning
    # transformers (behind mlx-lm's tokenizer loader) warns about our config's model type.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _open_standard_streams() -> bool:
    """Put /dev/null on each closed standard descriptor, so that no file opened later takes its
    number (MLX refuses to read a model file that got descriptor 0); returns whether stdout
    was open."""
    was_open = {}
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        was_open[fd] = _is_open(fd)
        if not was_open[fd]:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))
    return was_open[1]


def run(main: Callable[[argparse.Namespace], int], args: argparse.Namespace,
        needs_stdout: bool = True) -> int:
    """Run a tool's body under the policy above; returns its exit code."""
    install_warning_hook()
    if not _open_standard_streams() and needs_stdout:
        print_error("standard output is closed (>&-): there is nowhere to write the output; "
                    "send it to /dev/null if it is not wanted")
        return EXIT_ERROR
    try:
        return main(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`); silence the flush at exit as well.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except (ValueError, OSError, MissingDependency) as e:  # InputError, ModelLoadError, ConvertError,
        # I/O errors, an optional package that is not installed (its line names the extra)
        print_error(e)
        return EXIT_ERROR
    except Exception as e:  # never a traceback for the user
        print_error(f"{type(e).__name__}: {e}")
        return EXIT_ERROR


def str2bool(text: str) -> bool:
    """mlx-lm's boolean flag values: True/T/yes/1 or False/F/no/0, any case."""
    value = text.strip().lower()
    if value in ("true", "t", "yes", "y", "1"):
        return True
    if value in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not True or False")


def positive(cast: Callable):
    """An argparse type: a number > 0."""

    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    parse.__name__ = cast.__name__
    return parse


# -- the shared flags ------------------------------------------------------------------------------


def add_model_arg(p: argparse.ArgumentParser, default: Optional[str] = DEFAULT_MODEL) -> None:
    p.add_argument("--model", default=default,
                   help="a converted directory, an unconverted checkpoint directory or a hub id "
                   "(converted once into the cache)")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="cast the weights after loading (default: as converted, or float32 when "
                   "MLX runs on the CPU, whose half-precision matmul is slow)")


def add_temperature_arg(p: argparse.ArgumentParser, dest: str = "temp", default=None,
                        when: str = "") -> None:
    p.add_argument("--temp", "--temperature", dest=dest, type=float, default=default,
                   help=f"sampling temperature{when}; 0 is greedy (default: the model's "
                   "generation_config.json, else 0)")


def add_resolution_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", type=int, default=None,
                   help="image resolution, a multiple of 64 (default: the model's trained size)")


def add_max_pixels_arg(p: argparse.ArgumentParser, default_text: str = "100M") -> None:
    p.add_argument("--max-pixels", type=positive(int), default=None,
                   help=f"refuse images with more pixels (default {default_text}, or $FASTVLM_MAX_PIXELS)")


def add_run_args(p: argparse.ArgumentParser, max_pixels_text: str = "100M") -> None:
    """How the model runs on images: --resolution, --max-pixels, --dtype."""
    add_resolution_arg(p)
    add_max_pixels_arg(p, max_pixels_text)
    add_dtype_arg(p)


def add_verbosity_args(p: argparse.ArgumentParser, what: str) -> None:
    """mlx-lm's `--verbose [True|False]` (default True), and `--quiet` for `--verbose False`;
    both set ARGS.quiet."""
    p.add_argument("--verbose", dest="quiet", nargs="?", const=False, default=False, metavar="BOOL",
                   type=lambda text: not str2bool(text),
                   help=f"print {what} on stderr (mlx-lm's flag; default True)")
    p.add_argument("--quiet", dest="quiet", action="store_true", help="the same as --verbose False")


def add_tile_args(p: argparse.ArgumentParser) -> None:
    """AnyRes tiles for a single-view checkpoint (tiles.py): --tiles, --tile-size."""
    p.add_argument("--tiles", default=None, metavar="COLSxROWS",
                   help="experimental: encode each image as a grid of tiles (such as 2x2) beside "
                   "a global view (default: one view, or the model's own tiling)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="each tile's (and the global view's) resolution, a multiple of 64 "
                   "(default: --resolution, else the trained size)")


def tile_options(args: argparse.Namespace) -> dict:
    """--tiles and --tile-size as stream_generate options, the grid checked now (before the
    model loads)."""
    from .tiles import parse_grid

    return dict(tiles=None if args.tiles is None else parse_grid(args.tiles), tile_size=args.tile_size)


def add_kv_args(p: argparse.ArgumentParser) -> None:
    """mlx-lm's KV-cache flags, passed straight through."""
    g = p.add_argument_group("KV cache (mlx-lm's flags)")
    # (their ranges are checked with the sampling options, by GenerationOptions.check)
    g.add_argument("--max-kv-size", type=int, default=None,
                   help="a rotating KV cache of this many tokens (default: unbounded)")
    g.add_argument("--prefill-step-size", type=int, default=2048,
                   help="prompt positions prefilled per step")
    g.add_argument("--kv-bits", type=int, default=None,
                   help="quantize the KV cache to these bits (default: not quantized)")
    g.add_argument("--kv-group-size", type=int, default=64, help="group size of KV quantization")
    g.add_argument("--quantized-kv-start", type=int, default=5000,
                   help="quantize the KV cache once it holds this many tokens")


def kv_options(args: argparse.Namespace) -> dict:
    return dict(max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size,
                kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                quantized_kv_start=args.quantized_kv_start)


def main_of(build_parser: Callable[[], argparse.ArgumentParser], body: Callable,
            needs_stdout: bool = True) -> Callable:
    """A console-script entry point: parse ARGV with BUILD_PARSER, run BODY under the policy."""

    def main(argv: Optional[Sequence[str]] = None) -> int:
        return run(body, build_parser().parse_args(argv), needs_stdout)

    return main
