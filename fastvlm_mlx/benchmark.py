"""Benchmark: time to first token and its parts, decode speed and peak memory, over a sweep of
resolutions, with the alternatives timed the same way in the same process.

    python -m fastvlm_mlx.benchmark --arch 0.5b                      # random weights, no download
    python -m fastvlm_mlx.benchmark --model apple/FastVLM-0.5B --resolutions 512,1024
    python -m fastvlm_mlx.benchmark --arch 0.5b --compare torch,mlx-vlm --json out.json --plot out.png

Our runtime is timed through `stream_generate` itself, so the clock is generate.py's (the same
parts as every other TTFT this package reports), with the feature cache off and a decoded image
in hand (file decoding is outside TTFT). The peers are timed part by part at the same
boundaries, each closed by the runtime's own synchronization:
- `torch`: transformers' `FastVlmForConditionalGeneration` (on CUDA when MLX runs on a GPU and
  torch sees one, else on the CPU);
- `mlx-vlm`: mlx-vlm's `fastvlm` port, imported without mlx-vlm's package `__init__`, which pulls
  in far more than the model needs (conventions.md).
Peers get random weights of the same shapes, in the same dtype (and quantization, for mlx-vlm).
Every prompt has the same text-token count (`--prompt-tokens`) and one image; EOS is masked so
that every run decodes `--tokens` tokens.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import DTYPES, ModelConfig
from .loader import runtime_dtype
from .processing import DEFAULT_SYSTEM, format_prompt, preprocess_image

# The released decoders (fastvlm-reference.md). Tokens ids are Qwen2's.
ARCHS = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               tie_word_embeddings=False),
}
ENDOFTEXT, IM_START, IM_END, IMAGE_ID = 151643, 151644, 151645, 151646
PEERS = ("torch", "mlx-vlm")
OURS = "fastvlm-mlx"
# The parts of TTFT, in order, then the rest; all are Timings fields (generate.py).
PARTS = ("preprocess_ms", "vision_ms", "connector_ms", "prefill_ms", "first_token_ms")
METRICS = PARTS + ("ttft_ms", "decode_tps", "peak_memory_gb")


class BenchmarkError(Exception):
    """A setting or environment the benchmark cannot run with; one line says why."""


# ----------------------------------------------------------------------------------------------
# Models with random weights at the real shapes


def arch_config(arch: str) -> ModelConfig:
    text = dict(ARCHS[arch], rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)
    return ModelConfig(text_config=text, image_size=1024, image_token_id=IMAGE_ID,
                       eos_token_id=[IM_END, ENDOFTEXT])


def synthetic_processor(config: ModelConfig):
    """A word-level tokenizer over the model's vocabulary, Qwen2's special ids in place.

    Random weights need no real tokenizer, but the prompt still goes through the template and
    tokenization, and the answer through mlx-lm's detokenizer, so both are timed as usual.
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .processing import Processor

    vocab_size = config.text_config["vocab_size"]
    specials = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
    words = "system user assistant You are a helpful assistant. Describe the image in detail".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    vocab.update({f"w{i}": i for i in range(len(vocab), ENDOFTEXT)})
    vocab.update(specials)
    vocab.update({f"w{i}": i for i in range(IMAGE_ID, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))  # ids are all taken
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    return Processor(
        tokenizer=TokenizerWrapper(fast, eos_token_ids=config.eos_token_id),
        image_size=config.image_size, image_token_id=config.image_token_id,
        stride=config.vision_config.stride, eos_token_ids=list(config.eos_token_id),
    )


def tame_random_weights(model: nn.Module) -> None:
    """Layer scales of 0.01 (timm initializes them at 1e-5): with mlx's default of 1 the 44
    residual blocks of random weights overflow float16, and inf/NaN timings mean nothing."""
    from mlx.utils import tree_flatten

    scales = [(k, mx.full(v.shape, 0.01, v.dtype)) for k, v in tree_flatten(model.parameters())
              if "layer_scale" in k]
    model.load_weights(scales, strict=False)


def random_model(arch: str, dtype: mx.Dtype, q_bits: Optional[int], q_group_size: int):
    from .convert import quantize_model
    from .model import Model

    config = arch_config(arch)
    model = Model(config)
    tame_random_weights(model)
    model.set_dtype(dtype)
    if q_bits:
        quantize_model(model, config.to_dict(), q_bits, q_group_size)
    model.vision_tower.fuse()
    model.eval()
    mx.eval(model.parameters())
    return model, synthetic_processor(config)


def load_model(path: str, dtype: mx.Dtype, q_bits: Optional[int], q_group_size: int):
    from .convert import quantize_model
    from .loader import load

    model, processor = load(path, dtype=dtype)
    if q_bits:
        if model.config.quantization:
            raise BenchmarkError(f"{path} is already quantized: drop --q-bits")
        quantize_model(model, model.config.to_dict(), q_bits, q_group_size)
        mx.eval(model.parameters())
    return model, processor


# ----------------------------------------------------------------------------------------------
# The inputs every runtime gets


def source_image(resolution: int) -> np.ndarray:
    """A decoded 4:3 photo-sized RGB array (uint8), so preprocessing pads and resizes as usual."""
    rng = np.random.default_rng(resolution)
    return rng.integers(0, 256, (resolution * 3 // 4, resolution, 3), dtype=np.uint8)


def user_text(processor, n_text_tokens: int, resolution: int) -> str:
    """A user prompt whose templated form holds exactly `n_text_tokens` text tokens."""
    base = "Describe the image"

    def count(text):
        return len(prompt_ids(processor, text, resolution)) - processor.tokens_per_image(resolution)

    have = count(base)
    if n_text_tokens < have:
        raise BenchmarkError(f"--prompt-tokens must be at least {have} (the template and a question)")
    # Grow the question word by word; BPE merges make a word's token count depend on context.
    text, n = base, have
    while n < n_text_tokens:
        for word in (" in detail", " detail", " the", " a", ".", "!"):
            m = count(text + word)
            if n < m <= n_text_tokens:
                text, n = text + word, m
                break
        else:
            raise BenchmarkError(f"cannot build a prompt of exactly {n_text_tokens} text tokens")
    return text


def prompt_ids(processor, text: str, resolution: int) -> List[int]:
    """The templated prompt's ids, one `image_token_id` slot per image feature row."""
    return processor.encode(format_prompt(text, 1, DEFAULT_SYSTEM), resolution)


def no_eos_greedy(eos_ids: Sequence[int], vocab_size: int) -> Callable:
    """Greedy sampling that never ends the answer, so every run decodes the same count."""
    mask = np.zeros((vocab_size,), np.float32)
    mask[[i for i in eos_ids if 0 <= i < vocab_size]] = -np.inf
    mask = mx.array(mask)
    return lambda logprobs: mx.argmax(logprobs + mask, axis=-1)


# ----------------------------------------------------------------------------------------------
# Runtimes: each times one run and returns the METRICS it measured


def weight_bytes(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def others_bytes(model: nn.Module) -> int:
    """MLX memory held by everything but MODEL's weights (the peers' weights in a --compare run):
    subtracted from MLX's process-wide peak, so each runtime's peak is its own."""
    return max(mx.get_active_memory() - weight_bytes(model), 0)


class Ours:
    name = OURS

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.sampler = no_eos_greedy(processor.eos_token_ids, model.vocab_size)
        self.device = str(mx.default_device())

    def run(self, image, text: str, resolution: int, tokens: int) -> Dict[str, float]:
        from .generate import stream_generate

        others = others_bytes(self.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a resolution other than the trained one warns
            last = None
            for last in stream_generate(
                self.model, self.processor, text, images=[image], resolution=resolution,
                max_tokens=tokens, sampler=self.sampler, feature_cache=False,
            ):
                pass
        t = last.timings
        out = {k: getattr(t, k) for k in METRICS}
        out["peak_memory_gb"] -= others / 1e9
        return out


class _Lap:
    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.t = time.perf_counter()

    def __call__(self) -> float:
        self.sync()
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1e3, now
        return ms


class MlxVlm:
    """mlx-vlm's fastvlm port, random weights of our model's shapes, same dtype and quantization."""

    name = "mlx-vlm"

    def __init__(self, config: ModelConfig, dtype: mx.Dtype, q_bits, q_group_size):
        fastvlm = import_mlx_vlm_fastvlm()
        vc = fastvlm.VisionConfig()
        vc.layers = list(config.vision_config.depths)
        vc.embed_dims = list(config.vision_config.widths)
        text = dict(config.text_config, model_type="qwen2")
        tc = fastvlm.TextConfig(**{k: v for k, v in text.items() if k in fastvlm.TextConfig.__dataclass_fields__})
        model = fastvlm.Model(fastvlm.ModelConfig(text_config=tc, vision_config=vc))
        tame_random_weights(model)
        model.set_dtype(dtype)
        if q_bits:
            nn.quantize(model, group_size=q_group_size, bits=q_bits,
                        class_predicate=lambda p, m: p.startswith(("language_model.", "mm_projector."))
                        and hasattr(m, "to_quantized"))
        model.eval()
        mx.eval(model.parameters())
        self.model, self.dtype = model, dtype
        self.image_token = model.config.image_token_index  # -200: one marker, expanded in the splice
        self.our_image_token = config.image_token_id
        self.device = str(mx.default_device())

    def run(self, image, ids: List[int], image_slots: int, resolution: int, tokens: int,
            eos_ids: Sequence[int]) -> Dict[str, float]:
        from mlx_lm.models.cache import make_prompt_cache

        m = self.model
        mask = no_eos_greedy(eos_ids, m.language_model.config.vocab_size)  # before the clock
        others = others_bytes(m)
        mx.reset_peak_memory()
        lap = _Lap(lambda: None)
        out = {}
        # Their prompt holds one -200 marker where our prompt holds the image slots.
        first = ids.index(self.our_image_token)
        marked = ids[:first] + [self.image_token] + ids[first + image_slots:]
        pixels = mx.array(preprocess_image(image, resolution))[None].astype(self.dtype)
        input_ids = mx.array([marked])
        mx.eval(pixels, input_ids)
        out["preprocess_ms"] = lap()
        _, features, _ = m.vision_tower(pixels)
        mx.eval(features)
        out["vision_ms"] = lap()
        B, H, W, C = features.shape
        features = m.mm_projector(features.reshape(B, H * W, C))
        mx.eval(features)
        out["connector_ms"] = lap()
        embeddings = m.prepare_inputs_for_multimodal(features, input_ids, None)
        mx.eval(embeddings)
        out["preprocess_ms"] += lap()
        cache = make_prompt_cache(m.language_model)
        L = embeddings.shape[1]
        m.language_model(input_ids[:, : L - 1], cache=cache, inputs_embeds=embeddings[:, :-1])
        mx.eval([c.state for c in cache])
        out["prefill_ms"] = lap()

        def step(y, emb=None):
            logits = m.language_model(y, cache=cache, inputs_embeds=emb).logits[:, -1, :]
            return mask(logits)

        y = step(mx.array([[0]]), embeddings[:, -1:])
        y.item()
        out["first_token_ms"] = lap()
        # Decoding, pipelined as mlx-lm's generate_step does: queue the next step, then read.
        t0 = time.perf_counter()
        mx.async_eval(y)
        for _ in range(tokens - 1):
            nxt = step(y[None])
            mx.async_eval(nxt)
            y.item()
            y = nxt
        y.item()
        out["decode_tps"] = (tokens - 1) / max(time.perf_counter() - t0, 1e-9) if tokens > 1 else 0.0
        out["ttft_ms"] = sum(out[k] for k in PARTS)
        out["peak_memory_gb"] = (mx.get_peak_memory() - others) / 1e9
        return out


class Torch:
    """transformers' FastVlmForConditionalGeneration, random weights of our model's shapes."""

    name = "torch"

    def __init__(self, config: ModelConfig, dtype_name: str):
        try:
            import torch
            from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config
        except ImportError as e:
            raise BenchmarkError(f"--compare torch needs torch, timm and transformers ({e})") from None
        self.torch = torch
        on_gpu = mx.default_device() == mx.gpu and torch.cuda.is_available()
        self.torch_device = torch.device("cuda" if on_gpu else "cpu")
        self.device = f"torch {self.torch_device} ({torch.cuda.get_device_name() if on_gpu else platform.processor() or 'cpu'})"
        self.dtype = getattr(torch, dtype_name)
        text = {k: v for k, v in config.text_config.items() if k != "model_type"}
        vc = dict(
            model_type="timm_wrapper", architecture="fastvit_mci3", hidden_size=3072,
            do_pooling=False,
            model_args={"inference_mode": True, "layers": list(config.vision_config.depths)},
        )
        self.image_token = config.image_token_id
        cfg = FastVlmConfig(vision_config=vc, text_config=Qwen2Config(**text),
                            image_token_index=max(self.image_token, 0))
        torch.manual_seed(0)
        model = FastVlmForConditionalGeneration(cfg).eval()
        self.model = model.to(device=self.torch_device, dtype=self.dtype)

    def _sync(self):
        if self.torch_device.type == "cuda":
            self.torch.cuda.synchronize()

    def run(self, image, ids: List[int], resolution: int, tokens: int,
            eos_ids: Sequence[int]) -> Dict[str, float]:
        torch = self.torch
        from transformers import DynamicCache

        m = self.model
        lm = m.model.language_model
        eos = [i for i in eos_ids if 0 <= i < m.lm_head.out_features]  # before the clock
        on_gpu = self.torch_device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        out = {}
        with torch.inference_mode():
            lap = _Lap(self._sync)
            pixels = torch.from_numpy(preprocess_image(image, resolution)).permute(2, 0, 1)[None]
            pixels = pixels.to(self.torch_device, self.dtype)
            input_ids = torch.tensor([ids], device=self.torch_device)
            slots = input_ids == self.image_token
            input_ids = input_ids.masked_fill(slots, 0)  # the slot id may be outside the vocabulary
            out["preprocess_ms"] = lap()
            features = m.model.vision_tower(pixels).last_hidden_state
            out["vision_ms"] = lap()
            features = m.model.multi_modal_projector(features.flatten(2).permute(0, 2, 1))
            out["connector_ms"] = lap()
            embeddings = lm.get_input_embeddings()(input_ids)
            embeddings = embeddings.masked_scatter(
                slots.unsqueeze(-1).expand_as(embeddings), features.to(embeddings.dtype)
            )
            out["preprocess_ms"] += lap()
            cache = DynamicCache(config=lm.config)
            lm(inputs_embeds=embeddings[:, :-1], past_key_values=cache, use_cache=True)
            out["prefill_ms"] = lap()

            def step(emb):
                hidden = lm(inputs_embeds=emb, past_key_values=cache, use_cache=True).last_hidden_state
                logits = m.lm_head(hidden[:, -1])
                logits[:, eos] = -float("inf")
                return logits.argmax(-1, keepdim=True)

            y = step(embeddings[:, -1:])
            y.item()
            out["first_token_ms"] = lap()
            t0 = time.perf_counter()
            for _ in range(tokens - 1):
                y = step(lm.get_input_embeddings()(y))
                y.item()
            out["decode_tps"] = (tokens - 1) / max(time.perf_counter() - t0, 1e-9) if tokens > 1 else 0.0
        out["ttft_ms"] = sum(out[k] for k in PARTS)
        out["peak_memory_gb"] = (
            torch.cuda.max_memory_allocated() / 1e9 if on_gpu else float("nan")
        )
        return out


def import_mlx_vlm_fastvlm():
    """mlx_vlm.models.fastvlm without running mlx_vlm/__init__.py (see the module docstring)."""
    spec = importlib.util.find_spec("mlx_vlm")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError("--compare mlx-vlm needs mlx-vlm installed (pip install mlx-vlm)")
    if "mlx_vlm" not in sys.modules:
        package = types.ModuleType("mlx_vlm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mlx_vlm"] = package
    try:
        import mlx_vlm.models.fastvlm as fastvlm
    except ImportError as e:
        raise BenchmarkError(f"mlx-vlm's fastvlm model cannot be imported ({e})") from None
    return fastvlm


# ----------------------------------------------------------------------------------------------
# The sweep


@dataclass
class Result:
    runtime: str
    device: str
    resolution: int
    image_tokens: int
    prompt_tokens: int
    samples: Dict[str, List[float]] = field(default_factory=dict)

    def summary(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for k in METRICS:
            vals = [v for v in self.samples.get(k, []) if v == v]  # NaN: not measured
            if vals:
                out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        return out

    def median(self, key: str) -> float:
        s = self.summary().get(key)
        return s["median"] if s else float("nan")

    def to_dict(self) -> dict:
        return {
            "runtime": self.runtime, "device": self.device, "resolution": self.resolution,
            "image_tokens": self.image_tokens, "prompt_tokens": self.prompt_tokens,
            "runs": len(self.samples.get("ttft_ms", [])), "metrics": self.summary(),
            "samples": {k: [None if v != v else v for v in vs] for k, vs in self.samples.items()},
        }


class Progress:
    """One line on stderr, redrawn in place: [#####-----] step/total label."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 24):
        self.total, self.done, self.stream, self.width = total, 0, stream, width
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {label}"
        self.stream.write(("\r" + line.ljust(78)) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def sweep(ours: Ours, peers: Sequence, resolutions: Sequence[int], n_text: int, tokens: int,
          runs: int, warmup: int, quiet: bool = False) -> List[Result]:
    processor = ours.processor
    eos = list(processor.eos_token_ids)
    runtimes = [ours] + list(peers)
    progress = Progress(len(resolutions) * len(runtimes) * (runs + warmup),
                        stream=open(os.devnull, "w") if quiet else sys.stderr)
    results = []
    text = None
    for res in resolutions:
        text = text or user_text(processor, n_text, res)
        ids = prompt_ids(processor, text, res)
        slots = processor.tokens_per_image(res)
        image = source_image(res)
        for rt in runtimes:
            r = Result(rt.name, rt.device, res, slots, len(ids))
            for i in range(warmup + runs):
                kind = "warmup" if i < warmup else f"run {i - warmup + 1}/{runs}"
                if isinstance(rt, Ours):
                    sample = rt.run(image, text, res, tokens)
                elif isinstance(rt, MlxVlm):
                    sample = rt.run(image, ids, slots, res, tokens, eos)
                else:
                    sample = rt.run(image, ids, res, tokens, eos)
                progress.step(f"{rt.name} {res}px {kind}")
                if i >= warmup:
                    for k, v in sample.items():
                        r.samples.setdefault(k, []).append(float(v))
            results.append(r)
    progress.close()
    return results


# ----------------------------------------------------------------------------------------------
# Reports


def _cell(summary: dict, key: str, digits: int = 1) -> str:
    s = summary.get(key)
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def format_table(results: List[Result]) -> str:
    head = ("runtime", "res", "img tok", "preprocess ms", "vision ms", "connector ms", "prefill ms",
            "first tok ms", "TTFT ms", "decode tok/s", "peak GB")
    rows = [head]
    for r in results:
        s = r.summary()
        rows.append((r.runtime, str(r.resolution), str(r.image_tokens), _cell(s, "preprocess_ms"),
                     _cell(s, "vision_ms"), _cell(s, "connector_ms"), _cell(s, "prefill_ms"),
                     _cell(s, "first_token_ms"), _cell(s, "ttft_ms"), _cell(s, "decode_tps"),
                     _cell(s, "peak_memory_gb", 2)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(median [min-max] over runs)"


def ratios(results: List[Result]) -> List[dict]:
    """Peer / ours for TTFT and the vision encoder (above 1: we are faster), decode ours / peer."""
    ours = {r.resolution: r for r in results if r.runtime == OURS}
    out = []
    for r in results:
        if r.runtime == OURS or r.resolution not in ours:
            continue
        o = ours[r.resolution]
        out.append({
            "peer": r.runtime, "resolution": r.resolution,
            "ttft_speedup": r.median("ttft_ms") / o.median("ttft_ms"),
            "vision_speedup": r.median("vision_ms") / o.median("vision_ms"),
            "decode_speedup": o.median("decode_tps") / r.median("decode_tps"),
        })
    return out


def format_ratios(rows: List[dict]) -> str:
    lines = [f"{OURS} speed-up (peer time / ours; decode: our tok/s / peer's):"]
    for r in rows:
        lines.append(
            f"  vs {r['peer']:8s} {r['resolution']:5d}px  TTFT {r['ttft_speedup']:.2f}x  "
            f"vision {r['vision_speedup']:.2f}x  decode {r['decode_speedup']:.2f}x"
        )
    return "\n".join(lines)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp_path)`, then rename over PATH: a failed run leaves no half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot(results: List[Result], path: Path, title: str) -> None:
    """TTFT and its parts against resolution (stacked, ours) and TTFT against image tokens (all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in results if r.runtime == OURS]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    x = np.arange(len(ours))
    bottom = np.zeros(len(ours))
    for part in PARTS:
        vals = np.array([r.median(part) for r in ours])
        left.bar(x, vals, bottom=bottom, label=part[:-3].replace("_", " "))
        bottom += vals
    left.set_xticks(x, [f"{r.resolution}px\n{r.image_tokens} tok" for r in ours])
    left.set_ylabel("ms")
    left.set_title(f"{OURS}: TTFT by part")
    left.legend(fontsize=8)
    for name in dict.fromkeys(r.runtime for r in results):
        rs = [r for r in results if r.runtime == name]
        tokens = [r.image_tokens for r in rs]
        (line,) = right.plot(tokens, [r.median("ttft_ms") for r in rs], "o-", label=f"{name} TTFT")
        right.plot(tokens, [r.median("vision_ms") for r in rs], "o--", color=line.get_color(),
                   label=f"{name} vision")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("image tokens")
    right.set_ylabel("ms (median)")
    right.set_title("TTFT (solid) and vision encoder (dashed) against image tokens")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastvlm_mlx.benchmark",
        description="Time to first token and its parts, decode speed and peak memory over "
        "resolutions, optionally side by side with PyTorch and mlx-vlm.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a converted model, or a checkpoint/hub id load() converts")
    src.add_argument("--arch", choices=sorted(ARCHS), help="random weights of the real shapes (default 0.5b)")
    p.add_argument("--resolutions", default="256,512,768,1024,1536",
                   help="comma-separated multiples of 64 (default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="default float16, or float32 when MLX runs on the CPU (whose half-precision "
                   "matmul is slow)")
    p.add_argument("--q-bits", type=int, choices=(4, 8), help="quantize the decoder and connector")
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=28, help="text tokens of the prompt, template included")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate per run (decode speed)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", metavar="F", help="write the results as JSON to F")
    p.add_argument("--plot", metavar="F.png", help="draw TTFT and its parts (needs matplotlib)")
    p.add_argument("--compare", default="", help="peers timed in the same run: torch, mlx-vlm")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_resolutions(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchmarkError(f"--resolutions takes comma-separated integers, got {text!r}") from None
    bad = [v for v in values if v <= 0 or v % 64]
    if not values or bad:
        raise BenchmarkError(f"--resolutions must be positive multiples of 64, got {text!r}")
    return values


def parse_peers(text: str) -> List[str]:
    peers = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in peers if v not in PEERS]
    if unknown:
        raise BenchmarkError(f"--compare: unknown peer(s) {', '.join(unknown)} (torch, mlx-vlm)")
    return list(dict.fromkeys(peers))


def environment(args, dtype_name: str) -> dict:
    import mlx_lm

    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m fastvlm_mlx.benchmark " + " ".join(sys.argv[1:]),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "device": str(mx.default_device()),
        "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
        "model": args.model or f"random weights, FastVLM-{(args.arch or '0.5b').upper()} shapes",
        "dtype": dtype_name, "q_bits": args.q_bits,
        "prompt_tokens": args.prompt_tokens, "tokens": args.tokens,
        "runs": args.runs, "warmup": args.warmup,
    }
    if mx.default_device() == mx.gpu:
        try:
            env["gpu"] = mx.device_info().get("device_name")
        except Exception:  # device_info is backend-dependent
            pass
    return env


def run(args) -> int:
    resolutions = parse_resolutions(args.resolutions)
    peers = parse_peers(args.compare)
    for name, value, low in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0),
                             ("--tokens", args.tokens, 1), ("--prompt-tokens", args.prompt_tokens, 1)):
        if value < low:
            raise BenchmarkError(f"{name} must be at least {low}, got {value}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise BenchmarkError("--plot needs matplotlib (pip install 'fastvlm-mlx[plot]')")
    for out in (args.json, args.plot):
        if out and not Path(out).resolve().parent.is_dir():
            raise BenchmarkError(f"cannot write {out}: its directory does not exist")
        if out and not os.access(Path(out).resolve().parent, os.W_OK):
            raise BenchmarkError(f"cannot write {out}: its directory is not writable")
    dtype = runtime_dtype(args.dtype) or mx.float16
    dtype_name = str(dtype).split(".")[-1]

    if args.model:
        model, processor = load_model(args.model, dtype, args.q_bits, args.q_group_size)
    else:
        model, processor = random_model(args.arch or "0.5b", dtype, args.q_bits, args.q_group_size)
    ours = Ours(model, processor)
    runtimes = []
    for peer in peers:
        if peer == "mlx-vlm":
            runtimes.append(MlxVlm(model.config, dtype, args.q_bits, args.q_group_size))
        else:
            runtimes.append(Torch(model.config, dtype_name))

    env = environment(args, dtype_name)
    print(f"# {env['model']} | {dtype_name}{f' q{args.q_bits}' if args.q_bits else ''} | "
          f"{env['device']} | mlx {env['mlx']} | {args.prompt_tokens} text tokens + image, "
          f"{args.tokens} generated | {args.runs} runs after {args.warmup} warm-up", flush=True)
    results = sweep(ours, runtimes, resolutions, args.prompt_tokens, args.tokens, args.runs,
                    args.warmup, quiet=args.quiet)
    print(format_table(results))
    rows = ratios(results)
    if rows:
        print(format_ratios(rows))
    if args.json:
        doc = {**env, "results": [r.to_dict() for r in results], "ratios": rows}
        write_atomically(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    if args.plot:
        plot(results, Path(args.plot), f"{env['model']}, {dtype_name}, {env['device']}, {env['date']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import ModelLoadError
    from .processing import InputError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (BenchmarkError, ModelLoadError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the JSON or the plot cannot be written
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
