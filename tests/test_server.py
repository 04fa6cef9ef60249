"""server: the real uvicorn server on a loopback port with the tiny random-weight model, driven by
the official `openai` client and raw httpx: greedy answers equal `generate`, streaming, stop
sequences, logprobs, concurrency, KV/feature reuse across turns, every bad request, disconnects,
the bounded queue, and the CLI."""

import base64
import collections
import concurrent.futures
import contextlib
import functools
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

import fastvlm_mlx.server as server_module
from fastvlm_mlx.generate import GenerationOptions, generate
from fastvlm_mlx.server import create_app
from reference import CountingTower, LocalHTTP, closed_port, drip, redirect_to, send_bytes

ROOT = Path(__file__).resolve().parents[1]
JSON = {"Content-Type": "application/json"}
KEY = "test-key"
PROMPT = "What is in this picture?"
N = 10  # tokens per answer in most tests


def png(seed, size=(300, 200)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text, *urls):
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}


@pytest.fixture(scope="module")
def images(module_tmp):
    d = module_tmp("server_images")
    out = {}
    for name, seed, size in [("a", 1, (300, 200)), ("b", 2, (180, 240)), ("c", 3, (256, 256))]:
        (d / f"{name}.png").write_bytes(png(seed, size))
        out[name] = d / f"{name}.png"
    big = Image.new("RGB", (1000, 1000), (10, 200, 30))  # 1M pixels, a few KB as PNG
    big.save(d / "big.png")
    out["big"] = d / "big.png"
    return out


class LiveServer:
    """uvicorn running create_app(...) in a thread, on a port the OS picked."""

    def __init__(self, app):
        self.app, self.engine, self.settings = app, app.state.engine, app.state.settings
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, **kw):
        kw = {"api_key": KEY, "max_retries": 0, "timeout": 60, **kw}
        return openai.OpenAI(base_url=self.url + "/v1", **kw)

    def post(self, body=None, key=KEY, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kw.pop("headers", {}))
        if body is not None:
            kw["json"] = body
        kw.setdefault("timeout", 60)
        return httpx.post(self.url + "/v1/chat/completions", headers=headers, **kw)

    def idle(self, within=5.0) -> bool:
        deadline = time.time() + within
        while time.time() < deadline:
            if not self.engine.busy and not self.engine.queued:
                return True
            time.sleep(0.01)
        return False

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(tiny_loaded):
    model, processor = tiny_loaded
    app = create_app(model, processor, model_id="tiny", api_key=KEY, max_pixels=200_000,
                     max_body_bytes=2**20, max_images=4, queue_timeout=30, prompt_cache_size=4)
    server = LiveServer(app)
    yield server
    server.close()
    assert not server.engine.worker_running, "the model worker outlived the server"


