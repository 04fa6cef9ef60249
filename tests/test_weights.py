"""Checkpoint import: renames, transposes, BatchNorm folding, and errors that name the tensor."""

import mlx.core as mx
import numpy as np
import pytest

import reference as ref
from fastvlm_mlx import weights as W
from fastvlm_mlx.config import ModelConfig
from fastvlm_mlx.model import Model


@pytest.fixture(scope="module")
def hf_state():
    return W.from_torch(ref.transformers_vlm(image_token_id=5, seed=3).state_dict())


@pytest.fixture(scope="module")
def model():
    return Model(
        ModelConfig(text_config=ref.text_config(), vision_config=ref.vision_config(), image_token_id=5)
    )


to_apple_key = ref.to_apple_key


def test_layouts_are_detected_from_keys(hf_state):
    assert W.detect_layout(hf_state) == "transformers"
    assert W.detect_layout({to_apple_key(k): v for k, v in hf_state.items()}) == "apple"
    assert W.detect_layout(W.sanitize(hf_state)) == "fastvlm_mlx"
    with pytest.raises(W.WeightError, match="unknown checkpoint layout"):
        W.detect_layout({"encoder.weight": mx.zeros(1)})


def test_apple_names_give_the_same_tensors(hf_state, model):
    apple = {to_apple_key(k): v for k, v in hf_state.items()}
    assert any(".network.6.reparam_conv." in k for k in apple)  # stage 3 RepCPE
    assert any(".layer_scale_1" in k and k.endswith("layer_scale_1") for k in apple)
    a, b = W.sanitize(apple), W.sanitize(hf_state)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    W.check_weights(model, a)


def test_tensor_rules(hf_state):
    out = W.sanitize(hf_state)
    v = "vision_tower."
    assert out[v + "stem.0.reparam_conv.weight"].shape == (96, 3, 3, 3)
    assert out[v + "stages.1.downsample.proj.0.reparam_conv.weight"].shape == (192, 7, 7, 1)
    assert out[v + "stages.1.downsample.proj.1.reparam_conv.weight"].shape == (192, 192)
    assert out[v + "stages.0.blocks.0.mlp.fc1.weight"].shape == (384, 96)
    assert out[v + "stages.0.blocks.0.layer_scale.gamma"].shape == (96,)
    assert out[v + "final_conv.se.fc1.weight"].shape == (192, 3072)
    assert not any(".bn." in k or "num_batches_tracked" in k for k in out)
    # The fold: conv(x) * s + (beta - mean * s), s = gamma / sqrt(var + eps).
    p = "model.vision_tower.timm_model.stages.0.blocks.0.mlp.conv."
    s = np.array(hf_state[p + "bn.weight"]) / np.sqrt(np.array(hf_state[p + "bn.running_var"]) + 1e-5)
    w = np.array(hf_state[p + "conv.weight"]).transpose(0, 2, 3, 1) * s[:, None, None, None]
    b = np.array(hf_state[p + "bn.bias"]) - np.array(hf_state[p + "bn.running_mean"]) * s
    # Both sides are the same few float32 operations per element (numpy's order may differ):
    # a few roundings of 2^-24 relative, so 1e-6 over each tensor.
    assert ref.rel_err(np.array(out[v + "stages.0.blocks.0.mlp.conv.conv.weight"]), w) <= 1e-6
    assert ref.rel_err(np.array(out[v + "stages.0.blocks.0.mlp.conv.conv.bias"]), b) <= 1e-6


def test_unused_tensors_are_dropped(hf_state, model):
    extra = dict(hf_state)
    extra["model.vision_tower.timm_model.head.fc.weight"] = mx.zeros((10, 3072))
    extra["model.language_model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.zeros(8)
    W.check_weights(model, W.sanitize(extra))


def test_missing_tensor_is_named(hf_state, model):
    bad = dict(hf_state)
    del bad["model.vision_tower.timm_model.stages.2.blocks.0.mlp.fc2.bias"]
    with pytest.raises(W.WeightError, match=r"missing tensor 'vision_tower\.stages\.2\.blocks\.0\.mlp\.fc2\.bias'"):
        W.check_weights(model, W.sanitize(bad))


def test_missing_batchnorm_part_is_named(hf_state):
    bad = dict(hf_state)
    del bad["model.vision_tower.timm_model.stages.1.blocks.0.mlp.conv.bn.running_mean"]
    with pytest.raises(W.WeightError, match=r"stages\.1\.blocks\.0\.mlp\.conv\.bn\.running_mean"):
        W.sanitize(bad)


def test_unknown_tensor_is_named(hf_state, model):
    bad = dict(hf_state)
    bad["model.vision_tower.timm_model.stages.0.blocks.0.extra.weight"] = mx.zeros(3)
    with pytest.raises(W.WeightError, match=r"unknown tensor 'vision_tower\.stages\.0\.blocks\.0\.extra\.weight'"):
        W.check_weights(model, W.sanitize(bad))


def test_misshaped_tensor_names_both_shapes(hf_state, model):
    bad = dict(hf_state)
    bad["model.multi_modal_projector.linear_1.weight"] = mx.zeros((64, 3000))
    with pytest.raises(W.WeightError, match=r"multi_modal_projector\.linear_1\.weight.*\(64, 3000\).*\(64, 3072\)"):
        W.check_weights(model, W.sanitize(bad))
