"""Generate text about images, streaming, with an honest time to first token.

Python API (mlx-lm's layering: plain pipeline functions, then `stream_generate`, then `generate`)::

    import fastvlm_mlx
    model, processor = fastvlm_mlx.load("apple/FastVLM-0.5B")
    for r in fastvlm_mlx.stream_generate(model, processor, "Describe the image.", images=["cat.jpg"]):
        print(r.text, end="", flush=True)
    result = fastvlm_mlx.generate(model, processor, "What colour is the cat?", images=["cat.jpg"])
    result.text, result.token_ids, result.logprobs, result.timings.ttft_ms

A conversation is a prompt cache and its token history, as in mlx-lm: pass the same
`prompt_cache=` (from `make_prompt_cache(model.language_model)`) and `history=` (a list) to every
turn (`chat.ChatSession` holds them for you). CLI::

    python -m fastvlm_mlx.generate --image cat.jpg --prompt "Describe the image."
    python -m fastvlm_mlx chat --image cat.jpg        # follow-up questions (chat.py)

The pipeline, each step a function here: image features (feature cache, pixels, vision tower,
connector) -> splice (`model.embed`) -> prefill and the first token -> mlx-lm's `generate_step`.
Time to first token is defined once, in timing.py.
"""

import itertools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from . import _cli
from ._callable_module import make_callable
from .feature_cache import FeatureCache, resolve_feature_cache
from .loader import load, runtime_dtype
from .processing import (
    DEFAULT_PROMPT,
    DEFAULT_SYSTEM,
    ImageInput,
    InputError,
    check_resolution,
    image_digest,
    is_whole_number,
    preprocess_image,
    to_pil,
)
from .tiles import Tiling, TilingError, parse_grid, runtime_tiling
from .timing import Clock, Timings, ms_since

DEFAULT_MODEL = _cli.DEFAULT_MODEL
DEFAULT_MAX_TOKENS = 256

Prompt = Union[str, Sequence[dict], Sequence[int]]


class ContextLengthError(InputError):
    """The prompt does not fit in the model's context."""


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
# Options: sampling and mlx-lm's KV-cache settings, checked in one place


