"""Caption every image in a folder with FastVLM, one line per image, and report TTFT.

    python examples/caption_folder.py photos/ [--model apple/FastVLM-0.5B] [--max-tokens 64]
"""

import argparse
import sys
from pathlib import Path

import fastvlm_mlx
from fastvlm_mlx.processing import InputError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--model", default="apple/FastVLM-0.5B")
    p.add_argument("--prompt", default="Write a one-sentence caption for this image.")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    files = sorted(f for f in args.folder.iterdir() if f.suffix.lower() in EXTENSIONS)
    if not files:
        sys.exit(f"error: no images in {args.folder}")
    try:
        model, processor = fastvlm_mlx.load(args.model)
    except ValueError as e:
        sys.exit(f"error: {e}")

    for f in files:
        try:
            r = fastvlm_mlx.generate(model, processor, args.prompt, images=[f], max_tokens=args.max_tokens)
        except InputError as e:  # a broken file should not stop the batch
            print(f"{f.name}\t(skipped: {e})", file=sys.stderr)
            continue
        caption = " ".join(r.text.split())
        print(f"{f.name}\t{caption}")
        print(f"  TTFT {r.timings.ttft_ms:.0f} ms (vision {r.timings.vision_ms:.0f} ms), "
              f"{r.timings.decode_tps:.1f} tok/s", file=sys.stderr)


if __name__ == "__main__":
    main()
