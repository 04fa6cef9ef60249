"""The server under concurrent clients (BENCHMARKS.md, section 10, "The server under load"): aggregate
completion tokens/s, requests/s, p50/p95 latency and the server process's peak RSS at several
client counts, for our server with continuous batching and with `--max-batch-size 1` (one
request at a time: the "before" row), and mlx-vlm's server when it is installed.

A random FastVLM with the real FastViTHD and a decoder of Qwen2-0.5B's shape (random_model.py),
float32, written once as a converted checkpoint (with a preprocessor_config.json naming the
resolution); the server is started on it as a subprocess on a loopback port. mlx-vlm's server
gets the same weights in Apple's layout, which it reads (`write_apple_checkpoint`, a copy beside
the checkpoint, checked by converting it back). Each client is a
thread with the official `openai` client sending its requests one after another; every request
has an image no other request had (a 256 px PNG data URL, so the feature cache never hits),
the same question, greedy decoding and max_tokens --tokens. Random weights almost never pick
an EOS, and the completion tokens counted are those `usage` reports. A level's wall time runs
from the first request to the last answer; latency is each request's, end to end.

    python scripts/server_throughput.py [--clients 1,4,8,16] [--tokens 32] [--requests 1]
        [--batch-sizes 1,8] [--checkpoint DIR] [--mlx-vlm-python PATH]
"""

import argparse
import base64
import concurrent.futures
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

QUESTION = "Describe the image in detail"


def write_checkpoint(dst: Path, resolution: int) -> Path:
    """The random 0.5B-shape FastVLM as a converted float32 directory (convert.py's layout)."""
    import mlx.core as mx

    from fastvlm_mlx.convert import save_converted, write_atomically
    from fastvlm_mlx.model import Model
    from fastvlm_mlx.random_model import arch_config, synthetic_processor, tame_random_weights

    if (dst / "config.json").is_file():
        return dst
    config = arch_config("0.5b")
    config.image_size = resolution
    model = Model(config)
    tame_random_weights(model)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())

    def write(tmp: Path) -> None:
        synthetic_processor(config).tokenizer._tokenizer.save_pretrained(str(tmp))
        (tmp / "preprocessor_config.json").write_text(json.dumps(
            {"crop_size": {"height": resolution, "width": resolution}, "size": {"shortest_edge": resolution}}))
        save_converted(tmp, model, config.to_dict(), None)  # the tokenizer files are there already

    write_atomically(dst, write, force=False)
    return dst


def _apple_vision_key(ours: str) -> str:
    """Our vision tower name (after `vision_tower.`) -> Apple's, inverting weights.apple_vision_name."""
    from fastvlm_mlx.weights import APPLE_NETWORK, APPLE_VISION_RENAMES

    for i, stage in APPLE_NETWORK.items():
        if ours.startswith(stage + "."):
            ours = f"network.{i}." + ours[len(stage) + 1:]
            break
    # Apple's ReparamLargeKernelConv (the first conv of each downsample) is `lkb_reparam`; every
    # other reparameterized conv is `reparam_conv` in both, so that rename is not inverted.
    ours = re.sub(r"^(network\.\d+\.proj\.0\.)reparam_conv\.", r"\1lkb_reparam.", ours)
    for apple, timm in APPLE_VISION_RENAMES:
        if timm != "reparam_conv.":
            ours = re.sub(rf"(^|\.){re.escape(timm)}", rf"\g<1>{apple}", ours)
    return re.sub(r"(layer_scale(_[12])?)\.gamma$", r"\1", ours)