class OptionError(InputError):
    """A generation option out of its range; `option` is its name (as in the API)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option} {message}")
        self.option = option


# What MLX's quantize supports ("The supported bits are 1, 2, 3, 4, 5, 6 and 8", "group sizes
# are 32, 64, and 128"). Anything else fails inside mlx-lm's KV quantization, a group size of 0
# with SIGFPE, which kills the process.
KV_BITS = (1, 2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass
class GenerationOptions:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0  # 1: no nucleus filtering (mlx-lm's default)
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
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
    def from_kwargs(cls, kwargs: dict, defaults: Optional[dict] = None,
                    vocab_size: Optional[int] = None,
                    head_dim: Optional[int] = None) -> "GenerationOptions":
        """Options from keyword arguments (None: not given), over DEFAULTS (the model's
        generation_config.json), checked (against the model's VOCAB_SIZE and HEAD_DIM when
        given; `for_model` gives both)."""
        kwargs = dict(kwargs)
        if "temp" in kwargs:
            kwargs["temperature"] = kwargs.pop("temp")
        unknown = sorted(set(kwargs) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)}")
        given = {k: v for k, v in kwargs.items() if v is not None}
        opts = cls(**{**(defaults or {}), **given})
        opts.check(vocab_size, head_dim)
        return opts

    @classmethod
    def for_model(cls, model, kwargs: dict, defaults: Optional[dict] = None) -> "GenerationOptions":
        """from_kwargs, checked against MODEL (its vocabulary and attention head width)."""
        return cls.from_kwargs(kwargs, defaults, vocab_size=model.vocab_size, head_dim=model.head_dim)

    def replace(self, **overrides) -> "GenerationOptions":
        """These options with OVERRIDES (None: keep) applied and checked."""
        return self.from_kwargs(overrides, defaults=vars(self)) if overrides else self

    def check(self, vocab_size: Optional[int] = None, head_dim: Optional[int] = None) -> None:
        """The one check of every sampling and KV-cache option (the CLIs, the API and the server
        all come here); a bad one raises OptionError naming it. VOCAB_SIZE (the width of the
        model's logits) bounds top_k: mlx-lm's top-k raises inside its compiled sampler, which
        leaves MLX's global random state unusable. HEAD_DIM (one attention head's width) must
        be a multiple of kv_group_size when kv_bits is set: MLX quantizes each head's keys and
        values in groups, and would fail every request once its cache reaches
        quantized_kv_start."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise OptionError(name, f"must be {rule}, got {getattr(self, name)!r}")

        def whole(name: str, low: int, rule: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            need(is_whole_number(value) and value >= low, name, rule)

        def real(name: str) -> bool:
            value = getattr(self, name)
            return _is_number(value) and math.isfinite(value)

        whole("max_tokens", 1, "a whole number >= 1")
        need(real("temperature") and self.temperature >= 0, "temperature", "a finite number >= 0")
        need(real("top_p") and 0 < self.top_p <= 1, "top_p", "in (0, 1] (1: off)")
        need(real("min_p") and 0 <= self.min_p <= 1, "min_p", "in [0, 1] (0: off)")
        whole("top_k", 0, "a whole number >= 0 (0: off)")
        if vocab_size is not None:
            need(self.top_k < vocab_size, "top_k", f"below the vocabulary of {vocab_size} tokens")
        if self.repetition_penalty is not None:
            need(real("repetition_penalty") and self.repetition_penalty > 0, "repetition_penalty",
                 "a finite number > 0")
        whole("repetition_context_size", 1, "a whole number >= 1")
        if self.seed is not None:
            need(is_whole_number(self.seed) and 0 <= self.seed < 2**64, "seed", "a whole number in [0, 2**64)")
        whole("max_kv_size", 1, "a whole number >= 1", optional=True)
        whole("prefill_step_size", 1, "a whole number >= 1")
        if self.kv_bits is not None:
            need(self.kv_bits in KV_BITS and is_whole_number(self.kv_bits), "kv_bits",
                 f"one of {', '.join(map(str, KV_BITS))} (what MLX can quantize to)")
        need(self.kv_group_size in KV_GROUP_SIZES and is_whole_number(self.kv_group_size), "kv_group_size",
             f"one of {', '.join(map(str, KV_GROUP_SIZES))}")
        if self.kv_bits is not None and head_dim is not None:
            need(head_dim % self.kv_group_size == 0, "kv_group_size",
                 f"a divisor of the model's attention head width, {head_dim}, with kv_bits")
        whole("quantized_kv_start", 0, "a whole number >= 0")
        if self.kv_bits is not None and self.max_kv_size is not None:
            raise OptionError("kv_bits", "cannot be combined with max_kv_size: mlx-lm cannot "
                              "quantize its rotating KV cache")

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
# The pipeline, step by step


_WARNED_RESOLUTIONS = set()


def context_length(model) -> int:
    """The decoder's context (0: unbounded)."""
    return int(getattr(model.language_model.args, "max_position_embeddings", 0) or 0)


def resolve_resolution(model, processor, resolution: Optional[int]) -> int:
    """The resolution asked for (default: the trained one), checked: a multiple of the stride
    whose image tokens fit in the model's context (checked on the numbers, before anything is
    built for it). A change of the image-token count from the trained size is said once per
    process."""
    size = check_resolution(resolution if resolution is not None else processor.image_size,
                            processor.stride)
    limit, n_tokens = context_length(model), processor.tokens_per_image(size)
    if limit and n_tokens > limit:
        raise InputError(f"resolution {size} needs {n_tokens} image tokens per image, more than "
                         f"the model's context of {limit} tokens")
    if size != processor.image_size and (processor.image_size, size) not in _WARNED_RESOLUTIONS:
        _WARNED_RESOLUTIONS.add((processor.image_size, size))
        warnings.warn(
            f"resolution {size} differs from the model's trained {processor.image_size}: "
            f"{n_tokens} image tokens per image, and quality may change",
            stacklevel=3,
        )
    return size


def resolve_views(model, processor, resolution: Optional[int] = None, tiles=None,
                  tile_size: Optional[int] = None) -> Tuple[int, Optional[Tiling]]:
    """(the views' resolution, the tiling or None for one square view) of a request, checked.

    Without TILES, the checkpoint's own: its AnyRes tiling at its trained size (which a
    resolution cannot change), or one view at the resolution. TILES ("2x2", (2, 2)) tiles any
    image into that grid at TILE_SIZE (default the resolution, else the trained size), beside a
    global view, merged as the checkpoint merges (tiles.py).
    """
    if tiles is None:
        if tile_size is not None:
            raise InputError("tile_size needs tiles (a grid such as 2x2)")
        tiling = processor.tiling
        if tiling is not None and resolution is not None and resolution != tiling.tile_size:
            raise InputError(
                f"this model tiles its images (anyres) at its trained {tiling.tile_size} px; "
                f"resolution {resolution} cannot change that (tiles and tile_size can)")
        return resolve_resolution(model, processor, resolution), tiling
    if tile_size is not None and resolution is not None and tile_size != resolution:
        raise InputError(f"tile_size {tile_size} and resolution {resolution} differ: with tiles, "
                         "give the views' size once")
    try:
        grid = parse_grid(tiles)
    except TilingError as e:
        raise InputError(str(e)) from None
    size = resolve_resolution(model, processor, tile_size if tile_size is not None else resolution)
    return size, runtime_tiling(grid, size, processor.patch_merge_type)


def check_context(model, n_tokens: int, n_image_tokens: int) -> None:
    """The one context-length rule: a prompt (with what its cache holds) must leave room."""
    limit = context_length(model)
    if limit and n_tokens > limit:
        raise ContextLengthError(
            f"the prompt is {n_tokens} tokens ({n_image_tokens} of them image tokens), longer "
            f"than the model's context of {limit} tokens"
        )


def images_that_fit(model, processor, prompt, size: int, system=DEFAULT_SYSTEM) -> Optional[int]:
    """How many images at SIZE fit in the model's context beside PROMPT's first turn (None: the
    context is unbounded, or the prompt fixes its own image count, with markers or ids)."""
    limit = context_length(model)
    if not limit:
        return None
    try:
        one, two = (len(processor.prompt_ids(prompt, n, size, system)) for n in (1, 2))
    except InputError:
        return None
    per_image = two - one  # its slots and the marker's newline
    return max(0, (limit - (one - per_image)) // per_image)


def video_frames(model, processor, video, size: int, prompt=None, system=DEFAULT_SYSTEM,
                 frames: Optional[int] = None, fps: Optional[float] = None,
                 max_pixels: Optional[int] = None):
    """VIDEO's sampled frames (a video.Video; see video.read_video), refused in one line when
    more of them than fit in the context beside PROMPT, saying how many would (before decoding
    when the file's frame count tells)."""
    from .video import FrameLimitError, read_video

    fit = images_that_fit(model, processor, prompt, size, system)
    try:
        return read_video(video, frames=frames, fps=fps, max_frames=fit, max_pixels=max_pixels)
    except FrameLimitError as e:
        raise ContextLengthError(
            f"video {video}: {e.wanted} frames at {size} px ({processor.tokens_per_image(size)} "
            f"image tokens each) do not fit in the model's context of {context_length(model)} "
            f"tokens with this prompt; at most {fit} do: sample fewer (frames / --frames, fps / "
            "--fps) or use a lower resolution") from None


def image_features(
    model,
    images: Sequence,
    resolution: int,
    feature_cache: Optional[FeatureCache],
    timings: Timings,
    tiling: Optional[Tiling] = None,
) -> mx.array:
    """Decoded images -> their projected features (their image tokens, d), in image order.

    Each image is one square view at RESOLUTION, or with TILING a global view and its tiles
    (tiles.py). Each image's vision features (of all its views) come from FEATURE_CACHE (keyed
    by content digest, resolution, dtype and tiling) or from one batched vision-tower call on
    every view of the missing ones; the connector runs on all, then the tiles' merge. Fills
    preprocess_ms (pixels), vision_ms (0 when every image was cached), connector_ms (with the
    merge) and feature_cache_hit.
    """
    clock = Clock()
    dtype = str(model.language_model.model.embed_tokens.weight.dtype)
    tiled = () if tiling is None else (tiling.key,)
    keys = [(image_digest(im), resolution, dtype) + tiled for im in images]
    feats = [feature_cache.get(k) if feature_cache is not None else None for k in keys]
    missing = [i for i, f in enumerate(feats) if f is None]
    if missing:
        if tiling is None:
            views = [preprocess_image(images[i], resolution)[None] for i in missing]
        else:
            views = [tiling.views(images[i]) for i in missing]
        pixels = mx.array(np.concatenate(views))
        mx.eval(pixels)
        timings.preprocess_ms += clock.lap()
        encoded = model.encode_images(pixels)  # (views, tokens per view, C)
        mx.eval(encoded)
        timings.vision_ms = clock.lap()
        start = 0
        for i, v in zip(missing, views):
            feats[i] = encoded[start:start + len(v)]
            start += len(v)
            if feature_cache is not None:
                feature_cache.put(keys[i], feats[i])
    timings.feature_cache_hit = not missing
    clock.lap()
    projected = model.project(mx.concatenate([f.reshape(-1, f.shape[-1]) for f in feats]))
    if tiling is not None:
        rows, start = [], 0
        for im, f in zip(images, feats):
            n = f.shape[0] * f.shape[1]
            own = projected[start:start + n].reshape(f.shape[0], f.shape[1], -1)
            rows.append(tiling.merge_features(own, im.size, getattr(model, "image_newline", None)))
            start += n
        projected = mx.concatenate(rows)
    mx.eval(projected)
    timings.connector_ms = clock.lap()
    return projected


def prefill_prompt(model, embeddings: mx.array, token_ids: Sequence[int], cache: List,
                   opts: GenerationOptions) -> None:
    """Feed every prompt position but the last into CACHE, in prefill_step_size steps, each
    evaluated. (batch.py prefills this way and lets mlx-lm's BatchGenerator run the last one.)"""
    from mlx_lm.generate import maybe_quantize_kv_cache

    lm = model.language_model
    n = len(token_ids) - 1
    for start in range(0, n, opts.prefill_step_size):
        stop = min(start + opts.prefill_step_size, n)
        lm(mx.array([token_ids[start:stop]]), cache=cache, input_embeddings=embeddings[None, start:stop])
        maybe_quantize_kv_cache(cache, opts.quantized_kv_start, opts.kv_group_size, opts.kv_bits)
        mx.eval([c.state for c in cache])


def prefill(model, embeddings: mx.array, token_ids: Sequence[int], cache: List, opts: GenerationOptions,
            sampler: Callable, processors: List[Callable]):
    """Feed every prompt position but the last into CACHE (in prefill_step_size steps), then
    run the last one and sample the first token. Returns (the first token, the log-softmax of
    its raw logits), both evaluated, with the time split at the boundary:
    (token, logprobs, prefill_ms, first_token_ms).

    The first token is sampled here, not by mlx-lm's `generate_step`: that one queues its
    second step before it hands out the first token (pipelining that pays while decoding), so
    the first token would wait for the second's graph, and on MLX's CPU for much of its compute
    (~175 vs ~300 ms for the 0.5B decoder: scripts/first_token_pipelining.py). This step is
    generate_step's own: the model on the last position, the logits processors, KV
    quantization, log-softmax and the sampler, on mlx-lm's generation stream.
    """
    from mlx_lm.generate import generation_stream, maybe_quantize_kv_cache

    lm = model.language_model
    clock = Clock()
    prefill_prompt(model, embeddings, token_ids, cache, opts)
    prefill_ms = clock.lap()
    with mx.stream(generation_stream):
        logits = lm(mx.array([token_ids[-1:]]), cache=cache, input_embeddings=embeddings[None, -1:])[:, -1, :]
        for p in processors:
            logits = p(mx.array([], dtype=mx.uint32), logits)
        maybe_quantize_kv_cache(cache, opts.quantized_kv_start, opts.kv_group_size, opts.kv_bits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        token = sampler(logprobs)
    mx.eval(token, logprobs)
    return int(token.item()), logprobs[0], prefill_ms, clock.lap()


def fresh_random_state() -> None:
    """Reseed MLX's global random state from fresh entropy. mlx-lm's samplers are compiled with
    that state as an input and output; one that raises while being traced (mlx-lm's top-k on a
    k it refuses) leaves the state an array without a primitive, and every later unseeded sample
    fails ("Attempting to eval an array without a primitive") until something reseeds it."""
    mx.random.seed(int.from_bytes(os.urandom(8), "little"))


def _history_processors(opts: GenerationOptions, history: mx.array):
    """The logits processors, each seeing the whole HISTORY before what generate_step feeds it
    (generate_step's processors see only the tokens it was given), and a first one that records
    the raw log-probabilities (before any processor). Returns (processors, recorded)."""
    processors = opts.make_processors()
    recorded: List[mx.array] = []
    if not processors:
        return [], recorded

    def record(tokens, logits):
        recorded.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        return logits

    def with_history(p):
        return lambda tokens, logits: p(mx.concatenate([history, tokens]), logits)

    return [record] + [with_history(p) for p in processors], recorded


def _placeholder(model, image_token_id: int) -> int:
    """A valid id for the image slots (Apple's layout marks them -200, outside the vocabulary);
    their embeddings are overwritten by the splice, and processors only need a real id."""
    rows = int(model.language_model.args.vocab_size)
    return image_token_id if 0 <= image_token_id < rows else 0


# ----------------------------------------------------------------------------------------------
# The public API


@dataclass
class Request:
    """One request, checked and tokenized: what stream_generate (and a batch, batch.py) has
    before the model runs."""

    opts: GenerationOptions
    size: int  # the resolution
    images: list  # decoded
    ids: List[int]  # this turn's prompt, image slots as image_token_id
    history: List[int]  # what the prompt cache holds before this turn
    n_image_tokens: int
    timings: Timings  # load_ms, preprocess_ms (the template and tokens) and queue_ms so far
    tiling: Optional[Tiling] = None  # the images' AnyRes tiles (None: one square view each)


def prepare_request(model, processor, prompt, images, history, *, system=DEFAULT_SYSTEM,
                    resolution=None, max_pixels=None, load_ms=0.0, preprocess_ms=0.0, queue_ms=None,
                    tiles=None, tile_size=None, video=None, frames=None, fps=None,
                    **options) -> Request:
    """stream_generate's first part, with its arguments: the options, resolution and tiles,
    checked; the images (or the video's frames), decoded; the template and tokens; the context
    rule."""
    opts = GenerationOptions.for_model(model, options, defaults=processor.generation_defaults)
    size, tiling = resolve_views(model, processor, resolution, tiles, tile_size)
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple, type(None))):
        images = [images]
    if video is not None:
        if images:
            raise InputError("give images or a video, not both")
        if history:
            raise InputError("a video goes in the first turn of a conversation")
        t0 = time.perf_counter()  # decoding is outside TTFT, like an image's
        images = video_frames(model, processor, video, size, prompt, system, frames, fps,
                              max_pixels).images
        load_ms += ms_since(t0)
    elif frames is not None or fps is not None:
        raise InputError("frames and fps sample a video: they need video=")
    t0 = time.perf_counter()
    images = [to_pil(im, max_pixels=max_pixels) for im in images or []]
    timings = Timings(load_ms=load_ms + ms_since(t0), preprocess_ms=preprocess_ms, queue_ms=queue_ms)
    history = [] if history is None else history

    # -- preprocess: the template and tokens -------------------------------------------------
    clock = Clock()
    if history:
        ids = processor.follow_up_ids(prompt, history, size)
    else:
        ids = processor.prompt_ids(prompt, len(images), size, system,
                                   image_tokens=processor.image_tokens(images, size, tiling))
    if not ids:
        raise InputError("the prompt is empty")
    n_image_tokens = sum(t == processor.image_token_id for t in ids)
    check_context(model, len(history) + len(ids), n_image_tokens)
    timings.preprocess_ms += clock.lap()
    if images and not n_image_tokens:  # their rows are in the prompt cache already
        timings.feature_cache_hit = True
    return Request(opts, size, images, ids, history, n_image_tokens, timings, tiling)


def stream_generate(
    model,
    processor,
    prompt: Prompt = None,
    images: Optional[Sequence[ImageInput]] = None,
    *,
    prompt_cache: Optional[List] = None,
    history: Optional[List[int]] = None,
    system: Optional[str] = DEFAULT_SYSTEM,
    resolution: Optional[int] = None,
    feature_cache: Union[FeatureCache, bool, None] = True,
    max_pixels: Optional[int] = None,
    load_ms: float = 0.0,
    preprocess_ms: float = 0.0,
    queue_ms: Optional[float] = None,
    tiles=None,
    tile_size: Optional[int] = None,
    video=None,
    frames: Optional[int] = None,
    fps: Optional[float] = None,
    **options,
) -> Iterator[GenerationResponse]:
    """Stream an answer about `images`. Never prints.

    prompt: the user's text (default "Describe the image."), a list of chat messages, or prompt
        token ids with the image slots. On a later turn (HISTORY not empty): the user's text,
        templated as a follow-up, or ids to append as they are.
    images: paths, http(s) URLs, PIL images or HWC numpy arrays. Images whose slots are already
        in PROMPT_CACHE (a later turn) are not encoded again (`feature_cache_hit`).
    prompt_cache: mlx-lm's KV cache to continue (made here when None); history: the ids it
        holds, a list this call extends by what it feeds (prompt and answer).
    load_ms, preprocess_ms, queue_ms: time the caller spent decoding images, preprocessing
        (e.g. tokenizing) and waiting, counted in the Timings.
    tiles, tile_size: AnyRes tiles for a single-view checkpoint (experimental): tiles=(2, 2)
        encodes each image as a 2x2 grid of TILE_SIZE tiles (default the resolution, else the
        trained one) beside a global view (tiles.py). A checkpoint trained with tiles tiles
        its images without being asked.
    video: a video file, instead of images: its frames, sampled by `frames` (default 8) or
        `fps` (see video.py), become the images, in time order; decoding counts in load_ms.
    options: system, resolution, feature_cache (a FeatureCache, True for the model's own,
        False/None for none), max_pixels, and GenerationOptions' fields: max_tokens,
        temperature (temp), top_p, top_k, min_p, repetition_penalty, repetition_context_size,
        seed, sampler, logits_processors, max_kv_size, prefill_step_size, kv_bits,
        kv_group_size, quantized_kv_start.
    """
    from mlx_lm.models.cache import make_prompt_cache

    request = prepare_request(model, processor, prompt, images, history, system=system,
                              resolution=resolution, max_pixels=max_pixels, load_ms=load_ms,
                              preprocess_ms=preprocess_ms, queue_ms=queue_ms, tiles=tiles,
                              tile_size=tile_size, video=video, frames=frames, fps=fps, **options)
    opts, size, images, ids, history, timings = (
        request.opts, request.size, request.images, request.ids, request.history, request.timings)
    n_image_tokens = request.n_image_tokens
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(
        model.language_model, max_kv_size=opts.max_kv_size)
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    mx.reset_peak_memory()

    # -- the images' features, then the splice ------------------------------------------------
    clock = Clock()
    features = None
    if n_image_tokens:
        features = image_features(model, images, size, resolve_feature_cache(feature_cache, model), timings,
                                  tiling=request.tiling)
        clock.lap()
    embeddings = model.embed(mx.array([ids]), features)[0]
    mx.eval(embeddings)
    timings.preprocess_ms += clock.lap()

    # -- prefill and the first token ----------------------------------------------------------
    placeholder = _placeholder(model, processor.image_token_id)
    fed = [placeholder if t == processor.image_token_id else t for t in ids]
    processors, recorded = _history_processors(
        opts, mx.array([placeholder if t == processor.image_token_id else t for t in history] + fed,
                       dtype=mx.uint32))
    sampler = opts.make_sampler()
    first, first_logprobs, timings.prefill_ms, timings.first_token_ms = prefill(
        model, embeddings, fed, cache, opts, sampler, processors)

    # Generation stops at the end of the context (the first token is always given).
    limit = context_length(model)
    max_tokens = max(1, min(opts.max_tokens, limit - len(history) - len(ids))) if limit else opts.max_tokens
    yield from _decode(model, processor, first, first_logprobs, ids, history, cache, opts, sampler,
                       processors, recorded, max_tokens, timings, n_image_tokens, size)


def _decode(model, processor, first, first_logprobs, ids, history, cache, opts, sampler, processors,
            recorded, max_tokens, timings, n_image_tokens, size) -> Iterator[GenerationResponse]:
    """Decoding from the first token on: mlx-lm's `generate_step`, fed the first token as its
    one-token prompt, with detokenizing, stop ids and the history kept with the cache."""
    from mlx_lm.generate import generate_step

    # (a generator: nothing runs, and the first token is not fed, until the second is asked for)
    steps = generate_step(
        mx.array([first], dtype=mx.uint32), model.language_model, max_tokens=max_tokens - 1,
        sampler=sampler, logits_processors=processors or None, prompt_cache=cache,
        prefill_step_size=opts.prefill_step_size, kv_bits=opts.kv_bits,
        kv_group_size=opts.kv_group_size, quantized_kv_start=opts.quantized_kv_start,
    )
    tokens = itertools.chain([(first, first_logprobs)], steps)
    detokenizer = processor.tokenizer.detokenizer  # a fresh copy per call
    stop_ids = processor.stop_token_ids
    answer: List[int] = []
    t_first = time.perf_counter()
    try:
        for token, logprobs in tokens:
            token = int(token)
            raw = recorded.pop(0)[0] if processors else logprobs
            answer.append(token)
            n = len(answer)
            if n > 1:
                timings.decode_tps = (n - 1) / max(time.perf_counter() - t_first, 1e-9)
            timings.peak_memory_gb = mx.get_peak_memory() / 1e9
            eos = token in stop_ids
            finish = "stop" if eos else "length" if n == max_tokens else None
            if not eos:
                detokenizer.add_token(token)
            if finish:
                detokenizer.finalize()
            yield GenerationResponse(
                detokenizer.last_segment, token, float(raw[token].item()), raw, len(ids),
                n_image_tokens, n - eos, timings, finish, size,
            )
            if finish:
                break
    finally:
        steps.close()
        # generate_step feeds every token it yields into the cache before yielding it; the
        # first token is fed here when decoding stopped before generate_step began.
        if len(answer) == 1:
            model.language_model(mx.array([[first]]), cache=cache)
            mx.eval([c.state for c in cache])
        history.extend(ids + answer)


def generate(model, processor, prompt: Prompt = None, images=None, **kwargs) -> GenerationResult:
    """The whole answer: text, token_ids, logprobs, finish_reason, prompt_tokens, image_tokens,
    timings (see Timings). Never prints. Takes stream_generate's arguments."""
    return collect(stream_generate(model, processor, prompt, images, **kwargs))


# ----------------------------------------------------------------------------------------------
# The CLI


def build_parser():
    p = _cli.ArgumentParser(
        prog="fastvlm-generate",
        description="Ask FastVLM about images; streams the answer and reports time to first token.",
    )
    _cli.add_model_arg(p)
    p.add_argument("--image", action="extend", nargs="+", default=[], metavar="IMG",
                   help="image path or http(s) URL; repeat or list several")
    add_video_args(p)
    p.add_argument("--prompt", "-p", default=None, help=f'the question (default "{DEFAULT_PROMPT}")')
    p.add_argument("--system", "--system-prompt", dest="system", default=DEFAULT_SYSTEM,
                   help="system message")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                   help="the most tokens to generate")
    _cli.add_temperature_arg(p)
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the most likely tokens whose probabilities sum to P (default: "
                   "the model's generation_config.json, else 1: off)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the K most likely tokens (default: the model's "
                   "generation_config.json, else 0: off)")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than P times the most likely one (default: the "
                   "model's generation_config.json, else 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalize the logits of recent tokens by this factor (default: off)")
    p.add_argument("--repetition-context-size", type=int, default=20,
                   help="how many recent tokens --repetition-penalty looks at")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    _cli.add_run_args(p)
    _cli.add_tile_args(p)
    _cli.add_kv_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    _cli.add_verbosity_args(p, "the stats block (TTFT and its parts, tokens/s, memory)")
    return p


