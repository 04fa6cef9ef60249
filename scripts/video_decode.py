"""Time video.read_video (PyAV, sequential decoding) on synthetic H.264 clips of a few lengths,
to show what `--video` costs before TTFT (it is load_ms) (BENCHMARKS.md).

    python scripts/video_decode.py --size 1280x720 --rate 30 --seconds 10,60 --runs 3

The clips are written once into --dir (moving noise, so the encoder cannot make every frame a
copy of the last); the timings are of reading them back.
"""

import argparse
import statistics
from pathlib import Path

import av
import numpy as np

from fastvlm_mlx.video import read_video


def write_clip(path: Path, width: int, height: int, rate: int, seconds: int) -> Path:
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(rate * seconds):
            frame = np.roll(base, 4 * i, axis=1)  # a pan: every frame differs
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1280x720")
    p.add_argument("--rate", type=int, default=30)
    p.add_argument("--seconds", default="10,60")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default="/tmp/fastvlm-video-bench")
    args = p.parse_args()
    width, height = map(int, args.size.split("x"))
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    print(f"| clip | sampling | frames | decode ms (median of {args.runs}) |")
    print("|---|---|---|---|")
    for seconds in map(int, args.seconds.split(",")):
        clip = write_clip(Path(args.dir) / f"{width}x{height}-{args.rate}fps-{seconds}s.mp4",
                          width, height, args.rate, seconds)
        for label, kwargs in (("frames=8", dict(frames=8)), ("fps=1", dict(fps=1))):
            times, n = [], 0
            for _ in range(args.runs):
                v = read_video(clip, **kwargs)
                times.append(v.decode_ms)
                n = len(v.images)
            print(f"| {width}x{height} {args.rate} fps, {seconds} s | {label} | {n} | "
                  f"{statistics.median(times):.0f} |", flush=True)


if __name__ == "__main__":
    main()
