"""Generate text about images, streaming, with an honest time to first token.

Python API::

    import fastvlm_mlx
    model, processor = fastvlm_mlx.load("apple/FastVLM-0.5B")
    for r in fastvlm_mlx.stream_generate(model, processor, "Describe the image.", images=["cat.jpg"]):
        print(r.text, end="", flush=True)
    result = fastvlm_mlx.generate(model, processor, "What colour is the cat?", images=["cat.jpg"])
    result.text, result.token_ids, result.logprobs, result.timings.ttft_ms

CLI::

    python -m fastvlm_mlx.generate --image cat.jpg --prompt "Describe the image."

Time to first token (TTFT) is measured as Apple's app does: from just before preprocessing to the
first sampled token being available, model load and image file/URL decoding excluded. It is the sum
of five parts, each closed by an `mx.eval`, so the lazy graph cannot move work from one part into
another: preprocess (template, tokens, pixels, splice), vision encoder, connector, prefill (every
prompt position but the last, into the KV cache), first token (the last position, sampled and
evaluated). The first token is mlx-lm's own sampling step run here, so that it does not wait for
the second; decoding from it on is mlx-lm's `generate_step`.
"""

import argparse
import collections
import itertools
import json
import os
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .processing import (
    DEFAULT_PROMPT,
    DEFAULT_SYSTEM,
    IMAGE_MARKER,
    ImageInput,
    InputError,
    check_resolution,
    format_prompt,
    image_digest,
    preprocess_image,
    to_pil,
)

DEFAULT_MODEL = "apple/FastVLM-0.5B"
DEFAULT_MAX_TOKENS = 256
DEFAULT_FEATURE_CACHE_SIZE = 16

Prompt = Union[str, Sequence[dict], Sequence[int]]


# ----------------------------------------------------------------------------------------------
# Timings: one type for the CLI, the API (and the server and benchmark, which import it).


@dataclass
class Timings:
    load_ms: float = 0.0  # reading and decoding image files / URLs: outside TTFT
    preprocess_ms: float = 0.0  # pixels, template and tokenization, splice
    vision_ms: float = 0.0  # encoder; 0 when every image's features came from the cache
    connector_ms: float = 0.0
    prefill_ms: float = 0.0  # every prompt position but the last, into the KV cache
    first_token_ms: float = 0.0  # the last position, the first token sampled and evaluated
    ttft_ms: float = 0.0  # preprocess + vision + connector + prefill + first token
    decode_tps: float = 0.0  # tokens per second after the first
    peak_memory_gb: float = 0.0
    feature_cache_hit: bool = False
    queue_ms: Optional[float] = None  # the server only

    def finish_ttft(self) -> None:
        self.ttft_ms = (
            self.preprocess_ms + self.vision_ms + self.connector_ms + self.prefill_ms
            + self.first_token_ms
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["queue_ms"] is None:
            del d["queue_ms"]
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


class _Clock:
    """Milliseconds since the last lap; call only after an mx.eval boundary."""

    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1e3, now
        return ms


# ----------------------------------------------------------------------------------------------
# Responses


@dataclass
class GenerationResponse:
    """One streamed step: `text` is the new printable segment (may be empty)."""

    text: str
    token: int
    logprob: float  # log-softmax of the raw logits at `token` (before processors/temperature)
    logprobs: Optional[mx.array]  # the raw log-probability vector over the vocabulary
    prompt_tokens: int
    image_tokens: int
    generation_tokens: int
    timings: Timings
    finish_reason: Optional[str] = None  # "stop" | "length" on the last response, else None
    resolution: int = 0

    @property
    def peak_memory(self) -> float:  # mlx-lm's name
        return self.timings.peak_memory_gb


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    logprobs: List[float]
    finish_reason: str
    prompt_tokens: int
    image_tokens: int
    timings: Timings
    resolution: int = 0

    @property
    def peak_memory_gb(self) -> float:
        return self.timings.peak_memory_gb

    @property
    def feature_cache_hit(self) -> bool:
        return self.timings.feature_cache_hit

    def to_dict(self) -> dict:
        timings = self.timings.to_dict()
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "logprobs": [float(x) for x in self.logprobs],
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "image_tokens": self.image_tokens,
            "generation_tokens": len(self.token_ids),
            "resolution": self.resolution,
            "timings": timings,
            "peak_memory_gb": timings["peak_memory_gb"],
            "feature_cache_hit": timings["feature_cache_hit"],
        }