def add_video_args(p) -> None:
    from .video import DEFAULT_FRAMES

    g = p.add_argument_group("video (its frames become the images; needs the video extra)")
    g.add_argument("--video", default=None, metavar="FILE",
                   help="a video file, instead of --image: sampled frames, in time order")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--frames", type=_cli.positive(int), default=DEFAULT_FRAMES, metavar="N",
                     help="sample N frames: the centres of N equal segments of the video")
    how.add_argument("--fps", type=_cli.positive(float), default=None, metavar="F",
                     help="sample a frame every 1/F seconds instead (segment centres), each frame "
                     "at most once")


def check_video_args(args) -> None:
    """What --video can tell before the model loads: not beside --image, PyAV installed, the
    file there."""
    if args.video is None:
        return
    from .video import check_file

    if args.image:
        raise InputError("give --image or --video, not both")
    check_file(args.video)


def cli_video(args, model, processor):
    """--video's frames (a video.Video) for the generate and chat CLIs; None without --video."""
    if args.video is None:
        return None
    size = resolve_resolution(model, processor, args.resolution)
    return video_frames(model, processor, args.video, size, args.prompt, args.system,
                        frames=None if args.fps else args.frames, fps=args.fps,
                        max_pixels=args.max_pixels)


def format_stats(result: GenerationResult, n_images: int, video=None) -> str:
    t = result.timings
    if video is None:
        load = f"Image load: {t.load_ms:.1f} ms (outside TTFT, like model load)"
    else:
        load = (f"Video: {len(video.images)} frames at "
                f"{', '.join(f'{s:.2f}' for s in video.timestamps)} s of {video.duration:.2f} s, "
                f"decoded in {t.load_ms:.1f} ms (outside TTFT, like model load)")
    lines = [
        "=" * 10,
        f"Prompt: {result.prompt_tokens} tokens ({result.prompt_tokens - result.image_tokens} text + "
        f"{result.image_tokens} image, {n_images} image(s) at {result.resolution}px)",
        f"TTFT: {t.ttft_ms:.1f} ms = preprocess {t.preprocess_ms:.1f} + vision {t.vision_ms:.1f}"
        + (" (feature cache hit)" if t.feature_cache_hit else "")
        + f" + connector {t.connector_ms:.1f} + prefill {t.prefill_ms:.1f}"
        f" + first token {t.first_token_ms:.1f}",
        load,
        f"Generation: {len(result.token_ids)} tokens, {t.decode_tps:.1f} tokens/s",
        f"Peak memory: {t.peak_memory_gb:.3f} GB",
    ]
    return "\n".join(lines)


