"""Many requests at once: generate.py's pipeline, batched on mlx-lm's `BatchGenerator`.

    results = fastvlm_mlx.batch_generate(model, processor, ["Describe the image."] * 3,
                                         [["a.jpg"], ["b.jpg"], ["c.jpg"]], max_tokens=64)

    batch = RunningBatch(model, processor, max_batch_size=8)   # what a server's worker drives
    handle = batch.add("What is this?", ["a.jpg"], max_tokens=64)
    while batch:
        for handle, response in batch.step().items(): ...    # GenerationResponses, as streamed

How a request flows:
1. `add` does what `stream_generate` does before the model runs: the options, checked; the
   images, decoded; the template and tokens; the context rule. It returns a handle and the
   request waits (its wait is its `queue_ms`).
2. Each `step` first admits waiting requests while the batch has free rows (`max_batch_size`).
   The admitted requests' images are encoded together: one `generate.image_features` call per
   resolution, so one vision-tower call on every image the feature cache does not hold, and one
   connector call. Then, request by request: the splice (`model.embed`), and every prompt
   position but the last prefilled into the request's own KV cache with `input_embeddings`
   (`generate.prefill_prompt`). Its last token is inserted into mlx-lm's `BatchGenerator` with
   that cache (`insert(..., caches=[cache])`), with the request's own sampler, logits
   processors, `max_tokens` and stop ids.
3. Then one `BatchGenerator.next()`: one decoder step for every row (the rows inserted in this
   step get their first token computed, which the next step hands out). Each row's token is
   detokenized into a GenerationResponse, as `stream_generate` streams them; a finished row
   leaves the batch, and its freed row takes the next waiting request.

A request that fails leaves the batch alone: an error in its images' encode, its prefill, or
its own sampler or logits processors while a step is built is that request's answer (`step`
hands out the exception for its handle), and the other rows go on. (The failing sampler or
processor is passed over for that step, so the step the rows share completes.) An error that
belongs to no row - one raised when the shared step is evaluated - propagates from `step`,
and the batch is then unusable.

Batched answers equal solo ones: greedy ids are the same up to float32 near-ties (the batched
decoder's matmuls round differently), which tests/test_batch.py shows where they occur.
`logprobs` are the raw log-softmax at the chosen id, as in generate: mlx-lm hands out the
processed ones, so a first processor per row records the raw ones (`_history_processors`).

A seeded request is reproducible batched or not, and equals `generate(..., seed=s)`: its row
draws from its own key (`SeededSampler`), split once per token exactly as MLX's global
generator is after `mx.random.seed(s)`, so nothing another row draws can move it. Unseeded
sampling draws from MLX's global generator, as generate does.

Timings stay per request. `vision_ms` is the request's share of the shared encode (by the
images it had encoded), `batch_vision_ms` the whole encode; the pixels' and the connector's
time are shared the same way. `prefill_ms` is the request's own prefill; `first_token_ms` runs
from its end to the request's first token, evaluated, so it holds the prefills of the requests
admitted after it in the same step and a batched decoder step.

What a batch cannot do: quantize KV caches (`kv_bits`: mlx-lm's batch caches have no quantized
kind), mix `max_kv_size` settings (one cache kind per batch), or key a custom `sampler`
callable per row (a seed with one is refused). With `max_kv_size`, mlx-lm's batch rotating
cache keeps no first tokens once the window is full (its solo one keeps 4), so a batched answer
equals the solo one only while prompt and answer fit in the window.
"""

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .feature_cache import FeatureCache, resolve_feature_cache
from .generate import (
    GenerationOptions,
    GenerationResponse,
    GenerationResult,
    Prompt,
    Request,
    _history_processors,
    _placeholder,
    collect,
    context_length,
    fresh_random_state,
    image_features,
    prefill_prompt,
    prepare_request,
)
from .processing import ImageInput, InputError
from .timing import Clock, Timings

DEFAULT_MAX_BATCH_SIZE = 8  # rows decoded together; a 0.5B decoder's step on a CPU is memory-bound


