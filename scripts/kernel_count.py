"""Count the GPU kernels of one FastViTHD forward and one decoder prefill step, per primitive.

    python scripts/kernel_count.py [--resolutions 256,1024] [--positions 272] [--dtype float16]
                                   [--sdpa cuda|metal] [--as-built] [--compile-tower] [--json PATH]

On a GPU the vision tower is bound by the cost per kernel, not by arithmetic (BENCHMARKS.md), so
the number of kernels one forward launches is the figure to watch. It is measured without
evaluating anything, on any backend (this machine's CPU, CI), so it needs no GPU:

1. Build the lazy output of the forward in the formulation a GPU runs: `vision._on_cpu` returns
   False for the duration, so the tower takes its GPU path (grouped `mx.conv2d`, `nn.gelu`, and
   whatever the GPU path compiles). Parameters and inputs are evaluated first: they are not
   kernels of the forward.
2. Write the graph with `mx.export_to_dot` and count its primitive nodes by name.
3. What is not a kernel is left out: the views and no-ops in `VIEWS` (Reshape, Broadcast,
   Transpose, Slice, ...). A view fed to a kernel is read in place by it.
4. A function under `mx.compile` appears as what a GPU launches for it: each of its fused
   elementwise chains is one `Compiled...` node, counted as one kernel named `Compiled[ops]`,
   beside its unfused primitives (convolutions, matmuls, reductions).
5. `mx.fast` ops (layer_norm, rms_norm, rope, scaled_dot_product_attention) are one kernel on a
   GPU, but on the CPU backend MLX builds their unfused fallback into the graph (a dozen
   elementwise ops for a LayerNorm). While the graph is built they are therefore replaced by a
   stand-in: one marker primitive that MLX's graphs here never use otherwise (a cumulative op,
   see `_FAST_OPS`), renamed to the fast op in the count, with `mx.depends` on the op's other
   inputs. Scaled dot-product attention is one kernel only where the GPU has a fused kernel for
   the shapes and dtype (`--sdpa`, below); elsewhere MLX builds the same fallback on the GPU,
   so the fallback is what is counted.

`--sdpa cuda` (the default: the project's GPU figures are taken on an H100/H200) applies MLX
0.32's CUDA rule, a fused kernel for float16/bfloat16 with head dims a multiple of 8 up to 128;
`--sdpa metal` the Metal rule, which has no fused kernel for the tower's head dim 32 at more than
8 queries. Queries of at most 8 positions are counted as fused on both.

Two caveats the count cannot see, printed beside it: a Reshape of a broadcast or transposed view
copies (one more kernel) unless the strides allow a view, and MLX's CUDA SDPA writes its output
in its query's layout, so the transpose and reshape after the tower's attention stay views there.
The decoder is mlx-lm's Qwen2 at the FastVLM-0.5B shape (random weights, tied embeddings); its
prefill step is what `generate` evaluates: the KV cache after the prompt positions.
"""

import argparse
import contextlib
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

# Run as `python scripts/kernel_count.py`, count the package of the checkout this script is in.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import fastvlm_mlx.vision as V  # noqa: E402

# Primitives that launch nothing: views of their input, or no-ops that share its buffer.
VIEWS = frozenset({
    "AsStrided", "Broadcast", "BroadcastAxes", "Copy", "Depends", "ExpandDims", "Flatten",
    "Reshape", "Slice", "Split", "Squeeze", "StopGradient", "Transpose", "Unflatten",
})
# Views after which a Reshape may have to copy.
_STRIDED_VIEWS = frozenset({"Broadcast", "BroadcastAxes", "Transpose"})

# mx.fast op -> (the GPU primitive it is, the marker that stands in for it in the graph).
_FAST_OPS = {
    "layer_norm": ("LayerNorm", mx.cummax),
    "rms_norm": ("RMSNorm", mx.cummin),
    "rope": ("RoPE", mx.cumprod),
    "scaled_dot_product_attention": ("ScaledDotProductAttention", mx.logcumsumexp),
}
_MARKER_LABELS = {"CumMax": "LayerNorm", "CumMin": "RMSNorm", "CumProd": "RoPE",
                  "CumLogAddExp": "ScaledDotProductAttention"}


def _sdpa_is_fused(q: mx.array, v: mx.array, rules: str) -> bool:
    """Whether MLX 0.32 runs attention of these shapes as one kernel on that GPU backend."""
    if q.shape[2] <= 8:
        return True
    head_dim = q.shape[-1]
    if rules == "metal":
        return head_dim == v.shape[-1] and head_dim in (64, 72, 80, 96, 128, 192, 256)
    return (q.dtype in (mx.float16, mx.bfloat16) and head_dim % 8 == 0 and head_dim <= 128
            and v.shape[-1] % 8 == 0 and v.shape[-1] <= 128)


