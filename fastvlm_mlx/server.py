"""An OpenAI-compatible HTTP server for FastVLM: `python -m fastvlm_mlx.server --model M`.

    POST /v1/chat/completions   messages with text and image_url parts; stream: true for SSE
    GET  /v1/models             the one model served
    GET  /health                liveness, and whether the model is busy

One worker thread owns the model and runs one request at a time; the others wait in a bounded
queue (each for at most `queue_timeout` seconds, then 503). Images are downloaded and decoded by
the request handlers, outside the model's time. The worker keeps a few conversations' KV caches
(keyed by the digests of their images) and continues each new request from the longest prefix
of its tokens it already holds, so a follow-up question about an image neither re-encodes the
image nor re-reads the conversation; vision features are cached per image as in `generate`.
"""

import argparse
import asyncio
import base64
import binascii
import collections
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
import uuid
import warnings
from dataclasses import dataclass, replace
from typing import Dict, List, Literal, Optional, Tuple, Union

from .generate import (
    DEFAULT_MODEL,
    ChatSession,
    GenerationOptions,
    InputError,
    feature_cache_for,
)
from .processing import (
    DEFAULT_SYSTEM,
    IMAGE_MARKER,
    check_resolution,
    format_prompt,
    image_digest,
    is_url,
    to_pil,
)

log = logging.getLogger("fastvlm_mlx.server")

DEFAULT_MAX_BODY_BYTES = 64 * 2**20  # a request body above this gets 413
DRAIN_BYTES = 8 * 2**20  # read (and drop) this much of an oversized body, so the 413 arrives
FINGERPRINT = "fastvlm-mlx-0.1.0"


@dataclass
class ServerSettings:
    """Every limit and default of the server; the CLI flags have the same names."""

    model_id: str = DEFAULT_MODEL  # what /v1/models and every response call the model
    api_key: Optional[str] = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    allow_local_files: bool = False  # image_url may be a local path or file:// URL
    max_tokens: int = 512  # when the request gives none (mlx-lm's server default)
    # When the request gives none; None: the model's generation_config.json, else greedy.
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    system: Optional[str] = DEFAULT_SYSTEM  # used when the request has no system message
    resolution: Optional[int] = None  # default: the model's trained size
    max_pixels: Optional[int] = None  # decoded pixels per image (default FASTVLM_MAX_PIXELS, 100M)
    max_url_bytes: Optional[int] = None  # per image URL (default FASTVLM_MAX_URL_BYTES, 50 MiB)
    url_timeout: Optional[float] = None  # per image URL (default FASTVLM_URL_TIMEOUT, 15 s)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_images: int = 16  # per request
    queue_timeout: float = 120.0  # seconds a request may wait for the model before a 503
    max_queue: int = 32  # requests waiting beyond this get a 503 at once
    prompt_cache_size: int = 8  # conversations whose KV cache is kept for reuse
    prompt_cache_bytes: Optional[int] = 2**30  # and at most this many bytes of KV cache in all
    # mlx-lm's KV-cache options, passed through
    max_kv_size: Optional[int] = None
    prefill_step_size: int = 2048
    kv_bits: Optional[int] = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000


# ----------------------------------------------------------------------------------------------
# Errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}