class SeededSampler:
    """mlx-lm's `make_sampler` chain (top-p, min-p, top-k, then a categorical draw at the
    temperature), drawing from a key of its own: each call splits it, as MLX's global generator
    splits its key on every draw, so a row's tokens equal those of `mx.random.seed(seed)` and a
    solo run. (make_sampler's own chain draws from the global generator, hence the chain again.)"""

    def __init__(self, opts: GenerationOptions):
        self.key = mx.random.key(opts.seed)
        self.temperature, self.top_p, self.min_p, self.top_k = (
            opts.temperature, opts.top_p, opts.min_p, opts.top_k)

    def __call__(self, logprobs: mx.array) -> mx.array:
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        self.key, draw = mx.random.split(self.key)
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=draw)


def row_sampler(opts: GenerationOptions):
    """The sampler of one row: greedy and unseeded ones as generate makes them; a seeded one
    with its own key."""
    if opts.seed is None or (opts.sampler is None and opts.temperature == 0):
        return opts.make_sampler()
    if opts.sampler is not None:
        raise InputError("a seed cannot be combined with a custom sampler in a batch: the sampler "
                         "draws from MLX's global generator, which every row shares")
    return SeededSampler(opts)


class _RecordingCache:
    """A feature cache (or none) that notes which images it did not hold, so that a request's
    share of the shared encode and its own `feature_cache_hit` are known."""

    def __init__(self, cache: Optional[FeatureCache]):
        self.cache = cache
        self.missed: List[bool] = []  # one per `get`, in image order

    def get(self, key):
        value = self.cache.get(key) if self.cache is not None else None
        self.missed.append(value is None)
        return value

    def put(self, key, value):
        if self.cache is not None:
            self.cache.put(key, value)


@dataclass
class _Row:
    """One request, from `add` to its last response."""

    handle: int
    request: Request  # checked and tokenized (generate.prepare_request)
    cache: Optional[List]  # the caller's KV cache (a conversation to continue), else None
    added: float  # perf_counter at add: the wait in the queue starts here
    uid: Optional[int] = None  # BatchGenerator's, once admitted
    recorded: List[mx.array] = field(default_factory=list)
    with_processors: bool = False
    detokenizer: object = None
    answer: List[int] = field(default_factory=list)
    t_prefilled: float = 0.0
    t_first: float = 0.0
    error: Optional[Exception] = None  # what failed this request; it then leaves the batch


def _guarded(row: _Row, fn: Callable, fallback: Callable) -> Callable:
    """FN (a row's sampler or logits processor), which if it raises fails ROW and gives
    FALLBACK's value instead, so that the step every row shares still completes."""

    def call(*args):
        if row.error is None:
            try:
                return fn(*args)
            except Exception as e:
                row.error = e
                # A sampler that raised while mx.compile traced it leaves MLX's global random
                # state unusable, for the other rows' draws too.
                fresh_random_state()
        return fallback(*args)

    return call


def _pass_logits(tokens, logits):
    return logits


def _argmax(logprobs):
    return mx.argmax(logprobs, axis=-1)


