"""The padded vocabulary: Qwen2 checkpoints hold more embedding and lm_head rows than the
tokenizer has tokens. As Apple's loader (which resizes both to len(tokenizer)), padded ids are
never produced and hold no softmax mass."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import fastvlm_mlx
import reference as ref
from fastvlm_mlx.convert import convert
from fastvlm_mlx.generate import generate
from fastvlm_mlx.processing import DEFAULT_SYSTEM, format_prompt

PROMPT = "Describe the image."
N_TOKENS = 8
# Logprobs are differences of float32 logits of size ~10-30 (a sharp random lm_head): float32
# rounding through the tower and decoder leaves them ~1e-5 apart; 1e-4 is the suite's bound.
TOL = 1e-4


@pytest.fixture(scope="module")
def padded_heavy(module_tmp):
    """A checkpoint whose padded lm_head rows are 10x the real ones, so that without the rule
    every greedy step would pick a padded id; converted to float32 and loaded."""
    src = module_tmp("padded")
    ids = ref.write_tokenizer(src)
    model = ref.transformers_vlm(image_token_id=ids[ref.IMAGE], seed=11)
    n_real = ref.tokenizer_length(src)
    with torch.no_grad():
        model.lm_head.weight[n_real:] *= 10.0
    model.save_pretrained(str(src))
    ref.save_json(src / "preprocessor_config.json", {"crop_size": {"height": 256, "width": 256}})
    loaded = fastvlm_mlx.load(convert(src, src / "mlx", dtype="float32"))
    return model, loaded, src, ids, n_real


def test_padded_ids_are_never_produced(padded_heavy):
    padded_model, (model, processor), src, ids, n_real = padded_heavy
    assert model.language_model.args.vocab_size == 512 and n_real < 400
    image = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    prompt_ids = processor.encode(format_prompt(PROMPT, 1, DEFAULT_SYSTEM))
    pixels = torch.from_numpy((image.astype(np.float32) / 255).transpose(2, 0, 1)[None])

    with torch.no_grad():
        padded_logits = padded_model(input_ids=torch.tensor([prompt_ids]), pixel_values=pixels).logits
    assert int(padded_logits[0, -1].argmax()) >= n_real, "the padded rows would not win: weak test"

    oracle = ref.apple_vocabulary(padded_model, src)
    tokens, logprobs = ref.greedy(oracle, prompt_ids, pixels.numpy(), N_TOKENS)

    r = generate(model, processor, PROMPT, images=[image], max_tokens=N_TOKENS, feature_cache=False)
    stop = len(r.token_ids)
    assert all(t < n_real for t in r.token_ids)
    assert r.token_ids == tokens[:stop]
    # The log-softmax is over the real vocabulary: with the padded rows' mass, every logprob
    # here would be ~-100 instead.
    np.testing.assert_allclose(r.logprobs, logprobs[:stop], atol=TOL, rtol=0)


def test_logits_stop_at_the_tokenizer(padded_heavy):
    _, (model, processor), _, _, n_real = padded_heavy
    ids = processor.encode(format_prompt("Hello world", 0, DEFAULT_SYSTEM))
    assert model(mx.array([ids])).shape == (1, len(ids), n_real)
    assert model.vocab_size == n_real
