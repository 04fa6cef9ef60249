"""Caption folders, globs or lists of images into a JSONL file, batched, resumable, on one Mac or
several.

    python -m fastvlm_mlx caption photos/ 'shots/**/*.png' --list more.txt --out captions.jsonl
    fastvlm-caption photos/ --out captions.jsonl --prompt "Describe the image." --batch-size 8

One line per image: `path`, `text`, `prompt_tokens`, `image_tokens`, `generation_tokens`,
`finish_reason`, `resolution` and `timings` (generate's, per image), or `path` and `error` for
a file that could not be read (the run goes on).

Resumable: a rerun with the same inputs skips every path the output already has a row for
(error rows too, unless --retry-errors). Each row is written with one `write` of the whole line
and an fsync, so a kill -9 loses at most the images in flight and never leaves a broken line in
the middle; a partial last line (a power cut mid-write) is cut off on the next run.

Several Macs (MLX's own launcher; `mx.distributed.init()` gives each process its rank):

    mlx.launch --hostfile hosts.json --python /path/to/venv/bin/python -- \\
        -m fastvlm_mlx caption photos/ --out captions.jsonl

Every rank lists the same images. The ranks first pool what is done already (every rank's
output, over MLX's collectives), then rank r takes every n-th image still to do. Each writes
its rows to its own shard, OUT.rank<r> beside OUT on its own disk, so a killed run resumes from
the shards; at the end rank 0 gathers the shards' rows (again over MLX's collectives), appends
them to OUT, and the shards are removed once OUT holds them.
"""

import glob
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from . import _cli
from .generate import DEFAULT_MAX_TOKENS
from .loader import load, runtime_dtype
from .processing import DEFAULT_PROMPT, DEFAULT_SYSTEM, InputError, to_pil
from .timing import ms_since

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------------------------
# The inputs


def find_images(inputs: Sequence[str], lists: Sequence[str] = ()) -> List[str]:
    """The image paths, in order, each once: a folder gives its image files (by suffix, at any
    depth, sorted, hidden ones skipped); a glob its matches (sorted); a list file one path per line (blank lines and
    `#` comments skipped); anything else is taken as a path (a missing one gets an error row)."""
    found: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            # (hidden files skipped: macOS leaves `._name.jpg` metadata files on other disks)
            found += sorted(str(p) for p in Path(item).rglob("*")
                            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                            and p.is_file())
        elif glob.has_magic(item):
            found += sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        else:
            found.append(item)
    for name in lists:
        try:
            lines = Path(name).read_text().splitlines()
        except OSError as e:
            raise InputError(f"cannot read the list file {name}: {e.strerror or e}") from None
        found += [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    return list(dict.fromkeys(found))


# ----------------------------------------------------------------------------------------------
# The output: whole lines, durable one by one


def read_rows(path: str) -> Dict[str, dict]:
    """The rows of a JSONL output by path (the last one of a path wins). A partial last line
    (no newline: the write was cut) and lines that do not parse are not rows."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {}
    rows = {}
    for line in data.split(b"\n")[:-1]:  # what follows the last newline is partial
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("path"), str):
            rows[row["path"]] = row
    return rows


class RowWriter:
    """Appends rows to a JSONL file, each as one `os.write` of the whole line followed by an
    fsync: a kill between rows leaves only whole lines. Opening it cuts off a partial last
    line left by an earlier run (a write cut by a power loss)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        end = os.fstat(self.fd).st_size
        whole = end
        while whole and os.pread(self.fd, 1, whole - 1) != b"\n":
            chunk = os.pread(self.fd, min(whole, 1 << 16), max(whole - (1 << 16), 0))
            cut = chunk.rfind(b"\n")
            whole = whole - len(chunk) + cut + 1 if cut >= 0 else whole - len(chunk)
        if whole < end:
            os.ftruncate(self.fd, whole)

    def write(self, row: dict) -> None:
        self.write_line(json.dumps(row, ensure_ascii=False).encode() + b"\n")

    def write_line(self, line: bytes) -> None:
        view = memoryview(line)
        while view:  # one write for a regular file; the loop only guards a short one
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def result_row(path: str, result) -> dict:
    return {
        "path": path, "text": result.text, "prompt_tokens": result.prompt_tokens,
        "image_tokens": result.image_tokens, "generation_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason, "resolution": result.resolution,
        "timings": result.timings.to_dict(),
    }


def is_done(row: dict, retry_errors: bool) -> bool:
    return not (retry_errors and "error" in row)


# ----------------------------------------------------------------------------------------------
# Several ranks: MLX's collectives carry the bytes (no networking of our own)


def all_gather_bytes(data: bytes, group) -> List[bytes]:
    """Every rank's DATA, in rank order, on every rank (two `all_gather`s: sizes, then the
    padded bytes). Every rank must call it at the same point."""
    import mlx.core as mx
    import numpy as np

    sizes = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=group, stream=mx.cpu)
    sizes = [int(n) for n in sizes.tolist()]
    longest = max(sizes)
    if longest == 0:
        return [b""] * len(sizes)
    padded = np.zeros(longest, np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    gathered = np.array(mx.distributed.all_gather(mx.array(padded), group=group, stream=mx.cpu))
    return [gathered[r * longest: r * longest + n].tobytes() for r, n in enumerate(sizes)]


def shard_path(out: str, rank: int) -> str:
    return f"{out}.rank{rank}"


def local_rows(out: str) -> Dict[str, dict]:
    """The rows this machine holds: OUT, then any shards beside it (a killed distributed run)."""
    rows = read_rows(out)
    for shard in sorted(glob.glob(glob.escape(out) + ".rank*")):
        rows.update(read_rows(shard))
    return rows


# ----------------------------------------------------------------------------------------------
# The run


def caption_images(model, processor, paths: Iterable[str], writer: RowWriter, args,
                   progress=None) -> Tuple[int, int]:
    """Caption PATHS in batches, one row each to WRITER as it finishes; (captioned, errors)."""
    from .batch import RunningBatch, as_completed

    counts = {"ok": 0, "error": 0}
    tiles = _cli.tile_options(args)

    def requests():
        for path in paths:
            t0 = time.perf_counter()
            try:
                image = to_pil(path, max_pixels=args.max_pixels)
            except (InputError, OSError) as e:
                failed(path, e)
                continue
            yield path, (args.prompt, [image]), dict(
                system=args.system, resolution=args.resolution, load_ms=ms_since(t0),
                max_tokens=args.max_tokens, temperature=args.temp, seed=args.seed, **tiles)

    def failed(path, error):
        writer.write({"path": path, "error": " ".join(str(error).split())})
        counts["error"] += 1
        if progress is not None:
            progress.update(1)

    batch = RunningBatch(model, processor, max_batch_size=args.batch_size, feature_cache=False)
    try:
        for path, result in as_completed(batch, requests(), refused=failed):
            writer.write(result_row(path, result))
            counts["ok"] += 1
            if progress is not None:
                progress.update(1)
    finally:
        batch.close()
    return counts["ok"], counts["error"]


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True, disable=not enabled, file=sys.stderr,
                desc="captioning")