# ----------------------------------------------------------------------------------------------
# The vision-feature cache


class FeatureCache:
    """A bounded LRU of vision-encoder outputs, keyed by image content digest, resolution, dtype."""

    def __init__(self, max_items: int = DEFAULT_FEATURE_CACHE_SIZE):
        self.max_items = max_items
        self._items: "collections.OrderedDict[tuple, mx.array]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Optional[mx.array]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: mx.array) -> None:
        if self.max_items <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def feature_cache_for(model) -> FeatureCache:
    """The model's own feature cache (created on first use)."""
    cache = model.__dict__.get("_fastvlm_feature_cache")
    if cache is None:
        size = int(os.environ.get("FASTVLM_FEATURE_CACHE_SIZE", DEFAULT_FEATURE_CACHE_SIZE))
        cache = FeatureCache(size)
        # Bypass nn.Module.__setattr__: this is not a parameter.
        object.__setattr__(model, "_fastvlm_feature_cache", cache)
    return cache


# ----------------------------------------------------------------------------------------------
# Options


@dataclass
class GenerationOptions:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    seed: Optional[int] = None
    sampler: Optional[Callable] = None
    logits_processors: Optional[List[Callable]] = None
    max_kv_size: Optional[int] = None
    prefill_step_size: int = 2048
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000  # mlx-lm's DEFAULT_QUANTIZED_KV_START

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "GenerationOptions":
        kwargs = dict(kwargs)
        if "temp" in kwargs:
            kwargs["temperature"] = kwargs.pop("temp")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)}")
        opts = cls(**{k: v for k, v in kwargs.items() if v is not None or k in ("seed",)})
        if opts.max_tokens is None or opts.max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {opts.max_tokens}")
        if opts.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {opts.temperature}")
        if opts.kv_bits is not None and opts.max_kv_size is not None:
            raise InputError("kv_bits cannot be combined with max_kv_size: mlx-lm cannot quantize its rotating KV cache")
        if opts.prefill_step_size < 1:
            raise InputError(f"prefill_step_size must be at least 1, got {opts.prefill_step_size}")
        return opts

    def make_sampler(self):
        if self.sampler is not None:
            return self.sampler
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def make_processors(self) -> List[Callable]:
        from mlx_lm.sample_utils import make_logits_processors

        procs = make_logits_processors(
            repetition_penalty=self.repetition_penalty,
            repetition_context_size=self.repetition_context_size,
        )
        return procs + list(self.logits_processors or [])


# ----------------------------------------------------------------------------------------------
# The conversation: images, KV cache and token history, turn after turn


def _ms_now() -> float:
    return time.perf_counter() * 1e3