def stream_to_stdout(responses: Iterator[GenerationResponse]) -> GenerationResult:
    """Print each text segment as it comes; the collected result."""

    def tee():
        for r in responses:
            if r.text:
                sys.stdout.write(r.text)
                sys.stdout.flush()
            yield r

    result = collect(tee())
    sys.stdout.write("\n")
    sys.stdout.flush()
    return result


def generation_options(args) -> dict:
    """The generate/chat CLIs' sampling and KV flags as stream_generate options, checked now
    (what needs the model, top_k against its vocabulary, is checked again once it is loaded),
    so that a bad flag fails before the model loads."""
    options = dict(
        max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size, seed=args.seed, **_cli.kv_options(args),
    )
    GenerationOptions.from_kwargs(options)
    return options


def run_cli(args) -> int:
    # Options and images first, images decoded once: bad input fails before the model loads.
    options = dict(generation_options(args), **_cli.tile_options(args))
    check_video_args(args)
    t0 = time.perf_counter()
    images = [to_pil(im, max_pixels=args.max_pixels) for im in args.image]
    load_ms = ms_since(t0)
    model, processor = load(args.model, dtype=runtime_dtype(args.dtype))
    video = cli_video(args, model, processor)
    if video is not None:
        images, load_ms = video.images, video.decode_ms
    responses = stream_generate(
        model, processor, args.prompt, images, system=args.system, resolution=args.resolution,
        load_ms=load_ms, **options,
    )
    if args.json:
        out = collect(responses).to_dict()
        if video is not None:
            out["video"] = {"duration_s": round(video.duration, 6),
                            "timestamps_s": [round(t, 6) for t in video.timestamps]}
        print(json.dumps(out), flush=True)
        return 0
    result = stream_to_stdout(responses)
    if not args.quiet:
        print(format_stats(result, len(images), video), file=sys.stderr, flush=True)
    return 0


main = _cli.main_of(build_parser, run_cli)
make_callable(__name__)  # fastvlm_mlx.generate(...) calls generate()


if __name__ == "__main__":  # the package's own copy of this module (see __init__)
    from fastvlm_mlx.generate import main as package_main

    sys.exit(package_main())