def write_apple_checkpoint(converted: Path, dst: Path) -> Path:
    """The converted checkpoint CONVERTED as Apple's ml-fastvlm writes one (llava_qwen2 names,
    PyTorch tensor layout, the ConvFFN BatchNorms unfolded to identities, the unused pooling head
    as zeros), with a preprocessor_config.json naming the resolution: a checkpoint both servers
    load, with the same weights. Checked by converting it back (weights.sanitize)."""
    import mlx.core as mx

    from fastvlm_mlx.convert import TOKENIZER_FILES, write_atomically
    from fastvlm_mlx.loader import read_weights
    from fastvlm_mlx.weights import BN_EPS, sanitize

    if (dst / "config.json").is_file():
        return dst
    ours = read_weights(converted)
    apple = {}
    for key, value in ours.items():
        if key.startswith("vision_tower."):
            name = "model.vision_tower.vision_tower.model." + _apple_vision_key(key[len("vision_tower."):])
            if name.endswith(".convffn.conv.conv.bias"):  # the folded BatchNorm, as an identity one
                bn = name[: -len("conv.bias")] + "bn."
                c = value.shape[0]
                apple[bn + "bias"] = value
                apple[bn + "weight"] = mx.full((c,), (1 + BN_EPS) ** 0.5, value.dtype)
                apple[bn + "running_mean"] = mx.zeros((c,), value.dtype)
                apple[bn + "running_var"] = mx.ones((c,), value.dtype)
                continue
            if value.ndim == 4:  # MLX conv (O, kh, kw, I/g) -> PyTorch (O, I/g, kh, kw)
                value = value.transpose(0, 3, 1, 2)
            elif value.ndim == 2 and ".token_mixer." not in name:  # a 1x1 conv (not attention's Linear)
                value = value.reshape(*value.shape, 1, 1)
            elif name.endswith(("layer_scale", "layer_scale_1", "layer_scale_2")):
                value = value.reshape(-1, 1, 1)
        elif key.startswith("multi_modal_projector.linear_"):
            n = key[len("multi_modal_projector.linear_")]
            name = f"model.mm_projector.{0 if n == '1' else 2}." + key.split(".", 2)[2]
        elif key.startswith("language_model."):
            name = key[len("language_model."):]
        else:
            raise ValueError(f"no Apple name for {key!r}")
        apple[name] = value
    apple["model.vision_tower.vision_tower.model.head.proj"] = mx.zeros((3072, 768), mx.float32)
    back = sanitize(dict(apple), "apple")
    assert set(back) == set(ours), sorted(set(back) ^ set(ours))[:4]
    for key, value in ours.items():
        err = mx.abs(back[key].astype(mx.float32) - value.astype(mx.float32)).max().item()
        assert err <= 1e-5 * (1 + mx.abs(value).max().item()), (key, err)

    config = json.loads((converted / "config.json").read_text())
    text = config["text_config"]

    def write(tmp: Path) -> None:
        for name in TOKENIZER_FILES:  # preprocessor_config.json among them
            if (converted / name).is_file():
                shutil.copyfile(converted / name, tmp / name)
        mx.save_safetensors(str(tmp / "model.safetensors"), apple, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({
            "model_type": "llava_qwen2", "architectures": ["LlavaQwen2ForCausalLM"],
            "mm_vision_tower": f"mobileclip_l_{config['image_size']}", "mm_hidden_size": 3072,
            "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad",
            "eos_token_id": config["eos_token_id"][0], **{k: v for k, v in text.items() if k != "model_type"},
        }, indent=2))

    write_atomically(dst, write, force=False)
    return dst


def rss_bytes(pid: int) -> int:
    """The resident set size of PID (Linux /proc, else ps)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout
    return int(out.strip() or 0) * 1024


class PeakRSS:
    """The largest RSS of a process while the context is open, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._done = pid, 0, threading.Event()

    def _sample(self):
        while not self._done.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self):
        self.peak = rss_bytes(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command, port: int, log: Path) -> subprocess.Popen:
    """COMMAND (a server) in its own process; returns once it answers on PORT."""
    import httpx

    p = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 600
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{command[2]} exited: " + log.read_text()[-2000:])
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            return p
        except httpx.HTTPError:
            time.sleep(0.5)
    p.kill()
    raise RuntimeError(f"{command[2]} did not start within 600 s")