def run_caption(args) -> int:
    import mlx.core as mx

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    _cli.tile_options(args)  # a bad --tiles fails before anything is read
    group = mx.distributed.init()
    rank, size = group.rank(), group.size()
    paths = find_images(args.inputs, args.list)
    if not paths:
        raise InputError("no images found in " + ", ".join(list(args.inputs) + list(args.list)))
    out = args.out

    # What is done: this machine's rows, pooled over every rank.
    rows = local_rows(out)
    done = {p for p, row in rows.items() if is_done(row, args.retry_errors)}
    if size > 1:
        # The shares are cut from the list, so every rank must hold the same one.
        listing = hashlib.sha256("\n".join(paths).encode()).digest()
        if len(set(all_gather_bytes(listing, group))) > 1:
            raise InputError("the ranks list different images: give every Mac the same files at the same paths")
        for blob in all_gather_bytes(json.dumps(sorted(done)).encode(), group):
            done.update(json.loads(blob))
    todo = [p for p in paths if p not in done]
    mine = todo[rank::size]
    if rank == 0 and not args.quiet:
        print(f"{len(paths)} images, {len(paths) - len(todo)} done already, {len(todo)} to caption"
              + (f" on {size} ranks" if size > 1 else ""), file=sys.stderr, flush=True)

    model = processor = None
    if mine:
        model, processor = load(args.model, dtype=runtime_dtype(args.dtype))
    writer = RowWriter(out if size == 1 else shard_path(out, rank))
    try:
        with progress_bar(len(mine), enabled=rank == 0 and not args.quiet) as bar:
            ok, errors = caption_images(model, processor, mine, writer, args, bar) if mine else (0, 0)
    finally:
        writer.close()
    if size > 1:
        merge_shards(out, rank, group)
    if not args.quiet:
        print(f"rank {rank}: " if size > 1 else "", end="", file=sys.stderr)
        print(f"{ok} captioned, {errors} error rows, into {out}", file=sys.stderr, flush=True)
    return 0


def merge_shards(out: str, rank: int, group) -> None:
    """Rank 0 appends every shard's rows to OUT (those it does not hold already); once it is
    durable, each rank removes its shard."""
    import mlx.core as mx

    shard = shard_path(out, rank)
    try:
        data = Path(shard).read_bytes()
    except FileNotFoundError:
        data = b""
    data = data[: data.rfind(b"\n") + 1]  # whole lines only
    blobs = all_gather_bytes(data, group)
    if rank == 0:
        writer = RowWriter(out)
        have = set(Path(out).read_bytes().split(b"\n"))
        try:
            for blob in blobs:
                for line in blob.split(b"\n")[:-1]:
                    if line not in have:
                        writer.write_line(line + b"\n")
                        have.add(line)
        finally:
            writer.close()
    # Every rank waits for rank 0's merge before its shard goes.
    mx.eval(mx.distributed.all_sum(mx.array([1]), group=group, stream=mx.cpu))
    if os.path.exists(shard):
        os.remove(shard)


def build_parser():
    p = _cli.ArgumentParser(
        prog="fastvlm-caption",
        description="Caption folders, globs or lists of images into JSONL: batched, resumable "
        "(a rerun skips what is done), across Macs with mlx.launch.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="folders, globs or image paths")
    p.add_argument("--list", action="append", default=[], metavar="FILE",
                   help="a file of image paths, one per line (repeatable)")
    p.add_argument("--out", "-o", default="captions.jsonl", help="the JSONL output (appended to)")
    _cli.add_model_arg(p)
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="the question asked of every image")
    p.add_argument("--system", "--system-prompt", dest="system", default=DEFAULT_SYSTEM,
                   help="system message")
    p.add_argument("--max-tokens", "-m", type=_cli.positive(int), default=DEFAULT_MAX_TOKENS,
                   help="the most tokens per caption")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images decoded together (rows of the batch)")
    _cli.add_temperature_arg(p)
    p.add_argument("--seed", type=int, default=None,
                   help="each image's sampling seed (default: unseeded)")
    _cli.add_run_args(p)
    _cli.add_tile_args(p)
    p.add_argument("--retry-errors", action="store_true", help="caption again the paths with an error row")
    _cli.add_verbosity_args(p, "the progress bar and the summary")
    return p


main = _cli.main_of(build_parser, run_caption)


if __name__ == "__main__":
    sys.exit(main())
