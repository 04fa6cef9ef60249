"""Time the FastViTHD tower (random weights, real shapes) with each speed choice of vision.py
switched off in turn, to show what each one is worth on this machine (BENCHMARKS.md).

    python scripts/vision_ablation.py --resolutions 256,512 --runs 5 [--dtype float32] [--unfused] [--compiled]
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

import fastvlm_mlx.vision as V
from fastvlm_mlx.config import DTYPES, VisionConfig
from fastvlm_mlx.random_model import tame_random_weights


def grouped_conv(x, weight, stride):
    """What the shifted sums replace: mx.conv2d with groups (a scalar loop on MLX's CPU)."""
    K = weight.shape[1]
    return mx.conv2d(x, weight, stride=stride, padding=K // 2, groups=x.shape[-1])


VARIANTS = {
    "all choices on": {},
    "no shifted-sum depthwise": {"_shifted_sum_conv": grouped_conv},
    "no rational-erf GELU": {"_gelu_rational": nn.gelu},
    "neither (plain MLX ops)": {"_shifted_sum_conv": grouped_conv, "_gelu_rational": nn.gelu},
}


def time_tower(tower, size, dtype, runs):
    x = mx.random.uniform(shape=(1, size, size, 3)).astype(dtype)
    mx.eval(tower(x))  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        mx.eval(tower(x))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times), max(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", default="256,512")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--unfused", action="store_true", help="also time without FastViTHD.fuse()")
    p.add_argument("--compiled", action="store_true", help="also time mx.compile(tower)")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    tower = V.FastViTHD(VisionConfig())
    tame_random_weights(tower)
    tower.set_dtype(dtype)
    unfused = None
    if args.unfused:
        unfused = V.FastViTHD(VisionConfig())
        unfused.update(tower.parameters())
        unfused.eval()
    tower.fuse().eval()
    mx.eval(tower.parameters())
    print(f"FastViTHD, random weights, {args.dtype}, {mx.default_device()}, median [min-max] ms "
          f"over {args.runs} runs")
    for size in (int(s) for s in args.resolutions.split(",")):
        for name, patch in VARIANTS.items():
            saved = {k: getattr(V, k) for k in patch}
            for k, v in patch.items():
                setattr(V, k, v)
            try:
                med, lo, hi = time_tower(tower, size, dtype, args.runs)
            finally:
                for k, v in saved.items():
                    setattr(V, k, v)
            print(f"{size:5d}px  {name:28s} {med:9.1f} [{lo:.1f}-{hi:.1f}]", flush=True)
        if args.compiled:
            med, lo, hi = time_tower(mx.compile(tower), size, dtype, args.runs)
            print(f"{size:5d}px  {'all on, under mx.compile':28s} {med:9.1f} [{lo:.1f}-{hi:.1f}]")
        if unfused is not None:
            med, lo, hi = time_tower(unfused, size, dtype, args.runs)
            print(f"{size:5d}px  {'all on, layer scales unfused':28s} {med:9.1f} [{lo:.1f}-{hi:.1f}]")


if __name__ == "__main__":
    main()