def image_urls(n: int, resolution: int, seed: int):
    """N different 4:3 random PNGs as data URLs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution * 3 // 4, resolution, 3), dtype=np.uint8)).save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def ask(client, model: str, url: str, tokens: int):
    """One greedy request: (latency s, completion tokens)."""
    t0 = time.perf_counter()
    r = client.chat.completions.create(model=model, max_tokens=tokens, temperature=0.0, messages=[
        {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                     {"type": "image_url", "image_url": {"url": url}}]}])
    return time.perf_counter() - t0, r.usage.completion_tokens


def level(port: int, pid: int, model: str, clients: int, requests: int, tokens: int,
          resolution: int, seed: int) -> dict:
    """CLIENTS threads, each sending REQUESTS requests one after another."""
    import openai

    urls = image_urls(clients * requests, resolution, seed)
    latencies, completion = [], 0
    lock = threading.Lock()

    def client_run(i):
        nonlocal completion
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=3600)
        for url in urls[i * requests:(i + 1) * requests]:
            latency, n = ask(client, model, url, tokens)
            with lock:
                latencies.append(latency)
                completion += n

    with PeakRSS(pid) as memory, concurrent.futures.ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        list(pool.map(client_run, range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "requests": len(latencies), "wall_s": wall,
            "tok_s": completion / wall, "req_s": len(latencies) / wall,
            "p50_s": statistics.median(latencies), "p95_s": q[18],
            "tokens": completion, "peak_rss_gb": memory.peak / 2**30}


def run_server(name, command, port, model_name, args, log_dir, seed) -> list:
    p = start(command, port, log_dir / f"{name.split()[0]}-{port}.log")
    rows = []
    try:
        level(port, p.pid, model_name, 1, 1, args.tokens, args.resolution, seed)  # warm-up
        for i, n in enumerate(args.clients):
            row = level(port, p.pid, model_name, n, args.requests, args.tokens, args.resolution,
                        seed + 1000 * (i + 1))
            row["name"] = name
            rows.append(row)
            print_row(row, rows[0])
    finally:
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
    return rows


def print_row(m: dict, first: dict) -> None:
    per_client = (f"{(m['peak_rss_gb'] - first['peak_rss_gb']) / (m['clients'] - 1) * 1024:.0f}"
                  if m["clients"] > 1 else "-")
    print(f"| {m['name']} | {m['clients']} | {m['requests']} | {m['tokens']} | {m['wall_s']:.1f} | "
          f"{m['tok_s']:.1f} | {m['req_s']:.3f} | {m['p50_s']:.1f} | {m['p95_s']:.1f} | "
          f"{m['peak_rss_gb']:.2f} | {per_client} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="1,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--batch-sizes", default="1,8", type=lambda s: [int(x) for x in s.split(",")],
                   help="our server's --max-batch-size per run (1: one request at a time)")
    p.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="where to write (or find) the random checkpoint (default: a temporary dir)")
    p.add_argument("--mlx-vlm-python", default=None,
                   help="a Python with mlx-vlm installed, to run its server too (default: skip it)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(args.checkpoint or Path(tmp) / "fastvlm-random-0.5b", args.resolution)
        log_dir = Path(tmp)
        import mlx.core as mx

        print(f"# random FastVLM-0.5B shapes, float32, {mx.default_device()}, mlx {mx.__version__}, "
              f"{os.cpu_count()} CPUs, {args.resolution} px distinct images, {args.tokens} greedy tokens, "
              f"{args.requests} request(s) per client")
        print("| server | clients | requests | completion tokens | wall s | completion tok/s | req/s "
              "| p50 latency s | p95 latency s | peak RSS GB | MB per added client |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for batch in args.batch_sizes:
            port = free_port()
            command = [sys.executable, "-m", "fastvlm_mlx.server", "--model", str(ckpt), "--port",
                       str(port), "--dtype", "float32", "--max-batch-size", str(batch),
                       "--max-queue", "256", "--queue-timeout", "3600", "--log-level", "warning"]
            run_server(f"ours, --max-batch-size {batch}", command, port, "fastvlm", args, log_dir, seed=batch)
        if args.mlx_vlm_python is None:
            print("# mlx-vlm's server: not run (no --mlx-vlm-python given)")
        else:
            # mlx-vlm reads Apple's layout, not ours: the same weights written as Apple's.
            apple = write_apple_checkpoint(ckpt, ckpt.with_name(ckpt.name + "-apple"))
            port = free_port()
            command = [args.mlx_vlm_python, "-m", "mlx_vlm.server", "--model", str(apple), "--port", str(port)]
            try:
                run_server("mlx-vlm server", command, port, str(apple), args, log_dir, seed=99)
            except Exception as e:  # its server cannot load this checkpoint, or failed a request
                print(f"# mlx-vlm's server: not measured: {' '.join(str(e).split())[:300]}")


if __name__ == "__main__":
    main()
