"""FastViTHD in MLX against timm's fastvit_mci3(inference_mode=True), random weights."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import reference as ref
from fastvlm_mlx import weights as W
from fastvlm_mlx.config import VisionConfig
from fastvlm_mlx.vision import FastViTHD

TOL = 1e-4  # float32, ||mlx - ref|| / ||ref||


def mlx_tower(timm_model, layers):
    """Our tower loaded from the timm model's state dict (transformers' key prefix)."""
    sd = W.from_torch(
        {"model.vision_tower.timm_model." + k: v for k, v in timm_model.state_dict().items()}
    )
    weights = {k[len("vision_tower."):]: v for k, v in W.sanitize(sd).items()}
    return W.load_into(FastViTHD(VisionConfig(depths=list(layers))), weights)


def run_both(timm_model, tower, x_nchw):
    with torch.no_grad():
        expected = timm_model.forward_features(torch.from_numpy(x_nchw)).numpy()
    ours = tower(mx.array(x_nchw.transpose(0, 2, 3, 1)))
    return np.array(ours).transpose(0, 3, 1, 2), expected


@pytest.fixture(scope="module")
def tiny_pair():
    m = ref.timm_tower(ref.TINY_LAYERS, seed=1)
    return m, mlx_tower(m, ref.TINY_LAYERS)


@pytest.mark.parametrize("size", [256, 512])
def test_tiny_tower_matches_timm(tiny_pair, size):
    timm_model, tower = tiny_pair
    ours, expected = run_both(timm_model, tower, ref.pixels(2, size, seed=size))
    assert ours.shape == expected.shape == (2, 3072, size // 64, size // 64)
    err = ref.rel_err(ours, expected)
    print(f"vision {size}px rel err {err:.2e}")
    assert err <= TOL


def test_full_tower_at_1024_matches_timm():
    """The real 122.7M-parameter FastViTHD (depths 2,12,24,4,2) at its trained resolution."""
    timm_model = ref.timm_tower([2, 12, 24, 4, 2], seed=2)
    tower = mlx_tower(timm_model, [2, 12, 24, 4, 2])
    n_params = sum(v.size for _, v in tree_flatten(tower.parameters()))
    # timm's count minus the folded BatchNorms (4 tensors each -> one conv bias of the same width).
    assert n_params == sum(
        p.numel() for n, p in timm_model.named_parameters() if ".bn." not in n
    ) + sum(p.numel() for n, p in timm_model.named_parameters() if n.endswith(".bn.bias"))
    ours, expected = run_both(timm_model, tower, ref.pixels(1, 1024, seed=3))
    assert ours.shape == (1, 3072, 16, 16)
    err = ref.rel_err(ours, expected)
    print(f"vision full tower 1024px rel err {err:.2e}")
    assert err <= TOL


def test_batch_rows_are_independent(tiny_pair):
    _, tower = tiny_pair
    x = mx.array(ref.pixels(3, 128, seed=4).transpose(0, 2, 3, 1))
    batched = np.array(tower(x))
    single = np.array(tower(x[1:2]))
    assert np.allclose(batched[1:2], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 200, 200, 3), (1, 256, 128, 3), (1, 256, 256, 1), (256, 256, 3)])
def test_bad_resolution_is_refused_by_value(tiny_pair, shape):
    _, tower = tiny_pair
    with pytest.raises(ValueError) as e:
        tower(mx.zeros(shape))
    assert str(shape[1]) in str(e.value) or str(shape) in str(e.value) or "shape" in str(e.value)


def test_every_vision_tensor_moves_the_output():
    """A mis-mapped tensor must fail the parity tests. Scrambling any single tensor (its values
    shuffled: what a wrong mapping of the same shape looks like) moves the output by over
    100x TOL, so no tensor is dead weight in this random model and none can be wrong unseen."""
    timm_model = ref.timm_tower(ref.TINY_LAYERS, seed=5)
    tower = mlx_tower(timm_model, ref.TINY_LAYERS)
    x = mx.array(ref.pixels(1, 128, seed=6).transpose(0, 2, 3, 1))
    base = np.array(tower(x))
    params = dict(tree_flatten(tower.parameters()))
    assert len(params) == 85  # the 1-block-per-stage tower, BatchNorms folded
    rng = np.random.default_rng(0)
    weak = {}
    for name, value in params.items():
        v = np.array(value)
        scrambled = rng.permutation(v.reshape(-1)).reshape(v.shape)
        tower.load_weights([(name, mx.array(scrambled))], strict=False)
        err = ref.rel_err(np.array(tower(x)), base)
        tower.load_weights([(name, value)], strict=False)
        if err <= 100 * TOL:
            weak[name] = err
    assert not weak, f"tensors whose scrambling barely moves the output: {weak}"


@pytest.mark.parametrize("multiplier,kernel,stride,size", [(1, 7, 1, 20), (1, 3, 2, 17), (2, 7, 2, 16), (2, 3, 1, 9)])
def test_depthwise_conv_equals_grouped_conv2d(multiplier, kernel, stride, size):
    """The shifted-sum depthwise path (CPU) is the grouped conv it replaces, channel multiplier too."""
    from fastvlm_mlx.vision import depthwise_conv2d

    rng = np.random.default_rng(kernel * 10 + stride)
    C = 6
    x = mx.array(rng.standard_normal((2, size, size, C)).astype(np.float32))
    w = mx.array(rng.standard_normal((C * multiplier, kernel, kernel, 1)).astype(np.float32))
    expected = mx.conv2d(x, w, stride=stride, padding=kernel // 2, groups=C)
    ours = depthwise_conv2d(x, w, stride)
    assert ours.shape == expected.shape
    assert np.allclose(np.array(ours), np.array(expected), rtol=1e-5, atol=1e-5)


def test_gelu_matches_erf_gelu():
    from mlx import nn

    from fastvlm_mlx.vision import gelu

    x = mx.linspace(-12, 12, 100_001).reshape(1, 1, -1, 1)
    diff = mx.abs(gelu(x) - nn.gelu(x)).max().item()
    assert diff < 3e-6
    half = gelu(x.astype(mx.float16))
    assert half.dtype == mx.float16
    assert mx.abs(half.astype(mx.float32) - nn.gelu(x)).max().item() < 1.3e-2  # fp16 ulp at 12


def test_fuse_folds_layer_scales_without_changing_the_output(tiny_pair):
    timm_model, tower = tiny_pair
    fused = mlx_tower(timm_model, ref.TINY_LAYERS).fuse()
    names = [k for k, _ in tree_flatten(fused.parameters())]
    assert not any("layer_scale" in k or k.endswith("mlp.conv.conv.bias") for k in names)
    assert any("layer_scale" in k for k, _ in tree_flatten(tower.parameters()))
    x = mx.array(ref.pixels(1, 256, seed=5).transpose(0, 2, 3, 1))
    assert ref.rel_err(np.array(fused(x)), np.array(tower(x))) < 1e-5  # float32 rounding only


def test_gpu_formulation_matches_timm(tiny_pair, monkeypatch):
    """The ops the tower uses off the CPU (grouped mx.conv2d, repeat for the channel multiplier,
    mlx's erf GELU) run here too, so the Metal/CUDA path is checked against timm as well."""
    import fastvlm_mlx.vision as V

    monkeypatch.setattr(V, "_on_cpu", lambda: False)
    timm_model, tower = tiny_pair
    ours, expected = run_both(timm_model, tower, ref.pixels(1, 256, seed=6))
    assert ref.rel_err(ours, expected) <= TOL
