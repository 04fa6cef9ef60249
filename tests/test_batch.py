"""batch.py: every batched answer equals the same request run alone through generate (greedy ids
the same up to float32 near-ties, which are shown to be ties), images never trade answers,
text-only and follow-up requests mixed in, seeded sampling reproducible batched or not, and
timings per request with the shared encode split between them."""

import mlx.core as mx
import numpy as np
import pytest

import fastvlm_mlx
from fastvlm_mlx import ChatSession, FeatureCache, RunningBatch, batch_generate
from fastvlm_mlx.generate import generate, stream_generate
from fastvlm_mlx.processing import InputError
from reference import CountingTower
from test_generate import write_png

PROMPT = "What is in this picture?"
N_TOKENS = 10
# Float32 rounding of logits of size ~10-30 through the tower and decoder, in another batch
# shape: ~1e-5 apart in absolute terms (tests/test_generate.py's TOL, with its reasoning).
TOL = 1e-4
# A batched and a solo run's logprobs differ by less than TOL, so their top-2 margins by less
# than 2 * TOL: only candidates closer than that can trade places (a float32 near-tie).
TIE = 2 * TOL


@pytest.fixture(scope="module")
def images(module_tmp):
    d = module_tmp("batch_images")
    sizes = [(300, 200), (180, 240), (256, 256), (320, 180), (200, 300), (240, 240)]
    return [write_png(d / f"{i}.png", 10 + i, size) for i, size in enumerate(sizes)]


def solo(model, processor, prompt, imgs, **options):
    """The request run alone: its result and the raw log-probability vector of every step."""
    responses = list(stream_generate(model, processor, prompt, imgs, feature_cache=False, **options))
    vectors = [np.array(r.logprobs) for r in responses]
    return fastvlm_mlx.generate.collect(iter(responses)), vectors


def assert_same_or_tie(batched, alone):
    """The batched answer has the solo run's ids, or leaves them only where the solo run's two
    best candidates are within TIE of each other (and then takes the second of them)."""
    result, vectors = alone
    a, b = result.token_ids, batched.token_ids
    if a == b:
        np.testing.assert_allclose(batched.logprobs, result.logprobs, atol=TOL, rtol=0)
        assert batched.finish_reason == result.finish_reason
        return
    k = next(i for i in range(min(len(a), len(b)) + 1) if i >= min(len(a), len(b)) or a[i] != b[i])
    lp = vectors[k]
    first, second = np.argsort(lp)[::-1][:2]
    margin = lp[first] - lp[second]
    assert margin < TIE and k < len(b) and b[k] == second, (
        f"step {k}: batched {b[k:k + 1]} vs solo {a[k:k + 1]}, solo top-2 margin {margin:.2e}: not a tie")


def test_the_tie_check_accepts_ties_and_nothing_else():
    from fastvlm_mlx.generate import GenerationResult
    from fastvlm_mlx.timing import Timings

    def result(ids):
        return GenerationResult("", ids, [0.0] * len(ids), "length", 1, 0, Timings())

    lp = np.log(np.full(5, 0.2))
    tie = lp.copy()
    tie[[1, 3]] += [1.0, 1.0 - TIE / 2]  # 1 is best, 3 a near-tie second
    clear = lp.copy()
    clear[[1, 3]] += [1.0, 0.5]
    alone = result([1, 1]), [tie, tie]
    assert_same_or_tie(result([1, 1]), alone)
    assert_same_or_tie(result([1, 3]), alone)  # the tie at step 1
    with pytest.raises(AssertionError, match="not a tie"):
        assert_same_or_tie(result([1, 4]), alone)  # not the second best
    with pytest.raises(AssertionError, match="not a tie"):
        assert_same_or_tie(result([1, 3]), (result([1, 1]), [clear, clear]))


