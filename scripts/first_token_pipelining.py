"""What mlx-lm's pipelining costs the first token (BENCHMARKS.md, "The first token").

The 0.5B decoder (random weights), a 43-position prefill, then the last position's token is
sampled and evaluated either alone, or with the second step queued behind it first, as
mlx-lm's `generate_step` does before it hands out the first token.

    python scripts/first_token_pipelining.py [--runs 3]
"""

import argparse
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from fastvlm_mlx.random_model import random_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    model, _ = random_model("0.5b", mx.float32, None, 64)
    lm = model.language_model
    embeddings = mx.random.normal((44, lm.args.hidden_size)) * 0.02
    stream = mx.new_stream(mx.default_device())

    def prefill():
        cache = make_prompt_cache(lm)
        lm(mx.zeros((1, 43), mx.uint32), cache=cache, input_embeddings=embeddings[None, :-1])
        mx.eval([c.state for c in cache])
        return cache

    def step(cache, tokens=None, embedding=None):
        with mx.stream(stream):
            logits = lm(mx.zeros((1, 1), mx.uint32) if tokens is None else tokens[None],
                        cache=cache, input_embeddings=embedding)[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            return mx.argmax(logprobs, -1), logprobs

    print(f"0.5B decoder, float32, {mx.default_device()}: ms until the first token is evaluated")
    for _ in range(args.runs):
        for pipelined in (False, True):
            cache = prefill()
            t = time.perf_counter()
            y, logprobs = step(cache, embedding=embeddings[None, -1:])
            mx.async_eval(y, logprobs)
            build = ""
            if pipelined:  # generate_step queues the second step first
                t_build = time.perf_counter()
                y2, logprobs2 = step(cache, tokens=y)
                build = f"  (building its graph: {(time.perf_counter() - t_build) * 1e3:.1f} ms)"
                mx.async_eval(y2, logprobs2)
            mx.eval(y)
            ms = (time.perf_counter() - t) * 1e3
            label = "second step queued first" if pipelined else "first token alone"
            print(f"  {label:26s} {ms:7.1f}{build}")
            if pipelined:
                mx.eval(y2)


if __name__ == "__main__":
    main()