class RunningBatch:
    """Requests that join (`add`), advance together one token per `step`, and leave when done
    or `remove`d. `max_batch_size` caps the rows decoded together; more requests wait. One
    thread drives it (the model is not thread-safe).

    feature_cache: a FeatureCache, True for the model's own, False/None for none.
    max_kv_size: mlx-lm's rotating KV cache for every row (one cache kind per batch).
    """

    def __init__(self, model, processor, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 feature_cache: Union[FeatureCache, bool, None] = True,
                 max_kv_size: Optional[int] = None):
        from mlx_lm.generate import BatchGenerator, StopSequences

        if max_batch_size < 1:
            raise InputError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model, self.processor = model, processor
        self.max_batch_size = max_batch_size
        self.feature_cache = resolve_feature_cache(feature_cache, model)
        self.max_kv_size = max_kv_size
        # Its own prefill is never used (every row arrives prefilled but its last token).
        self.generator = BatchGenerator(
            model.language_model, completion_batch_size=max_batch_size,
            prefill_batch_size=max_batch_size, max_kv_size=max_kv_size)
        self.stop_sequences = StopSequences([[t] for t in sorted(processor.stop_token_ids)])
        self.placeholder = _placeholder(model, processor.image_token_id)
        self.waiting: List[_Row] = []
        self.active: Dict[int, _Row] = {}  # by BatchGenerator uid
        self._handles = 0

    def __len__(self) -> int:
        """Requests not finished: waiting or decoding."""
        return len(self.waiting) + len(self.active)

    def add(self, prompt: Prompt = None, images: Optional[Sequence[ImageInput]] = None, *,
            prompt_cache: Optional[List] = None, history: Optional[List[int]] = None, **options) -> int:
        """Queue one request; takes stream_generate's arguments (system, resolution, max_pixels,
        load_ms, preprocess_ms, queue_ms and the GenerationOptions; feature_cache is the batch's).
        Bad input raises here (InputError), before the request joins. PROMPT_CACHE and HISTORY
        continue a conversation: the cache is prefilled in place, and once the answer is done
        it holds the whole turn and HISTORY is extended by it, as stream_generate does."""
        if history and prompt_cache is None:
            raise InputError("a history needs the prompt_cache that holds it")
        request = prepare_request(self.model, self.processor, prompt, images, history, **options)
        opts = request.opts
        if opts.kv_bits is not None:
            raise InputError("kv_bits is not supported in a batch: mlx-lm's batch KV caches are not quantized")
        if opts.max_kv_size != self.max_kv_size:
            raise InputError(f"max_kv_size {opts.max_kv_size} differs from the batch's {self.max_kv_size}")
        row_sampler(opts)  # a seed with a custom sampler fails now, not at admission
        if request.ids[-1] == self.processor.image_token_id:
            raise InputError("the prompt ends on an image slot: its last position must be a token")
        self._handles += 1
        self.waiting.append(_Row(self._handles, request, prompt_cache, time.perf_counter()))
        return self._handles

    def remove(self, handle: int) -> None:
        """Drop a request, waiting or decoding (a disconnected client); the others go on. A
        conversation's cache then holds its history and this turn's prefill, and HISTORY says
        so (as when stream_generate is closed early)."""
        for i, row in enumerate(self.waiting):
            if row.handle == handle:
                del self.waiting[i]
                return
        for uid, row in list(self.active.items()):
            if row.handle == handle:
                self.generator.remove([uid])
                del self.active[uid]
                if row.cache is not None:
                    row.request.history.extend(row.request.ids[:-1])
                return

    def step(self) -> Dict[int, Union[GenerationResponse, Exception]]:
        """Admit waiting requests into free rows, then advance every row by one token: each
        row's new response, by handle (rows admitted in this step answer from the next one). A
        request that failed has its exception instead, and has left the batch."""
        responses: Dict[int, Union[GenerationResponse, Exception]] = self._admit()
        if not self.active:
            return responses
        _, generated = self.generator.next()
        for r in generated:
            row = self.active[r.uid]
            if row.error is None:
                responses[row.handle] = self._respond(r, len(generated))
        for uid, row in list(self.active.items()):
            if row.error is not None:
                responses[row.handle] = row.error
                self.generator.remove([uid])
                del self.active[uid]
        return responses

    def close(self) -> None:
        self.generator.close()

    # -- admission: the shared encode, then each request's prefill -------------------------------

    def _admit(self) -> Dict[int, Exception]:
        """Admit waiting requests into free rows; those whose encode or prefill failed, by handle."""
        free = self.max_batch_size - len(self.active)
        if free <= 0 or not self.waiting:
            return {}
        rows, self.waiting = self.waiting[:free], self.waiting[free:]
        now = time.perf_counter()
        for row in rows:
            row.request.timings.queue_ms = (row.request.timings.queue_ms or 0.0) + (now - row.added) * 1e3
        features = self._encode(rows)
        failed = {}
        for row in rows:
            if row.error is None:
                try:
                    self._insert(row, features.get(row.handle))
                except Exception as e:
                    row.error = e
            if row.error is not None:
                failed[row.handle] = row.error
        return failed

    def _encode(self, rows: List[_Row]) -> Dict[int, mx.array]:
        """The projected features of the rows' images, by handle: per resolution and tiling,
        one `image_features` call on all of their images. Each row's timings get its share."""
        by_views: Dict[tuple, List[_Row]] = {}
        for row in rows:
            if row.request.n_image_tokens:
                by_views.setdefault((row.request.size, row.request.tiling), []).append(row)
        out = {}
        for (size, tiling), group in by_views.items():
            images = [im for row in group for im in row.request.images]
            shared = Timings()
            recorder = _RecordingCache(self.feature_cache)
            try:
                projected = image_features(self.model, images, size, recorder, shared, tiling=tiling)
            except Exception as e:  # it fails the requests that shared it, not the batch
                for row in group:
                    row.error = e
                continue
            missed = recorder.missed
            n_missed = max(sum(missed), 1)
            start, first_row = 0, 0  # the group's images, and their feature rows
            for row in group:
                n = len(row.request.images)
                own_missed = sum(missed[start:start + n])
                share = own_missed / n_missed
                t = row.request.timings
                t.preprocess_ms += shared.preprocess_ms * share  # the pixels
                t.vision_ms = shared.vision_ms * share
                t.batch_vision_ms = shared.vision_ms
                t.connector_ms = shared.connector_ms * n / len(images)
                t.feature_cache_hit = own_missed == 0
                n_rows = row.request.n_image_tokens  # its images' slots, sizes and tiles counted
                out[row.handle] = projected[first_row:first_row + n_rows]
                start, first_row = start + n, first_row + n_rows
        return out

    def _insert(self, row: _Row, features: Optional[mx.array]) -> None:
        """Splice, prefill all but the last position into the row's own cache, then hand the
        last token and the cache to the BatchGenerator."""
        from mlx_lm.models.cache import make_prompt_cache

        model, req, image_id = self.model, row.request, self.processor.image_token_id
        clock = Clock()
        embeddings = model.embed(mx.array([req.ids]), features)[0]
        mx.eval(embeddings)
        req.timings.preprocess_ms += clock.lap()
        cache = row.cache if row.cache is not None else make_prompt_cache(
            model.language_model, max_kv_size=self.max_kv_size)
        fed = [self.placeholder if t == image_id else t for t in req.ids]
        prefill_prompt(model, embeddings, fed, cache, req.opts)
        req.timings.prefill_ms = clock.lap()
        # The processors see the whole history, as in generate: what the cache holds, then the
        # tokens mlx-lm feeds (from this turn's last prompt token on).
        history = [self.placeholder if t == image_id else t for t in req.history] + fed[:-1]
        processors, row.recorded = _history_processors(req.opts, mx.array(history, dtype=mx.uint32))
        row.with_processors = bool(processors)
        processors = [_guarded(row, p, _pass_logits) for p in processors]
        limit = context_length(model)
        max_tokens = (max(1, min(req.opts.max_tokens, limit - len(req.history) - len(req.ids)))
                      if limit else req.opts.max_tokens)
        (row.uid,) = self.generator.insert(
            [[fed[-1]]], max_tokens=[max_tokens], caches=[cache],
            samplers=[_guarded(row, row_sampler(req.opts), _argmax)],
            logits_processors=[processors], stop_sequences=[self.stop_sequences])
        row.detokenizer = self.processor.tokenizer.detokenizer  # a fresh copy
        row.t_prefilled = time.perf_counter()
        self.active[row.uid] = row

    # -- decoding: one BatchGenerator response -> one GenerationResponse --------------------------

    def _respond(self, r, rows: int) -> GenerationResponse:
        """As generate's `_decode` turns a generate_step token into a response (ROWS: how many
        were decoded in this step)."""
        row = self.active[r.uid]
        req, t = row.request, row.request.timings
        t.batch_size = max(t.batch_size or 0, rows)
        token = int(r.token)
        raw = row.recorded.pop(0)[0] if row.with_processors else r.logprobs
        row.answer.append(token)
        n = len(row.answer)
        now = time.perf_counter()
        if n == 1:
            t.first_token_ms, row.t_first = (now - row.t_prefilled) * 1e3, now
        else:
            t.decode_tps = (n - 1) / max(now - row.t_first, 1e-9)
        t.peak_memory_gb = mx.get_peak_memory() / 1e9
        eos = r.finish_reason == "stop"
        if not eos:
            row.detokenizer.add_token(token)
        if r.finish_reason:
            row.detokenizer.finalize()
            del self.active[r.uid]
            if row.cache is not None:  # the conversation's cache now holds the whole turn
                row.cache[:] = r.prompt_cache
                req.history.extend(req.ids + row.answer)
        return GenerationResponse(
            row.detokenizer.last_segment, token, float(raw[token].item()), raw, len(req.ids),
            req.n_image_tokens, n - eos, t, r.finish_reason, req.size,
        )