def test_greedy_batched_equals_each_request_alone(tiny_loaded, images):
    """Six requests, different images and texts, one of them text-only and one with two images,
    different max_tokens, in rows of four: each equals its solo run."""
    model, processor = tiny_loaded
    requests = [
        (PROMPT, [images[0]], 10),
        (PROMPT, [images[1]], 6),
        ("Describe the image.", [images[2]], 12),
        ("Hello world, how are you today?", None, 8),
        (PROMPT, [images[3], images[4]], 10),
        ("A cat sits on a mat.", [images[5]], 3),
    ]
    batch = RunningBatch(model, processor, max_batch_size=4, feature_cache=False)
    handles = [batch.add(p, imgs, max_tokens=m) for p, imgs, m in requests]
    streams = {h: [] for h in handles}
    widest = 0
    while len(batch):
        responses = batch.step()
        widest = max(widest, len(responses))
        for h, r in responses.items():
            streams[h].append(r)
    assert widest == 4, "the rows were not decoded together"
    results = [fastvlm_mlx.generate.collect(iter(streams[h])) for h in handles]
    for (p, imgs, m), got in zip(requests, results):
        assert_same_or_tie(got, solo(model, processor, p, imgs, max_tokens=m))
        assert len(got.token_ids) + (got.finish_reason == "stop") <= m
    assert results[3].image_tokens == 0 and results[4].image_tokens == 32
    # The streamed text is the detokenized ids.
    for got in results:
        d = processor.tokenizer.detokenizer
        for t in got.token_ids:
            d.add_token(t)
        d.finalize()
        assert got.text == d.text


def test_batch_generate_same_text_different_images_never_trade_answers(tiny_loaded, images):
    model, processor = tiny_loaded
    got = batch_generate(model, processor, [PROMPT] * 4, [[im] for im in images[:4]],
                         max_tokens=N_TOKENS, feature_cache=False)
    alone = [solo(model, processor, PROMPT, [im], max_tokens=N_TOKENS) for im in images[:4]]
    for g, a in zip(got, alone):
        assert_same_or_tie(g, a)
    assert len({tuple(r.token_ids) for r, _ in alone}) > 1, "the images give one answer; the test is weak"
    assert isinstance(got[0], fastvlm_mlx.GenerationResult)


def test_batch_generate_text_only_and_one_image_per_prompt(tiny_loaded, images):
    model, processor = tiny_loaded
    prompts = ["Hello world", "The quick brown fox", PROMPT]
    got = batch_generate(model, processor, prompts, [None, [], images[0]], max_tokens=5)
    for p, imgs, g in zip(prompts, [None, None, [images[0]]], got):
        assert_same_or_tie(g, solo(model, processor, p, imgs, max_tokens=5))
    assert [g.image_tokens for g in got] == [0, 0, 16]
    assert got[0].timings.vision_ms == 0 and got[0].timings.batch_vision_ms is None


def test_more_requests_than_rows_wait_their_turn(tiny_loaded, images):
    """max_batch_size 2, five requests: each still equals its solo run, and those that waited
    for a free row say so in queue_ms."""
    model, processor = tiny_loaded
    got = batch_generate(model, processor, [PROMPT] * 5, [[im] for im in images[:5]],
                         max_tokens=4, max_batch_size=2, feature_cache=False)
    for g, im in zip(got, images[:5]):
        assert_same_or_tie(g, solo(model, processor, PROMPT, [im], max_tokens=4))
    queue = [g.timings.queue_ms for g in got]
    assert all(q >= 0 for q in queue) and max(queue[2:]) > max(queue[:2])


