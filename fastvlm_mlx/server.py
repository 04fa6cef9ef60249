"""An OpenAI-compatible HTTP server for FastVLM: `python -m fastvlm_mlx.server --model M`.

    POST /v1/chat/completions   messages with text and image_url parts; stream: true for SSE
    GET  /v1/models             the one model served
    GET  /health                liveness, and whether the model is busy

One worker thread owns the model and runs one request at a time; the others wait in a bounded
queue (each for at most `queue_timeout` seconds, then 503). Everything else happens off the
model worker, in the handlers: big bodies are parsed, prompts tokenized and images decoded in
threads (a bounded number of decodes at once), and image URLs fetched in a small pool of their
own, so that a request without images never waits for a slow URL. The worker keeps a few conversations' KV caches
(keyed by the digests of their images) and continues each new request from the longest prefix
of its tokens it already holds, so a follow-up question about an image neither re-encodes the
image nor re-reads the conversation; vision features are cached per image as in `generate`.
"""

import argparse
import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Union

from . import _cli
from .extras import require
from .engine import (
    EngineBusy,
    EngineError,
    EngineSettings,
    EngineShuttingDown,
    EngineStopped,
    GenerationFailed,
    Job,
    Engine,
)
from .fetch import Cancel
from .generate import ContextLengthError, GenerationOptions, InputError, OptionError
from .loader import load, runtime_dtype
from .processing import (
    DEFAULT_SYSTEM,
    IMAGE_MARKER,
    check_resolution,
    fetch_url,
    format_prompt,
    image_digest,
    is_url,
    pixel_cap,
    to_pil,
)
from .tiles import parse_grid
from .timing import ms_since

log = logging.getLogger("fastvlm_mlx.server")

DEFAULT_MAX_BODY_BYTES = 64 * 2**20  # a request body above this gets 413
DRAIN_BYTES = 8 * 2**20  # read (and drop) this much of an oversized body, so the 413 arrives
# The generate CLI's 100M-pixel cap lets a 16 KB PNG cost 1.4 GB to decode; 32M pixels is more
# than any camera's photo (45 MP is 8192 x 5464 = 44.8M; 24 MP is 24M) yet a third of the cost.
SERVER_MAX_PIXELS = 32_000_000
# Bodies and prompt texts up to these sizes are parsed and tokenized on the event loop (well
# under a millisecond); bigger ones in a thread, so that the loop keeps answering.
INLINE_BODY_BYTES = 64 * 2**10
INLINE_PROMPT_CHARS = 8 * 2**10
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Any failure of an image URL gives its client this one text (the log has the reason): texts
# that told "refused", "timed out", "HTTP 404" and "not an image" apart made a port scanner.
URL_FAILURE = ("the image URL could not be fetched as an image (the server fetches public http(s) "
               "addresses only, unless started with --allow-private-urls)")
FINGERPRINT = "fastvlm-mlx-0.1.0"


@dataclass
class ServerSettings(EngineSettings):
    """Every limit and default of the server: the model worker's (EngineSettings: resolution,
    queue and prompt-cache sizes, mlx-lm's KV-cache options) and HTTP's. The CLI flags have
    the same names."""

    model_id: str = _cli.DEFAULT_MODEL  # what /v1/models and every response call the model
    api_key: Optional[str] = None  # when set, /v1/* needs `Authorization: Bearer <key>`; never ""
    # A request's Host header must name `host` (the address listened on), a loopback name or
    # one of `allowed_hosts` ("*": any): a DNS-rebinding page sends its own name. When `host` is
    # a wildcard (0.0.0.0, ::), any IP address is allowed too (no page can rebind one).
    host: str = "127.0.0.1"
    allowed_hosts: Tuple[str, ...] = ()
    allow_local_files: bool = False  # image_url may be a local path or file:// URL
    allow_private_urls: bool = False  # image URLs may name loopback, private, link-local addresses
    max_tokens: int = 512  # when the request gives none (mlx-lm's server default)
    # When the request gives none; None: the model's generation_config.json, else greedy.
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    system: Optional[str] = DEFAULT_SYSTEM  # used when the request has no system message
    # decoded pixels per image (default FASTVLM_MAX_PIXELS, else SERVER_MAX_PIXELS)
    max_pixels: Optional[int] = None
    max_url_bytes: Optional[int] = None  # per image URL (default FASTVLM_MAX_URL_BYTES, 50 MiB)
    url_timeout: Optional[float] = None  # per image URL, all in (default FASTVLM_URL_TIMEOUT, 15 s)
    url_fetchers: int = 4  # image URLs fetched at once, in a pool of their own
    max_decodes: int = 2  # images decoded at once (each may take a few hundred MB)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_images: int = 16  # per request
    queue_timeout: float = 120.0  # seconds a request may wait for the model before a 503

    def check(self) -> None:
        """Refuse settings the server cannot run with, in one line (before the model loads)."""
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("the API key is empty (--api-key / FASTVLM_API_KEY): give a key, or "
                             "leave it unset to serve without one")
        if self.prompt_cache_size < 0:
            raise InputError(f"--prompt-cache-size must be >= 0, got {self.prompt_cache_size}")
        if self.resolution is not None:
            check_resolution(self.resolution)
        if self.tiles is not None:
            parse_grid(self.tiles)
        if self.tile_size is not None:
            check_resolution(self.tile_size)
        GenerationOptions.from_kwargs(dict(self.cache_options(), temperature=self.temperature,
                                           top_p=self.top_p))

    def engine_settings(self) -> EngineSettings:
        """The model worker's share of these settings, as a settings object of its own."""
        names = EngineSettings.__dataclass_fields__
        return EngineSettings(**{k: v for k, v in vars(self).items() if k in names})


