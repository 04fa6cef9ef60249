"""Benchmark: time to first token and its parts, decode speed and peak memory, over a sweep of
resolutions, with the alternatives timed the same way in the same process.

    python -m fastvlm_mlx.benchmark --arch 0.5b                      # random weights, no download
    python -m fastvlm_mlx.benchmark --model apple/FastVLM-0.5B --resolutions 512,1024
    python -m fastvlm_mlx.benchmark --arch 0.5b --compare torch,mlx-vlm --json out.json --plot out.png

Our runtime is timed through `stream_generate` itself, so the clock is generate.py's (the same
parts as every other TTFT this package reports), with the feature cache off and a decoded image
in hand (file decoding is outside TTFT). The peers (peers.py: transformers and mlx-vlm) are
timed part by part at the same boundaries, each closed by the runtime's own synchronization;
every runtime answers `run(inputs) -> Timings` for the same `peers.Inputs`. Random weights at
the released shapes (`--arch`) are random_model.py's.
Every prompt has the same text-token count (`--prompt-tokens`) and one image; EOS is masked so
that every run decodes `--tokens` tokens.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import _cli
from .config import DTYPES
from .convert import current_umask
from .extras import require
from .loader import runtime_dtype
from .peers import PEERS, Inputs, PeerUnavailable, no_eos_greedy, others_bytes, unavailable
from .processing import DEFAULT_SYSTEM, format_prompt
from .random_model import ARCHS, random_model
from .timing import TTFT_PARTS, Timings

OURS = "fastvlm-mlx"
# The parts of TTFT, in order, then the rest; all are Timings fields (timing.py).
PARTS = TTFT_PARTS
METRICS = PARTS + ("ttft_ms", "decode_tps", "peak_memory_gb")


class BenchmarkError(ValueError):
    """A setting or environment the benchmark cannot run with; one line says why."""


# ----------------------------------------------------------------------------------------------
# Our model: a converted one, or random weights at the released shapes (random_model.py)


def load_model(path: str, dtype: mx.Dtype, q_bits: Optional[int], q_group_size: int):
    from .convert import quantize_model
    from .loader import load

    model, processor = load(path, dtype=dtype)
    if q_bits:
        if model.config.quantization:
            raise BenchmarkError(f"{path} is already quantized: drop --q-bits")
        quantize_model(model, model.config.to_dict(), q_bits, q_group_size)
        mx.eval(model.parameters())
    return model, processor


# ----------------------------------------------------------------------------------------------
# The inputs every runtime gets


def source_image(resolution: int) -> np.ndarray:
    """A decoded 4:3 photo-sized RGB array (uint8), so preprocessing pads and resizes as usual."""
    rng = np.random.default_rng(resolution)
    return rng.integers(0, 256, (resolution * 3 // 4, resolution, 3), dtype=np.uint8)


def user_text(processor, n_text_tokens: int, resolution: int) -> str:
    """A user prompt whose templated form holds exactly `n_text_tokens` text tokens."""
    base = "Describe the image"

    def count(text):
        return len(prompt_ids(processor, text, resolution)) - processor.tokens_per_image(resolution)

    have = count(base)
    if n_text_tokens < have:
        raise BenchmarkError(f"--prompt-tokens must be at least {have} (the template and a question)")
    # Grow the question word by word; BPE merges make a word's token count depend on context.
    text, n = base, have
    while n < n_text_tokens:
        for word in (" in detail", " detail", " the", " a", ".", "!"):
            m = count(text + word)
            if n < m <= n_text_tokens:
                text, n = text + word, m
                break
        else:
            raise BenchmarkError(f"cannot build a prompt of exactly {n_text_tokens} text tokens")
    return text


def prompt_ids(processor, text: str, resolution: int) -> List[int]:
    """The templated prompt's ids, one `image_token_id` slot per image feature row."""
    return processor.encode(format_prompt(text, 1, DEFAULT_SYSTEM), resolution)


# ----------------------------------------------------------------------------------------------
# Our runtime, behind the peers' interface (peers.py)