def test_one_vision_call_for_the_requests_admitted_together(tiny_loaded, images):
    """Requests admitted in one step share one vision-tower call (by resolution); the feature
    cache spares the images it holds; timings give each its share and the whole encode."""
    model, processor = tiny_loaded
    cache = FeatureCache(8)
    generate(model, processor, PROMPT, [images[0]], max_tokens=1, feature_cache=cache)
    with CountingTower(model) as tower:
        got = batch_generate(model, processor, [PROMPT] * 4 + ["Hello"], [[im] for im in images[:4]] + [None],
                             max_tokens=3, feature_cache=cache)
        assert tower.calls == 1, "one encode for the three missing images"
    t = [g.timings for g in got]
    assert t[0].feature_cache_hit and t[0].vision_ms == 0
    assert not any(x.feature_cache_hit for x in t[1:4])
    whole = t[1].batch_vision_ms
    assert whole > 0 and all(x.batch_vision_ms == whole for x in t[:4])
    assert abs(sum(x.vision_ms for x in t[:4]) - whole) < 1e-6
    assert abs(t[1].vision_ms - whole / 3) < 1e-6
    assert t[4].batch_vision_ms is None and t[4].vision_ms == 0
    for x in t:
        parts = x.preprocess_ms + x.vision_ms + x.connector_ms + x.prefill_ms + x.first_token_ms
        assert abs(x.ttft_ms - parts) < 1e-9 and x.prefill_ms > 0 and x.first_token_ms > 0
        assert x.peak_memory_gb > 0 and x.queue_ms >= 0 and x.load_ms > 0
        assert "batch_vision_ms" in x.to_dict() or x.batch_vision_ms is None
    assert all(g.timings is not h.timings for g, h in zip(got, got[1:]))


def test_two_resolutions_two_vision_calls(tiny_loaded, images, monkeypatch):
    import fastvlm_mlx.generate as generate_module

    # The resolution warning is said once per process: a set of our own, so that this test
    # sees it and the other tests' sets are left as they were.
    monkeypatch.setattr(generate_module, "_WARNED_RESOLUTIONS", set())
    model, processor = tiny_loaded
    batch = RunningBatch(model, processor, feature_cache=False)
    with CountingTower(model) as tower, pytest.warns(UserWarning, match="resolution 192"):
        a = batch.add(PROMPT, [images[0]], max_tokens=2)
        b = batch.add(PROMPT, [images[1]], max_tokens=2, resolution=192)
        c = batch.add(PROMPT, [images[2]], max_tokens=2)
        done = {}
        while len(batch):
            for h, r in batch.step().items():
                done.setdefault(h, []).append(r)
        assert tower.calls == 2
    assert done[b][-1].image_tokens == 9 and done[a][-1].image_tokens == done[c][-1].image_tokens == 16
    got = fastvlm_mlx.generate.collect(iter(done[b]))
    assert_same_or_tie(got, solo(model, processor, PROMPT, [images[1]], max_tokens=2, resolution=192))


def test_seeded_sampling_is_reproducible_batched_or_not(tiny_loaded, images):
    """A seeded row draws from its own key: it equals generate(seed=...) run alone, whatever
    else is in the batch (other seeds, unseeded sampling, greedy rows)."""
    model, processor = tiny_loaded
    sampling = dict(temperature=1.5, top_k=50, max_tokens=N_TOKENS)
    alone = {s: generate(model, processor, PROMPT, [images[s]], seed=s, feature_cache=False, **sampling)
             for s in (0, 1, 2)}
    assert len({tuple(r.token_ids) for r in alone.values()}) > 1

    def batched(with_others):
        batch = RunningBatch(model, processor, feature_cache=False)
        handles = {}
        if with_others:
            batch.add(PROMPT, [images[3]], temperature=1.5, max_tokens=N_TOKENS)  # unseeded
            batch.add(PROMPT, [images[4]], max_tokens=N_TOKENS)  # greedy
        for s in (2, 0, 1):
            handles[batch.add(PROMPT, [images[s]], seed=s, **sampling)] = s
        streams = {}
        while len(batch):
            for h, r in batch.step().items():
                streams.setdefault(h, []).append(r)
        return {s: fastvlm_mlx.generate.collect(iter(streams[h])) for h, s in handles.items()}

    for run in (batched(False), batched(True)):
        for s, r in run.items():
            assert r.token_ids == alone[s].token_ids, f"seed {s}"
            np.testing.assert_allclose(r.logprobs, alone[s].logprobs, atol=TOL, rtol=0)
    # batch_generate: one seed for every prompt, each row as generate with that seed
    got = batch_generate(model, processor, [PROMPT] * 2, [[images[0]], [images[1]]], seed=7,
                         feature_cache=False, **sampling)
    for g, im in zip(got, images[:2]):
        assert g.token_ids == generate(model, processor, PROMPT, [im], seed=7, feature_cache=False,
                                       **sampling).token_ids


