"""generate: the CLI (subprocess) and the Python API on the tiny converted model, against the
transformers reference; the chat KV reuse, the feature cache, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from fastvlm_mlx import ChatSession, FeatureCache
from fastvlm_mlx.generate import generate, stream_generate
from fastvlm_mlx.processing import DEFAULT_SYSTEM, InputError, format_prompt, preprocess_image
import reference as ref
from reference import CountingTower, closed_port

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is in this picture?"
N_TOKENS = 12
# Logprobs are differences of float32 logits of size ~10-30 (the test model's lm_head is sharp):
# float32 rounding through the tower and decoder (~1e-6 relative, whatever the BLAS or batch
# shape) leaves them ~1e-5 apart in absolute terms; 1e-4 bounds that with room.
TOL = 1e-4


def write_png(path, seed, size=(300, 200)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(module_tmp):
    d = module_tmp("images")
    return write_png(d / "a.png", 1), write_png(d / "b.png", 2, size=(180, 240))


def run_cli(*args, stdin=None, env=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "fastvlm_mlx.generate", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, input=stdin, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def reference(tiny_source, tiny_loaded, images):
    """transformers' greedy tokens and raw log-probs for PROMPT about images[0]."""
    model, _, ids = tiny_source
    _, processor = tiny_loaded
    prompt_ids = processor.encode(format_prompt(PROMPT, 1, DEFAULT_SYSTEM))
    pixels = preprocess_image(images[0], 256).transpose(2, 0, 1)[None]
    tokens, logprobs = ref.greedy(model, prompt_ids, pixels, N_TOKENS)
    # Our run stops at the first EOS (which is not one of its tokens).
    eos = set(processor.eos_token_ids)
    stop = next((i for i, t in enumerate(tokens) if t in eos), None)
    if stop is not None:
        tokens, logprobs = tokens[:stop], logprobs[:stop]
    assert len(set(tokens)) > 3, "the reference repeats itself; the comparison would be weak"
    return {"prompt_ids": prompt_ids, "tokens": tokens, "logprobs": logprobs, "stopped": stop is not None}


# ------------------------------------------------------------------------------------------------
# The CLI, end to end


def test_cli_json_greedy_matches_transformers(tiny_converted, images, reference):
    p = run_cli("--model", tiny_converted, "--image", images[0], "--prompt", PROMPT,
                "--max-tokens", N_TOKENS, "--json")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1 and p.stdout.endswith("}\n"), "exactly one JSON object"
    out = json.loads(p.stdout)
    for key in ("text", "token_ids", "logprobs", "finish_reason", "prompt_tokens", "image_tokens",
                "timings", "peak_memory_gb", "feature_cache_hit"):
        assert key in out, key
    for key in ("load_ms", "preprocess_ms", "vision_ms", "connector_ms", "prefill_ms",
                "first_token_ms", "ttft_ms", "decode_tps"):
        assert isinstance(out["timings"][key], (int, float)), key
    t = out["timings"]
    parts = t["preprocess_ms"] + t["vision_ms"] + t["connector_ms"] + t["prefill_ms"] + t["first_token_ms"]
    assert abs(t["ttft_ms"] - parts) < 0.01
    assert t["vision_ms"] > 0 and t["prefill_ms"] > 0 and t["first_token_ms"] > 0
    assert out["feature_cache_hit"] is False

    assert out["token_ids"] == reference["tokens"]
    assert len(out["token_ids"]) == len(out["logprobs"])
    np.testing.assert_allclose(out["logprobs"], reference["logprobs"], atol=TOL, rtol=0)
    assert out["finish_reason"] == ("stop" if reference["stopped"] else "length")
    assert out["prompt_tokens"] == len(reference["prompt_ids"])
    assert out["image_tokens"] == 16


def test_cli_streams_text_and_prints_stats(tiny_converted, images):
    p = run_cli("--model", tiny_converted, "--image", images[0], "--max-tokens", 6)
    assert p.returncode == 0, p.stderr
    for needle in ("TTFT", "preprocess", "vision", "connector", "prefill", "first token",
                   "Prompt:", "image", "tokens/s", "Peak memory"):
        assert needle in p.stderr, needle
    assert "TTFT" not in p.stdout
    q = run_cli("--model", tiny_converted, "--image", images[0], "--max-tokens", 6, "--quiet")
    assert q.returncode == 0 and "TTFT" not in q.stderr
    assert q.stdout == p.stdout  # greedy: the same text, streamed to stdout