def _stand_in(name: str, x: mx.array, others) -> mx.array:
    """One marker node shaped like the fast op's output, depending on all of the op's inputs."""
    out = _FAST_OPS[name][1](x, axis=-1)
    deps = [a for a in others if isinstance(a, mx.array)]
    return mx.depends([out], deps)[0] if deps else out


@contextlib.contextmanager
def gpu_formulation(sdpa: str = "cuda", stand_ins: bool = True):
    """While building a graph: the tower's GPU path, and each mx.fast op as its one GPU kernel
    (with `stand_ins` false, the fast ops as this backend builds them).

    Only for counting: the stand-ins compute nothing meaningful, and a function compiled while
    they are in place keeps them in its trace for those shapes. The tower's compiled kernels call
    no mx.fast op; a model whose compiled functions do must be counted fresh and then dropped.
    """
    fast = {name: getattr(mx.fast, name) for name in _FAST_OPS}

    def layer_norm(x, weight, bias, eps, **kw):
        return _stand_in("layer_norm", x, [weight, bias])

    def rms_norm(x, weight, eps, **kw):
        return _stand_in("rms_norm", x, [weight])

    def rope(a, dims, *, offset=0, freqs=None, **kw):
        return _stand_in("rope", a, [offset, freqs])

    def scaled_dot_product_attention(q, k, v, *, scale, mask=None, sinks=None, **kw):
        if not _sdpa_is_fused(q, v, sdpa) or q.shape[-1] != v.shape[-1]:
            return fast["scaled_dot_product_attention"](q, k, v, scale=scale, mask=mask,
                                                        sinks=sinks, **kw)
        return _stand_in("scaled_dot_product_attention", q, [k, v, mask, sinks])

    on_cpu = V._on_cpu
    V._on_cpu = lambda: False
    for f in (layer_norm, rms_norm, rope, scaled_dot_product_attention) if stand_ins else ():
        setattr(mx.fast, f.__name__, f)
    try:
        yield
    finally:
        V._on_cpu = on_cpu
        for name, f in fast.items():
            setattr(mx.fast, name, f)


def _compiled_name(label: str) -> str:
    """'CompiledBroadcastAddErf...' -> 'Compiled[Add+Erf+...]': the fused ops, views dropped."""
    ops = re.findall(r"[A-Z][a-z0-9]*", label[len("Compiled"):])
    kept = [op for op in dict.fromkeys(ops) if op not in VIEWS]
    return "Compiled[" + "+".join(kept) + "]"


def count_kernels(*outputs: mx.array) -> tuple:
    """(kernels per primitive name, reshapes of a broadcast or transposed view) in the graph."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.dot"
        mx.export_to_dot(str(path), *outputs)
        dot = path.read_text()
    # One `{ id [label ="Name"...] }` line per primitive instance (a compiled function's
    # primitives are shared between its calls, so ids repeat), then its input and output edges.
    instances, producer = [], {}  # [(label, input arrays)], array -> producing label
    for line in dot.splitlines():
        if m := re.match(r'\{ \d+ \[label ="([^"]+)"', line):
            instances.append((m.group(1), []))
        elif m := re.match(r'"([^"]+)" -> \d+$', line):
            instances[-1][1].append(m.group(1))
        elif m := re.match(r'\d+ -> "([^"]+)"$', line):
            producer[m.group(1)] = instances[-1][0]
    kernels, reshape_copies = Counter(), 0
    for label, inputs in instances:
        if label in ("Reshape", "Flatten", "Unflatten"):
            reshape_copies += producer.get(inputs[0]) in _STRIDED_VIEWS
        if label in VIEWS:
            continue
        if label.startswith("Compiled"):
            label = _compiled_name(label)
        kernels[_MARKER_LABELS.get(label, label)] += 1
    return kernels, reshape_copies


def _random_tower(dtype: mx.Dtype):
    from fastvlm_mlx.random_model import tame_random_weights
    from fastvlm_mlx.config import VisionConfig

    tower = V.FastViTHD(VisionConfig())
    tame_random_weights(tower)
    tower.set_dtype(dtype)
    tower.fuse().eval()
    mx.eval(tower.parameters())
    return tower


def tower_kernels(size: int, dtype: mx.Dtype = mx.float16, sdpa: str = "cuda", tower=None,
                  stand_ins: bool = True):
    """Kernels of one FastViTHD forward on one (1, size, size, 3) image (a fresh random tower,
    float16 as a GPU runs it, unless one is given)."""
    tower = tower if tower is not None else _random_tower(dtype)
    x = mx.random.uniform(shape=(1, size, size, 3)).astype(dtype)
    mx.eval(x)
    with gpu_formulation(sdpa, stand_ins):
        return count_kernels(tower(x))


def connector_kernels(tokens: int, dtype: mx.Dtype = mx.float16, sdpa: str = "cuda",
                      stand_ins: bool = True):
    """Kernels of the mlp2x_gelu connector on one image's features (3072 -> 896)."""
    from fastvlm_mlx.model import Connector

    connector = Connector(3072, 896)
    connector.set_dtype(dtype)
    mx.eval(connector.parameters())
    features = mx.random.normal((1, tokens, 3072)).astype(dtype)
    mx.eval(features)
    with gpu_formulation(sdpa, stand_ins):
        return count_kernels(connector(features))