# ----------------------------------------------------------------------------------------------
# Errors, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}

_ERROR_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
                429: "rate_limit_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None, headers=None):
        # What a client sent (a URL, a path) may hold lone surrogates, which no JSON body can
        # carry as UTF-8: escape them, or the error itself would fail to encode.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
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

    @classmethod
    def of(cls, e: Exception) -> "APIError":
        """The engine's and the pipeline's errors as OpenAI errors."""
        if isinstance(e, APIError):
            return e
        if isinstance(e, EngineBusy):
            return cls(503, str(e), code="server_busy", headers={"Retry-After": "1"})
        if isinstance(e, EngineShuttingDown):
            return cls(503, str(e), code="server_shutting_down", headers={"Connection": "close"})
        if isinstance(e, EngineStopped):
            return cls(503, str(e), code="unavailable")
        if isinstance(e, ContextLengthError):
            return cls(400, str(e), param="messages", code="context_length_exceeded")
        if isinstance(e, OptionError):
            return cls(400, str(e), param=e.option)
        if isinstance(e, InputError):
            return cls(400, str(e))
        return cls(500, str(e) if isinstance(e, GenerationFailed) else f"internal error: {type(e).__name__}")


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

    # The sampling fields' ranges are GenerationOptions.check's, as in every other tool: the
    # schema gives their types only.
    class ChatRequest(Base):
        model: Optional[str] = None
        messages: List[Message] = Field(min_length=1)
        max_tokens: Optional[int] = None
        max_completion_tokens: Optional[int] = None
        temperature: Optional[float] = None
        top_p: Optional[float] = None
        seed: Optional[int] = None
        stop: Union[str, List[str], None] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        n: int = 1
        logprobs: bool = False
        top_logprobs: Optional[int] = Field(None, ge=0, le=20)
        logit_bias: Optional[Dict[int, float]] = None
        # mlx-lm's extensions
        top_k: Optional[int] = None
        min_p: Optional[float] = None
        repetition_penalty: Optional[float] = None
        # fastvlm-mlx's: AnyRes tiles for this request ("2x2" or [2, 2]; experimental)
        tiles: Union[str, List[int], None] = None

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


def image_source(url: str, where: str, settings: ServerSettings):
    """What an image_url that is not an http(s) URL names: the bytes of a data URL, or a local
    path (only with allow_local_files); bad input -> a 400 naming the part."""
    try:
        if url.startswith("data:"):
            header, sep, data = url.partition(",")
            if not sep or not header.endswith(";base64"):
                raise InputError("a data URL must be base64: data:image/png;base64,...")
            try:
                return base64.b64decode("".join(data.split()), validate=True)
            except (binascii.Error, ValueError):
                raise InputError("the data URL is not valid base64") from None
        scheme = _SCHEME.match(url)
        if scheme and scheme.group(1).lower() != "file":
            raise InputError(f"unsupported image URL scheme {scheme.group(1)!r}: use a base64 data "
                             "URL or an http(s) URL")
    except InputError as e:
        raise APIError(400, f"{where}: {e}", param=where, code="invalid_image") from None
    if not settings.allow_local_files:
        raise APIError(400, f"{where}: local image paths are not allowed; start the server with "
                       "--allow-local-files, or send the image as a base64 data URL",
                       param=where, code="local_files_not_allowed")
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme else url
    return os.path.expanduser(path)