class Ours:
    """fastvlm-mlx, the runtime measured, behind the peers' `run(inputs) -> Timings`.

    It is not timed here: `stream_generate` reports the Timings every user of the package gets
    (the boundaries the peers copy), read by field name, so either Timings type will do. It
    stays beside the sweep that compares the peers to it; peers.py never imports generate."""

    name = OURS

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.sampler = no_eos_greedy(processor.eos_token_ids, model.vocab_size)
        self.device = str(mx.default_device())

    def run(self, inputs: Inputs) -> Timings:
        from .generate import stream_generate

        others = others_bytes(self.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a resolution other than the trained one warns
            last = None
            for last in stream_generate(
                self.model, self.processor, inputs.text, images=[inputs.image],
                resolution=inputs.resolution, max_tokens=inputs.tokens, sampler=self.sampler,
                feature_cache=False,
            ):
                pass
        t = last.timings
        return Timings(
            **{k: getattr(t, k) for k in PARTS + ("decode_tps",)},
            peak_memory_gb=t.peak_memory_gb - others / 1e9,
        )


# ----------------------------------------------------------------------------------------------
# The sweep


@dataclass
class Result:
    runtime: str
    device: str
    resolution: int
    image_tokens: int
    prompt_tokens: int
    samples: Dict[str, List[float]] = field(default_factory=dict)

    def summary(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for k in METRICS:
            vals = [v for v in self.samples.get(k, []) if v == v]  # NaN: not measured
            if vals:
                out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        return out

    def median(self, key: str) -> float:
        s = self.summary().get(key)
        return s["median"] if s else float("nan")

    def to_dict(self) -> dict:
        return {
            "runtime": self.runtime, "device": self.device, "resolution": self.resolution,
            "image_tokens": self.image_tokens, "prompt_tokens": self.prompt_tokens,
            "runs": len(self.samples.get("ttft_ms", [])), "metrics": self.summary(),
            "samples": {k: [None if v != v else v for v in vs] for k, vs in self.samples.items()},
        }


def sweep(ours: Ours, peers: Sequence, resolutions: Sequence[int], n_text: int, tokens: int,
          runs: int, warmup: int, quiet: bool = False) -> List[Result]:
    processor = ours.processor
    eos = list(processor.eos_token_ids)
    runtimes = [ours] + list(peers)
    progress = tqdm(total=len(resolutions) * len(runtimes) * (runs + warmup), unit="run",
                    file=sys.stderr, disable=quiet, dynamic_ncols=True)
    results = []
    text = None
    for res in resolutions:
        text = text or user_text(processor, n_text, res)
        ids = prompt_ids(processor, text, res)
        inputs = Inputs(image=source_image(res), text=text, ids=ids,
                        image_slots=processor.tokens_per_image(res), resolution=res,
                        tokens=tokens, eos_ids=eos)
        for rt in runtimes:
            r = Result(rt.name, rt.device, res, inputs.image_slots, len(ids))
            for i in range(warmup + runs):
                kind = "warmup" if i < warmup else f"run {i - warmup + 1}/{runs}"
                progress.set_description(f"{rt.name} {res}px {kind}")
                timings = rt.run(inputs)
                progress.update()
                if i >= warmup:
                    for k in METRICS:
                        r.samples.setdefault(k, []).append(float(getattr(timings, k)))
            results.append(r)
    progress.close()
    return results


# ----------------------------------------------------------------------------------------------
# Reports


def _cell(summary: dict, key: str, digits: int = 1) -> str:
    s = summary.get(key)
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def format_table(results: List[Result]) -> str:
    head = ("runtime", "res", "img tok", "preprocess ms", "vision ms", "connector ms", "prefill ms",
            "first tok ms", "TTFT ms", "decode tok/s", "peak GB")
    rows = [head]
    for r in results:
        s = r.summary()
        rows.append((r.runtime, str(r.resolution), str(r.image_tokens), _cell(s, "preprocess_ms"),
                     _cell(s, "vision_ms"), _cell(s, "connector_ms"), _cell(s, "prefill_ms"),
                     _cell(s, "first_token_ms"), _cell(s, "ttft_ms"), _cell(s, "decode_tps"),
                     _cell(s, "peak_memory_gb", 2)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(median [min-max] over runs)"


def ratios(results: List[Result]) -> List[dict]:
    """Peer / ours for TTFT and the vision encoder (above 1: we are faster), decode ours / peer."""
    ours = {r.resolution: r for r in results if r.runtime == OURS}
    out = []
    for r in results:
        if r.runtime == OURS or r.resolution not in ours:
            continue
        o = ours[r.resolution]
        out.append({
            "peer": r.runtime, "resolution": r.resolution,
            "ttft_speedup": r.median("ttft_ms") / o.median("ttft_ms"),
            "vision_speedup": r.median("vision_ms") / o.median("vision_ms"),
            "decode_speedup": o.median("decode_tps") / r.median("decode_tps"),
        })
    return out


def format_ratios(rows: List[dict]) -> str:
    lines = [f"{OURS} speed-up (peer time / ours; decode: our tok/s / peer's):"]
    for r in rows:
        lines.append(
            f"  vs {r['peer']:8s} {r['resolution']:5d}px  TTFT {r['ttft_speedup']:.2f}x  "
            f"vision {r['vision_speedup']:.2f}x  decode {r['decode_speedup']:.2f}x"
        )
    return "\n".join(lines)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)`, then rename over PATH: a failed run leaves no half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's file is 0600; a plain open's follows the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(results: List[Result], path: Path, title: str) -> None:
    """TTFT and its parts against resolution (stacked, ours) and TTFT against image tokens (all)."""
    require("plot", "plot()")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in results if r.runtime == OURS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    x = np.arange(len(ours))
    bottom = np.zeros(len(ours))
    # The parts in shades of grey, the runtimes (right) in the default colour cycle: no colour
    # means a part on the left and a runtime on the right.
    shades = plt.get_cmap("Greys")(np.linspace(0.25, 0.9, len(PARTS)))
    for part, shade in zip(PARTS, shades):
        vals = np.array([r.median(part) for r in ours])
        left.bar(x, vals, bottom=bottom, color=shade, label=part[:-3].replace("_", " "))
        bottom += vals
    left.set_xticks(x, [f"{r.resolution}px\n{r.image_tokens} tok" for r in ours])
    left.set_ylabel("ms")
    left.set_title(f"{OURS}: TTFT by part")
    left.legend(fontsize=8)
    for name in dict.fromkeys(r.runtime for r in results):
        rs = [r for r in results if r.runtime == name]
        tokens = [r.image_tokens for r in rs]
        (line,) = right.plot(tokens, [r.median("ttft_ms") for r in rs], "o-", label=f"{name} TTFT")
        right.plot(tokens, [r.median("vision_ms") for r in rs], "o--", color=line.get_color(),
                   label=f"{name} vision")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("image tokens")
    right.set_ylabel("ms (median)")
    right.set_title("TTFT (solid) and vision encoder (dashed) against image tokens")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The CLI


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="fastvlm-benchmark",
        description="Time to first token and its parts, decode speed and peak memory over "
        "resolutions, optionally side by side with PyTorch and mlx-vlm.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a converted model, or a checkpoint/hub id load() converts "
                     "(default: --arch 0.5b)")
    src.add_argument("--arch", choices=sorted(ARCHS), help="random weights of the real shapes (default 0.5b)")
    p.add_argument("--resolutions", default="256,512,768,1024,1536",
                   help="comma-separated multiples of 64")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="default float16, or float32 when MLX runs on the CPU (whose half-precision "
                   "matmul is slow)")
    p.add_argument("--q-bits", type=int, choices=(4, 8),
                   help="quantize the decoder and connector (default: not quantized)")
    p.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64,
                   help="quantization group size")
    p.add_argument("--prompt-tokens", type=int, default=28, help="text tokens of the prompt, template included")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate per run (decode speed)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per runtime and resolution")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--json", metavar="F", help="write the results as JSON to F")
    p.add_argument("--plot", metavar="F.png",
                   help="draw TTFT and its parts into F.png (the plot extra: matplotlib)")
    p.add_argument("--compare", default="",
                   help="peers timed in the same run, comma-separated: torch, mlx-vlm (a peer "
                   "that is not installed is skipped with a note; default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_resolutions(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchmarkError(f"--resolutions takes comma-separated integers, got {text!r}") from None
    bad = [v for v in values if v <= 0 or v % 64]
    if not values or bad:
        raise BenchmarkError(f"--resolutions must be positive multiples of 64, got {text!r}")
    return values


def parse_peers(text: str) -> List[str]:
    peers = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in peers if v not in PEERS]
    if unknown:
        raise BenchmarkError(f"--compare: unknown peer(s) {', '.join(unknown)} (torch, mlx-vlm)")
    return list(dict.fromkeys(peers))


OPENBLAS = ("/usr/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/aarch64-linux-gnu/libopenblas.so.0")


def openblas_library() -> Optional[str]:
    """Debian's OpenBLAS for this machine, where it is installed."""
    return next((f for f in OPENBLAS if os.path.exists(f)), None)


def openblas_note() -> Optional[str]:
    """On Linux, MLX's CPU wheel bundles a reference BLAS 20-60x slower than OpenBLAS for float32
    matmul (scripts/test.sh); a note on how to preload it when it is not loaded, else None."""
    if platform.system() != "Linux" or mx.default_device() != mx.cpu:
        return None
    try:
        if "libopenblas" in Path("/proc/self/maps").read_text():
            return None
    except OSError:
        return None
    lib = openblas_library()
    how = (f"LD_PRELOAD={lib}" if lib else
           "apt-get install libopenblas0-pthread, then LD_PRELOAD=/usr/lib/<arch>-linux-gnu/libopenblas.so.0")
    return f"MLX's CPU matmul is 20-60x faster with OpenBLAS: run with {how} (README, Set-up)"


def environment(args, dtype_name: str) -> dict:
    import mlx_lm

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m fastvlm_mlx.benchmark " + " ".join(sys.argv[1:]),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "device": str(mx.default_device()),
        "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
        "model": args.model or f"random weights, FastVLM-{(args.arch or '0.5b').upper()} shapes",
        "dtype": dtype_name, "q_bits": args.q_bits,
        "prompt_tokens": args.prompt_tokens, "tokens": args.tokens,
        "runs": args.runs, "warmup": args.warmup,
    }
    if mx.default_device() == mx.gpu:
        try:
            env["gpu"] = mx.device_info().get("device_name")
        except Exception:  # device_info is backend-dependent
            pass
    return env


def run(args) -> int:
    resolutions = parse_resolutions(args.resolutions)
    peers = parse_peers(args.compare)
    skipped = {name: why for name in peers if (why := unavailable(name))}  # the others still run
    peers = [name for name in peers if name not in skipped]
    for name, value, low in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0),
                             ("--tokens", args.tokens, 1), ("--prompt-tokens", args.prompt_tokens, 1)):
        if value < low:
            raise BenchmarkError(f"{name} must be at least {low}, got {value}")
    if args.plot:
        require("plot", "--plot")
    for out in (args.json, args.plot):
        if out and not Path(out).resolve().parent.is_dir():
            raise BenchmarkError(f"cannot write {out}: its directory does not exist")
        if out and not os.access(Path(out).resolve().parent, os.W_OK):
            raise BenchmarkError(f"cannot write {out}: its directory is not writable")
    dtype = runtime_dtype(args.dtype) or mx.float16
    dtype_name = str(dtype).split(".")[-1]

    if args.model:
        model, processor = load_model(args.model, dtype, args.q_bits, args.q_group_size)
    else:
        model, processor = random_model(args.arch or "0.5b", dtype, args.q_bits, args.q_group_size)
    ours = Ours(model, processor)
    try:
        runtimes = [PEERS[peer](model.config, dtype, args.q_bits, args.q_group_size) for peer in peers]
    except PeerUnavailable as e:
        raise BenchmarkError(str(e)) from None
    user_text(processor, args.prompt_tokens, resolutions[0])  # refuses a too-short --prompt-tokens
    # The notes come once every setting is known good (and before any timing): bad input gets
    # its one line, nothing more.
    for why in skipped.values():
        print(f"note: skipping {why}", file=sys.stderr, flush=True)
    note = openblas_note()
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)

    env = environment(args, dtype_name)
    print(f"# {env['model']} | {dtype_name}{f' q{args.q_bits}' if args.q_bits else ''} | "
          f"{env['device']} | mlx {env['mlx']} | {args.prompt_tokens} text tokens + image, "
          f"{args.tokens} generated | {args.runs} runs after {args.warmup} warm-up", flush=True)
    results = sweep(ours, runtimes, resolutions, args.prompt_tokens, args.tokens, args.runs,
                    args.warmup, quiet=args.quiet)
    print(format_table(results))
    rows = ratios(results)
    if rows:
        print(format_ratios(rows))
    if args.json:
        doc = {**env, "results": [r.to_dict() for r in results], "ratios": rows,
               "skipped_peers": skipped}
        write_atomically(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
        print(f"wrote {args.json}", file=sys.stderr, flush=True)
    if args.plot:
        plot(results, Path(args.plot), f"{env['model']}, {dtype_name}, {env['device']}, {env['date']}")
    return 0


def run_cli(args) -> int:
    try:
        return run(args)
    except OSError as e:  # the JSON or the plot cannot be written: the file's name, in one line
        raise OSError(f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")) from None


main = _cli.main_of(build_parser, run_cli)


if __name__ == "__main__":
    sys.exit(main())
