"""The benchmark's peers: other runtimes of the same model, behind one interface.

Each runtime has a `name`, a `device` (in words) and `run(inputs) -> Timings`: one generation
from the same `Inputs` (a decoded image, our templated prompt ids with their image slots, the
resolution, the token count, the EOS ids to mask), timed part by part at the boundaries of
`fastvlm_mlx.timing` with its `Clock`, each part closed by the runtime's own synchronization,
so that TTFT is the same sum of parts for everyone. Our own runtime (benchmark.py's `Ours`)
answers the same call.

- `torch`: transformers' `FastVlmForConditionalGeneration` (on CUDA when MLX runs on a GPU and
  torch sees one, else on the CPU);
- `mlx-vlm`: mlx-vlm's `fastvlm` port, imported without mlx-vlm's package `__init__`, which pulls
  in far more than the model needs (conventions.md).
Peers get random weights of our model's shapes, in the same dtype (and quantization, for
mlx-vlm; transformers' peer is not quantized).
"""

import importlib.util
import platform
import sys
import types
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ModelConfig
from .extras import EXTRAS, install_line, missing
from .processing import preprocess_image
from .random_model import tame_random_weights
from .timing import Clock, Timings


class PeerUnavailable(Exception):
    """A peer that cannot be built here (its package is missing); one line says why."""


@dataclass(frozen=True)
class Inputs:
    """What every runtime gets for one run."""

    image: np.ndarray  # decoded RGB, uint8 (HWC): file decoding is outside TTFT
    text: str  # the user's question, for a runtime that templates and tokenizes it itself (ours)
    ids: List[int]  # the templated prompt's ids, `image_slots` image-token slots in them
    image_slots: int
    resolution: int
    tokens: int  # tokens to generate; EOS is masked, so every run decodes this many
    eos_ids: Sequence[int]


# ----------------------------------------------------------------------------------------------
# What every runtime shares