def _decode(source, max_pixels: int):
    """Encoded image bytes or a path -> (the RGB image, its digest), in one call off the loop."""
    image = to_pil(source, max_pixels=max_pixels)
    return image, image_digest(image)


class ImageLoader:
    """Fetches and decodes a request's images, off the event loop and the model worker: URLs in
    a pool of their own (`url_fetchers` threads; a request without URLs never waits for it),
    decodes at most `max_decodes` at once. A request's fetches end when its client leaves."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.max_pixels = pixel_cap(settings.max_pixels, default=SERVER_MAX_PIXELS)
        self.fetchers = ThreadPoolExecutor(settings.url_fetchers, thread_name_prefix="fastvlm-url")
        self.decodes = asyncio.Semaphore(settings.max_decodes)

    async def load(self, refs, cancel: Cancel):
        """The images of REFS ((where, url) pairs), their digests, and the ms spent on them."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        images = []
        for where, url in refs:
            remote = is_url(url)
            try:
                if remote:
                    source = await loop.run_in_executor(
                        self.fetchers, fetch_url, url, self.settings.url_timeout,
                        self.settings.max_url_bytes, self.settings.allow_private_urls, cancel)
                else:
                    source = image_source(url, where, self.settings)
                async with self.decodes:
                    images.append(await asyncio.to_thread(_decode, source, self.max_pixels))
            except InputError as e:
                if remote:  # the reason goes to the log only (see URL_FAILURE)
                    log.info("%s: %s", where, e)
                message = URL_FAILURE if remote else str(e)
                raise APIError(400, f"{where}: {message}", param=where, code="invalid_image") from None
        return [im for im, _ in images], [digest for _, digest in images], ms_since(t0)

    def close(self) -> None:
        self.fetchers.shutdown(wait=False, cancel_futures=True)


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