@pytest.fixture(scope="module")
def default_live(tiny_loaded):
    """A server with every default but the model's name: no key, the default pixel cap, public
    image URLs only, the Host check."""
    model, processor = tiny_loaded
    server = LiveServer(create_app(model, processor, model_id="tiny"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def expected(tiny_loaded, images):
    """generate()'s greedy answers, computed before the server gets any work."""
    model, processor = tiny_loaded

    @functools.lru_cache(None)
    def run(prompt, image=None, max_tokens=N):
        ims = [images[image]] if image else []
        return generate(model, processor, prompt, images=ims, max_tokens=max_tokens,
                        feature_cache=False)

    return run


def check_timings(t: dict):
    for key in ("load_ms", "preprocess_ms", "vision_ms", "connector_ms", "prefill_ms",
                "first_token_ms", "ttft_ms", "decode_tps", "peak_memory_gb", "feature_cache_hit",
                "queue_ms"):
        assert key in t, key
    parts = t["preprocess_ms"] + t["vision_ms"] + t["connector_ms"] + t["prefill_ms"] + t["first_token_ms"]
    assert abs(t["ttft_ms"] - parts) < 0.01 and t["ttft_ms"] > 0 and t["queue_ms"] >= 0


# ------------------------------------------------------------------------------------------------
# Answers


def test_plain_and_streamed_completions_equal_generate(live, images, expected):
    want = expected(PROMPT, "a")
    assert len(want.token_ids) >= 3, "the reference answer is too short to compare"
    client = live.client()
    msgs = [user(PROMPT, data_url(images["a"].read_bytes()))]

    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
    assert r.usage.image_tokens == 16  # (256 / 64) ** 2
    check_timings(r.timings)

    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == want.finish_reason
    assert finals[0].usage.completion_tokens == len(want.token_ids)  # always on the last chunk
    check_timings(finals[0].timings)
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == want.prompt_tokens

    # The wire format: SSE `data:` lines of JSON, ending with [DONE].
    with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": msgs, "max_tokens": 3, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] and "usage" in last and "timings" in last


def test_logprobs_seed_and_text_only(live, expected, tiny_loaded):
    want = expected("Hello there", None)
    r = live.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=N,
        logprobs=True, top_logprobs=3,
    )
    assert r.choices[0].message.content == want.text
    assert r.usage.image_tokens == 0 and r.timings["vision_ms"] == 0
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    np.testing.assert_allclose([c.logprob for c in content], want.logprobs, atol=1e-4, rtol=0)
    for c in content:  # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)

    # Sampling with a seed is reproducible.
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=N,
              temperature=1.5, top_p=0.95, seed=7)
    a, b = (live.client().chat.completions.create(**kw) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    # ... and it is sampling at that temperature: the same draw as generate()'s, off the greedy
    # answer (so a server that ignored temperature, top_p or seed would fail here).
    model, processor = tiny_loaded
    sampled = generate(model, processor, "Hello there", max_tokens=N, temperature=1.5, top_p=0.95,
                       seed=7, feature_cache=False)
    assert a.choices[0].message.content == sampled.text
    assert sampled.token_ids != want.token_ids
    other_seed = live.client().chat.completions.create(**{**kw, "seed": 8})
    assert other_seed.choices[0].message.content != a.choices[0].message.content


def test_stop_sequences_cut_the_text(live, images, expected):
    text = expected(PROMPT, "a").text
    # A stop string first found at position i > 0.
    i = next(i for i in range(1, len(text) - 1) if text.find(text[i : i + 2]) == i)
    stop = text[i : i + 2]
    msgs = [user(PROMPT, data_url(images["a"].read_bytes()))]
    client = live.client()
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N,
                                       stop=["never in this text \u2603", stop])
    assert r.choices[0].message.content == text[:i]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N,
                                                 stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:i]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_text_holds_back_what_may_begin_a_stop_sequence():
    from fastvlm_mlx.engine import StopText

    st = StopText(["o w", "xyz"])
    assert st.add("He") == ("He", False)
    assert st.add("llo") == ("ll", False)  # "o" may begin "o w"
    assert st.add(" ") == ("", False)  # "o " too
    assert st.add("wor") == ("", True)  # cut before the stop sequence
    assert st.text == "Hell"
    st = StopText(["xyz"])
    assert st.add("ax") == ("a", False) and st.add("b") == ("xb", False) and st.flush() == ""
    assert StopText([]).add("anything") == ("anything", False)


# ------------------------------------------------------------------------------------------------
# One model, many clients


def test_parallel_clients_all_get_their_own_answers(live, images, expected):
    jobs = [("a", PROMPT), ("b", PROMPT), ("a", "Describe the colours."), (None, "Say something."),
            ("c", PROMPT), ("b", "Describe the colours.")]
    wants = [expected(p, im) for im, p in jobs]
    served = live.engine.stats["served"]
    barrier = threading.Barrier(len(jobs))

    def ask(i):
        im, prompt = jobs[i]
        msgs = [user(prompt, data_url(images[im].read_bytes())) if im else user(prompt)]
        client = live.client()
        barrier.wait(10)
        if i % 2:
            chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N,
                                                         stream=True))
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N)
        return r.choices[0].message.content

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, range(len(jobs)), timeout=60))
    assert time.time() - t0 < 60
    for (im, prompt), got, want in zip(jobs, answers, wants):
        assert got == want.text, (im, prompt)
    # Same text, different images: different answers (the caches keep images apart).
    assert wants[0].token_ids != wants[1].token_ids
    assert live.engine.stats["served"] == served + len(jobs)
    assert live.idle()


