"""The server's model worker, apart from HTTP: jobs, a bounded queue, the kept conversations
(prompt caches) and stop strings. One thread owns the model and decodes up to
`max_batch_size` jobs together, as the rows of a batch.RunningBatch (continuous batching): a
job that arrives while others decode joins at the next step, and the jobs admitted together
have their images encoded in one vision-tower call per resolution.

What mlx-lm's batch caches cannot hold - quantized KV caches (`kv_bits`) or a rotating one
(`max_kv_size`: its batch kind keeps no first tokens once the window is full, so answers
would differ from a solo run) - and `max_batch_size` 1 run every job alone, one after
another, as `ChatSession.stream` does.

It knows nothing of HTTP: it takes explicit settings, reports failures as the domain errors
below (and the pipeline's InputError / ContextLengthError), and hands each job's results back
as events (`delta`, `final`, `error`) on the job's own asyncio queue. server.py maps them to
OpenAI's responses and status codes.
"""

import asyncio
import collections
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .batch import DEFAULT_MAX_BATCH_SIZE, RunningBatch
from .chat import ChatSession
from .feature_cache import default_feature_cache
from .generate import (
    ContextLengthError,
    GenerationOptions,
    check_context,
    context_length,
    fresh_random_state,
    resolve_views,
)
from .processing import InputError
from .tiles import Tiling, parse_grid
from .timing import ms_since

log = logging.getLogger("fastvlm_mlx.engine")


class EngineError(Exception):
    """A job the engine could not run; the message says why in one line."""


class EngineBusy(EngineError):
    """The queue is full, or the job waited longer than it may."""


class EngineStopped(EngineError):
    """The worker is not running (stopped, or never started)."""


class EngineShuttingDown(EngineStopped):
    """The server is shutting down: waiting jobs are refused, the running ones end early."""


class GenerationFailed(EngineError):
    """Generation raised something unexpected; the worker itself goes on serving."""


@dataclass
class EngineSettings:
    resolution: Optional[int] = None  # default: the model's trained size
    # AnyRes tiles for every request (a grid such as (2, 2); a request's `tiles` overrides it)
    # and their size (default: the resolution); see generate.resolve_views.
    tiles: Optional[Tuple[int, int]] = None
    tile_size: Optional[int] = None
    max_queue: int = 32  # jobs waiting beyond this are refused at once (EngineBusy)
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # jobs decoded together (1: one at a time)
    prompt_cache_size: int = 8  # conversations whose KV cache is kept for reuse
    prompt_cache_bytes: Optional[int] = 2**30  # and at most this many bytes of KV cache in all
    # mlx-lm's KV-cache options, passed through
    max_kv_size: Optional[int] = None
    prefill_step_size: int = 2048
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000
    # Prompt text longer than this is refused before it is tokenized (tokenizing megabytes takes
    # seconds that nothing can interrupt); default: CHARS_PER_TOKEN_BOUND x the context.
    max_prompt_chars: Optional[int] = None

    def cache_options(self) -> dict:
        return dict(max_kv_size=self.max_kv_size, prefill_step_size=self.prefill_step_size,
                    kv_bits=self.kv_bits, kv_group_size=self.kv_group_size,
                    quantized_kv_start=self.quantized_kv_start)


# No tokenizer packs more characters than this into one token on text that fits the context
# (English runs at ~4), so a prompt over this many characters per context token cannot fit.
CHARS_PER_TOKEN_BOUND = 16
MAX_PROMPT_CHARS_UNBOUNDED = 2**20  # for a model without a context limit