def test_cli_chat_prints_a_ttft_per_turn_and_exits_on_eof(tiny_converted, images):
    p = subprocess.run(
        [str(Path(sys.executable).with_name("fastvlm-chat")), "--model", str(tiny_converted),
         "--image", str(images[0]), "--max-tokens", "4", "--prompt", PROMPT],
        cwd=ROOT, capture_output=True, text=True, input="And the colours?\n", timeout=180,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("[TTFT") == 2
    assert "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def bad_images(module_tmp, images):
    d = module_tmp("bad")
    data = images[0].read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "corrupt.jpg").write_bytes(b"this is not an image" * 10)
    (d / "notamodel").mkdir()
    (d / "notamodel" / "readme.txt").write_text("hello")
    return d


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing", "not found"),
        ("corrupt", "corrupt.jpg"),
        ("truncated", "truncated"),
        ("empty", "empty"),
        ("pixel-cap", "pixel"),
        ("pixel-cap-env", "pixel"),
        ("url", "127.0.0.1"),
        ("too-long", "context"),
        ("not-a-model", "notamodel"),
        ("bad-resolution", "resolution"),
        ("feature-cache-env", "FASTVLM_FEATURE_CACHE_SIZE='abc'"),
    ],
)
def test_cli_bad_input_is_one_line(case, needle, tiny_converted, images, bad_images):
    model, image, extra, env = tiny_converted, images[0], [], None
    if case == "missing":
        image = bad_images / "nope.png"
    elif case in ("corrupt", "truncated", "empty"):
        image = next(bad_images.glob(f"{case}.*"))
    elif case == "pixel-cap":
        extra = ["--max-pixels", 1000]
    elif case == "pixel-cap-env":
        env = {"FASTVLM_MAX_PIXELS": "1000"}
    elif case == "feature-cache-env":
        env = {"FASTVLM_FEATURE_CACHE_SIZE": "abc"}
    elif case == "url":
        image = f"http://127.0.0.1:{closed_port()}/x.png"
    elif case == "too-long":
        extra = ["--prompt", "The quick brown fox jumps over the lazy dog. " * 500]
    elif case == "not-a-model":
        model = bad_images / "notamodel"
    elif case == "bad-resolution":
        extra = ["--resolution", 300]
    p = run_cli("--model", model, "--image", image, "--max-tokens", 2, *extra, env=env)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("flags,needle", [
    (["--top-p", 5], "top_p"),
    (["--top-p", 0], "top_p"),
    (["--min-p", 2], "min_p"),
    (["--temp", "nan"], "temperature"),
    (["--temp", "-1"], "temperature"),
    (["--top-k", 100000], "top_k"),  # over the vocabulary (the model's, once loaded)
    (["--top-k", -1], "top_k"),
    (["--repetition-penalty", 0], "repetition_penalty"),
    (["--repetition-context-size", -1, "--repetition-penalty", 1.1], "repetition_context_size"),
    (["--seed", -1], "seed"),
    (["--max-kv-size", 0], "max_kv_size"),
    (["--prefill-step-size", 0], "prefill_step_size"),
    (["--kv-bits", 4, "--kv-group-size", 0, "--quantized-kv-start", 0], "kv_group_size"),  # SIGFPE
    (["--kv-bits", 7], "kv_bits"),
    (["--resolution", 640000], "context"),  # 1e8 image slots, built even for a text-only prompt
    (["--resolution", 1000000000], "context"),  # 2.4e14 of them
])
def test_cli_refuses_what_the_server_refuses_in_one_line(flags, needle, tiny_converted):
    p = run_cli("--model", tiny_converted, "--prompt", "Hello", "--max-tokens", 2, *flags, timeout=120)
    needle = needle if needle == "context" else f"{needle} must be"
    assert p.returncode == 1, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert p.stdout == ""


def test_cli_says_what_an_image_path_is(tiny_converted, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    for image, needle in [(fifo, "named pipe"), ("/dev/zero", "a device"), (tmp_path, "a directory"),
                          (loop, "symlink loop")]:
        p = run_cli("--model", tiny_converted, "--image", image, "--max-tokens", 2, timeout=60)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and needle in lines[0], (image, p.stderr)


def run_shell(command, timeout=120):
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, timeout=timeout)