def weight_bytes(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def others_bytes(model: nn.Module) -> int:
    """MLX memory held by everything but MODEL's weights (the peers' weights in a --compare run):
    subtracted from MLX's process-wide peak, so each runtime's peak is its own."""
    return max(mx.get_active_memory() - weight_bytes(model), 0)


def no_eos_greedy(eos_ids: Sequence[int], vocab_size: int) -> Callable:
    """Greedy sampling that never ends the answer, so every run decodes the same count."""
    mask = np.zeros((vocab_size,), np.float32)
    mask[[i for i in eos_ids if 0 <= i < vocab_size]] = -np.inf
    mask = mx.array(mask)
    return lambda logprobs: mx.argmax(logprobs + mask, axis=-1)


def tokens_per_second(tokens: int, decode_ms: float) -> float:
    """Decode speed: the tokens after the first over the time they took."""
    return (tokens - 1) / max(decode_ms / 1e3, 1e-9) if tokens > 1 else 0.0


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


# ----------------------------------------------------------------------------------------------
# The peers


def import_mlx_vlm_fastvlm():
    """mlx_vlm.models.fastvlm without running mlx_vlm/__init__.py (see the module docstring)."""
    if "mlx_vlm" not in sys.modules:  # a second peer finds the bare package of the first
        spec = importlib.util.find_spec("mlx_vlm")
        if spec is None or not spec.submodule_search_locations:
            raise PeerUnavailable(unavailable("mlx-vlm") or "--compare mlx-vlm: mlx_vlm is not a package")
        package = types.ModuleType("mlx_vlm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mlx_vlm"] = package
    try:
        import mlx_vlm.models.fastvlm as fastvlm
    except ImportError as e:
        raise PeerUnavailable(f"mlx-vlm's fastvlm model cannot be imported ({e})") from None
    return fastvlm


class MlxVlm:
    """mlx-vlm's fastvlm port, random weights of our model's shapes, same dtype and quantization."""

    name = "mlx-vlm"
    requires, install = ("mlx_vlm",), "pip install mlx-vlm"

    def __init__(self, config: ModelConfig, dtype: mx.Dtype, q_bits: Optional[int] = None,
                 q_group_size: int = 64):
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

    def run(self, inputs: Inputs) -> Timings:
        from mlx_lm.models.cache import make_prompt_cache

        m = self.model
        ids = inputs.ids
        mask = no_eos_greedy(inputs.eos_ids, m.language_model.config.vocab_size)  # before the clock
        others = others_bytes(m)
        mx.reset_peak_memory()
        clock = Clock()
        out = {}
        # Their prompt holds one -200 marker where our prompt holds the image slots.
        first = ids.index(self.our_image_token)
        marked = ids[:first] + [self.image_token] + ids[first + inputs.image_slots:]
        pixels = mx.array(preprocess_image(inputs.image, inputs.resolution))[None].astype(self.dtype)
        input_ids = mx.array([marked])
        mx.eval(pixels, input_ids)
        out["preprocess_ms"] = clock.lap()
        _, features, _ = m.vision_tower(pixels)
        mx.eval(features)
        out["vision_ms"] = clock.lap()
        B, H, W, C = features.shape
        features = m.mm_projector(features.reshape(B, H * W, C))
        mx.eval(features)
        out["connector_ms"] = clock.lap()
        embeddings = m.prepare_inputs_for_multimodal(features, input_ids, None)
        mx.eval(embeddings)
        out["preprocess_ms"] += clock.lap()
        cache = make_prompt_cache(m.language_model)
        L = embeddings.shape[1]
        m.language_model(input_ids[:, : L - 1], cache=cache, inputs_embeds=embeddings[:, :-1])
        mx.eval([c.state for c in cache])
        out["prefill_ms"] = clock.lap()

        def step(y, emb=None):
            logits = m.language_model(y, cache=cache, inputs_embeds=emb).logits[:, -1, :]
            return mask(logits)

        y = step(mx.array([[0]]), embeddings[:, -1:])
        y.item()
        out["first_token_ms"] = clock.lap()
        # Decoding, pipelined as mlx-lm's generate_step does: queue the next step, then read.
        mx.async_eval(y)
        for _ in range(inputs.tokens - 1):
            nxt = step(y[None])
            mx.async_eval(nxt)
            y.item()
            y = nxt
        y.item()
        return Timings(**out, decode_tps=tokens_per_second(inputs.tokens, clock.lap()),
                       peak_memory_gb=(mx.get_peak_memory() - others) / 1e9)


class Torch:
    """transformers' FastVlmForConditionalGeneration, random weights of our model's shapes,
    in the same dtype; not quantized (Q_BITS is accepted for the common signature only)."""

    name = "torch"
    requires, install = EXTRAS["verify"], install_line("verify")

    def __init__(self, config: ModelConfig, dtype: mx.Dtype, q_bits: Optional[int] = None,
                 q_group_size: int = 64):
        try:
            import torch
            from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config
        except ImportError as e:
            raise PeerUnavailable(f"--compare torch needs torch, timm and transformers ({e})") from None
        self.torch = torch
        on_gpu = mx.default_device() == mx.gpu and torch.cuda.is_available()
        self.torch_device = torch.device("cuda" if on_gpu else "cpu")
        self.device = f"torch {self.torch_device} ({torch.cuda.get_device_name() if on_gpu else platform.processor() or 'cpu'})"
        self.dtype = getattr(torch, dtype_name(dtype))
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

    def run(self, inputs: Inputs) -> Timings:
        torch = self.torch
        from transformers import DynamicCache

        m = self.model
        lm = m.model.language_model
        eos = [i for i in inputs.eos_ids if 0 <= i < m.lm_head.out_features]  # before the clock
        on_gpu = self.torch_device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        out = {}
        with torch.inference_mode():
            clock = Clock(self._sync)
            pixels = torch.from_numpy(preprocess_image(inputs.image, inputs.resolution)).permute(2, 0, 1)[None]
            pixels = pixels.to(self.torch_device, self.dtype)
            input_ids = torch.tensor([inputs.ids], device=self.torch_device)
            slots = input_ids == self.image_token
            input_ids = input_ids.masked_fill(slots, 0)  # the slot id may be outside the vocabulary
            out["preprocess_ms"] = clock.lap()
            features = m.model.vision_tower(pixels).last_hidden_state
            out["vision_ms"] = clock.lap()
            features = m.model.multi_modal_projector(features.flatten(2).permute(0, 2, 1))
            out["connector_ms"] = clock.lap()
            embeddings = lm.get_input_embeddings()(input_ids)
            embeddings = embeddings.masked_scatter(
                slots.unsqueeze(-1).expand_as(embeddings), features.to(embeddings.dtype)
            )
            out["preprocess_ms"] += clock.lap()
            cache = DynamicCache(config=lm.config)
            lm(inputs_embeds=embeddings[:, :-1], past_key_values=cache, use_cache=True)
            out["prefill_ms"] = clock.lap()

            def step(emb):
                hidden = lm(inputs_embeds=emb, past_key_values=cache, use_cache=True).last_hidden_state
                logits = m.lm_head(hidden[:, -1])
                logits[:, eos] = -float("inf")
                return logits.argmax(-1, keepdim=True)

            y = step(embeddings[:, -1:])
            y.item()
            out["first_token_ms"] = clock.lap()
            for _ in range(inputs.tokens - 1):
                y = step(lm.get_input_embeddings()(y))
                y.item()
            out["decode_tps"] = tokens_per_second(inputs.tokens, clock.lap())
        peak = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else float("nan")
        return Timings(**out, peak_memory_gb=peak)


# The peers by their --compare names, each built as PEER(config, dtype, q_bits, q_group_size).
PEERS = {"torch": Torch, "mlx-vlm": MlxVlm}


def unavailable(name: str) -> Optional[str]:
    """Why peer NAME cannot run here, with the line that installs it; None when it can. Its
    packages are looked up, not imported, so the check costs nothing before any work."""
    peer = PEERS[name]
    absent = missing(peer.requires)
    if not absent:
        return None
    return f"--compare {name} needs {', '.join(absent)}, not installed here: {peer.install}"