def as_completed(batch: RunningBatch, requests: Iterable[Tuple[object, tuple, dict]],
                 refused: Optional[Callable[[object, InputError], None]] = None,
                 ) -> Iterator[Tuple[object, GenerationResult]]:
    """Feed REQUESTS, (key, args, kwargs) for `batch.add`, into BATCH as rows free up; yield
    (key, result) as each request finishes. A request `add` refuses (bad input) goes to
    REFUSED(key, error) when given; otherwise the InputError propagates. A request that fails
    while it runs raises its error here."""
    keys: Dict[int, object] = {}
    responses: Dict[int, List[GenerationResponse]] = {}
    requests = iter(requests)
    while True:
        # One batch's worth waiting beyond the decoding rows: enough for the next admission,
        # and images are decoded only shortly before they are encoded.
        while len(batch) < 2 * batch.max_batch_size:
            request = next(requests, None)
            if request is None:
                break
            key, args, kwargs = request
            try:
                handle = batch.add(*args, **kwargs)
            except InputError as e:
                if refused is None:
                    raise
                refused(key, e)
                continue
            keys[handle], responses[handle] = key, []
        if not len(batch):
            return
        for handle, r in batch.step().items():
            if isinstance(r, Exception):
                raise r
            # (the raw vector per token would keep each step's whole batch of logits alive)
            responses[handle].append(replace(r, logprobs=None))
            if r.finish_reason:
                yield keys.pop(handle), collect(iter(responses.pop(handle)))