_ERROR_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _ERROR_TYPES.get(status) or (
            "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------------------------
# The request schema (unknown fields are ignored, as OpenAI-compatible servers do)


def _schema():
    """The pydantic models, built on first use so that `--help` does not import pydantic."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field

    class Base(BaseModel):
        model_config = ConfigDict(extra="ignore")

    class TextPart(Base):
        type: Literal["text"]
        text: str

    class ImageURL(Base):
        url: str
        detail: Optional[str] = None

    class ImagePart(Base):
        type: Literal["image_url"]
        image_url: Union[ImageURL, str]

    class Message(Base):
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, List[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]],
                       None] = None

    class StreamOptions(Base):
        include_usage: bool = False

    class ChatRequest(Base):
        model: Optional[str] = None
        messages: List[Message] = Field(min_length=1)
        max_tokens: Optional[int] = Field(None, ge=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        temperature: Optional[float] = Field(None, ge=0)
        top_p: Optional[float] = Field(None, gt=0, le=1)
        seed: Optional[int] = Field(None, ge=0, lt=2**64)
        stop: Union[str, List[str], None] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        n: int = 1
        logprobs: bool = False
        top_logprobs: Optional[int] = Field(None, ge=0, le=20)
        logit_bias: Optional[Dict[int, float]] = None
        # mlx-lm's extensions
        top_k: Optional[int] = Field(None, ge=0)
        min_p: Optional[float] = Field(None, ge=0, le=1)
        repetition_penalty: Optional[float] = Field(None, gt=0)

    return ChatRequest


_CHAT_REQUEST = None


def parse_request(payload):
    """JSON payload -> ChatRequest; a schema error -> 400 naming the field."""
    global _CHAT_REQUEST
    from pydantic import ValidationError

    if _CHAT_REQUEST is None:
        _CHAT_REQUEST = _schema()
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = _CHAT_REQUEST.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        # Unions report each alternative; the most specific location names the field best.
        for other in e.errors():
            if len(other["loc"]) > len(err["loc"]):
                err = other
        # Drop pydantic's tags for union branches ("str", "list[...]", "ImageURL", a part's type
        # after its index) and dict keys ("[key]"); keep the field names and indices.
        loc, prev = [], None
        for x in err["loc"]:
            tag = isinstance(x, str) and (
                x in ("str", "[key]") or x.startswith("list[") or x[:1].isupper()
                or isinstance(prev, int) and x in ("text", "image_url")
            )
            if not tag:
                loc.append(x)
            prev = x
        param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
        raise APIError(400, f"{param or 'body'}: {err['msg']}", param=param or None) from None
    if req.n != 1:
        raise APIError(400, "n must be 1: this server returns one choice", param="n")
    if isinstance(req.stop, list) and len(req.stop) > 16:
        raise APIError(400, "stop: at most 16 stop sequences", param="stop")
    return req


def conversation(req, max_images: int) -> Tuple[List[dict], List[Tuple[str, str]]]:
    """The request's messages -> template messages with `<image>` markers, and the image URLs
    (with their JSON location, for error messages), in order.

    As in `generate`, each user message's images become one `<image>\\n` each before its text,
    whatever the order of the parts; if the text already holds `<image>` markers, they place
    the images instead, and their number must equal the number of images."""
    messages, refs, explicit = [], [], False
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        texts, n_images = [], 0
        parts = [] if m.content is None else [m.content] if isinstance(m.content, str) else m.content
        for j, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
            elif part.type == "text":
                texts.append(part.text)
            else:
                where = f"messages[{i}].content[{j}].image_url"
                if role != "user":
                    raise APIError(400, f"{where}: images are accepted in user messages only",
                                   param=where)
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                refs.append((where, url))
                n_images += 1
        text = "".join(texts)
        explicit = explicit or IMAGE_MARKER in text
        messages.append({"role": role, "content": text, "images": n_images})
    if len(refs) > max_images:
        raise APIError(400, f"{len(refs)} images in one request; this server takes at most {max_images}",
                       param="messages")
    for m in messages:
        n = m.pop("images")
        if n and not explicit:
            m["content"] = (IMAGE_MARKER + "\n") * n + m["content"]
    return messages, refs


# ----------------------------------------------------------------------------------------------
# Images: data URLs, http(s) URLs, local files (when allowed)

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


def load_image(url: str, where: str, settings: ServerSettings):
    """One image_url -> an RGB PIL image; bad input -> a 400 naming the part."""
    try:
        if url.startswith("data:"):
            header, sep, data = url.partition(",")
            if not sep or not header.endswith(";base64"):
                raise InputError("a data URL must be base64: data:image/png;base64,...")
            try:
                raw = base64.b64decode("".join(data.split()), validate=True)
            except (binascii.Error, ValueError):
                raise InputError("the data URL is not valid base64") from None
            return to_pil(raw, max_pixels=settings.max_pixels)
        if is_url(url):
            return to_pil(url, max_pixels=settings.max_pixels, timeout=settings.url_timeout,
                          max_bytes=settings.max_url_bytes)
        scheme = _SCHEME.match(url)
        if scheme and scheme.group(1).lower() != "file":
            raise InputError(f"unsupported image URL scheme {scheme.group(1)!r}: use a base64 data "
                             "URL or an http(s) URL")
        if not settings.allow_local_files:
            raise APIError(400, f"{where}: local image paths are not allowed; start the server with "
                           "--allow-local-files, or send the image as a base64 data URL",
                           param=where, code="local_files_not_allowed")
        path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme else url
        return to_pil(os.path.expanduser(path), max_pixels=settings.max_pixels)
    except InputError as e:
        raise APIError(400, f"{where}: {e}", param=where, code="invalid_image") from None


def load_images(refs, settings: ServerSettings):
    """Decode every image (in a handler thread, outside the model's time): images, digests, ms."""
    t0 = time.perf_counter()
    images = [load_image(url, where, settings) for where, url in refs]
    digests = [image_digest(im) for im in images]
    return images, digests, (time.perf_counter() - t0) * 1e3


# ----------------------------------------------------------------------------------------------
# Stop sequences


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


# ----------------------------------------------------------------------------------------------
# The model worker: one thread, one request at a time


class Job:
    """One request's work for the worker, and the channel back to its handler (an asyncio
    queue fed from the worker thread)."""

    def __init__(self, loop, prompt_text, images, digests, load_ms, sampling, max_tokens, stops,
                 logprobs, top_logprobs):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.started = asyncio.Event()
        self.cancelled = threading.Event()
        self.state = "queued"  # -> running | abandoned; guarded by the engine's lock
        self.prompt_text, self.images, self.digests, self.load_ms = prompt_text, images, digests, load_ms
        self.sampling, self.max_tokens, self.stops = sampling, max_tokens, stops
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.submitted = time.perf_counter()
        self.queue_ms = 0.0

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


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else -9999.0  # OpenAI's value for "impossible"


class Engine:
    """Owns the model. `submit` queues a Job; the worker thread runs jobs one at a time."""

    def __init__(self, model, processor, settings: ServerSettings):
        self.model, self.processor, self.settings = model, processor, settings
        self.resolution = check_resolution(
            int(settings.resolution or processor.image_size), processor.stride
        )
        if self.resolution != processor.image_size:  # said once here, not per conversation
            warnings.warn(
                f"resolution {self.resolution} differs from the model's trained "
                f"{processor.image_size}: {processor.tokens_per_image(self.resolution)} image "
                "tokens per image, and quality may change", stacklevel=2,
            )
        self.cache_options = dict(
            max_kv_size=settings.max_kv_size, prefill_step_size=settings.prefill_step_size,
            kv_bits=settings.kv_bits, kv_group_size=settings.kv_group_size,
            quantized_kv_start=settings.quantized_kv_start,
        )
        GenerationOptions.from_kwargs(self.cache_options)  # a bad combination fails at start
        self.context_length = int(
            getattr(model.language_model.args, "max_position_embeddings", 0) or 0
        )
        self.feature_cache = feature_cache_for(model)
        self.sessions = SessionCache(settings.prompt_cache_size, settings.prompt_cache_bytes)
        self._cond = threading.Condition()
        self._queue: "collections.deque[Job]" = collections.deque()
        self.running: Optional[Job] = None
        self.stats = collections.Counter(served=0, cancelled=0, failed=0, timed_out=0)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fastvlm-model", daemon=True)

    # -- the handlers' side ----------------------------------------------------------------------

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._queue) + ([self.running] if self.running else []):
                job.cancelled.set()
            self._queue.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.alive:
                raise APIError(503, "the model worker is not running", code="unavailable")
            if len(self._queue) >= self.settings.max_queue:
                raise APIError(503, f"the server is busy: {len(self._queue)} requests are waiting "
                               "for the model; retry later", code="server_busy",
                               headers={"Retry-After": "1"})
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

    def _next(self) -> Optional[Job]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._queue.popleft()
            job.state = "running"
            self.running = job
            return job

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it waited
                self.stats["cancelled"] += 1
                with self._cond:
                    self.running = None
                job.post("final", finish_reason=None, usage=None, timings=None)
                continue
            job.queue_ms = (time.perf_counter() - job.submitted) * 1e3
            job.start()
            try:
                self._serve(job)
            except APIError as e:
                self.stats["failed"] += 1
                job.post("error", error=e)
            except InputError as e:
                self.stats["failed"] += 1
                job.post("error", error=APIError(400, str(e)))
            except Exception as e:  # keep serving; the request gets a 500
                self.stats["failed"] += 1
                log.exception("generation failed")
                job.post("error", error=APIError(500, f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self._cond:
                    self.running = None

    def _logprob_entry(self, r, top_n: int) -> dict:
        import mlx.core as mx

        decode = self.processor.tokenizer.decode

        def entry(token, logprob):
            text = decode([token])
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

        out = entry(r.token, r.logprob)
        out["top_logprobs"] = []
        if top_n and r.logprobs is not None:
            v = r.logprobs.astype(mx.float32)
            top = mx.argpartition(-v, kth=top_n - 1)[:top_n].tolist()
            values = v[mx.array(top)].tolist()
            pairs = sorted(zip(top, values), key=lambda p: -p[1])
            out["top_logprobs"] = [entry(t, lp) for t, lp in pairs]
        return out

    def _serve(self, job: Job) -> None:
        processor = self.processor
        t0 = time.perf_counter()
        ids = processor.encode(job.prompt_text, self.resolution)
        image_tokens = sum(t == processor.image_token_id for t in ids)
        max_tokens = job.max_tokens
        if self.context_length:
            room = self.context_length - len(ids)
            if room < 1:
                raise APIError(
                    400, f"the prompt is {len(ids)} tokens ({image_tokens} of them image tokens); "
                    f"this model's context is {self.context_length} tokens",
                    param="messages", code="context_length_exceeded",
                )
            max_tokens = min(max_tokens, room)  # generation stops at the end of the context
        tokenize_ms = (time.perf_counter() - t0) * 1e3

        key = (tuple(job.digests), self.resolution)
        session, cached = self.sessions.take(key, ids)
        if session is None:
            with warnings.catch_warnings():  # the resolution warning was given at start
                warnings.simplefilter("ignore", UserWarning)
                session = ChatSession(self.model, processor, job.images, system=None,
                                      resolution=self.resolution, feature_cache=self.feature_cache,
                                      **self.cache_options)
            prompt = ids
        else:
            session.rewind(cached)
            prompt = ids[cached:]

        stop = StopText(job.stops)
        finish, timings, n_tokens = None, None, 0
        keep = False
        steps = session.stream(prompt, max_tokens=max_tokens, **job.sampling)
        try:
            for r in steps:
                if timings is None:
                    timings = r.timings
                    # The template's tokenization is part of preprocessing, so part of TTFT.
                    timings.preprocess_ms += tokenize_ms
                    timings.finish_ttft()
                    timings.load_ms, timings.queue_ms = job.load_ms, job.queue_ms
                    if cached and job.images:  # the images' rows came from the KV cache
                        timings.feature_cache_hit = True
                eos = r.finish_reason == "stop"  # the EOS token is not part of the completion
                n_tokens += not eos
                text, hit = stop.add(r.text)
                if hit:
                    finish = "stop"
                elif r.finish_reason:
                    finish = r.finish_reason
                    text += stop.flush()
                lps = [self._logprob_entry(r, job.top_logprobs)] if job.logprobs and not eos else []
                if text or lps:
                    job.post("delta", text=text, logprobs=lps)
                if finish or job.cancelled.is_set():
                    break
            keep = True
        finally:
            steps.close()  # the session's history and KV cache now agree
            session.images = []  # their rows are in the KV cache; free the pixels
            if keep:
                self.sessions.put(key, session)

        if finish is None:
            self.stats["cancelled"] += 1
            log.info("request cancelled after %d tokens (client gone)", n_tokens)
            job.post("final", finish_reason=None, usage=None, timings=None)
            return
        self.stats["served"] += 1
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": n_tokens,
            "total_tokens": len(ids) + n_tokens,
            "image_tokens": image_tokens,
            "prompt_tokens_details": {"cached_tokens": cached, "image_tokens": image_tokens},
        }
        t = timings
        log.info(
            "%d prompt tokens (%d image, %d cached) -> %d tokens (%s); TTFT %.1f ms, %.1f tokens/s, "
            "queue %.1f ms", len(ids), image_tokens, cached, n_tokens, finish, t.ttft_ms,
            t.decode_tps, t.queue_ms,
        )
        job.post("final", finish_reason=finish, usage=usage, timings=t.to_dict())


# ----------------------------------------------------------------------------------------------
# The HTTP side


async def read_body(request, cap: int) -> bytes:
    """The request body, or 413 when it is over `cap` bytes. An oversized body is still read
    (and dropped) up to DRAIN_BYTES more, so that the client sees the 413 rather than a reset."""
    from starlette.requests import ClientDisconnect

    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise APIError(400, "invalid Content-Length header")
    declared = int(length) if length is not None else 0
    over = declared > cap
    body, size = bytearray(), 0
    if declared <= cap + DRAIN_BYTES:
        try:
            async for chunk in request.stream():
                size += len(chunk)
                over = over or size > cap
                if over:
                    body = None
                    if size > cap + DRAIN_BYTES:
                        break
                    continue
                body += chunk
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the request") from None
    if over:
        raise APIError(413, f"the request body is over the server's limit of {cap} bytes "
                       "(--max-body-bytes)", code="request_too_large")
    return bytes(body)


def check_api_key(request, settings: ServerSettings) -> None:
    if not settings.api_key:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _until_disconnect(request) -> None:
    """Returns when the client goes away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def create_app(model, processor, settings: Optional[ServerSettings] = None, **overrides):
    """The FastAPI app serving `model`. `app.state.engine` is its Engine (started and stopped
    with the app's lifespan)."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = replace(settings or ServerSettings(), **overrides)
    engine = Engine(model, processor, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="fastvlm-mlx", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine, app.state.settings = engine, settings

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        message = {404: f"Invalid URL ({request.method} {request.url.path})",
                   405: f"Method {request.method} is not allowed for {request.url.path}"}
        return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return APIError(400, str(exc)).response()

    @app.exception_handler(Exception)
    async def server_error(request, exc):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": int(time.time()),
                "owned_by": "fastvlm-mlx"}

    @app.get("/health")
    async def health():
        ok = engine.alive
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "model": settings.model_id,
             "busy": engine.running is not None, "queued": engine.queued, **engine.stats},
            status_code=200 if ok else 503,
        )

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request, settings)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        check_api_key(request, settings)
        if model_id != settings.model_id:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request, settings)
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            # Also keeps web pages from posting here with a "simple" cross-site request.
            raise APIError(415, f"Content-Type must be application/json, not {ctype}")
        body = await read_body(request, settings.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        req = parse_request(payload)
        messages, refs = conversation(req, settings.max_images)
        try:
            prompt_text = format_prompt(messages, len(refs), settings.system)
        except InputError as e:
            raise APIError(400, str(e), param="messages") from None
        images, digests, load_ms = await asyncio.to_thread(load_images, refs, settings)

        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = dict(
            temperature=settings.temperature if req.temperature is None else req.temperature,
            top_p=settings.top_p if req.top_p is None else req.top_p,
            seed=req.seed,
        )
        for name in ("top_k", "min_p", "repetition_penalty"):
            if getattr(req, name) is not None:
                sampling[name] = getattr(req, name)
        if req.logit_bias:
            from mlx_lm.sample_utils import make_logits_processors

            vocab = model.vocab_size
            bad = [t for t in req.logit_bias if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"logit_bias: token id {bad[0]} is outside the vocabulary "
                               f"(0..{vocab - 1})", param="logit_bias")
            sampling["logits_processors"] = make_logits_processors(logit_bias=req.logit_bias)
        max_tokens = req.max_completion_tokens or req.max_tokens or settings.max_tokens
        job = Job(asyncio.get_running_loop(), prompt_text, images, digests, load_ms, sampling,
                  max_tokens, stops, req.logprobs or bool(req.top_logprobs), req.top_logprobs or 0)

        async def watch():  # until the response starts; then Starlette watches for us
            await _until_disconnect(request)
            engine.cancel(job)

        engine.submit(job)
        watcher = asyncio.create_task(watch())
        try:
            # Wait for the model, at most queue_timeout, or until the client leaves.
            started = asyncio.create_task(job.started.wait())
            await asyncio.wait({started, watcher}, timeout=settings.queue_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if watcher.done():
                return JSONResponse({}, status_code=499)  # nobody is listening
            if not job.started.is_set() and engine.abandon(job):
                raise APIError(503, f"the model stayed busy for {settings.queue_timeout:g} s "
                               "(--queue-timeout); retry later", code="server_busy",
                               headers={"Retry-After": "1"})
            # The first event (a token, or an error before any) decides the status code.
            first = await job.events.get()
            if first[0] == "error":
                raise first[1]["error"]
            if not req.stream:
                events = [first]
                while events[-1][0] == "delta":
                    events.append(await job.events.get())
                if events[-1][0] == "error":
                    raise events[-1][1]["error"]
        except BaseException:
            engine.cancel(job)
            raise
        finally:
            watcher.cancel()

        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": settings.model_id,
                "system_fingerprint": FINGERPRINT}

        if not req.stream:
            final = events[-1][1]
            if final["finish_reason"] is None:
                return JSONResponse({}, status_code=499)
            deltas = [d for kind, d in events if kind == "delta"]
            choice = {"index": 0,
                      "message": {"role": "assistant", "content": "".join(d["text"] for d in deltas)},
                      "logprobs": None, "finish_reason": final["finish_reason"]}
            if job.logprobs:
                choice["logprobs"] = {"content": [e for d in deltas for e in d["logprobs"]]}
            return {**head, "object": "chat.completion", "choices": [choice],
                    "usage": final["usage"], "timings": final["timings"]}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta, finish=None, logprobs=None, **extra):
            c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if job.logprobs and logprobs is not None:
                c["logprobs"] = {"content": logprobs}
            out = {**head, "object": "chat.completion.chunk", "choices": [c], **extra}
            if include_usage and "usage" not in extra:
                out["usage"] = None
            return _sse(out)

        async def events_stream():
            try:
                yield chunk({"role": "assistant", "content": ""})
                event = first
                while True:
                    kind, data = event
                    if kind == "delta":
                        yield chunk({"content": data["text"]}, logprobs=data["logprobs"])
                    elif kind == "error":
                        yield _sse(data["error"].body())
                        break
                    else:
                        if data["finish_reason"] is None:
                            break
                        # The last chunk always carries usage and timings.
                        yield chunk({}, data["finish_reason"], usage=data["usage"],
                                    timings=data["timings"])
                        if include_usage:  # OpenAI's own usage chunk: no choices
                            yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                        "usage": data["usage"], "timings": data["timings"]})
                        break
                    event = await job.events.get()
                yield b"data: [DONE]\n\n"
            finally:
                engine.cancel(job)  # the client went away mid-stream: stop at the next token

        return StreamingResponse(
            events_stream(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


# ----------------------------------------------------------------------------------------------
# The CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _positive(cast):
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def _port(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = ServerSettings()
    p = _Parser(prog="fastvlm-server",
                description="An OpenAI-compatible chat-completions server for FastVLM.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"converted directory, unconverted checkpoint or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("FASTVLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default $FASTVLM_API_KEY)")
    p.add_argument("--allow-local-files", action="store_true",
                   help="let image_url be a local path or file:// URL")
    p.add_argument("--served-model-name", default=None, help="the model's id in the API (default: --model)")
    p.add_argument("--max-tokens", "-m", type=_positive(int), default=d.max_tokens,
                   help=f"when the request gives none (default {d.max_tokens})")
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=d.temperature,
                   help="when the request gives none; 0 is greedy (default: the model's "
                   "generation_config.json, else 0)")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--system", default=d.system, help="system message when the request has none")
    p.add_argument("--resolution", type=int, default=None,
                   help="image resolution (a multiple of 64); default: the model's trained size")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast the weights after loading (default: as converted, or float32 when "
                   "MLX runs on the CPU)")
    p.add_argument("--max-pixels", type=_positive(int), default=None,
                   help="refuse images with more pixels (default 100M, or FASTVLM_MAX_PIXELS)")
    p.add_argument("--max-url-bytes", type=_positive(int), default=None,
                   help="refuse image URLs with larger bodies (default 50 MiB, or FASTVLM_MAX_URL_BYTES)")
    p.add_argument("--url-timeout", type=_positive(float), default=None,
                   help="seconds per image URL (default 15, or FASTVLM_URL_TIMEOUT)")
    p.add_argument("--max-body-bytes", type=_positive(int), default=d.max_body_bytes,
                   help=f"refuse larger request bodies with 413 (default {d.max_body_bytes})")
    p.add_argument("--max-images", type=_positive(int), default=d.max_images,
                   help=f"images per request (default {d.max_images})")
    p.add_argument("--queue-timeout", type=_positive(float), default=d.queue_timeout,
                   help="seconds a request may wait for the model before a 503 "
                   f"(default {d.queue_timeout:g})")
    p.add_argument("--max-queue", type=_positive(int), default=d.max_queue,
                   help=f"waiting requests beyond this get a 503 at once (default {d.max_queue})")
    p.add_argument("--prompt-cache-size", type=int, default=d.prompt_cache_size,
                   help="conversations whose KV cache is kept for reuse "
                   f"(default {d.prompt_cache_size}; 0: none)")
    p.add_argument("--prompt-cache-bytes", type=_positive(int), default=d.prompt_cache_bytes,
                   help=f"bytes of KV cache kept in all (default {d.prompt_cache_bytes})")
    p.add_argument("--max-kv-size", type=_positive(int), default=None)
    p.add_argument("--prefill-step-size", type=_positive(int), default=d.prefill_step_size)
    p.add_argument("--kv-bits", type=int, default=None)
    p.add_argument("--kv-group-size", type=int, default=d.kv_group_size)
    p.add_argument("--quantized-kv-start", type=int, default=d.quantized_kv_start)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails at once."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(args) -> int:
    import uvicorn

    # transformers (behind mlx-lm's tokenizer loader) warns about our config's model type.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.resolution is not None:
        check_resolution(args.resolution)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]

    import fastvlm_mlx

    from .loader import runtime_dtype

    model, processor = fastvlm_mlx.load(args.model, dtype=runtime_dtype(args.dtype))
    settings = ServerSettings(
        model_id=args.served_model_name or args.model, api_key=args.api_key or None,
        allow_local_files=args.allow_local_files, max_tokens=args.max_tokens,
        temperature=args.temp, top_p=args.top_p, system=args.system, resolution=args.resolution,
        max_pixels=args.max_pixels, max_url_bytes=args.max_url_bytes, url_timeout=args.url_timeout,
        max_body_bytes=args.max_body_bytes, max_images=args.max_images,
        queue_timeout=args.queue_timeout, max_queue=args.max_queue,
        prompt_cache_size=args.prompt_cache_size, prompt_cache_bytes=args.prompt_cache_bytes,
        max_kv_size=args.max_kv_size,
        prefill_step_size=args.prefill_step_size, kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start,
    )
    app = create_app(model, processor, settings)
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host) and not settings.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can "
              "use the model", file=sys.stderr, flush=True)
    print(f"fastvlm-server: {settings.model_id} at http://{shown}:{port}/v1 "
          "(POST /v1/chat/completions, GET /v1/models, GET /health)", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level,
                            timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl+C
        pass
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.temp is not None and args.temp < 0:
        parser.error(f"--temp must be >= 0, got {args.temp}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prompt_cache_size < 0:
        parser.error(f"--prompt-cache-size must be >= 0, got {args.prompt_cache_size}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        return run_server(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # InputError, ModelLoadError, ConvertError, a taken port
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # never a traceback for the user
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