def test_logprobs_raw_and_penalties_per_row(tiny_loaded, images):
    """A repetition penalty on one row only: that row equals its solo run (ids and raw
    logprobs), the other rows are unpenalized."""
    model, processor = tiny_loaded
    penalty = dict(repetition_penalty=3.0, repetition_context_size=64)
    batch = RunningBatch(model, processor, feature_cache=False)
    h_pen = batch.add(PROMPT, [images[0]], max_tokens=16, **penalty)
    h_plain = batch.add(PROMPT, [images[0]], max_tokens=16)
    streams = {h_pen: [], h_plain: []}
    while len(batch):
        for h, r in batch.step().items():
            streams[h].append(r)
    pen = fastvlm_mlx.generate.collect(iter(streams[h_pen]))
    plain = fastvlm_mlx.generate.collect(iter(streams[h_plain]))
    assert_same_or_tie(pen, solo(model, processor, PROMPT, [images[0]], max_tokens=16, **penalty))
    assert_same_or_tie(plain, solo(model, processor, PROMPT, [images[0]], max_tokens=16))
    assert pen.token_ids != plain.token_ids, "the penalty changed nothing; the test would be weak"


def test_follow_up_turns_in_a_batch_equal_the_chat_session(tiny_loaded, images):
    """A conversation's second turn, batched beside first turns of other requests, equals
    ChatSession's second turn; the cache and history then hold the whole turn."""
    from mlx_lm.models.cache import make_prompt_cache

    model, processor = tiny_loaded
    chat = ChatSession(model, processor, [images[0]], max_tokens=6, feature_cache=False)
    chat.generate(PROMPT)
    history = list(chat.token_ids)
    cache = make_prompt_cache(model.language_model)
    # The first turn again, batched, into our own cache and history.
    batch = RunningBatch(model, processor, feature_cache=False)
    mine = []
    h = batch.add(PROMPT, [images[0]], prompt_cache=cache, history=mine, max_tokens=6)
    batch.add("Describe the image.", [images[1]], max_tokens=6)
    while len(batch):
        batch.step()
    assert mine == history and cache[0].offset == len(history)
    expected = chat.generate("And what colour is it?")
    batch.add("Hello world", None, max_tokens=5)
    h = batch.add("And what colour is it?", [images[0]], prompt_cache=cache, history=mine, max_tokens=6)
    out = []
    while len(batch):
        r = batch.step().get(h)
        if r is not None:
            out.append(r)
    got = fastvlm_mlx.generate.collect(iter(out))
    assert got.token_ids == expected.token_ids and got.image_tokens == 0
    assert got.timings.feature_cache_hit and got.timings.vision_ms == 0
    assert mine == chat.token_ids and cache[0].offset == len(mine)


def test_remove_leaves_the_others_going(tiny_loaded, images):
    model, processor = tiny_loaded
    batch = RunningBatch(model, processor, feature_cache=False)
    keep = batch.add(PROMPT, [images[0]], max_tokens=8)
    gone = batch.add(PROMPT, [images[1]], max_tokens=8)
    waiting = batch.add(PROMPT, [images[2]], max_tokens=8)
    out = []
    steps = 0
    while len(batch):
        responses = batch.step()
        steps += 1
        if steps == 1:
            batch.remove(waiting)  # admitted already: leaves from the decoding rows
        if steps == 3:
            batch.remove(gone)
        assert steps <= 3 or gone not in responses
        if keep in responses:
            out.append(responses[keep])
    assert_same_or_tie(fastvlm_mlx.generate.collect(iter(out)),
                       solo(model, processor, PROMPT, [images[0]], max_tokens=8))