def prefill_kernels(positions: int, dtype: mx.Dtype = mx.float16, sdpa: str = "cuda",
                    stand_ins: bool = True, text_config: dict = None):
    """Kernels of one prefill step of an mlx-lm Qwen2 decoder (FastVLM-0.5B's shape unless
    `text_config` says otherwise) over `positions` prompt embeddings, into a fresh KV cache, as
    `generate` runs and evaluates it."""
    from mlx_lm.models import qwen2
    from mlx_lm.models.cache import make_prompt_cache

    from fastvlm_mlx.random_model import arch_config

    text_config = text_config or arch_config("0.5b").text_config
    decoder = qwen2.Model(qwen2.ModelArgs.from_dict(text_config))
    decoder.set_dtype(dtype)
    mx.eval(decoder.parameters())
    embeddings = mx.random.normal((1, positions, decoder.args.hidden_size)).astype(dtype)
    ids = mx.zeros((1, positions), mx.int32)
    mx.eval(embeddings, ids)
    cache = make_prompt_cache(decoder)
    with gpu_formulation(sdpa, stand_ins):
        decoder(ids, cache=cache, input_embeddings=embeddings)
        return count_kernels(*[a for c in cache for a in c.state if isinstance(a, mx.array)])


def _table(columns: dict) -> str:
    """Markdown table: one row per kernel name, one column per measurement, totals first."""
    names = sorted({n for counts, _ in columns.values() for n in counts},
                   key=lambda n: (-max(c[n] for c, _ in columns.values()), n))
    lines = ["| kernel | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines.append("| **total** | " + " | ".join(
        f"**{sum(c.values())}**" for c, _ in columns.values()) + " |")
    for n in names:
        lines.append(f"| {n} | " + " | ".join(str(c[n] or "") for c, _ in columns.values()) + " |")
    lines.append("| (reshapes of a broadcast/transposed view, not in the total) | "
                 + " | ".join(str(r) for _, r in columns.values()) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", default="256,1024")
    p.add_argument("--positions", type=int, default=272,
                   help="decoder prefill length (default 272: 256 image rows + 16 text)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--sdpa", choices=["cuda", "metal"], default="cuda",
                   help="which GPU backend's fused-attention rule to apply")
    p.add_argument("--as-built", action="store_true",
                   help="count the mx.fast ops as this backend builds them (on the CPU their "
                        "unfused fallbacks), not as the one kernel each is on a GPU")
    p.add_argument("--compile-tower", action="store_true",
                   help="count mx.compile(tower) instead of the tower as it runs")
    p.add_argument("--json", help="also write the counts here")
    args = p.parse_args()
    dtype = getattr(mx, args.dtype)
    tower = _random_tower(dtype)
    if args.compile_tower:
        tower = mx.compile(tower)
    columns = {}
    stand_ins = not args.as_built
    for size in (int(s) for s in args.resolutions.split(",")):
        columns[f"tower {size} px"] = tower_kernels(size, dtype, args.sdpa, tower, stand_ins)
    columns["connector (256 rows)"] = connector_kernels(256, dtype, args.sdpa, stand_ins)
    columns[f"decoder prefill ({args.positions} pos.)"] = prefill_kernels(
        args.positions, dtype, args.sdpa, stand_ins)
    fast_ops = ("mx.fast ops as built on this backend" if args.as_built
                else f"mx.fast ops as GPU kernels, {args.sdpa} attention rule")
    if args.compile_tower:
        fast_ops += ", the tower under mx.compile"
    print(f"Kernels per forward, GPU formulation ({args.dtype}, {fast_ops}), "
          f"MLX {mx.__version__}, counted on {mx.default_device()}\n")
    print(_table(columns))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {k: {"total": sum(c.values()), "kernels": dict(c), "reshapes_of_views": r}
             for k, (c, r) in columns.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
