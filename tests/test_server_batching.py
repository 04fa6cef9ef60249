"""The server's continuous batching (engine.py on batch.RunningBatch): the real uvicorn server on
loopback with the tiny random-weight model and the official `openai` client. 8 and 32 concurrent
clients, each with its own image (some text-only, some on a follow-up turn of their own
conversation), each get the greedy answer of their request run alone (token for token, up to
float32 near-ties that are shown to be ties); a request joins a running batch; the requests
queued together share one vision-tower call; a client that leaves takes only its own row; a
seeded request samples the same alone and under load; what cannot be batched runs alone."""

import concurrent.futures
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from fastvlm_mlx.generate import GenerationResult, generate
from fastvlm_mlx.server import create_app
from reference import CountingTower
from test_batch import assert_same_or_tie, solo
from test_server import KEY, PROMPT, LiveServer, data_url, long_request, png, user

N = 8  # tokens per answer
ROWS = 8  # the server's max_batch_size


@pytest.fixture(scope="module")
def batched(tiny_loaded):
    model, processor = tiny_loaded
    server = LiveServer(create_app(model, processor, model_id="tiny", api_key=KEY,
                                   max_batch_size=ROWS, max_queue=64, queue_timeout=120,
                                   prompt_cache_size=64))
    yield server
    server.close()
    assert not server.engine.worker_running, "the model worker outlived the server"


def picture(seed):
    """A distinct small image: (its data URL, the PIL image the server decodes from it)."""
    data = png(seed, (96 + seed % 5 * 8, 64 + seed % 3 * 16))
    return data_url(data), Image.open(io.BytesIO(data)).convert("RGB")


def served_result(choice, alone, tokenizer) -> GenerationResult:
    """The served answer as a GenerationResult with token ids, for `assert_same_or_tie`. The
    server says each token as text with its logprob: the id is the solo run's where the texts
    agree, else the solo run's second candidate at that step if its text is the served one (a
    float32 near-tie the check then measures); past a difference the ids are not needed."""
    result, vectors = alone
    ids, logprobs = [], []
    for k, entry in enumerate(choice.logprobs.content):
        if k < len(result.token_ids) and tokenizer.decode([result.token_ids[k]]) == entry.token:
            ids.append(result.token_ids[k])
            logprobs.append(entry.logprob)
            continue
        if k < len(vectors):
            second = int(np.argsort(vectors[k])[::-1][1])
            if tokenizer.decode([second]) == entry.token:
                ids.append(second)
                logprobs.append(entry.logprob)
        if len(ids) <= k:
            ids.append(-1)  # no candidate of the solo run: assert_same_or_tie fails on it
        break
    return GenerationResult(choice.message.content, ids, logprobs, choice.finish_reason, 0, 0, None)


def ask(client, messages, stream, **kw):
    """One chat completion (streamed or not) with logprobs: (text, choice-like, usage, timings)."""
    kw = dict(model="tiny", messages=messages, max_tokens=N, logprobs=True, top_logprobs=2, **kw)
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0], r.usage, r.timings
    chunks = list(client.chat.completions.create(stream=True, **kw))
    last = chunks[-1]
    content = [e for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]

    class Choice:  # the streamed answer, shaped as a non-streamed choice
        message = type("M", (), {"content": "".join(c.choices[0].delta.content or "" for c in chunks
                                                    if c.choices)})
        logprobs = type("L", (), {"content": content})
        finish_reason = next(c.choices[0].finish_reason for c in chunks[::-1]
                             if c.choices and c.choices[0].finish_reason)

    return Choice, last.usage, last.timings


def plain(messages):
    """The OpenAI messages as generate's prompt (text parts only; the images go apart)."""
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else next(p["text"] for p in m["content"] if p["type"] == "text")} for m in messages]