def host_name(header: str) -> str:
    """The name in a Host header, lower-cased, without the port: `[::1]:8080` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0] if header.count(":") == 1 else header


def _ip_address(name: str):
    """NAME as an IP address, or None when it is a host name."""
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostCheck:
    """ASGI middleware: refuse (400, code `invalid_host`) a request whose Host header names
    anything but the server's own address, a loopback name or --allowed-hosts. A page that
    rebinds its own DNS name to this machine sends that name."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.any_host = "*" in settings.allowed_hosts
        self.names = {host_name(h) for h in (settings.host, *LOOPBACK_NAMES, *settings.allowed_hosts)}
        # Listening on every address, the server has many; and no page can rebind an IP address.
        self.any_ip = settings.host in ("0.0.0.0", "::", "")

    def allowed(self, name: str) -> bool:
        return self.any_host or name in self.names or (self.any_ip and _ip_address(name) is not None)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            raw = headers.get(b"host")
            name = host_name(raw.decode("latin-1")) if raw is not None else None
            if name is not None and not self.allowed(name):
                error = APIError(400, f"the Host header names {name!r}, which this server does not "
                                 "answer to; start it with --allowed-hosts to add names",
                                 code="invalid_host")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def parse_chat_request(body: bytes, settings: ServerSettings):
    """A request body -> (the request, its image refs, the templated prompt text): parsing and
    checking in one call, which big bodies make off the event loop."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    try:
        req = parse_request(payload)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    messages, refs = conversation(req, settings.max_images)
    try:
        prompt_text = format_prompt(messages, len(refs), settings.system)
    except InputError as e:
        raise APIError(400, str(e), param="messages") from None
    return req, refs, prompt_text


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

    require("server", "create_app", ("fastapi",))
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = replace(settings or ServerSettings(), **overrides)
    settings.check()
    engine = Engine(model, processor, settings.engine_settings())
    images = ImageLoader(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            images.close()

    app = FastAPI(title="fastvlm-mlx", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine, app.state.settings = engine, settings
    app.add_middleware(HostCheck, settings=settings)

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

    def token_entry(token: int, logprob: float) -> dict:
        text = processor.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def logprob_entry(entry) -> dict:
        """The engine's (token, logprob, top pairs) as OpenAI's logprobs content entry."""
        token, logprob, top = entry
        return {**token_entry(token, logprob), "top_logprobs": [token_entry(t, lp) for t, lp in top]}

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": int(time.time()),
                "owned_by": "fastvlm-mlx"}

    @app.get("/health")
    async def health():
        ok = engine.alive
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "model": settings.model_id,
             "busy": engine.busy, "decoding": len(engine.running), "queued": engine.queued,
             **engine.stats},
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

    async def off_loop(big: bool, fn, *args):
        """FN(*ARGS), in a thread when BIG (so that the event loop keeps answering)."""
        return await asyncio.to_thread(fn, *args) if big else fn(*args)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request, settings)
        # Required, and JSON: a web page can post a body without a Content-Type (a Blob) or
        # with a "simple" one (text/plain) cross-site, with no preflight that would stop it.
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise APIError(415, f"Content-Type must be application/json, not {ctype or 'missing'}",
                           code="unsupported_media_type")
        body = await read_body(request, settings.max_body_bytes)
        req, refs, prompt_text = await off_loop(len(body) > INLINE_BODY_BYTES, parse_chat_request,
                                                body, settings)

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
        max_tokens = next((n for n in (req.max_completion_tokens, req.max_tokens) if n is not None),
                          settings.max_tokens)
        try:
            # Everything that can refuse the request cheaply, before its images are fetched.
            engine.check_options(dict(sampling, max_tokens=max_tokens))
            # With tiles, an image's slots depend on its size: tokenized once it is decoded.
            tiled = engine.views(req.tiles)[1] is not None
            t0 = time.perf_counter()
            if not tiled:
                prompt_ids = await off_loop(len(prompt_text) > INLINE_PROMPT_CHARS, engine.tokenize,
                                            prompt_text)
            preprocess_ms = ms_since(t0)
        except InputError as e:
            raise APIError.of(e) from None
        cancel = Cancel()  # the request's image fetches, dropped if its client leaves
        loading = asyncio.ensure_future(images.load(refs, cancel)) if refs else None
        if loading is not None:
            gone = asyncio.ensure_future(_until_disconnect(request))
            await asyncio.wait({loading, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not loading.done():
                cancel.set()
                loading.cancel()
                return JSONResponse({}, status_code=499)  # nobody is listening
        decoded, digests, load_ms = loading.result() if loading is not None else ([], [], 0.0)
        if tiled:
            try:
                t0 = time.perf_counter()
                prompt_ids = await off_loop(True, engine.tokenize, prompt_text, decoded, req.tiles)
                preprocess_ms = ms_since(t0)
            except InputError as e:
                raise APIError.of(e) from None
        job = Job(asyncio.get_running_loop(), prompt_ids, decoded, digests, load_ms, sampling,
                  max_tokens, stops, req.logprobs or bool(req.top_logprobs), req.top_logprobs or 0,
                  preprocess_ms=preprocess_ms, tiles=req.tiles)

        async def watch():  # until the response starts; then Starlette watches for us
            await _until_disconnect(request)
            engine.cancel(job)

        try:
            engine.submit(job)
        except (EngineError, InputError) as e:
            raise APIError.of(e) from None
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
                raise APIError.of(first[1]["error"])
            if not req.stream:
                events = [first]
                while events[-1][0] == "delta":
                    events.append(await job.events.get())
                if events[-1][0] == "error":
                    raise APIError.of(events[-1][1]["error"])
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
                choice["logprobs"] = {"content": [logprob_entry(e) for d in deltas for e in d["logprobs"]]}
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
                        yield chunk({"content": data["text"]},
                                    logprobs=[logprob_entry(e) for e in data["logprobs"]])
                    elif kind == "error":
                        yield _sse(APIError.of(data["error"]).body())
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


def _port(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The server's flags; each flag's dest is the ServerSettings field of the same name."""
    d = ServerSettings()
    positive = _cli.positive
    p = _cli.ArgumentParser(prog="fastvlm-server",
                            description="An OpenAI-compatible chat-completions server for FastVLM.")
    _cli.add_model_arg(p)
    p.add_argument("--host", default=d.host, help="address to listen on")
    p.add_argument("--port", type=_port, default=8080, help="port (0 = any free port)")
    p.add_argument("--allowed-hosts", type=lambda text: tuple(h for h in text.split(",") if h),
                   default=d.allowed_hosts, metavar="NAME,...",
                   help="more names the Host header may give besides --host and the loopback "
                   "names (`*`: any); others get a 400, which stops DNS-rebinding pages")
    p.add_argument("--api-key", default=os.environ.get("FASTVLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default $FASTVLM_API_KEY)")
    p.add_argument("--allow-local-files", action="store_true",
                   help="let image_url be a local path or file:// URL")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs name loopback, private and link-local addresses")
    p.add_argument("--served-model-name", dest="model_id", default=None,
                   help="the model's id in the API (default: --model's name, never its path)")
    p.add_argument("--max-tokens", "-m", type=positive(int), default=d.max_tokens,
                   help="when the request gives none")
    _cli.add_temperature_arg(p, dest="temperature", default=d.temperature,
                             when=" when the request gives none")
    p.add_argument("--top-p", type=float, default=d.top_p, help="when the request gives none")
    p.add_argument("--system", "--system-prompt", dest="system", default=d.system,
                   help="system message when the request has none")
    _cli.add_run_args(p, max_pixels_text=f"{SERVER_MAX_PIXELS // 10**6}M")
    _cli.add_tile_args(p)
    p.add_argument("--max-url-bytes", type=positive(int), default=None,
                   help="refuse image URLs with larger bodies (default 50 MiB, or $FASTVLM_MAX_URL_BYTES)")
    p.add_argument("--url-timeout", type=positive(float), default=None,
                   help="seconds per image URL, all in (default 15, or $FASTVLM_URL_TIMEOUT)")
    p.add_argument("--url-fetchers", type=positive(int), default=d.url_fetchers,
                   help="image URLs fetched at once; more wait their turn")
    p.add_argument("--max-decodes", type=positive(int), default=d.max_decodes,
                   help="images decoded at once")
    p.add_argument("--max-prompt-chars", type=positive(int), default=None,
                   help="refuse longer prompt texts before tokenizing them (default: "
                   "16 x the model's context)")
    p.add_argument("--max-body-bytes", type=positive(int), default=d.max_body_bytes,
                   help="refuse larger request bodies with 413")
    p.add_argument("--max-images", type=positive(int), default=d.max_images, help="images per request")
    p.add_argument("--queue-timeout", type=positive(float), default=d.queue_timeout,
                   help="seconds a request may wait for the model before a 503")
    p.add_argument("--max-queue", type=positive(int), default=d.max_queue,
                   help="waiting requests beyond this get a 503 at once")
    p.add_argument("--max-batch-size", type=positive(int), default=d.max_batch_size,
                   help="requests decoded together (continuous batching); 1: one at a time")
    p.add_argument("--prompt-cache-size", type=int, default=d.prompt_cache_size,
                   help="conversations whose KV cache is kept for reuse (0: none)")
    p.add_argument("--prompt-cache-bytes", type=positive(int), default=d.prompt_cache_bytes,
                   help="bytes of KV cache kept in all")
    _cli.add_kv_args(p)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level")
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
    ip = _ip_address(host)
    return ip.is_loopback if ip is not None else host == "localhost"


def served_name(model: str) -> str:
    """The model's name in the API: a hub id as it is, a local directory by its own name (its
    path would tell every client where the server's files are)."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def settings_from_args(args) -> ServerSettings:
    """ServerSettings from the parsed flags, which carry the fields' names."""
    given = {k: v for k, v in vars(args).items() if k in ServerSettings.__dataclass_fields__}
    given["model_id"] = args.model_id or served_name(args.model)
    return ServerSettings(**given)


def json_400_protocol():
    """uvicorn's HTTP protocol, answering a request it cannot parse with OpenAI's JSON error
    instead of its plain text."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(APIError(400, msg).body()).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return Protocol


def uvicorn_server(app, host: str, port: int, log_level: str = "info", on_listening=None):
    """A uvicorn server for APP (from create_app) that answers bad HTTP in JSON, calls
    ON_LISTENING once its socket accepts connections, and on shutdown (SIGTERM, Ctrl+C) first
    ends the model's work: waiting requests get a 503 `server_shutting_down`, each running stream
    ends with its final chunk. Run it with `.run(sockets=[sock])`."""
    require("server", "uvicorn_server", ("uvicorn",))
    import uvicorn

    engine = app.state.engine

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and on_listening is not None:
                on_listening()

        async def shutdown(self, sockets=None):
            engine.shut_down()  # before uvicorn waits for the connections to close
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=json_400_protocol(), timeout_graceful_shutdown=5)
    return Server(config)


def run_server(args) -> int:
    require("server", "fastvlm-server")  # before the model loads
    settings = settings_from_args(args)
    settings.check()  # before the model loads
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    model, processor = load(args.model, dtype=runtime_dtype(args.dtype))
    app = create_app(model, processor, settings)
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host) and not settings.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can "
              "use the model", file=sys.stderr, flush=True)

    def banner():
        print(f"fastvlm-server: {settings.model_id} at http://{shown}:{port}/v1 "
              "(POST /v1/chat/completions, GET /v1/models, GET /health)", flush=True)

    # uvicorn re-raises the signal that stopped it once it has shut down; SIGTERM then ends the
    # process with status 0, as Ctrl+C does, instead of dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn_server(app, host, port, args.log_level, on_listening=banner).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl+C
        pass
    return 0


main = _cli.main_of(build_parser, run_server, needs_stdout=False)


if __name__ == "__main__":
    sys.exit(main())
