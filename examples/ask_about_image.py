"""Ask several questions about one image. Two ways:

1. independent questions: `fastvlm_mlx.generate` per question; the vision features are cached,
   so only the first question runs the encoder (watch vision_ms drop to 0);
2. a conversation: `ChatSession` keeps one KV cache, so each follow-up only prefills its own text.

    python examples/ask_about_image.py photo.jpg [--model apple/FastVLM-0.5B]
"""

import argparse
import sys

import fastvlm_mlx
from fastvlm_mlx import ChatSession
from fastvlm_mlx.processing import to_pil

QUESTIONS = [
    "Describe the image in one sentence.",
    "What colours dominate the picture?",
    "Is there any text in the image? If so, what does it say?",
]


def main():
    p = argparse.ArgumentParser(description="Several questions about one image.")
    p.add_argument("image")
    p.add_argument("--model", default="apple/FastVLM-0.5B")
    p.add_argument("--max-tokens", type=int, default=96)
    args = p.parse_args()
    try:
        # Decoded once, before the model loads: a missing or broken image is one line, at once.
        image = to_pil(args.image)
        model, processor = fastvlm_mlx.load(args.model)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")

    print("== independent questions (feature cache)")
    for q in QUESTIONS:
        r = fastvlm_mlx.generate(model, processor, q, images=[image], max_tokens=args.max_tokens)
        t = r.timings
        print(f"Q: {q}\nA: {r.text.strip()}")
        print(f"   TTFT {t.ttft_ms:.0f} ms, vision {t.vision_ms:.0f} ms, cache hit {r.feature_cache_hit}\n")

    print("== one conversation (KV cache)")
    chat = ChatSession(model, processor, [image], max_tokens=args.max_tokens)
    for q in QUESTIONS:
        print(f"Q: {q}\nA: ", end="")
        for r in chat.stream(q):
            print(r.text, end="", flush=True)
        print(f"\n   TTFT {r.timings.ttft_ms:.0f} ms (prefill {r.timings.prefill_ms:.0f} ms)\n")


if __name__ == "__main__":
    main()