@pytest.mark.parametrize("clients", [8, 32])
def test_concurrent_clients_each_get_their_solo_answer(batched, tiny_loaded, clients):
    """Every fourth client is text-only, every fourth asks a follow-up in its own conversation;
    half stream. Each answer is its request's solo run, and they were decoded together."""
    model, processor = tiny_loaded
    served = dict(batched.engine.stats)
    barrier = threading.Barrier(clients)

    def client_run(i):
        url, image = picture(100 * clients + i)
        client = batched.client(timeout=120)
        kind = ("image", "image", "follow-up", "text")[i % 4]
        messages = [user(f"Say something about {i}.")] if kind == "text" else [user(PROMPT, url)]
        barrier.wait(30)
        if kind == "follow-up":
            first, _, _ = ask(client, messages, stream=False)
            messages = messages + [{"role": "assistant", "content": first.message.content},
                                   {"role": "user", "content": "And what colour is it?"}]
        choice, usage, timings = ask(client, messages, stream=bool(i % 2))
        return kind, messages, [] if kind == "text" else [image], choice, usage, timings

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(client_run, range(clients), timeout=300))
    assert batched.idle()
    for kind, messages, images, choice, usage, timings in runs:
        alone = solo(model, processor, plain(messages), images, max_tokens=N)
        assert_same_or_tie(served_result(choice, alone, processor.tokenizer), alone)
        assert usage.prompt_tokens == alone[0].prompt_tokens
        if choice.message.content == alone[0].text:
            assert usage.completion_tokens == len(alone[0].token_ids)
        assert timings["queue_ms"] >= 0 and 1 <= timings["batch_size"] <= ROWS
        if kind == "follow-up":  # its conversation's KV cache was reused: no second encode
            assert usage.prompt_tokens_details.cached_tokens > 0 and timings["feature_cache_hit"]
    follow_ups = sum(kind == "follow-up" for kind, *_ in runs)
    assert batched.engine.stats["served"] == served["served"] + clients + follow_ups
    assert batched.engine.stats["failed"] == served["failed"]
    # They were decoded together, as many at once as there are rows.
    assert max(timings["batch_size"] for *_, timings in runs) >= min(clients, ROWS) // 2


def test_a_request_joins_the_running_batch(batched, tiny_loaded):
    _, processor = tiny_loaded
    client = batched.client(timeout=120)
    long = client.chat.completions.create(
        model="tiny", stream=True, **{**long_request(processor), "max_tokens": 400})
    chunks = iter(long)
    for _ in range(4):  # the long answer is decoding
        next(chunks)
    url, _ = picture(7)
    short = client.chat.completions.create(model="tiny", messages=[user(PROMPT, url)], max_tokens=N)
    assert short.timings["batch_size"] == 2  # it decoded beside the long answer, which goes on
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length" and rest[-1].timings["batch_size"] == 2
    assert rest[-1].usage.completion_tokens == 400


def test_requests_queued_together_share_one_vision_call(batched, tiny_loaded):
    """While the worker is held in a step, three image requests queue; they then join the batch
    at once, and their images are encoded in one vision-tower call."""
    model, _ = tiny_loaded
    engine = batched.engine
    gate, held = threading.Event(), threading.Event()
    step = engine.batch.step

    def held_step():
        if not gate.is_set():
            held.set()
            gate.wait(60)
        return step()

    engine.batch.step = held_step
    try:
        with CountingTower(model) as tower, concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(batched.client().chat.completions.create, model="tiny",
                                messages=[user("hi")], max_tokens=N)
            assert held.wait(30)
            urls = [picture(200 + i)[0] for i in range(3)]
            queued = [pool.submit(batched.client().chat.completions.create, model="tiny",
                                  messages=[user(PROMPT, u)], max_tokens=N) for u in urls]
            deadline = time.time() + 30
            while engine.queued < 3:
                assert time.time() < deadline, "the requests never queued"
                time.sleep(0.01)
            gate.set()
            answers = [f.result(60) for f in queued]
            first.result(60)
    finally:
        gate.set()
        del engine.batch.step
    assert tower.calls == 1
    whole = answers[0].timings["batch_vision_ms"]
    assert whole > 0 and all(a.timings["batch_vision_ms"] == whole for a in answers)
    assert sum(a.timings["vision_ms"] for a in answers) == pytest.approx(whole, abs=0.01)


def test_a_client_that_leaves_takes_only_its_own_row(batched, tiny_loaded):
    model, processor = tiny_loaded
    cancelled = batched.engine.stats["cancelled"]
    pictures = [picture(300 + i) for i in range(4)]
    leaving = batched.client(timeout=120).chat.completions.create(
        model="tiny", stream=True, **{**long_request(processor), "max_tokens": 400})
    it = iter(leaving)
    next(it)

    def stay(i):
        return ask(batched.client(timeout=120), [user(PROMPT, pictures[i][0])], stream=True)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        staying = [pool.submit(stay, i) for i in range(4)]
        for _ in range(3):
            next(it)
        leaving.close()  # mid-answer, while the others decode
        results = [f.result(120) for f in staying]
    assert batched.idle()
    assert batched.engine.stats["cancelled"] == cancelled + 1
    for (choice, usage, timings), (_, image) in zip(results, pictures):
        alone = solo(model, processor, PROMPT, [image], max_tokens=N)
        assert_same_or_tie(served_result(choice, alone, processor.tokenizer), alone)


