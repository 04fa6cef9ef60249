"""The whole model (FastViTHD + connector + mlx-lm Qwen2) against transformers' FastVLM."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.generate import generate_step

import reference as ref
from conftest import reference_logits
from fastvlm_mlx import weights as W
from fastvlm_mlx.config import ModelConfig
from fastvlm_mlx.model import Model

# ||ours - ref|| / ||ref|| of float32 logits: two implementations in different summation orders,
# float32 rounding (2^-24) through ~10 layers of the tiny tower and decoder is ~1e-6; 1e-4 leaves
# room for BLAS and shapes, and a mis-mapped tensor moves it by order 1.
TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    model = ref.transformers_vlm(image_token_id=5, seed=7)
    cfg = ModelConfig(
        text_config=ref.text_config(), vision_config=ref.vision_config(), image_token_id=5,
        image_size=256,
    )
    ours = W.load_into(Model(cfg), W.sanitize(W.from_torch(model.state_dict())))
    return model, ours


def prompt_ids(n_images, tokens_per_image=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = list(rng.integers(10, 500, 4))
    for _ in range(n_images):
        ids += [5] * tokens_per_image + list(rng.integers(10, 500, 3))
    return [int(i) for i in ids]


def nhwc(x):
    return mx.array(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("n_images", [1, 2])
def test_logits_match_transformers(pair, n_images):
    model, ours = pair
    x = ref.pixels(n_images, 256, seed=n_images)
    ids = [prompt_ids(n_images)]
    expected = reference_logits(model, ids, x)
    got = np.array(ours(mx.array(ids), nhwc(x)))
    err = ref.rel_err(got, expected)
    print(f"logits, {n_images} image(s): rel err {err:.2e}")
    assert got.shape == expected.shape
    assert err <= TOL


def test_batch_of_prompts_each_with_an_image(pair):
    model, ours = pair
    x = ref.pixels(2, 256, seed=11)
    ids = [prompt_ids(1, seed=1), prompt_ids(1, seed=2)]
    expected = reference_logits(model, ids, x)
    got = np.array(ours(mx.array(ids), nhwc(x)))
    assert ref.rel_err(got, expected) <= TOL


def test_text_only_prompt(pair):
    model, ours = pair
    ids = [prompt_ids(0)]
    assert ref.rel_err(np.array(ours(mx.array(ids))), reference_logits(model, ids, None)) <= TOL


def greedy_mlx(ours, ids, pixels_nhwc, n):
    """16 greedy tokens through mlx-lm's own generate_step, fed our spliced embeddings."""
    feats = ours.project(ours.encode_images(pixels_nhwc))
    emb = ours.embed(mx.array([ids]), feats)[0]
    # mlx-lm only counts these prompt ids; image slots are replaced by a valid id.
    placeholder = mx.array([0 if i == 5 else i for i in ids])
    steps = generate_step(placeholder, ours.language_model, input_embeddings=emb, max_tokens=n)
    return [int(t) for t, _ in steps]


def test_greedy_tokens_match_transformers(pair):
    model, ours = pair
    x = ref.pixels(1, 256, seed=21)
    ids = prompt_ids(1, seed=3)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(x), max_new_tokens=16,
            do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=16,
        )
    expected = out[0, len(ids):].tolist()
    got = greedy_mlx(ours, ids, nhwc(x), 16)
    print("greedy", got)
    assert len(expected) == 16
    assert len(set(expected)) > 4, "the test model repeats itself; the comparison would be weak"
    assert got == expected


# Half precision: float16 keeps 11 significant bits (unit roundoff u = 2^-11 ~ 4.9e-4), bfloat16
# 8 bits (u = 2^-8 ~ 3.9e-3). Weights, pixels and every activation are rounded, through ~100
# layers (tower and decoder), and the logits here are large (a scaled lm_head), so measured
# errors are ~10u: 5e-3 (float16) and 4.5e-2 (bfloat16). The bounds, 40u and 25u, leave room for
# other seeds and BLAS, and stay far below what a mis-mapped tensor gives (order 1, see
# test_vision.test_every_vision_tensor_moves_the_output).
@pytest.mark.parametrize("dtype,tol", [(mx.float16, 2e-2), (mx.bfloat16, 1e-1)])
def test_half_precision_logits(pair, dtype, tol):
    model, ours = pair
    ours_half = W.load_into(
        Model(ours.config), W.sanitize(W.from_torch(model.state_dict())), dtype=dtype
    )
    x = ref.pixels(1, 256, seed=31)
    ids = [prompt_ids(1, seed=4)]
    expected = reference_logits(model, ids, x)
    got = ours_half(mx.array(ids), nhwc(x))
    assert got.dtype == dtype
    err = ref.rel_err(np.array(got.astype(mx.float32)), expected)
    print(f"{dtype} logits rel err {err:.2e}")
    assert err <= tol
    # Argmax agreement wherever the reference's top-2 margin is clear of the rounding noise.
    top2 = np.sort(expected[0], axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 0.5
    assert (np.array(got.astype(mx.float32))[0].argmax(-1)[clear] == expected[0].argmax(-1)[clear]).all()


def test_slot_count_must_match_the_images(pair):
    _, ours = pair
    ids = mx.array([[7, 8] + [5] * 15 + [9]])
    with pytest.raises(ValueError, match="15 image-token slots"):
        ours(ids, nhwc(ref.pixels(1, 256)))