def test_a_failing_request_leaves_the_batch_alone(tiny_loaded, images):
    """A row whose logits processor raises while the step is built is answered by its error at
    that step and leaves; the other rows' answers are their solo runs."""
    model, processor = tiny_loaded

    def broken(tokens, logits):
        raise ValueError("a processor that fails")

    batch = RunningBatch(model, processor, feature_cache=False)
    keep = [batch.add(PROMPT, [im], max_tokens=8) for im in images[:2]]
    bad = batch.add(PROMPT, [images[2]], max_tokens=8, logits_processors=[broken])
    out = {h: [] for h in keep}
    failures = []
    while len(batch):
        for handle, r in batch.step().items():
            if isinstance(r, Exception):
                failures.append((handle, r))
            else:
                out[handle].append(r)
    assert [(h, str(e)) for h, e in failures] == [(bad, "a processor that fails")]
    for handle, im in zip(keep, images[:2]):
        assert_same_or_tie(fastvlm_mlx.generate.collect(iter(out[handle])),
                           solo(model, processor, PROMPT, [im], max_tokens=8))


def test_a_rotating_kv_cache_within_its_window_equals_the_solo_run(tiny_loaded, images):
    """max_kv_size for the whole batch; the prompts (45 positions) and answers fit in it. (Past
    the window mlx-lm's batch cache keeps no first tokens, its solo one 4: they part there.)"""
    model, processor = tiny_loaded
    got = batch_generate(model, processor, [PROMPT] * 2, [[images[0]], [images[1]]], max_tokens=12,
                         max_kv_size=64, feature_cache=False)
    for g, im in zip(got, images[:2]):
        assert g.prompt_tokens + 12 <= 64
        assert_same_or_tie(g, solo(model, processor, PROMPT, [im], max_tokens=12, max_kv_size=64))
    with pytest.raises(InputError, match="max_kv_size"):
        RunningBatch(model, processor, max_kv_size=64).add(PROMPT, [images[0]], max_kv_size=128)


def test_as_completed_yields_each_result_and_hands_refusals_over(tiny_loaded, images):
    from fastvlm_mlx.batch import as_completed

    model, processor = tiny_loaded
    too_long = "The quick brown fox jumps over the lazy dog. " * 500
    requests = [("a", (PROMPT, [images[0]]), dict(max_tokens=3)),
                ("long", (too_long, [images[1]]), dict(max_tokens=3)),
                ("b", ("Hello world", None), dict(max_tokens=5))]
    refused = []
    batch = RunningBatch(model, processor, max_batch_size=1, feature_cache=False)
    done = dict(as_completed(batch, requests, refused=lambda key, e: refused.append((key, str(e)))))
    assert sorted(done) == ["a", "b"] and [k for k, _ in refused] == ["long"] and "context" in refused[0][1]
    assert_same_or_tie(done["b"], solo(model, processor, "Hello world", None, max_tokens=5))
    with pytest.raises(InputError, match="context"):
        list(as_completed(RunningBatch(model, processor), requests))


def test_bad_requests_are_refused_at_add(tiny_loaded, images, tmp_path):
    model, processor = tiny_loaded
    batch = RunningBatch(model, processor)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.png"):
        batch.add(PROMPT, [bad])
    with pytest.raises(InputError, match="kv_bits"):
        batch.add(PROMPT, [images[0]], kv_bits=4)
    with pytest.raises(InputError, match="custom sampler"):
        batch.add(PROMPT, [images[0]], seed=1, sampler=lambda x: mx.argmax(x, axis=-1))
    with pytest.raises(InputError, match="context"):
        batch.add("The quick brown fox jumps over the lazy dog. " * 500, [images[0]])
    with pytest.raises(InputError, match="image lists"):
        batch_generate(model, processor, [PROMPT, PROMPT], [[images[0]]])
    assert len(batch) == 0