def test_a_seeded_request_samples_the_same_alone_and_under_load(batched, tiny_loaded):
    model, processor = tiny_loaded
    url, image = picture(400)
    kw = dict(model="tiny", messages=[user(PROMPT, url)], max_tokens=N, temperature=1.2,
              top_p=0.9, seed=11)
    alone = batched.client().chat.completions.create(**kw).choices[0].message.content
    sampled = generate(model, processor, PROMPT, images=[image], max_tokens=N, temperature=1.2,
                       top_p=0.9, seed=11, feature_cache=False)
    assert alone == sampled.text
    others = [picture(410 + i)[0] for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        load = [pool.submit(batched.client().chat.completions.create, model="tiny",
                            messages=[user(PROMPT, u)], max_tokens=N, temperature=1.0)
                for u in others]
        loaded = pool.submit(batched.client().chat.completions.create, **kw)
        assert loaded.result(120).choices[0].message.content == alone
        assert loaded.result().timings["batch_size"] > 1
        for f in load:
            f.result(120)


def test_what_cannot_be_batched_runs_alone(tiny_loaded):
    """A rotating KV cache (max_kv_size) has no batch kind that keeps the first tokens, so every
    request runs alone, none is refused, and each answer is generate's with the same options.
    (kv_bits takes the same path; the tiny decoder's 16-wide heads admit no KV group size.)"""
    model, processor = tiny_loaded
    options = dict(max_kv_size=1024)
    server = LiveServer(create_app(model, processor, model_id="tiny", **options))
    try:
        assert server.engine.batch is None
        pictures = [picture(500 + i) for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(
                lambda p: server.client(api_key="x").chat.completions.create(
                    model="tiny", messages=[user(PROMPT, p[0])], max_tokens=N), pictures))
    finally:
        server.close()
    for r, (_, image) in zip(answers, pictures):
        want = generate(model, processor, PROMPT, images=[image], max_tokens=N, feature_cache=False,
                        **options)
        assert r.choices[0].message.content == want.text
        assert "batch_size" not in r.timings


def test_a_failing_request_fails_alone_and_the_others_go_on(batched, tiny_loaded, monkeypatch):
    """Four requests decode together; one's sampler raises while mx.compile traces it (as
    mlx-lm's top-k once did). That request gets its 500; the others their solo answers, and
    sampling stays usable."""
    import functools

    import mlx.core as mx

    from fastvlm_mlx.generate import GenerationOptions

    model, processor = tiny_loaded
    engine = batched.engine

    @functools.partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
    def broken(logprobs):
        raise ValueError("a sampler that fails while it is traced")

    make_sampler = GenerationOptions.make_sampler
    monkeypatch.setattr(GenerationOptions, "make_sampler", lambda self: broken
                        if self.temperature == 0.5 else make_sampler(self))
    gate, held = threading.Event(), threading.Event()
    step = engine.batch.step

    def held_step():  # the four requests queue while the worker is held, then join at once
        if not gate.is_set():
            held.set()
            gate.wait(60)
        return step()

    engine.batch.step = held_step
    pictures = [picture(600 + i) for i in range(3)]
    try:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            first = pool.submit(batched.client().chat.completions.create, model="tiny",
                                messages=[user("hi")], max_tokens=N)
            assert held.wait(30)
            good = [pool.submit(ask, batched.client(), [user(PROMPT, u)], False) for u, _ in pictures]
            bad = pool.submit(batched.post, {"messages": [user("hi")], "max_tokens": N,
                                             "temperature": 0.5})
            deadline = time.time() + 30
            while engine.queued < 4:
                assert time.time() < deadline, "the requests never queued"
                time.sleep(0.01)
            gate.set()
            r = bad.result(60)
            results = [f.result(60) for f in good]
            first.result(60)
    finally:
        gate.set()
        del engine.batch.step
    assert r.status_code == 500 and "fails while it is traced" in r.json()["error"]["message"]
    for (choice, _, timings), (_, image) in zip(results, pictures):
        assert timings["batch_size"] >= 3
        alone = solo(model, processor, PROMPT, [image], max_tokens=N)
        assert_same_or_tie(served_result(choice, alone, processor.tokenizer), alone)
    monkeypatch.undo()
    sampled = batched.post({"messages": [user("hi")], "max_tokens": 3, "temperature": 1.0})
    assert sampled.status_code == 200, sampled.text