class ChatSession:
    """A conversation about fixed image(s). The first turn encodes the images (or takes their
    features from the cache); every later turn appends its text to the same KV cache.

    `session.stream(prompt)` yields GenerationResponses; `session.generate(prompt)` returns a
    GenerationResult. `prompt` is the user's text, a list of chat messages (first turn only), or
    the full list of prompt token ids with image slots (first turn only, mlx-lm style).
    """

    def __init__(
        self,
        model,
        processor,
        images: Optional[Sequence[ImageInput]] = None,
        system: Optional[str] = DEFAULT_SYSTEM,
        resolution: Optional[int] = None,
        feature_cache: Union[FeatureCache, None, bool] = True,
        max_pixels: Optional[int] = None,
        **options,
    ):
        self.model, self.processor = model, processor
        self.system = system
        # The model's sampling defaults (generation_config.json) hold where the caller is silent.
        given = {k: v for k, v in options.items() if v is not None or k == "seed"}
        defaults = getattr(processor, "generation_defaults", None) or {}
        self.options = GenerationOptions.from_kwargs({**defaults, **given})
        self.resolution = check_resolution(
            int(resolution) if resolution is not None else processor.image_size, processor.stride
        )
        if self.resolution != processor.image_size:
            warnings.warn(
                f"resolution {self.resolution} differs from the model's trained "
                f"{processor.image_size}: {processor.tokens_per_image(self.resolution)} image tokens "
                "per image, and quality may change",
                stacklevel=2,
            )
        if feature_cache is True:
            feature_cache = feature_cache_for(model)
        elif feature_cache is False:
            feature_cache = None
        self.feature_cache: Optional[FeatureCache] = feature_cache
        text_args = model.language_model.args
        self.context_length = int(getattr(text_args, "max_position_embeddings", 0) or 0)
        vocab = int(text_args.vocab_size)
        tid = processor.image_token_id
        # Image slots may hold an id outside the vocabulary (-200 in Apple's layout); mlx-lm only
        # needs a valid id there.
        self._placeholder_id = tid if 0 <= tid < vocab else 0
        im_end = processor.tokenizer.encode("<|im_end|>", add_special_tokens=False)
        self._im_end = im_end[0] if len(im_end) == 1 else None
        self._eos = set(processor.eos_token_ids or []) | set(
            getattr(processor.tokenizer, "eos_token_ids", None) or []
        )

        # Image loading (file or URL decode) is outside TTFT.
        t0 = _ms_now()
        self.images = [to_pil(im, max_pixels=max_pixels) for im in (images or [])]
        self.load_ms = _ms_now() - t0

        self.prompt_cache = None
        self.history: List[int] = []  # every token fed to the decoder, image slots as placeholders
        self.prompt_ids: List[int] = []  # the first turn's ids, image slots as image_token_id
        self.turns = 0
        self._last_finish: Optional[str] = None

    @property
    def token_ids(self) -> List[int]:
        """The conversation so far, as fed to the decoder, image slots as image_token_id."""
        return self.prompt_ids + self.history[len(self.prompt_ids) :]

    def can_rewind(self, n: int) -> bool:
        """Whether `rewind(n)` is possible: the image slots stay within the first n tokens and
        the KV cache can be trimmed (a rotating cache that has wrapped cannot)."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        ids = self.token_ids
        slots = [i for i, t in enumerate(ids) if t == self.processor.image_token_id]
        image_end = slots[-1] + 1 if slots else 0
        return (
            self.turns > 0 and max(image_end, 1) <= n <= len(self.history)
            and can_trim_prompt_cache(self.prompt_cache)
        )

    def rewind(self, n: int) -> None:
        """Keep only the first n tokens of the conversation (KV cache included), so that another
        continuation can follow as a list of token ids: `session.stream(ids)`. The server uses
        this to reuse the longest common prefix of a stateless request's conversation."""
        from mlx_lm.models.cache import trim_prompt_cache

        if not self.can_rewind(n):
            raise ValueError(f"cannot rewind this conversation of {len(self.history)} tokens to {n}")
        trim_prompt_cache(self.prompt_cache, len(self.history) - n)
        del self.history[n:]
        del self.prompt_ids[n:]
        self._last_finish = None

    # -- helpers --------------------------------------------------------------------------------

    def _check_length(self, n: int) -> None:
        if self.context_length and n > self.context_length:
            raise InputError(
                f"the prompt is {n} tokens (text and image), longer than the model's context of "
                f"{self.context_length} tokens"
            )

    def _first_turn_ids(self, prompt: Prompt) -> List[int]:
        n = len(self.images)
        if isinstance(prompt, mx.array):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            ids = [int(t) for t in prompt]
            slots = sum(t == self.processor.image_token_id for t in ids)
            want = n * self.processor.tokens_per_image(self.resolution)
            if slots != want:
                raise InputError(f"the prompt ids hold {slots} image slots; {n} image(s) need {want}")
            return ids
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            prompt = DEFAULT_PROMPT
        text = format_prompt(prompt, n, self.system)
        return self.processor.encode(text, self.resolution)

    def _follow_up_ids(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, mx.array):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            # Token ids to append as they are (the server's continuation after `rewind`).
            if self.processor.image_token_id in prompt:
                raise InputError("follow-up turns cannot add images")
            return [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise InputError("a follow-up turn takes the user's text or token ids")
        if IMAGE_MARKER in prompt:
            raise InputError("follow-up turns cannot add images")
        # Close the assistant turn the way the template does, then open the next one.
        closed = self._last_finish == "stop" and self.history and self.history[-1] == self._im_end
        text = ("" if closed else "<|im_end|>") + (
            f"\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        )
        return self.processor.encode(text, self.resolution)

    def _image_features(self, timings: Timings) -> List[mx.array]:
        """Vision features per image (cache or encoder); fills preprocess_ms and vision_ms."""
        model = self.model
        clock = _Clock()
        dtype = str(model.language_model.model.embed_tokens.weight.dtype)
        keys, feats, missing = [], [], []
        for i, im in enumerate(self.images):
            key = (image_digest(im), self.resolution, dtype)
            keys.append(key)
            hit = self.feature_cache.get(key) if self.feature_cache is not None else None
            feats.append(hit)
            if hit is None:
                missing.append(i)
        pixels = None
        if missing:
            pixels = mx.array(
                np.stack([preprocess_image(self.images[i], self.resolution) for i in missing])
            )
            mx.eval(pixels)
        timings.preprocess_ms += clock.lap()
        if missing:
            encoded = model.encode_images(pixels)
            mx.eval(encoded)
            for j, i in enumerate(missing):
                feats[i] = encoded[j]
                if self.feature_cache is not None:
                    self.feature_cache.put(keys[i], encoded[j])
        timings.vision_ms = clock.lap() if missing else 0.0
        timings.feature_cache_hit = bool(self.images) and not missing
        return feats

    # -- the turn ---------------------------------------------------------------------------------

    def stream(self, prompt: Prompt = None, **overrides) -> Iterator[GenerationResponse]:
        from mlx_lm.generate import generate_step, maybe_quantize_kv_cache
        from mlx_lm.models.cache import make_prompt_cache

        opts = self.options
        overrides = {k: v for k, v in overrides.items() if v is not None}  # None: not given
        if overrides:
            opts = GenerationOptions.from_kwargs({**asdict(self.options), **overrides})
        model, processor = self.model, self.processor
        first = self.turns == 0
        timings = Timings(load_ms=self.load_ms if first else 0.0)
        if opts.seed is not None:
            mx.random.seed(opts.seed)
        mx.reset_peak_memory()

        # -- preprocess: template, tokens (and pixels, inside _image_features) -------------------
        clock = _Clock()
        ids = self._first_turn_ids(prompt) if first else self._follow_up_ids(prompt)
        n_image_tokens = len(self.images) * processor.tokens_per_image(self.resolution) if first else 0
        self._check_length(len(self.history) + len(ids))
        if not ids:
            raise InputError("the prompt is empty")
        timings.preprocess_ms = clock.lap()

        features = None
        if first and self.images:
            feats = self._image_features(timings)
            clock.lap()
            features = model.project(mx.stack(feats))
            mx.eval(features)
            timings.connector_ms = clock.lap()

        # -- splice ------------------------------------------------------------------------------
        embeddings = model.embed(mx.array([ids]), features)[0]
        mx.eval(embeddings)
        timings.preprocess_ms += clock.lap()

        placeholder = [self._placeholder_id if t == processor.image_token_id else t for t in ids]
        if first:
            self.prompt_cache = make_prompt_cache(model.language_model, max_kv_size=opts.max_kv_size)
            self.prompt_ids = list(ids)
        cache = self.prompt_cache

        # -- prefill: all positions but the last, in steps, into the KV cache --------------------
        n_prefill = len(ids) - 1
        done = 0
        while done < n_prefill:
            step = min(opts.prefill_step_size, n_prefill - done)
            model.language_model(
                mx.array([placeholder[done : done + step]]),
                cache=cache,
                input_embeddings=embeddings[None, done : done + step],
            )
            maybe_quantize_kv_cache(cache, opts.quantized_kv_start, opts.kv_group_size, opts.kv_bits)
            mx.eval([c.state for c in cache])
            done += step
        timings.prefill_ms = clock.lap()

        # -- first token: the last prompt position, sampled and evaluated here -------------------
        # mlx-lm's generate_step queues the second step before it hands out the first token
        # (pipelining that pays while decoding), so the first token would wait for the second
        # step's graph to be built, and on MLX's CPU backend for much of its compute (~175 vs
        # ~300 ms for the 0.5B decoder: scripts/first_token_pipelining.py, BENCHMARKS.md).
        # This step is generate_step's own `_step`: the model on the last position, the logits
        # processors, KV quantization, log-softmax and the sampler, on mlx-lm's generation stream.
        from mlx_lm.generate import generation_stream

        raw = collections.deque()
        processors = opts.make_processors()
        if processors:
            # generate_step's processors see only the tokens it was given; prepend the history.
            # The first processor records the raw log-probabilities (before any processor).
            full_history = mx.array(self.history + placeholder, dtype=mx.uint32)

            def record(tokens, logits):
                raw.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
                return logits

            def with_history(p):
                return lambda tokens, logits: p(mx.concatenate([full_history, tokens]), logits)

            processors = [record] + [with_history(p) for p in processors]
        sampler = opts.make_sampler()
        with mx.stream(generation_stream):
            logits = model.language_model(
                mx.array([placeholder[-1:]]), cache=cache, input_embeddings=embeddings[None, -1:]
            )[:, -1, :]
            for p in processors:
                logits = p(mx.array([], dtype=mx.uint32), logits)
            maybe_quantize_kv_cache(cache, opts.quantized_kv_start, opts.kv_group_size, opts.kv_bits)
            first_logprobs = logits - mx.logsumexp(logits, keepdims=True)
            first_token = sampler(first_logprobs)
        mx.eval(first_token, first_logprobs)
        first_token = int(first_token.item())
        timings.first_token_ms = clock.lap()
        timings.finish_ttft()

        # -- decoding: mlx-lm's generate_step, fed the first token as its one-token prompt --------
        # (a generator: nothing runs, and the first token is not fed, until the second is asked for)
        steps = generate_step(
            mx.array([first_token], dtype=mx.uint32),
            model.language_model,
            max_tokens=opts.max_tokens - 1,
            sampler=sampler,
            logits_processors=processors or None,
            prompt_cache=cache,
            prefill_step_size=opts.prefill_step_size,
            kv_bits=opts.kv_bits,
            kv_group_size=opts.kv_group_size,
            quantized_kv_start=opts.quantized_kv_start,
        )
        tokens = itertools.chain([(first_token, first_logprobs[0])], steps)
        detokenizer = processor.tokenizer.detokenizer
        prompt_tokens = len(ids)
        fed = list(placeholder)
        n = 0
        t_first = None
        finish = None
        try:
            for token, logprobs in tokens:
                token = int(token)
                lp_vector = raw.popleft()[0] if processors else logprobs
                if n == 0:
                    t_first = time.perf_counter()
                n += 1
                fed.append(token)
                logprob = float(lp_vector[token].item())
                if n > 1:
                    timings.decode_tps = (n - 1) / max(time.perf_counter() - t_first, 1e-9)
                timings.peak_memory_gb = mx.get_peak_memory() / 1e9
                if token in self._eos:
                    finish = "stop"
                    detokenizer.finalize()
                    yield GenerationResponse(
                        detokenizer.last_segment, token, logprob, lp_vector, prompt_tokens,
                        n_image_tokens, n - 1, timings, finish, self.resolution,
                    )
                    break
                detokenizer.add_token(token)
                if n == opts.max_tokens:
                    finish = "length"
                    detokenizer.finalize()
                yield GenerationResponse(
                    detokenizer.last_segment, token, logprob, lp_vector, prompt_tokens,
                    n_image_tokens, n, timings, finish, self.resolution,
                )
                if finish:
                    break
        finally:
            steps.close()
            # generate_step feeds every token it yields into the cache before yielding it; the
            # first token is fed here when decoding stopped before generate_step began.
            if n == 1:
                model.language_model(mx.array([[first_token]]), cache=cache)
                mx.eval([c.state for c in cache])
            self.history.extend(fed)
            self.turns += 1
            self._last_finish = finish

    def generate(self, prompt: Prompt = None, **overrides) -> GenerationResult:
        return collect(self.stream(prompt, **overrides))


def collect(responses: Iterator[GenerationResponse]) -> GenerationResult:
    """Gather a stream into one result (the final EOS is not a token of the result)."""
    text, ids, lps = [], [], []
    last = None
    for r in responses:
        last = r
        text.append(r.text)
        if r.finish_reason != "stop":
            ids.append(r.token)
            lps.append(r.logprob)
    if last is None:
        raise RuntimeError("generation produced no response")
    return GenerationResult(
        text="".join(text), token_ids=ids, logprobs=lps, finish_reason=last.finish_reason or "length",
        prompt_tokens=last.prompt_tokens, image_tokens=last.image_tokens, timings=last.timings,
        resolution=last.resolution,
    )


# ----------------------------------------------------------------------------------------------
# The public API


def stream_generate(
    model,
    processor,
    prompt: Prompt = None,
    images: Optional[Sequence[ImageInput]] = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Stream an answer about `images`. Never prints.

    prompt: the user's text (default "Describe the image."), a list of chat messages, or prompt
        token ids with image slots.
    images: paths, http(s) URLs, PIL images or HWC numpy arrays.
    kwargs: system, resolution, max_tokens, temperature (temp), top_p, top_k, min_p,
        repetition_penalty, repetition_context_size, seed, sampler, logits_processors,
        max_kv_size, prefill_step_size, kv_bits, kv_group_size, quantized_kv_start,
        feature_cache (a FeatureCache, True for the model's own, False/None for none), max_pixels.
    """
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple, type(None))):
        images = [images]
    session = ChatSession(model, processor, images, **kwargs)
    yield from session.stream(prompt)


def generate(model, processor, prompt: Prompt = None, images=None, **kwargs) -> GenerationResult:
    """The whole answer: text, token_ids, logprobs, finish_reason, prompt_tokens, image_tokens,
    timings (see Timings). Never prints."""
    return collect(stream_generate(model, processor, prompt, images, **kwargs))


# ----------------------------------------------------------------------------------------------
# The CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvlm-generate",
        description="Ask FastVLM about images; streams the answer and reports time to first token.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"converted directory, unconverted checkpoint or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="IMG",
                   help="image path or http(s) URL; repeat or list several")
    p.add_argument("--prompt", default=None, help=f'the question (default "{DEFAULT_PROMPT}")')
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system message")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=None,
                   help="sampling temperature; 0 is greedy (default: the model's "
                   "generation_config.json, else 0)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--repetition-context-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None,
                   help="image resolution (a multiple of 64); default: the model's trained size")
    p.add_argument("--max-kv-size", type=int, default=None)
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--kv-bits", type=int, default=None)
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--quantized-kv-start", type=int, default=5000)
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels (default 100M, or FASTVLM_MAX_PIXELS)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast the weights after loading (default: as converted, or float32 when "
                   "MLX runs on the CPU)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat about the image(s)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    p.add_argument("--quiet", "-q", action="store_true", help="no stats block")
    return p


def format_stats(result_or_response, n_images: int) -> str:
    r = result_or_response
    t = r.timings
    n_gen = len(r.token_ids) if hasattr(r, "token_ids") else r.generation_tokens
    lines = [
        "=" * 10,
        f"Prompt: {r.prompt_tokens} tokens ({r.prompt_tokens - r.image_tokens} text + "
        f"{r.image_tokens} image, {n_images} image(s) at {r.resolution}px)",
        f"TTFT: {t.ttft_ms:.1f} ms = preprocess {t.preprocess_ms:.1f} + vision {t.vision_ms:.1f}"
        + (" (feature cache hit)" if t.feature_cache_hit else "")
        + f" + connector {t.connector_ms:.1f} + prefill {t.prefill_ms:.1f}"
        f" + first token {t.first_token_ms:.1f}",
        f"Image load: {t.load_ms:.1f} ms (outside TTFT, like model load)",
        f"Generation: {n_gen} tokens, {t.decode_tps:.1f} tokens/s",
        f"Peak memory: {t.peak_memory_gb:.3f} GB",
    ]
    return "\n".join(lines)


def _turn_line(t: Timings) -> str:
    parts = f"prefill {t.prefill_ms:.1f} + first token {t.first_token_ms:.1f}"
    if t.vision_ms or t.connector_ms:
        parts = f"vision {t.vision_ms:.1f} + connector {t.connector_ms:.1f} + " + parts
    return f"[TTFT {t.ttft_ms:.1f} ms: preprocess {t.preprocess_ms:.1f} + {parts}; {t.decode_tps:.1f} tok/s]"


def _err(msg: str) -> None:
    msg = " ".join(str(msg).split())
    print(f"error: {msg}", file=sys.stderr, flush=True)


def _stream_to_stdout(responses) -> GenerationResult:
    out = []

    def tee():
        for r in responses:
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
            out.append(r)
            yield r

    result = collect(tee())
    sys.stdout.write("\n")
    sys.stdout.flush()
    return result


def _chat(session: ChatSession, first_prompt: Optional[str], quiet: bool, interactive: bool) -> int:
    prompt = first_prompt
    while True:
        if prompt is None:
            try:
                if interactive:
                    sys.stderr.write(">> ")
                    sys.stderr.flush()
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                return 0
            if not line:  # EOF
                return 0
            prompt = line.strip()
            if not prompt:
                prompt = None
                continue
            if prompt in ("/exit", "/quit"):
                return 0
        try:
            result = _stream_to_stdout(session.stream(prompt))
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return 0
        if not quiet:
            print(_turn_line(result.timings), file=sys.stderr, flush=True)
        prompt = None


def run_cli(args) -> int:
    # Images first: a bad image fails fast, before the model loads.
    images = list(args.image)
    if args.max_pixels is not None and args.max_pixels < 1:
        raise InputError("--max-pixels must be positive")
    t0 = _ms_now()
    pil_images = [to_pil(im, max_pixels=args.max_pixels) for im in images]
    load_ms = _ms_now() - t0

    # transformers (behind mlx-lm's tokenizer loader) warns about our config's model type.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import fastvlm_mlx

    from .loader import runtime_dtype

    model, processor = fastvlm_mlx.load(args.model, dtype=runtime_dtype(args.dtype))

    options = dict(
        max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size, seed=args.seed,
        max_kv_size=args.max_kv_size, prefill_step_size=args.prefill_step_size,
        kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
    )
    session = ChatSession(
        model, processor, pil_images, system=args.system, resolution=args.resolution, **options
    )
    session.load_ms = load_ms

    if args.chat:
        interactive = sys.stdin.isatty()
        return _chat(session, args.prompt, args.quiet, interactive)

    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if args.json:
        result = session.generate(prompt)
        print(json.dumps(result.to_dict()), flush=True)
        return 0
    result = _stream_to_stdout(session.stream(prompt))
    if not args.quiet:
        print(format_stats(result, len(pil_images)), file=sys.stderr, flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chat and args.json:
        parser.error("--chat and --json cannot be combined")

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        return run_cli(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except (ValueError, OSError) as e:  # InputError, ModelLoadError, ConvertError, I/O errors
        _err(e)
        return 1
    except Exception as e:  # never a traceback for the user
        _err(f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