def batch_generate(
    model,
    processor,
    prompts: Sequence[Prompt],
    images: Optional[Sequence[Optional[Sequence[ImageInput]]]] = None,
    *,
    videos: Optional[Sequence] = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    feature_cache: Union[FeatureCache, bool, None] = True,
    **options,
) -> List[GenerationResult]:
    """One GenerationResult per prompt, in order, with generate's fields and timings, decoded
    `max_batch_size` rows at a time (see the module's docstring for how).

    images: one list of images per prompt (an image alone, None or [] for a text-only prompt),
        or None when no prompt has any.
    videos: one video file (or None) per prompt, instead of its images; its frames are sampled
        by the options' `frames` or `fps` (see video.py).
    options: stream_generate's (system, resolution, tiles, tile_size, max_pixels, max_tokens,
        temperature, seed, ...), the same for every prompt. Requests join as rows free up, so a bad input raises
        when its turn comes.
    """
    prompts = list(prompts)
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(images)} image lists")
    videos = [None] * len(prompts) if videos is None else list(videos)
    if len(videos) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(videos)} videos")
    sampling = {k: options.pop(k) for k in ("frames", "fps") if k in options}  # (videos only)
    batch = RunningBatch(model, processor, max_batch_size=max_batch_size,
                         feature_cache=feature_cache, max_kv_size=options.get("max_kv_size"))
    mx.reset_peak_memory()
    requests = ((i, (p, ims), options if v is None else {**options, "video": v, **sampling})
                for i, (p, ims, v) in enumerate(zip(prompts, images, videos)))
    results: List[Optional[GenerationResult]] = [None] * len(prompts)
    try:
        for i, result in as_completed(batch, requests):
            results[i] = result
    finally:
        batch.close()
    return results