def test_follow_up_turns_reuse_the_image_and_the_kv_prefix(live, images, tiny_loaded):
    model, processor = tiny_loaded
    url = data_url(png(11, (320, 240)))  # an image no other test has sent
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",")[1])))
    client = live.client()
    first = [user("What is this?", url)]
    with CountingTower(model) as tower:
        r1 = client.chat.completions.create(model="tiny", messages=first, max_tokens=N)
        assert tower.calls == 1
        assert r1.timings["vision_ms"] > 0 and not r1.timings["feature_cache_hit"]
        second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                          {"role": "user", "content": "And what colour is it?"}]
        r2 = client.chat.completions.create(model="tiny", messages=second, max_tokens=N)
        assert tower.calls == 1, "the follow-up re-encoded the image"
        # Another branch of the same conversation: only the system and image prefix is shared.
        branch = [user("Is it a photo?", url)]
        r3 = client.chat.completions.create(model="tiny", messages=branch, max_tokens=N)
        assert tower.calls == 1
    assert r2.timings["vision_ms"] == 0 and r2.timings["feature_cache_hit"]
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    assert 16 < r3.usage.prompt_tokens_details.cached_tokens < r1.usage.prompt_tokens
    # ... and the answers are those of fresh runs on the whole conversation.
    for r, msgs in [(r2, second), (r3, branch)]:
        prompt = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                   else m["content"][0]["text"]} for m in msgs]
        fresh = generate(model, processor, prompt, images=[image], max_tokens=N, feature_cache=False)
        assert r.choices[0].message.content == fresh.text
        assert r.usage.prompt_tokens == fresh.prompt_tokens


def test_images_by_http_url_and_allowed_local_path(live, images, expected):
    want = expected(PROMPT, "a").text
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images["a"].parent))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client = live.client()
    live.settings.allow_private_urls = True  # the test's server is on loopback
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
        r = client.chat.completions.create(model="tiny", messages=[user(PROMPT, url)], max_tokens=N)
        assert r.choices[0].message.content == want
    finally:
        live.settings.allow_private_urls = False
        httpd.shutdown()
    live.settings.allow_local_files = True
    try:
        for ref in (str(images["a"]), images["a"].as_uri()):
            r = client.chat.completions.create(model="tiny", messages=[user(PROMPT, ref)], max_tokens=N)
            assert r.choices[0].message.content == want
    finally:
        live.settings.allow_local_files = False


# ------------------------------------------------------------------------------------------------
# Bad requests: OpenAI-style errors, and the server keeps serving


def tiny_png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


