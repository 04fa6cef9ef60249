"""benchmark: the sweep's report (through the CLI) on the tiny converted model, the peers, the
real 0.5B shapes once, and bad settings. Timings are never asserted on: only their structure."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from fastvlm_mlx import benchmark as B
from fastvlm_mlx import peers as P
from fastvlm_mlx.random_model import random_model

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600, openblas=None):
    """The benchmark CLI. OPENBLAS None: this process's environment (scripts/test.sh preloads
    OpenBLAS); False: no preload, so on Linux the benchmark has its OpenBLAS note to print; a
    path: that library preloaded."""
    env = dict(os.environ)
    if openblas is False:
        env.pop("LD_PRELOAD", None)
    elif openblas:
        env["LD_PRELOAD"] = openblas
    return subprocess.run(
        [sys.executable, "-m", "fastvlm_mlx.benchmark", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )


def check_report(doc, resolutions, n_text, runs, runtimes):
    rows = {(r["runtime"], r["resolution"]): r for r in doc["results"]}
    assert set(rows) == {(rt, res) for rt in runtimes for res in resolutions}
    for (runtime, res), r in rows.items():
        assert r["image_tokens"] == (res // 64) ** 2
        assert r["prompt_tokens"] == n_text + r["image_tokens"]
        assert r["runs"] == runs
        samples = r["samples"]
        for i in range(runs):
            parts = sum(samples[k][i] for k in B.PARTS)
            assert samples["ttft_ms"][i] == pytest.approx(parts, rel=1e-6, abs=1e-3)
            assert samples["vision_ms"][i] > 0  # the feature cache is bypassed on every run
            assert samples["decode_tps"][i] > 0
        for k, s in r["metrics"].items():
            assert s["min"] <= s["median"] <= s["max"]
            assert s["median"] == pytest.approx(float(np.median(samples[k])))
    return rows


def test_cli_sweep_json_and_plot(tiny_converted, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    r = run_cli("--model", tiny_converted, "--resolutions", "128,256", "--runs", 2, "--warmup", 1,
                "--tokens", 3, "--prompt-tokens", 30, "--json", out, "--plot", png)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    check_report(doc, [128, 256], 30, 2, [B.OURS])
    assert doc["dtype"] == "float32" and doc["device"] == str(mx.default_device())
    assert doc["command"].startswith("python -m fastvlm_mlx.benchmark --model")
    # The table: one row per resolution, and the progress bar went to stderr.
    assert sum(line.startswith(B.OURS) for line in r.stdout.splitlines()) == 2
    assert "6/6" in r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_compare_torch_times_the_same_shapes(tiny_converted, tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("--model", tiny_converted, "--resolutions", "128", "--runs", 1, "--warmup", 0,
                "--tokens", 2, "--compare", "torch", "--json", out, "--quiet")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    check_report(doc, [128], 28, 1, [B.OURS, "torch"])
    (ratio,) = doc["ratios"]
    assert ratio["peer"] == "torch" and ratio["ttft_speedup"] > 0
    assert "vs torch" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("mlx_vlm") is None, reason="mlx-vlm is not installed")
def test_compare_mlx_vlm(tiny_loaded):
    model, processor = tiny_loaded
    peer = P.MlxVlm(model.config, mx.float32, None, 64)
    results = B.sweep(B.Ours(model, processor), [peer], [128], 28, 2, runs=1, warmup=0, quiet=True)
    assert [r.runtime for r in results] == [B.OURS, "mlx-vlm"]
    assert all(r.median("vision_ms") > 0 and r.median("prefill_ms") > 0 for r in results)
    # Each runtime's peak is its own: the peer's weights, resident in the same process, are not
    # counted in ours.
    del peer
    (alone,) = B.sweep(B.Ours(model, processor), [], [128], 28, 2, runs=1, warmup=0, quiet=True)
    assert results[0].median("peak_memory_gb") == pytest.approx(alone.median("peak_memory_gb"), rel=0.05)
    assert results[0].median("peak_memory_gb") >= P.weight_bytes(model) / 1e9


def test_real_shapes_with_random_weights():
    """--arch builds the FastVLM-0.5B shapes (122.7M tower + 0.5B decoder) and runs end to end."""
    model, processor = random_model("0.5b", mx.float32, None, 64)
    assert model.language_model.args.hidden_size == 896
    assert len(model.language_model.layers) == 24
    assert processor.tokens_per_image(1024) == 256
    results = B.sweep(B.Ours(model, processor), [], [64], 28, 2, runs=1, warmup=0, quiet=True)
    (r,) = results
    assert r.prompt_tokens == 28 + 1
    assert all(np.isfinite(r.samples[k][0]) for k in B.METRICS)


def test_prompt_has_exactly_the_asked_text_tokens(tiny_loaded):
    _, processor = tiny_loaded
    for n in (28, 29, 40):
        text = B.user_text(processor, n, 256)
        assert len(B.prompt_ids(processor, text, 256)) == n + processor.tokens_per_image(256)
    with pytest.raises(B.BenchmarkError):
        B.user_text(processor, 3, 256)


def test_no_eos_sampler_never_ends_the_answer():
    sample = P.no_eos_greedy([2, 7], 10)
    logprobs = mx.array([[-3.0, -5, 10, -5, -5, -5, -5, 9, -5, -1]])
    assert sample(logprobs).item() == 9


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolutions", "100"], "multiples of 64"),
        (["--resolutions", "a,b"], "comma-separated integers"),
        (["--compare", "onnx"], "unknown peer"),
        (["--runs", "0"], "--runs must be at least 1"),
        (["--compare", "mlx-vlm", "--runs", "0"], "--runs must be at least 1"),  # no skip note first
        (["--prompt-tokens", "3", "--resolutions", "128"], "--prompt-tokens must be at least"),
        (["--json", "/nonexistent/dir/x.json"], "directory does not exist"),
    ],
)
def test_bad_settings_give_one_line(tiny_converted, args, message):
    # Without OpenBLAS, so that the note the benchmark prints then cannot come before the error.
    r = run_cli("--model", tiny_converted, "--runs", 1, "--warmup", 0, "--quiet", *args, openblas=False)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_model_gives_one_line(tmp_path):
    r = run_cli("--model", tmp_path / "nothing", "--quiet", openblas=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(sys.platform != "linux" or B.openblas_library() is None,
                    reason="the note is for Linux's CPU wheel, where OpenBLAS is installed")
def test_a_run_without_openblas_says_how_to_preload_it(tiny_converted):
    args = ("--model", tiny_converted, "--resolutions", "64", "--runs", 1, "--warmup", 0,
            "--tokens", 1, "--quiet")
    without = run_cli(*args, openblas=False)
    assert without.returncode == 0, without.stderr
    assert "note: MLX's CPU matmul is 20-60x faster with OpenBLAS: run with LD_PRELOAD=" in without.stderr
    preloaded = run_cli(*args, openblas=B.openblas_library())
    assert preloaded.returncode == 0 and "OpenBLAS" not in preloaded.stderr