def test_cli_with_closed_standard_streams_and_a_prompt_that_is_not_utf_8(tiny_converted):
    cli = f"exec {sys.executable} -m fastvlm_mlx.generate --model {tiny_converted} --max-tokens 2 --quiet"
    # No stdin (0<&-): nothing reads it, and the model file is not mistaken for it.
    p = run_shell(f"{cli} --prompt Hello 0<&-")
    assert p.returncode == 0 and p.stdout.strip(), p.stderr
    # No stdout (>&-): the answer has nowhere to go, and the error says so.
    p = run_shell(f"{cli} --prompt Hello >&-")
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "standard output is closed" in lines[0], p.stderr
    # A prompt in Latin-1, not UTF-8.
    p = run_shell(f"{cli} --prompt $'caf\\xe9'")
    lines = p.stderr.decode().strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "not valid UTF-8" in lines[0], p.stderr


@pytest.mark.parametrize("option,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")), ("min_p", -0.1), ("min_p", 1.1),
    ("top_k", -1), ("top_k", 2.5), ("top_k", 10**6), ("repetition_penalty", 0.0),
    ("repetition_penalty", float("inf")), ("repetition_context_size", 0), ("seed", -1),
    ("seed", 2**64), ("seed", 1.5), ("max_tokens", 0), ("max_kv_size", 0), ("prefill_step_size", 0),
    ("kv_bits", 7), ("kv_bits", 0), ("kv_group_size", 0), ("kv_group_size", 16),
    ("quantized_kv_start", -1),
])
def test_every_option_is_checked_in_one_place(option, value, tiny_loaded):
    from fastvlm_mlx.generate import GenerationOptions, OptionError

    model, processor = tiny_loaded
    with pytest.raises(OptionError, match=f"^{option} must be") as e:
        GenerationOptions.from_kwargs({option: value}, vocab_size=model.vocab_size)
    assert e.value.option == option
    with pytest.raises(OptionError):  # the API refuses it the same way, before any work
        generate(model, processor, "Hello", **{"max_tokens": 2, option: value})