BAD = {
    # case: (request kwargs for LiveServer.post, status, code, words in the message)
    "malformed-json": (dict(content=b'{"messages": [', headers=JSON), 400, None, "JSON"),
    "not-an-object": (dict(body=["hello"]), 400, None, "object"),
    "no-messages": (dict(body={"model": "tiny"}), 400, None, "messages"),
    "wrong-type": (dict(body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}),
                   400, None, "max_tokens"),
    "bad-part": (dict(body={"messages": [{"role": "user", "content": [{"type": "video"}]}]}),
                 400, None, "messages[0].content[0]"),
    "bad-role": (dict(body={"messages": [{"role": "robot", "content": "hi"}]}), 400, None, "role"),
    "n": (dict(body={"messages": [{"role": "user", "content": "hi"}], "n": 2}), 400, None, "n must be 1"),
    "marker-without-image": (dict(body={"messages": [user("<image>\nWhat is this?")]}), 400, None,
                             "<image>"),
    "image-in-assistant": (dict(body={"messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        400, None, "user messages"),
    "undecodable-image": (dict(body={"messages": [user("hi", data_url(b"not an image" * 20))]}), 400,
                          "invalid_image", "not a supported image"),
    "empty-image": (dict(body={"messages": [user("hi", "data:image/png;base64,")]}), 400,
                    "invalid_image", "empty"),
    "bad-base64": (dict(body={"messages": [user("hi", "data:image/png;base64,@@@@")]}), 400,
                   "invalid_image", "base64"),
    "unreachable-url": (dict(body={"messages": [user("hi", f"http://127.0.0.1:{closed_port()}/x.png")]}),
                        400, "invalid_image", "could not be fetched"),
    "surrogate-in-url": (dict(content=b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
                              b'"image_url": {"url": "http://\\ud800.example/x.png"}}]}]}', headers=JSON),
                         400, "invalid_image", "could not be fetched"),
    "surrogate-in-text": (dict(content=b'{"messages": [{"role": "user", "content": "hi \\udc80 there"}]}',
                               headers=JSON), 400, None, "UTF-8"),
    "nested-json": (dict(content=b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=JSON),
                    400, None, "nested"),
    "no-content-type": (dict(content=json.dumps({"messages": [user("hi")]}).encode()), 415,
                        "unsupported_media_type", "missing"),
    "pixel-cap": ("big", 400, "invalid_image", "pixel"),
    "too-many-images": (dict(body={"messages": [user("hi", *[data_url(tiny_png())] * 5)]}), 400, None,
                        "at most 4"),
    "body-cap": (dict(body={"messages": [user("x" * (3 * 2**19))]}), 413, "request_too_large", "limit"),
    "context": (dict(body={"messages": [user("The quick brown fox jumps over the lazy dog. " * 1000)]}),
                400, "context_length_exceeded", "context"),
    "logit-bias-id": (dict(body={"messages": [user("hi")], "logit_bias": {"99999": 5}}), 400, None,
                      "vocabulary"),
    # Every sampling field is checked as the CLI checks it (GenerationOptions.check).
    **{f"{name}={value}": (dict(body={"messages": [user("hi")], name: value}), 400, None,
                           name.replace("max_completion_tokens", "max_tokens"))
       for name, value in [("top_k", 1000000), ("top_k", 512), ("top_k", -1), ("top_p", 5),
                           ("top_p", 0), ("min_p", 2), ("temperature", -1),
                           ("repetition_penalty", 0), ("seed", -1), ("seed", 2**64), ("max_tokens", 0),
                           ("max_completion_tokens", -3)]},
    **{f"temperature={value}": (dict(content=b'{"messages": [{"role": "user", "content": "hi"}], '
                                     b'"temperature": ' + value + b"}", headers=JSON), 400, None,
                                "temperature") for value in (b"NaN", b"1e400", b"-Infinity")},
    "no-key": (dict(body={"messages": [user("hi")]}, key=None), 401, "invalid_api_key", "API key"),
    "wrong-key": (dict(body={"messages": [user("hi")]}, key="nope"), 401, "invalid_api_key", "API key"),
    "local-path": ("local", 400, "local_files_not_allowed", "--allow-local-files"),
    "text-plain": (dict(content=b'{"messages": []}', headers={"Content-Type": "text/plain"}), 415,
                   "unsupported_media_type", "application/json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(case, live, images):
    kwargs, status, code, words = BAD[case]
    if kwargs == "big":
        kwargs = dict(body={"messages": [user("hi", data_url(images["big"].read_bytes()))]})
    elif kwargs == "local":
        kwargs = dict(body={"messages": [user("hi", str(images["a"]))]})
    r = live.post(**kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code
    assert words in err["message"], err["message"]
    # The server still answers a good request.
    ok = live.client().chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_errors_through_the_openai_client_and_other_routes(live):
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="wrong").chat.completions.create(model="tiny", messages=[user("hi")])
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(model="tiny", messages=[user("<image> hi")])
    assert e.value.body["type"] == "invalid_request_error"
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(live.url + "/v1/models").status_code == 401
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    r = httpx.get(live.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()


# ------------------------------------------------------------------------------------------------
# What one request can do to the others


def sampled(**extra):
    return {"messages": [user("hi")], "temperature": 1.0, "max_tokens": 3, **extra}


def test_a_refused_top_k_and_a_failed_generation_leave_sampling_usable(live, monkeypatch):
    r = live.post(sampled(top_k=1000000))
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text
    assert live.post(sampled()).status_code == 200

    # Another failure inside generation: a sampler that raises while mx.compile traces it with
    # MLX's random state as an input, as mlx-lm's top-k did. Only its own request fails.
    @functools.partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
    def broken(logprobs):
        raise ValueError("a sampler that fails while it is traced")

    with monkeypatch.context() as m:
        m.setattr(GenerationOptions, "make_sampler", lambda self: broken)
        r = live.post(sampled())
    assert r.status_code == 500 and "fails while it is traced" in r.json()["error"]["message"]
    for _ in range(2):
        r = live.post(sampled())
        assert r.status_code == 200, r.text


def test_slow_image_urls_hold_up_no_other_request_and_end_with_their_client(live):
    web = LocalHTTP({"/drip.png": drip(seconds=8)})
    live.settings.allow_private_urls, live.settings.url_timeout = True, 6.0
    try:
        def leave_early(_):
            with pytest.raises(httpx.TimeoutException):
                live.post({"messages": [user("hi", web.url("/drip.png"))], "max_tokens": 2}, timeout=0.5)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            leaving = [pool.submit(leave_early, i) for i in range(8)]
            time.sleep(0.3)
            fetching = web.open  # (while every client still waits)
            for f in leaving:
                f.result()
        assert fetching <= live.settings.url_fetchers == 4, "URL fetches are not in a bounded pool"
        # Eight clients gave up on slow URLs; a request without images is answered at once...
        t0 = time.monotonic()
        r = live.post({"messages": [user("hi")], "max_tokens": 2})
        assert r.status_code == 200 and time.monotonic() - t0 < 3, time.monotonic() - t0
        # ... and the fetches of the clients that left are dropped, not run to their deadline.
        deadline = time.monotonic() + 3
        while web.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert web.open == 0, "fetches went on for clients that had left"
    finally:
        live.settings.allow_private_urls, live.settings.url_timeout = False, None
        web.close()


def test_prompts_are_tokenized_off_the_model_worker_and_huge_ones_not_at_all(live, tiny_loaded,
                                                                             monkeypatch):
    _, processor = tiny_loaded
    calls, real = [], processor.encode

    def spy(text, size=None):
        calls.append((len(text), threading.current_thread().name))
        return real(text, size)

    monkeypatch.setattr(processor, "encode", spy)
    r = live.post({"messages": [user("Say something short.")], "max_tokens": 2})
    assert r.status_code == 200 and calls
    assert all(thread != "fastvlm-model" for _, thread in calls), calls
    calls.clear()
    huge = "many words " * 40_000  # 440K characters, over 16 x the tiny model's 4096 positions
    r = live.post({"messages": [user(huge)], "max_tokens": 2})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
    assert "characters" in err["message"] and calls == [], "the huge prompt was tokenized"


def test_big_bodies_are_parsed_off_the_event_loop(live, monkeypatch):
    threads, real = [], server_module.parse_request
    monkeypatch.setattr(server_module, "parse_request",
                        lambda payload: threads.append(threading.current_thread()) or real(payload))
    padding = ["an ignored field of some size"] * 20_000  # ~0.7 MB of JSON
    r = live.post({"messages": [user("hi")], "max_tokens": 2, "padding": padding})
    assert r.status_code == 200 and threads
    assert threads[-1] is not live.thread, "a big body was parsed on the event loop"


def test_the_default_pixel_cap_fits_photos_not_bombs(default_live):
    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (9, 9, 9)).save(buf, "PNG")  # 36M pixels in ~100 KB
    assert len(buf.getvalue()) < 2**20
    r = default_live.post({"messages": [user("hi", data_url(buf.getvalue()))], "max_tokens": 2})
    assert r.status_code == 400 and "over the cap of 32000000" in r.json()["error"]["message"], r.text


def test_images_are_decoded_a_few_at_a_time(live, monkeypatch):
    active, most, lock, real = [0], [0], threading.Lock(), server_module.to_pil

    def slow_decode(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.3)
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(server_module, "to_pil", slow_decode)
    bodies = [{"messages": [user("hi", data_url(png(100 + i, (64, 64))))], "max_tokens": 1}
              for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda body: live.post(body).status_code, bodies))
    assert codes == [200] * 6
    assert 1 <= most[0] <= live.settings.max_decodes == 2, most[0]


# ------------------------------------------------------------------------------------------------
# What a web page or an image URL can make the server do


def test_image_urls_to_non_public_addresses_are_refused_alike_before_connecting(default_live, images,
                                                                               monkeypatch):
    web = LocalHTTP({"/a.png": send_bytes(images["a"].read_bytes())})
    outside, real = [], socket.socket.connect

    def connect(sock, address):  # nothing leaves loopback, whatever the server would do
        if address[0] not in ("127.0.0.1", "::1"):
            outside.append(address)
            raise ConnectionRefusedError("this test allows loopback only")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    urls = [web.url("/a.png"), f"http://localhost:{web.port}/a.png", f"http://0.0.0.0:{web.port}/a.png",
            "http://169.254.169.254/latest/meta-data/", "http://2852039166/latest/meta-data/",
            "http://[::ffff:169.254.169.254]/latest/meta-data/", "http://10.0.0.1/x.png"]
    messages = set()
    try:
        for url in urls:
            r = default_live.post({"messages": [user("hi", url)], "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", (url, r.text)
            messages.add(r.json()["error"]["message"])
    finally:
        web.close()
    assert len(messages) == 1 and "--allow-private-urls" in messages.pop()
    assert web.served["/a.png"] == 0 and outside == []


def test_every_image_url_failure_reads_the_same(live, images):
    web = LocalHTTP({"/a.png": send_bytes(images["a"].read_bytes()),
                     "/text": send_bytes(b"hello", "text/plain"),
                     "/to-ftp": redirect_to("ftp://127.0.0.1/a.png"), "/loop": redirect_to("/loop")})
    live.settings.allow_private_urls = True
    messages = set()
    try:
        assert live.post({"messages": [user("hi", web.url("/a.png"))], "max_tokens": 2}).status_code == 200
        for url in [web.url("/missing"), web.url("/text"), web.url("/to-ftp"), web.url("/loop"),
                    f"http://127.0.0.1:{closed_port()}/a.png"]:
            r = live.post({"messages": [user("hi", url)], "max_tokens": 2})
            assert r.status_code == 400, (url, r.text)
            messages.add(r.json()["error"]["message"])
    finally:
        live.settings.allow_private_urls = False
        web.close()
    assert len(messages) == 1, messages


def test_requests_a_web_page_could_forge_are_refused(default_live):
    url, port = default_live.url, default_live.port
    body = json.dumps({"messages": [user("hi")], "max_tokens": 2}).encode()
    # A page can post a Blob (no Content-Type) cross-site with no preflight.
    r = httpx.post(url + "/v1/chat/completions", content=body, timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    # A page that rebinds its own name to 127.0.0.1 sends that name as the Host.
    for path in ("/health", "/v1/models"):
        r = httpx.get(url + path, headers={"Host": f"rebinding.example:{port}"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", (path, r.text)
    r = httpx.post(url + "/v1/chat/completions", content=body, timeout=60,
                   headers={"Host": "rebinding.example", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(url + "/health", headers={"Host": host}, timeout=60).status_code == 200, host
    r = httpx.post(url + "/v1/chat/completions", content=body, headers=JSON, timeout=60)
    assert r.status_code == 200


def test_an_image_with_a_broken_exif_block_is_read_as_stored(live):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "JPEG", exif=b"Exif\x00\x00XX\x00*not a TIFF header")
    r = live.post({"messages": [user("hi", data_url(buf.getvalue()))], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_local_path_with_a_lone_surrogate_is_a_400(live):
    live.settings.allow_local_files = True
    try:
        r = live.post(content=b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
                      b'"image_url": {"url": "/nowhere/\\udc80.png"}}]}]}', headers=JSON)
    finally:
        live.settings.allow_local_files = False
    assert r.status_code == 400 and "not found" in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------------------------------------
# A busy model: bounded waits, and clients that leave


def long_request(processor, **extra):
    """A request that would run to the end of the context: EOS is banned."""
    bias = {str(t): -100 for t in processor.eos_token_ids}
    return {"messages": [user("Tell me a very long story.")], "max_tokens": 100_000,
            "logit_bias": bias, **extra}


def test_busy_model_gives_503_and_a_disconnect_frees_it(live, tiny_loaded):
    _, processor = tiny_loaded
    stats = dict(live.engine.stats)
    headers = {"Authorization": f"Bearer {KEY}"}
    rows = live.engine.settings.max_batch_size  # long streams that fill every row of the batch
    readers = []  # each stream's line iterator (one dropped would close its stream)
    with httpx.Client(timeout=60) as http, contextlib.ExitStack() as streams:
        for _ in range(rows):
            stream = streams.enter_context(http.stream(
                "POST", live.url + "/v1/chat/completions", headers=headers,
                json=long_request(processor, stream=True)))
            assert stream.status_code == 200
            readers.append(stream.iter_lines())
            got = [next(readers[-1]) for _ in range(6)]  # the model is generating
            assert all(line.startswith("data: ") or not line for line in got)
        assert len(live.engine.running) == rows

        # A request that cannot get the model within queue_timeout: 503, promptly.
        live.settings.queue_timeout = 0.3
        try:
            t0 = time.time()
            r = live.post({"messages": [user("hi")], "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
            assert "Retry-After" in r.headers and time.time() - t0 < 10
        finally:
            live.settings.queue_timeout = 30
        # A full queue refuses at once.
        live.engine.settings.max_queue = 0  # the model worker's own limit
        try:
            r = live.post({"messages": [user("hi")], "max_tokens": 2})
            assert r.status_code == 503
        finally:
            live.engine.settings.max_queue = 32
        assert len(live.engine.running) == rows, "a long stream stopped by itself"
        # The streams are closed mid-generation: the model is freed at once, not after ~4000 tokens.
    assert live.idle(within=3), "the model kept generating for a client that left"
    t0 = time.time()
    r = live.client().chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length") and time.time() - t0 < 10
    assert r.timings["queue_ms"] < 1000

    # A non-streamed request whose client gives up (times out) is cancelled too.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + "/v1/chat/completions", headers=headers, json=long_request(processor),
                   timeout=httpx.Timeout(60, read=1.0))
    assert live.idle(within=3)
    after = live.engine.stats
    assert after["cancelled"] == stats["cancelled"] + rows + 1
    assert after["timed_out"] == stats["timed_out"] + 1
    assert after["failed"] == stats["failed"]
    ok = live.client().chat.completions.create(model="tiny", messages=[user("hi")], max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------------
# The command line


def start_server(model, *args):
    """The server CLI on a free loopback port: (the process, its base URL), once it has said
    where it listens."""
    p = subprocess.Popen(
        [sys.executable, "-m", "fastvlm_mlx.server", "--model", str(model), "--port", "0",
         "--log-level", "warning", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = p.stdout.readline()
    if "http://127.0.0.1:" not in line:
        p.kill()
        raise AssertionError(line + p.communicate(timeout=30)[1])
    return p, "http://" + line.split("http://")[1].split()[0].rstrip("/").removesuffix("/v1")


def stop_server(p, sig=signal.SIGINT) -> str:
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    assert p.returncode == 0, (p.returncode, err)
    assert "Traceback" not in err, err
    return err


def test_cli_says_where_it_listens_once_it_listens_serves_and_stops(tiny_converted):
    p, url = start_server(tiny_converted)
    try:
        # The line comes once the socket accepts connections: a client may connect at once.
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            # A request uvicorn itself cannot parse is answered in OpenAI's JSON too.
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer = raw.makefile("rb").read()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["type"] == "invalid_request_error"
        # The served name is the model directory's name, never its path.
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "ok" and health["model"] == tiny_converted.name
        assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]] == [tiny_converted.name]
        r = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="x", messages=[user("hi")], max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        stop_server(p)


def test_sigterm_ends_a_stream_with_its_last_chunk_and_refuses_what_waits(tiny_converted, tiny_loaded):
    _, processor = tiny_loaded
    p, url = start_server(tiny_converted, "--max-batch-size", "2")
    streamed = [{}, {}]  # two long streams fill the batch's rows; what comes next waits

    def stream(i):
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json=long_request(processor, stream=True)) as r:
            streamed[i]["status"] = r.status_code
            streamed[i]["lines"] = [line for line in r.iter_lines() if line]

    def health():
        return httpx.get(f"{url}/health", timeout=30).json()

    def wait_for(condition):
        for _ in range(200):
            if condition(health()):
                return
            time.sleep(0.05)
        raise AssertionError(f"the server never got there: {health()}")

    readers = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    try:
        for reader in readers:
            reader.start()
        wait_for(lambda h: h["decoding"] == 2)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=60,
                                   json={"messages": [user("hi")], "max_tokens": 2}) for _ in range(3)]
            wait_for(lambda h: h["queued"] == 3)
            err = stop_server(p, signal.SIGTERM)
            answers = [f.result(timeout=30) for f in waiting]
        for reader in readers:
            reader.join(30)
    finally:
        if p.poll() is None:
            p.kill()
    for r in answers:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "server_shutting_down"
    for one in streamed:
        lines = one["lines"]
        assert one["status"] == 200 and lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads(lines[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] > 0
    assert "Traceback" not in err and "ERROR" not in err, err


@pytest.mark.parametrize("args,code,needle", [
    (["--port", "70000"], 2, "port"),
    (["--max-body-bytes", "-5"], 2, "positive"),
    (["--max-batch-size", "0"], 2, "positive"),
    (["--model", "/nonexistent/model/dir", "--port", "0"], 1, "nonexistent"),
    (["--resolution", "300", "--port", "0"], 1, "resolution"),
    ("taken", 1, "cannot listen"),
    # Checked at start-up, not when the first request dies of them (a group size of 0 is a
    # SIGFPE once a KV cache reaches --quantized-kv-start).
    (["--kv-bits", "4", "--kv-group-size", "0"], 1, "kv_group_size"),
    (["--kv-bits", "7"], 1, "kv_bits"),
    (["--max-kv-size", "0"], 1, "max_kv_size"),
    (["--prefill-step-size", "0"], 1, "prefill_step_size"),
    (["--temp", "nan"], 1, "temperature"),
    (["--top-p", "5"], 1, "top_p"),
    (["--resolution", "640000"], 1, "context"),
    (["--api-key", ""], 1, "API key is empty"),
    ("empty-key-variable", 1, "API key is empty"),
])
def test_cli_bad_input_is_one_line(args, code, needle, tiny_converted):
    taken, env = None, dict(os.environ)
    if args == "taken":
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = ["--port", str(taken.getsockname()[1])]
    elif args == "empty-key-variable":
        args, env["FASTVLM_API_KEY"] = [], ""
    if code == 1 and "--model" not in args:
        args = ["--model", str(tiny_converted), "--port", "0", *args]
    try:
        p = subprocess.run([sys.executable, "-m", "fastvlm_mlx.server", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, env=env)
    finally:
        if taken:
            taken.close()
    assert p.returncode == code
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert p.stdout == ""


# ------------------------------------------------------------------------------------------------
# A property-based fuzz of the request schema


def fuzzed_requests():
    """Request bodies near the schema and far from it: every field with good values, values of
    the wrong type or range, NaN and infinities, lone surrogates, deep and odd JSON."""
    from hypothesis import strategies as st

    text = st.text(st.characters(codec=None), max_size=12)  # lone surrogates included
    junk = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8)
    small_int = st.integers(-3, 3) | st.sampled_from([2**63, 2**64, -(2**70)])
    number = st.floats(allow_nan=True, allow_infinity=True) | small_int
    image_url = st.sampled_from([
        data_url(tiny_png()), "data:image/png;base64,@@@", "data:,", "", "ftp://127.0.0.1/x.png",
        f"http://127.0.0.1:{closed_port()}/x.png", "file:///etc/passwd", "/etc/passwd",
        "http://169.254.169.254/", "<image>"]) | text
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": text | junk}),
        st.fixed_dictionaries({"type": st.just("image_url"),
                               "image_url": st.fixed_dictionaries({"url": image_url}) | image_url | junk}),
        st.fixed_dictionaries({"type": text | junk}), junk)
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", ""]) | junk},
        optional={"content": text | st.lists(part, max_size=3) | st.none() | junk})
    fields = {
        "model": text | junk, "max_tokens": small_int | junk, "max_completion_tokens": small_int,
        "temperature": number | junk, "top_p": number, "top_k": small_int | st.just(10**6),
        "min_p": number, "repetition_penalty": number, "seed": small_int | junk,
        "stop": text | st.lists(text, max_size=20) | junk, "stream": st.booleans() | junk,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | junk}) | junk,
        "n": small_int, "logprobs": st.booleans() | junk, "top_logprobs": small_int | st.just(21),
        "logit_bias": st.dictionaries(st.integers(-5, 10**6).map(str) | text, number, max_size=3) | junk,
    }
    body = st.fixed_dictionaries(
        {"messages": st.lists(message, max_size=3) | junk}, optional=fields)
    good_part = st.fixed_dictionaries({"type": st.just("text"), "text": text}) | st.just(
        {"type": "image_url", "image_url": {"url": data_url(tiny_png())}})
    good_fields = {
        "max_tokens": st.integers(1, 3), "temperature": st.floats(0, 3), "top_p": st.floats(0.01, 1),
        "top_k": st.integers(0, 50), "min_p": st.floats(0, 1), "repetition_penalty": st.floats(0.1, 3),
        "seed": st.integers(0, 2**64 - 1), "stop": st.lists(text, max_size=3), "stream": st.booleans(),
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 20),
        "logit_bias": st.dictionaries(st.integers(0, 300).map(str), st.floats(-100, 100), max_size=3),
    }
    near_good = st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries(
            {"role": st.just("user"), "content": text | st.lists(good_part, min_size=1, max_size=2)}),
            min_size=1, max_size=2)},
        optional={**good_fields, **{k: fields[k] for k in ("top_k", "seed", "stop")}})
    return near_good | body | junk


def test_fuzzed_requests_get_answers_or_4xx_never_a_500(tiny_loaded):
    """At most a minute of requests (hypothesis, a fixed seed): each gets a 200 or a JSON 4xx,
    never a 500, and the server answers a good request afterwards."""
    from hypothesis import HealthCheck, given, settings

    model, processor = tiny_loaded
    server = LiveServer(create_app(model, processor, model_id="tiny", max_tokens=2, max_images=2,
                                   max_body_bytes=2**18, queue_timeout=30, url_timeout=2))
    started = time.monotonic()
    statuses = collections.Counter()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fuzzed_requests())
    def answered(body):
        if time.monotonic() - started > 50:  # the minute's budget, setup included, is spent
            return
        content = json.dumps(body).encode()  # NaN and Infinity as Python's json writes them
        r = httpx.post(server.url + "/v1/chat/completions", content=content, headers=JSON, timeout=60)
        statuses[r.status_code] += 1
        assert r.status_code in (200, 400, 413), (r.status_code, r.text[:500], body)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")

    try:
        answered()
        assert statuses[200] and statuses[400], statuses  # both sides of the schema were reached
        ok = httpx.post(server.url + "/v1/chat/completions", headers=JSON, timeout=60,
                        json={"messages": [user("hi")]})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert server.idle()
    finally:
        server.close()
