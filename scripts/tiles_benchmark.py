"""Time to first token and vision time of one high-resolution single view against AnyRes tiles
(BENCHMARKS.md, "AnyRes tiles"): the paper's comparison, 1536 px single-view against 2x2 tiles
of 768 px beside a 768 px global view.

A random FastVLM with the real FastViTHD and a decoder of Qwen2-0.5B's shape (random_model.py),
float32; one decoded 4:3 image (file decoding is outside TTFT), the feature cache off, greedy
with EOS masked. Each setting is timed through `stream_generate`, generate.py's own clock, with
warm-up runs first; the median and range of the runs are shown.

    python scripts/tiles_benchmark.py [--resolution 1536] [--tiles 2x2] [--tile-size 768] [--runs 2]
"""

import argparse
import statistics
import warnings

import mlx.core as mx
import numpy as np

from fastvlm_mlx.generate import stream_generate
from fastvlm_mlx.peers import no_eos_greedy
from fastvlm_mlx.random_model import random_model
from fastvlm_mlx.tiles import parse_grid

QUESTION = "Describe the image in detail"
FIELDS = ("preprocess_ms", "vision_ms", "connector_ms", "prefill_ms", "first_token_ms", "ttft_ms")


def run(model, processor, image, tokens, **views):
    sampler = no_eos_greedy(processor.eos_token_ids, model.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resolution other than the trained 1024 warns
        for last in stream_generate(model, processor, QUESTION, [image], max_tokens=tokens,
                                    sampler=sampler, feature_cache=False, **views):
            pass
    return last


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=1536, help="the single view's resolution")
    p.add_argument("--tiles", default="2x2")
    p.add_argument("--tile-size", type=int, default=768)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    grid = parse_grid(args.tiles)
    model, processor = random_model("0.5b", mx.float32, None, 64)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.resolution * 3 // 4, args.resolution, 3), dtype=np.uint8)
    settings = {
        f"single view {args.resolution} px": dict(resolution=args.resolution),
        f"{grid[0]}x{grid[1]} tiles of {args.tile_size} px + global view": dict(
            tiles=grid, tile_size=args.tile_size),
    }
    print(f"image {image.shape[1]}x{image.shape[0]}, 0.5B shapes, float32, {mx.default_device()}")
    print("| setting | views | image tokens | " + " | ".join(FIELDS) + " |")
    print("|---|---|---|" + "---|" * len(FIELDS))
    for name, views in settings.items():
        for _ in range(args.warmup):
            run(model, processor, image, args.tokens, **views)
        samples = [run(model, processor, image, args.tokens, **views) for _ in range(args.runs)]
        n_views = 1 + grid[0] * grid[1] if "tiles" in views else 1
        cells = []
        for f in FIELDS:
            vals = [getattr(r.timings, f) for r in samples]
            cells.append(f"{statistics.median(vals):.1f} [{min(vals):.1f}-{max(vals):.1f}]")
        print(f"| {name} | {n_views} | {samples[0].image_tokens} | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
