"""Aggregate completion tokens/s of `batch_generate` at several batch sizes (BENCHMARKS.md,
"Batched generation").

A random FastVLM with the real FastViTHD and a decoder of Qwen2-0.5B's shape (random_model.py's
`random_model`), float32; each request a different 256 px image (decoded arrays, feature cache
off, so every image is encoded) and the same question; greedy, EOS masked so that every request
decodes exactly --tokens tokens. Each batch size runs all of its requests at once and is timed
end to end (vision, prefill and decoding); the solo row is `generate`, one request.

    python scripts/batch_throughput.py [--batch-sizes 1,4,8,16] [--tokens 32] [--runs 1]
"""

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from fastvlm_mlx.batch import batch_generate
from fastvlm_mlx.peers import no_eos_greedy
from fastvlm_mlx.random_model import random_model
from fastvlm_mlx.generate import generate

QUESTION = "Describe the image in detail"


def distinct_images(n: int, resolution: int, seed: int):
    """N different 4:3 RGB arrays (padded and resized as photos are)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (resolution * 3 // 4, resolution, 3), dtype=np.uint8) for _ in range(n)]


def measure(run, n_requests: int, tokens: int) -> dict:
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    results = run()
    wall = time.perf_counter() - t0
    generated = sum(len(r.token_ids) for r in results)
    assert generated == n_requests * tokens, "a request ended early"
    return {
        "wall_s": wall, "tok_s": generated / wall, "req_s": n_requests / wall,
        "ttft_ms": statistics.median(r.timings.ttft_ms for r in results),
        # where the wall time went: the encode (one call for the batch), the prefills (one per
        # request), and the decoding rate of all rows together
        "vision_s": sum(r.timings.vision_ms for r in results) / 1e3,
        "prefill_s": sum(r.timings.prefill_ms for r in results) / 1e3,
        "decode_tok_s": sum(r.timings.decode_tps for r in results),
        "peak_gb": mx.get_peak_memory() / 1e9,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--runs", type=int, default=1, help="runs per batch size; the median is shown")
    args = p.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    model, processor = random_model("0.5b", mx.float32, None, 64)
    options = dict(max_tokens=args.tokens, sampler=no_eos_greedy(processor.eos_token_ids, model.vocab_size),
                   resolution=args.resolution, feature_cache=False)
    seed = iter(range(10**6))  # fresh images every run

    def solo():
        return [generate(model, processor, QUESTION, [distinct_images(1, args.resolution, next(seed))[0]],
                         **options)]

    def batched(n):
        return lambda: batch_generate(model, processor, [QUESTION] * n,
                                      [[im] for im in distinct_images(n, args.resolution, next(seed))],
                                      max_batch_size=n, **options)

    import warnings

    warnings.simplefilter("ignore")  # a resolution other than the trained 1024 warns
    batched(2)()  # warm-up
    print(f"# random FastVLM-0.5B shapes, float32, {mx.default_device()}, mlx {mx.__version__}, "
          f"{args.resolution} px distinct images, {args.tokens} greedy tokens each, median of {args.runs}")
    print("| run | requests | wall s | completion tok/s | req/s | vs solo | median TTFT ms | vision s "
          "| prefill s | decode tok/s, all rows | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [("generate (solo)", 1, solo)] + [(f"batch_generate, batch {n}", n, batched(n)) for n in sizes]
    base = None
    for name, n, run in rows:
        runs = [measure(run, n, args.tokens) for _ in range(args.runs)]
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        base = base or m["tok_s"]
        print(f"| {name} | {n} | {m['wall_s']:.1f} | {m['tok_s']:.1f} | {m['req_s']:.2f} | "
              f"{m['tok_s'] / base:.2f}x | {m['ttft_ms']:.0f} | {m['vision_s']:.1f} | {m['prefill_s']:.1f} | "
              f"{m['decode_tok_s']:.1f} | {m['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