class StopText:
    """Streams text while holding back any tail that may begin a stop sequence; cuts the text at
    the first stop sequence."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def add(self, segment: str) -> Tuple[str, bool]:
        """New text -> (text safe to send now, whether a stop sequence was hit)."""
        self.text += segment
        if not self.stops:
            return self.flush(), False
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        out = self.text[self.sent : len(self.text) - hold]
        self.sent += len(out)
        return out, False

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


class Job:
    """One request's work for the worker, and the channel back to its handler (an asyncio
    queue fed from the worker thread). `start` is called when it leaves the queue to decode.

    prompt_ids: the templated conversation's ids, image slots included (`Engine.tokenize`);
    images: decoded images and their digests; load_ms, preprocess_ms: the time spent decoding
    them and tokenizing; sampling: stream_generate's sampling options; logprobs, top_logprobs:
    what to report per token.
    """

    def __init__(self, loop, prompt_ids: List[int], images: Sequence, digests: Sequence[str],
                 load_ms: float, sampling: dict, max_tokens: int, stops: List[str],
                 logprobs: bool = False, top_logprobs: int = 0, preprocess_ms: float = 0.0,
                 tiles: Optional[Tuple[int, int]] = None):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.started = asyncio.Event()
        self.cancelled = threading.Event()
        self.state = "queued"  # -> running | abandoned; guarded by the engine's lock
        self.prompt_ids, self.images, self.digests = prompt_ids, images, digests
        self.load_ms, self.preprocess_ms = load_ms, preprocess_ms
        self.sampling, self.max_tokens, self.stops = sampling, max_tokens, stops
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.tiles = tiles  # the request's own AnyRes grid (None: the engine's; Engine.views)
        self.submitted = time.perf_counter()

    def _call(self, fn, *args):
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def post(self, kind: str, **data) -> None:
        self._call(self.events.put_nowait, (kind, data))

    def start(self) -> None:
        self._call(self.started.set)


def common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SessionCache:
    """The conversations kept for reuse: ChatSessions keyed by (image digests, resolution). A
    request takes the one sharing the longest token prefix with it (image slots included, so the
    key's digests say whose pixels those slots hold) and puts it back when done."""

    def __init__(self, max_items: int, max_bytes: Optional[int] = None):
        self.max_items, self.max_bytes = max_items, max_bytes
        self.items: List[Tuple[tuple, ChatSession]] = []

    def take(self, key: tuple, ids: List[int]) -> Tuple[Optional[ChatSession], int]:
        best, best_n = None, 0
        for i, (k, session) in enumerate(self.items):
            if k != key:
                continue
            # At least the last prompt token must run, for the first token's logits.
            n = min(common_prefix(session.token_ids, ids), len(ids) - 1)
            if n > best_n and session.can_rewind(n):
                best, best_n = i, n
        if best is None:
            return None, 0
        return self.items.pop(best)[1], best_n

    @staticmethod
    def nbytes(session: ChatSession) -> int:
        return sum(getattr(c, "nbytes", 0) for c in session.prompt_cache or [])

    def put(self, key: tuple, session: ChatSession) -> None:
        self.items.append((key, session))
        # Evict the least recently used beyond either limit (the newest too, if it alone is over).
        while self.items and (
            len(self.items) > self.max_items
            or self.max_bytes is not None and sum(self.nbytes(s) for _, s in self.items) > self.max_bytes
        ):
            self.items.pop(0)

    def __len__(self) -> int:
        return len(self.items)


def top_logprobs(r, n: int) -> List[Tuple[int, float]]:
    """The N most likely (token, raw logprob) pairs of a streamed step, most likely first."""
    import mlx.core as mx

    if not n or r.logprobs is None:
        return []
    v = r.logprobs.astype(mx.float32)
    top = mx.argpartition(-v, kth=n - 1)[:n].tolist()
    pairs = sorted(zip(top, v[mx.array(top)].tolist()), key=lambda p: -p[1])
    return [(t, _finite(lp)) for t, lp in pairs]


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # OpenAI's value for "impossible"


class Turn:
    """A job being answered: its conversation (a ChatSession taken from the SessionCache, or
    new), and what its stream has said so far. `take` turns each GenerationResponse into the
    job's `delta` events, with stop strings and the shutdown cut."""

    def __init__(self, engine: "Engine", job: Job, queue_ms: float):
        self.engine, self.job, self.queue_ms = engine, job, queue_ms
        size, tiling, grid = engine.views(job.tiles)
        self.key = (tuple(job.digests), size, tiling)
        self.session, self.cached = engine._session_for(self.key, job.prompt_ids, job.images,
                                                        size, grid)
        self.stop = StopText(job.stops)
        self.finish, self.timings, self.n_tokens, self.prompt_tokens = None, None, 0, 0

    def turn_args(self) -> tuple:
        """(prompt, images), options: the session's turn, from the first id the cache lacks. The
        handler's tokenization is preprocessing, so part of TTFT: it is passed in."""
        job = self.job
        return ((job.prompt_ids[self.cached:], job.images if self.cached else None),
                dict(job.sampling, max_tokens=job.max_tokens, preprocess_ms=job.preprocess_ms,
                     queue_ms=self.queue_ms, load_ms=job.load_ms))

    def take(self, r) -> bool:
        """One response -> the job's delta event; True once the job is done (its answer ended,
        or its client left)."""
        job = self.job
        self.timings, self.prompt_tokens = r.timings, r.prompt_tokens
        eos = r.finish_reason == "stop"  # the EOS token is not part of the completion
        self.n_tokens += not eos
        text, hit = self.stop.add(r.text)
        finish = "stop" if hit else r.finish_reason
        if finish is None and self.engine._shutting_down:
            finish = "length"  # cut short, as max_tokens would, so the answer ends cleanly
        if finish and not hit:
            text += self.stop.flush()
        entries = [(r.token, _finite(r.logprob), top_logprobs(r, job.top_logprobs))] \
            if job.logprobs and not eos else []
        if text or entries:
            job.post("delta", text=text, logprobs=entries)
        self.finish = finish
        return bool(finish) or job.cancelled.is_set()

    def end(self) -> None:
        """The answer is over (the session's turn too): the conversation goes back to the
        SessionCache, and the job gets its final event."""
        self.session.images = []  # their rows are in the KV cache; free the pixels
        self.engine.sessions.put(self.key, self.session)
        self.engine._finish(self.job, self.finish, self.job.prompt_ids, self.cached, self.n_tokens,
                            self.timings)


# Never set: the worker threads of stopped engines wait on it until the process ends.
_PARKED = threading.Event()


def _work_then_park(run_ref: "weakref.WeakMethod", done: threading.Event) -> None:
    """A model worker thread's body: run the engine's worker, set DONE, then wait for ever (the
    thread is a daemon: it goes with the process), holding no reference to the engine.

    Why it never ends: a thread that ran MLX work and ends just before the process exits races
    MLX's static destructors with its per-thread state, and the process aborts ("terminate
    called without an active exception": 1 to 12 exits in 40 of a small script, MLX 0.32 on
    Linux; none while the thread still lives). A server stops its engine and exits at once, so
    the worker stays."""
    run = run_ref()
    try:
        if run is not None:
            run()
    finally:
        done.set()
        del run
    _PARKED.wait()


class Engine:
    """Owns the model. `submit` queues a Job; the worker thread (`_run`) decodes up to
    `max_batch_size` of them together."""

    def __init__(self, model, processor, settings: Optional[EngineSettings] = None):
        self.model, self.processor = model, processor
        self.settings = settings = settings or EngineSettings()
        # (tile_size alone is the size of the requests' own tiles)
        self.resolution, self.tiling = resolve_views(
            model, processor, settings.resolution, settings.tiles,
            settings.tile_size if settings.tiles is not None else None)
        self.check_options({})  # bad KV-cache options fail at start-up, not at the first request
        limit = context_length(model)
        self.max_prompt_chars = settings.max_prompt_chars or (
            CHARS_PER_TOKEN_BOUND * limit if limit else MAX_PROMPT_CHARS_UNBOUNDED)
        if settings.max_batch_size < 1:
            raise InputError(f"max_batch_size must be at least 1, got {settings.max_batch_size}")
        self.feature_cache = default_feature_cache(model)
        self.sessions = SessionCache(settings.prompt_cache_size, settings.prompt_cache_bytes)
        self._cond = threading.Condition()
        self._queue: "collections.deque[Job]" = collections.deque()
        self.running: List[Job] = []  # the jobs decoding (at most max_batch_size)
        # The jobs decode as the rows of a RunningBatch, unless they must run alone (see the
        # module's docstring); then `batch` is None.
        self.batched = (settings.max_batch_size > 1 and settings.kv_bits is None
                        and settings.max_kv_size is None)
        self.batch = self._new_batch()
        self._rows: Dict[int, Turn] = {}  # the batch's rows, by handle
        self.stats = collections.Counter(served=0, cancelled=0, failed=0, timed_out=0)
        self._stopping = False
        self._shutting_down = False
        self._done = threading.Event()  # set once the worker has stopped working
        self._thread = threading.Thread(target=_work_then_park, args=(weakref.WeakMethod(self._run), self._done),
                                        name="fastvlm-model", daemon=True)

    # -- the handlers' side ----------------------------------------------------------------------

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._queue) + self.running:
                job.cancelled.set()
            self._queue.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._done.wait(timeout)

    def shut_down(self) -> None:
        """The server is going away: refuse every waiting job (EngineShuttingDown) and end the
        running ones at their next token, as max_tokens would (finish_reason "length")."""
        with self._cond:
            self._shutting_down = True
            waiting = list(self._queue)
            self._queue.clear()
            for job in waiting:
                job.state = "abandoned"
        for job in waiting:
            job.post("error", error=EngineShuttingDown("the server is shutting down; retry later"))
            job.start()  # wakes its handler, which finds the error

    @property
    def alive(self) -> bool:
        return self.worker_running and not self._stopping and not self._shutting_down

    @property
    def worker_running(self) -> bool:
        """Whether the model worker is started and has not stopped (see _work_then_park)."""
        return self._thread.is_alive() and not self._done.is_set()

    @property
    def busy(self) -> bool:
        """Whether any job is decoding."""
        return bool(self.running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def check_options(self, sampling: dict) -> GenerationOptions:
        """SAMPLING (stream_generate's options) over the model's defaults and the engine's
        KV-cache options, checked as every tool checks them (against the model's vocabulary and
        head width)."""
        return GenerationOptions.for_model(
            self.model, sampling,
            defaults={**self.processor.generation_defaults, **self.settings.cache_options()})

    def views(self, tiles=None) -> Tuple[int, Optional[Tiling], Optional[Tuple[int, int]]]:
        """(resolution, tiling, grid) of a request asking for TILES (None: the engine's own),
        checked (InputError)."""
        tiles = self.settings.tiles if tiles is None else tiles
        if tiles is None:
            return self.resolution, self.tiling, None
        size, tiling = resolve_views(self.model, self.processor, None, tiles,
                                     self.settings.tile_size or self.settings.resolution)
        return size, tiling, parse_grid(tiles)

    def tokenize(self, prompt_text: str, images: Optional[Sequence] = None, tiles=None) -> List[int]:
        """A templated prompt (with `<image>` markers) -> its ids with image slots, checked
        against the context. Text over max_prompt_chars is refused before tokenizing. Called by
        the request handlers, in their own threads: tokenizing never holds up the model. With
        tiles (the request's TILES, the engine's or the model's), each image's slots depend on
        its size: IMAGES are the decoded images."""
        if len(prompt_text) > self.max_prompt_chars:
            raise ContextLengthError(
                f"the prompt is {len(prompt_text)} characters, over the limit of "
                f"{self.max_prompt_chars} (max_prompt_chars, from the model's context of "
                f"{context_length(self.model)} tokens)")
        size, tiling, _ = self.views(tiles)
        if tiling is None:
            ids = self.processor.encode(prompt_text, size)
        else:
            ids = self.processor.encode(prompt_text, size,
                                        self.processor.image_tokens(images or [], size, tiling))
        check_context(self.model, len(ids), sum(t == self.processor.image_token_id for t in ids))
        return ids

    def submit(self, job: Job) -> None:
        self.check_options(dict(job.sampling, max_tokens=job.max_tokens))
        with self._cond:
            if self._shutting_down:
                raise EngineShuttingDown("the server is shutting down; retry later")
            if not self.alive:
                raise EngineStopped("the model worker is not running")
            if len(self._queue) >= self.settings.max_queue:
                raise EngineBusy(f"the server is busy: {len(self._queue)} requests are waiting "
                                 "for the model; retry later")
            self._queue.append(job)
            self._cond.notify()

    def abandon(self, job: Job, why: str = "timed_out") -> bool:
        """Take a job out of the queue if it has not started; False if it has."""
        with self._cond:
            if job.state != "queued":
                return False
            job.state = "abandoned"
            job.cancelled.set()
            if job in self._queue:
                self._queue.remove(job)
            self.stats[why] += 1
            return True

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if queued, or stop it at its next token."""
        if not self.abandon(job, "cancelled"):
            job.cancelled.set()

    # -- the worker's side -----------------------------------------------------------------------

    def _new_batch(self) -> Optional[RunningBatch]:
        return RunningBatch(self.model, self.processor, self.settings.max_batch_size,
                            feature_cache=self.feature_cache) if self.batched else None

    def _run(self) -> None:
        """The model worker: start the jobs that wait, as many as the batch has free rows (they
        join it at its next step), then advance every row by one token; repeat. A job that
        runs alone is answered whole before the next starts."""
        while True:
            jobs = self._next()
            if jobs is None:
                break
            for job in jobs:
                self._start(job)
            if self._rows:
                self._step()
        for handle, turn in list(self._rows.items()):  # stopped: their clients hear no more
            turn.finish = None
            self._end_row(handle, turn)
        if self.batch is not None:
            self.batch.close()

    def _next(self) -> Optional[List[Job]]:
        """The jobs to start now, up to the free rows (one when jobs run alone): waits for one
        while nothing decodes. None once the engine stops."""
        free = self.batch.max_batch_size - len(self.batch) if self.batch is not None else 1
        with self._cond:
            while not self._queue and not self._stopping and not self._rows:
                self._cond.wait()
            if self._stopping:
                return None
            jobs = []
            while self._queue and len(jobs) < free:
                job = self._queue.popleft()
                job.state = "running"
                self.running.append(job)
                jobs.append(job)
            return jobs

    def _start(self, job: Job) -> None:
        """JOB joins the batch (its rows prefill at the next step), or runs whole if alone."""
        if job.cancelled.is_set():  # its client left while it waited
            self.stats["cancelled"] += 1
            self._release(job)
            job.post("final", finish_reason=None, usage=None, timings=None)
            return
        queue_ms = ms_since(job.submitted)
        job.start()
        try:
            turn = Turn(self, job, queue_ms)
            prompt, options = turn.turn_args()
            if self.batch is None:
                self._serve_alone(turn, prompt, options)
            else:
                self._rows[turn.session.add_to(self.batch, *prompt, **options)] = turn
        except Exception as e:  # keep serving: the request is told why, the next one runs
            self._fail(job, e)

    def _serve_alone(self, turn: Turn, prompt: tuple, options: dict) -> None:
        steps = turn.session.stream(*prompt, **options)
        try:
            for r in steps:
                if turn.take(r):
                    break
        finally:
            steps.close()  # the session's history and KV cache now agree; its turn is over
        turn.end()

    def _step(self) -> None:
        """One batch step: each row's response to its job; the rows done leave."""
        try:
            responses = self.batch.step()
        except Exception as e:
            # An error no row can be blamed for (raised when the shared step was evaluated):
            # every row fails with it, and a fresh batch serves what comes next.
            rows, self._rows = list(self._rows.values()), {}
            batch, self.batch = self.batch, self._new_batch()
            try:
                batch.close()
            except Exception:  # it is dropped either way; its rows are told of the first error
                log.debug("closing a failed batch failed too", exc_info=True)
            for turn in rows:
                self._fail(turn.job, e)
            return
        for handle, r in responses.items():
            turn = self._rows[handle]
            if isinstance(r, Exception):  # this row alone failed, and has left the batch
                del self._rows[handle]
                self._fail(turn.job, r)
            elif turn.take(r):
                if not r.finish_reason:  # a stop string, the client gone or the shutdown cut
                    self.batch.remove(handle)
                self._end_row(handle, turn)

    def _end_row(self, handle: int, turn: Turn) -> None:
        del self._rows[handle]
        turn.session.end_turn(turn.prompt_tokens)
        turn.end()

    def _fail(self, job: Job, e: Exception) -> None:
        self.stats["failed"] += 1
        # Whatever failed may have left MLX's global random state unusable (a sampler that
        # raised while mx.compile traced it), which would fail every later unseeded sample:
        # go on from a fresh one.
        fresh_random_state()
        if not isinstance(e, (InputError, EngineError)):
            log.error("generation failed", exc_info=e)
            e = GenerationFailed(" ".join(f"generation failed: {type(e).__name__}: {e}".split()))
        self._release(job)
        job.post("error", error=e)

    def _release(self, job: Job) -> None:
        with self._cond:
            if job in self.running:
                self.running.remove(job)

    def _session_for(self, key: tuple, ids: List[int], images, size: int,
                     grid=None) -> Tuple[ChatSession, int]:
        """A kept conversation sharing the longest prefix with IDS (rewound to it), or a new one."""
        session, cached = self.sessions.take(key, ids)
        if session is not None:
            session.rewind(cached)
            return session, cached
        session = ChatSession(self.model, self.processor, images, system=None,
                              resolution=size, tiles=grid, tile_size=size if grid else None,
                              feature_cache=self.feature_cache, **self.settings.cache_options())
        return session, 0

    def _finish(self, job: Job, finish, ids, cached: int, n_tokens: int, timings) -> None:
        self._release(job)
        if finish is None:
            self.stats["cancelled"] += 1
            log.info("request cancelled after %d tokens (client gone)", n_tokens)
            job.post("final", finish_reason=None, usage=None, timings=None)
            return
        self.stats["served"] += 1
        image_tokens = sum(t == self.processor.image_token_id for t in ids)
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": n_tokens,
            "total_tokens": len(ids) + n_tokens,
            "image_tokens": image_tokens,
            "prompt_tokens_details": {"cached_tokens": cached, "image_tokens": image_tokens},
        }
        log.info(
            "%d prompt tokens (%d image, %d cached) -> %d tokens (%s); TTFT %.1f ms, %.1f tokens/s, "
            "queue %.1f ms", len(ids), image_tokens, cached, n_tokens, finish, timings.ttft_ms,
            timings.decode_tps, timings.queue_ms,
        )
        job.post("final", finish_reason=finish, usage=usage, timings=timings.to_dict())