def test_kv_groups_must_divide_the_attention_heads(tiny_loaded, tiny_converted):
    """MLX quantizes a head's keys in groups of kv_group_size: a group wider than the head
    would fail every request once the cache reaches quantized_kv_start. It is refused at once,
    by the API, the chat session and the CLI, before the model runs."""
    from fastvlm_mlx.generate import GenerationOptions, OptionError

    model, processor = tiny_loaded
    assert model.head_dim == 16  # the tiny decoder's; every KV group size (32, 64, 128) is wider
    with pytest.raises(OptionError, match="^kv_group_size must be a divisor of the model's attention head width, 16"):
        GenerationOptions.for_model(model, {"kv_bits": 4, "kv_group_size": 32})
    GenerationOptions.for_model(model, {"kv_group_size": 32})  # without kv_bits it is unused
    with pytest.raises(OptionError, match="kv_group_size"):
        generate(model, processor, "Hello", max_tokens=2, kv_bits=4, quantized_kv_start=0)
    with pytest.raises(OptionError, match="kv_group_size"):
        ChatSession(model, processor, kv_bits=8)
    p = subprocess.run([sys.executable, "-m", "fastvlm_mlx.generate", "--model", str(tiny_converted),
                        "--prompt", "Hello", "--max-tokens", "2", "--kv-bits", "4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "kv_group_size" in p.stderr, p.stderr


def test_a_resolution_beyond_the_context_is_refused_before_anything_is_built(tiny_loaded):
    model, processor = tiny_loaded
    for size in (640000, 10**9):
        with pytest.raises(InputError, match=f"resolution {size} needs .* image tokens"):
            generate(model, processor, "Hello", max_tokens=2, resolution=size)
        with pytest.raises(InputError, match="context"):
            ChatSession(model, processor, resolution=size)


def test_cli_usage_error_exits_2():
    p = run_cli("--max-tokens", "many")
    assert p.returncode == 2 and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------------
# The API


def same(a, b):
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL, rtol=0)


def test_api_matches_cli_reference_and_never_prints(tiny_loaded, images, reference, capsys):
    model, processor = tiny_loaded
    r = generate(model, processor, PROMPT, images=[str(images[0])], max_tokens=N_TOKENS,
                 feature_cache=False)
    assert r.token_ids == reference["tokens"]
    np.testing.assert_allclose(r.logprobs, reference["logprobs"], atol=TOL, rtol=0)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_stream_yields_text_tokens_and_timings(tiny_loaded, images):
    model, processor = tiny_loaded
    responses = list(stream_generate(model, processor, PROMPT, images=images[0], max_tokens=5,
                                     feature_cache=False))
    assert responses[-1].finish_reason in ("stop", "length")
    assert all(r.finish_reason is None for r in responses[:-1])
    assert all(r.timings.ttft_ms > 0 for r in responses)
    assert all(isinstance(r.logprob, float) and r.logprob <= 0 for r in responses)
    text = "".join(r.text for r in responses)
    ids = [r.token for r in responses if r.finish_reason != "stop"]
    # (The tiny model's vocabulary is larger than its tokenizer's, so compare with mlx-lm's own
    # detokenizer fed all ids at once, rather than with tokenizer.decode.)
    whole = processor.tokenizer.detokenizer
    for t in ids:
        whole.add_token(t)
    whole.finalize()
    assert text == whole.text and len(ids) >= 1


@pytest.mark.parametrize("first_turn_tokens", [6, 1])
def test_chat_follow_up_reuses_the_kv_cache(tiny_loaded, images, first_turn_tokens):
    """With one token in the first turn, that token never reaches mlx-lm's generate_step (the
    first token is sampled before it), so it must still be fed into the KV cache."""
    model, processor = tiny_loaded
    with CountingTower(model) as tower:
        chat = ChatSession(model, processor, [images[0]], max_tokens=6, feature_cache=False)
        r1 = chat.generate(PROMPT, max_tokens=first_turn_tokens)
        assert len(r1.token_ids) + (r1.finish_reason == "stop") == first_turn_tokens
        assert tower.calls == 1
        r2 = chat.generate("And what colour is it?")
        assert tower.calls == 1, "the follow-up ran the vision encoder"
        assert r2.timings.vision_ms == 0 and r2.image_tokens == 0
        # A fresh single-turn run on the whole conversation up to the second answer.
        fed2 = len(r2.token_ids) + (r2.finish_reason == "stop")
        conversation = chat.token_ids[: len(chat.token_ids) - fed2]
        assert len(conversation) > len(r1.token_ids) + len(chat.prompt_ids)
        fresh = generate(model, processor, conversation, images=[images[0]], max_tokens=6,
                         feature_cache=False)
        assert tower.calls == 2
    same(r2, fresh)
    assert r2.prompt_tokens == len(conversation) - len(chat.prompt_ids) - len(r1.token_ids) - (
        r1.finish_reason == "stop"
    )


def test_feature_cache_one_encode_per_image(tiny_loaded, images):
    model, processor = tiny_loaded
    cache = FeatureCache(4)
    with CountingTower(model) as tower:
        a1 = generate(model, processor, PROMPT, images=[images[0]], max_tokens=4, feature_cache=cache)
        assert tower.calls == 1 and not a1.feature_cache_hit
        # Same content, another input type (a numpy array): a hit, no encode.
        arr = np.asarray(Image.open(images[0]).convert("RGB"))
        a2 = generate(model, processor, "Describe the image.", images=[arr], max_tokens=4,
                      feature_cache=cache)
        assert tower.calls == 1
        assert a2.feature_cache_hit and a2.timings.vision_ms == 0
        fresh = generate(model, processor, "Describe the image.", images=[images[0]], max_tokens=4,
                         feature_cache=False)
        same(a2, fresh)

        # The same text with another image is another image's answer, not the cached one.
        b = generate(model, processor, PROMPT, images=[images[1]], max_tokens=4, feature_cache=cache)
        assert not b.feature_cache_hit and tower.calls == 3
        b_fresh = generate(model, processor, PROMPT, images=[images[1]], max_tokens=4,
                           feature_cache=False)
        a_fresh = generate(model, processor, PROMPT, images=[images[0]], max_tokens=4,
                           feature_cache=False)
    same(b, b_fresh)
    same(a1, a_fresh)
    assert not np.allclose(a1.logprobs[:1], b.logprobs[:1], atol=1e-3) or a1.token_ids != b.token_ids


def test_feature_cache_is_bounded(tiny_loaded, images):
    model, processor = tiny_loaded
    cache = FeatureCache(1)
    for im in images:
        generate(model, processor, PROMPT, images=[im], max_tokens=1, feature_cache=cache)
    assert len(cache) == 1
    with CountingTower(model) as tower:
        generate(model, processor, PROMPT, images=[images[0]], max_tokens=1, feature_cache=cache)
        assert tower.calls == 1  # evicted


def test_logprobs_are_raw_under_repetition_penalty(tiny_loaded, images):
    model, processor = tiny_loaded
    # 16 tokens: the greedy answer starts repeating itself after 13, which the penalty stops.
    r = generate(model, processor, PROMPT, images=[images[0]], max_tokens=16, repetition_penalty=3.0,
                 repetition_context_size=64, feature_cache=False)
    plain = generate(model, processor, PROMPT, images=[images[0]], max_tokens=16, feature_cache=False)
    # Recompute the raw log-softmax at each chosen token with one forward pass.
    ids = processor.encode(format_prompt(PROMPT, 1, DEFAULT_SYSTEM)) + r.token_ids
    pixels = processor.pixels([images[0]])
    logits = model(mx.array([ids]), pixels)[0].astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    start = len(ids) - len(r.token_ids) - 1
    expected = [lp[start + i, t].item() for i, t in enumerate(r.token_ids)]
    np.testing.assert_allclose(r.logprobs, expected, atol=TOL, rtol=0)
    assert r.token_ids != plain.token_ids, "the penalty changed nothing; the test would be weak"


def test_tokens_equal_mlx_lm_generate_step_on_the_whole_prompt(tiny_loaded, images):
    """Our first token is sampled outside generate_step and decoding continues inside it; the
    tokens and processors' view of the history must equal one generate_step over the prompt."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    model, processor = tiny_loaded
    kwargs = dict(repetition_penalty=3.0, repetition_context_size=64)
    seen = {"ours": [], "mlx-lm": []}

    def spy(name):
        def processor_(tokens, logits):
            seen[name].append(tokens.tolist())
            return logits
        return processor_

    ours = generate(model, processor, PROMPT, images=[images[0]], max_tokens=8,
                    feature_cache=False, logits_processors=[spy("ours")], **kwargs)
    ids = processor.encode(format_prompt(PROMPT, 1, DEFAULT_SYSTEM))
    features = model.project(model.encode_images(processor.pixels([images[0]])))
    embeddings = model.embed(mx.array([ids]), features)[0]
    placeholder = mx.array(ids, dtype=mx.uint32)  # the image slots' id is in this vocabulary
    expected = []
    for token, _ in generate_step(placeholder, model.language_model, max_tokens=8,
                                  input_embeddings=embeddings,
                                  logits_processors=make_logits_processors(**kwargs)
                                  + [spy("mlx-lm")]):
        if token in processor.eos_token_ids:
            break
        expected.append(int(token))
    assert ours.token_ids == expected
    # Every step's processors saw the same history: the whole prompt, then the answer so far.
    n = len(seen["ours"])
    assert n >= len(expected) and seen["ours"] == seen["mlx-lm"][:n]


def test_resolution_override_warns_and_changes_image_tokens(tiny_loaded, images):
    model, processor = tiny_loaded
    with pytest.warns(UserWarning, match="resolution 192"):
        r = generate(model, processor, PROMPT, images=[images[0]], max_tokens=2, resolution=192,
                     feature_cache=False)
    assert r.image_tokens == 9 and r.resolution == 192
    assert r.prompt_tokens == len(processor.encode(format_prompt(PROMPT, 1, DEFAULT_SYSTEM), 192))


def test_text_only_and_two_images(tiny_loaded, images):
    model, processor = tiny_loaded
    r = generate(model, processor, "Hello world", max_tokens=3)
    assert r.image_tokens == 0 and r.timings.vision_ms == 0 and len(r.token_ids) <= 3
    r2 = generate(model, processor, PROMPT, images=list(images), max_tokens=3, feature_cache=False)
    assert r2.image_tokens == 32


def test_sampling_defaults_come_from_generation_config(tiny_loaded, tmp_path):
    """Greedy unless generation_config.json says do_sample; the caller's options always win."""
    import dataclasses

    from fastvlm_mlx.processing import generation_defaults

    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 100.0, "top_k": 50}))
    assert generation_defaults(tmp_path) == {"temperature": 100.0, "top_k": 50}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7}))
    assert generation_defaults(tmp_path) == {}  # transformers' default do_sample is False

    model, processor = tiny_loaded
    sampling = dataclasses.replace(processor, generation_defaults={"temperature": 100.0, "top_k": 50})
    assert ChatSession(model, sampling).options.temperature == 100.0
    assert ChatSession(model, sampling, temp=0.0).options.temperature == 0.0
    assert ChatSession(model, sampling, temperature=None).options.temperature == 100.0
    greedy = generate(model, processor, "Hello world", max_tokens=6)
    assert generate(model, sampling, "Hello world", max_tokens=6, temperature=0).token_ids == greedy.token_ids
    sampled = {tuple(generate(model, sampling, "Hello world", max_tokens=6, seed=s).token_ids) for s in range(3)}
    assert len(sampled) > 1, "the model's sampling defaults were ignored"
