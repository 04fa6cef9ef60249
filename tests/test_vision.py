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

# ||mlx - ref|| / ||ref|| in float32: timm and we sum in different orders (and BLAS kernels
# differ by machine and shape); float32 rounding through the 50-odd layers of the full tower
# measures ~1e-5 at 256-1024 px, so 1e-4, while a mis-mapped tensor moves it by order 1
# (test_every_vision_tensor_moves_the_output).
TOL = 1e-4


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
    """An image's features do not depend on the others in its batch. The batched and single
    runs are the same arithmetic in another summation order (BLAS picks its kernels by shape,
    OpenBLAS by batch size too), so they agree to float32 rounding, not bit for bit: each of
    the ~40 layers adds a few float32 roundings (2^-24 ~ 6e-8) relative, ~1e-6 in all; 1e-5
    leaves room, and a row leaking into another moves the output by order 1."""
    _, tower = tiny_pair
    x = mx.array(ref.pixels(3, 128, seed=4).transpose(0, 2, 3, 1))
    batched = np.array(tower(x))
    for i in range(3):
        assert ref.rel_err(batched[i : i + 1], np.array(tower(x[i : i + 1]))) <= 1e-5
    assert ref.rel_err(batched[0], batched[1]) > 0.1  # distinct images, distinct features


@pytest.mark.parametrize(
    "shape,named",
    [((1, 200, 200, 3), "resolution 200x200"), ((1, 256, 128, 3), "resolution 256x128"),
     ((1, 256, 256, 1), "(1, 256, 256, 1)"), ((256, 256, 3), "(256, 256, 3)")],
)
def test_bad_resolution_is_refused_by_value(tiny_pair, shape, named):
    _, tower = tiny_pair
    with pytest.raises(ValueError) as e:
        tower(mx.zeros(shape))
    assert named in str(e.value)


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


def grouped_conv_float64(x: np.ndarray, w: np.ndarray, stride: int):
    """The grouped conv with one input channel per group, 'same' padding, in float64 numpy
    (the definition, tap by tap), and the sum of |terms| per output for the error bound."""
    C, K = x.shape[-1], w.shape[1]
    m = w.shape[0] // C
    x = np.repeat(x.astype(np.float64), m, axis=-1)  # output channel o reads input o // m
    pad = K // 2
    B, H, W, _ = x.shape
    Ho, Wo = (H + 2 * pad - K) // stride + 1, (W + 2 * pad - K) // stride + 1
    xp = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    out, mass = np.zeros((B, Ho, Wo, C * m)), np.zeros((B, Ho, Wo, C * m))
    for i in range(K):
        for j in range(K):
            term = xp[:, i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride] * w[:, i, j, 0]
            out += term
            mass += np.abs(term)
    return out, mass


@pytest.mark.parametrize("multiplier,kernel,stride,size", [(1, 7, 1, 20), (1, 3, 2, 17), (2, 7, 2, 16), (2, 3, 1, 9)])
def test_shifted_sum_depthwise_conv_is_the_grouped_conv(multiplier, kernel, stride, size, monkeypatch):
    """The CPU formulation (sums of shifted copies; the channel multiplier by repeated
    channels) against the grouped conv's definition in float64. A sum of K*K float32 terms is
    off by at most K*K * 2^-24 * sum|terms| (the standard bound), elementwise."""
    import fastvlm_mlx.vision as V

    monkeypatch.setattr(V, "_on_cpu", lambda: True)  # the CPU formulation, on any backend
    rng = np.random.default_rng(kernel * 10 + stride)
    C = 6
    x = rng.standard_normal((2, size, size, C)).astype(np.float32)
    w = rng.standard_normal((C * multiplier, kernel, kernel, 1)).astype(np.float32)
    expected, mass = grouped_conv_float64(x, w, stride)
    ours = np.array(V.depthwise_conv2d(mx.array(x), mx.array(w), stride), np.float64)
    assert ours.shape == expected.shape
    assert (np.abs(ours - expected) <= kernel**2 * 2.0**-24 * mass).all()


def erf_gelu_float64(x: np.ndarray) -> np.ndarray:
    import math

    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_rational_gelu_is_erf_gelu():
    """The CPU formulation of exact GELU: 0.5 x (1 + erf(x / sqrt 2)) with erf a rational
    approximation of max error 5e-7, so |error| <= 0.5 |x| * 1e-6 (the approximation's bound
    doubled for float32 rounding in its evaluation), over [-12, 12], tails included. In
    float16 the output adds one float16 rounding (2^-11 relative) and the input's."""
    from fastvlm_mlx.vision import _gelu_rational

    x = np.linspace(-12, 12, 100_001, dtype=np.float32)
    exact = erf_gelu_float64(x.astype(np.float64))
    ours = np.array(_gelu_rational(mx.array(x)), np.float64)
    assert (np.abs(ours - exact) <= 0.5 * np.abs(x) * 1e-6 + 1e-12).all()
    half = _gelu_rational(mx.array(x).astype(mx.float16))
    assert half.dtype == mx.float16
    x16 = np.array(mx.array(x).astype(mx.float16).astype(mx.float32), np.float64)
    exact16 = erf_gelu_float64(x16)
    got16 = np.array(half.astype(mx.float32), np.float64)
    assert (np.abs(got16 - exact16) <= 2.0**-11 * np.abs(exact16) + 0.5 * np.abs(x16) * 1e-6 + 2.0**-25).all()


def test_fuse_folds_layer_scales_without_changing_the_output(tiny_pair):
    timm_model, tower = tiny_pair
    fused = mlx_tower(timm_model, ref.TINY_LAYERS).fuse()
    names = [k for k, _ in tree_flatten(fused.parameters())]
    assert not any("layer_scale" in k or k.endswith("mlp.conv.conv.bias") for k in names)
    assert any("layer_scale" in k for k, _ in tree_flatten(tower.parameters()))
    x = mx.array(ref.pixels(1, 256, seed=5).transpose(0, 2, 3, 1))
    assert ref.rel_err(np.array(fused(x)), np.array(tower(x))) < 1e-5  # float32 rounding only


@pytest.mark.parametrize("dtype,unit_roundoff", [(mx.float16, 2.0**-11), (mx.bfloat16, 2.0**-8)])
def test_fuse_rounds_once_in_the_weights_dtype(tiny_pair, dtype, unit_roundoff):
    """At load, fuse() folds layer scales and ConvFFN conv biases into half-precision weights:
    each folded tensor is the exact fold of the stored values rounded once (within the dtype's
    unit roundoff, relative; 2^-25 absolute below float16's normal range), and every other
    tensor is untouched."""
    from mlx.utils import tree_map

    timm_model, _ = tiny_pair
    tower = mlx_tower(timm_model, ref.TINY_LAYERS)
    tower.update(tree_map(lambda p: p.astype(dtype), tower.parameters()))
    stored = {k: np.array(v.astype(mx.float32), np.float64) for k, v in tree_flatten(tower.parameters())}
    expected = dict(stored)  # the exact folds, in float64, of the stored half-precision values
    # The bias fold b1 + W1 b is computed in float32: a K-term dot product may be off by up to
    # K * 2^-24 * sum |terms| (the standard bound), which matters where the terms cancel.
    dot_slack = {}
    for k in stored:
        if k.endswith(("layer_scale.gamma", "layer_scale_1.gamma", "layer_scale_2.gamma")):
            block, scale = k.rsplit(".", 2)[0], k.rsplit(".", 2)[1]
            linear = f"{block}.token_mixer.proj" if scale == "layer_scale_1" else f"{block}.mlp.fc2"
            g = stored[k]
            expected[f"{linear}.weight"] = stored[f"{linear}.weight"] * g[:, None]
            expected[f"{linear}.bias"] = stored[f"{linear}.bias"] * g
            del expected[k]
        elif k.endswith("mlp.conv.conv.bias"):
            fc1 = k[: -len("conv.conv.bias")] + "fc1"
            b1, w1, b = stored[f"{fc1}.bias"], stored[f"{fc1}.weight"], stored[k]
            expected[f"{fc1}.bias"] = b1 + w1 @ b
            dot_slack[f"{fc1}.bias"] = (len(b) + 1) * 2.0**-24 * (np.abs(b1) + np.abs(w1) @ np.abs(b))
            del expected[k]
    fused = dict(tree_flatten(tower.fuse().parameters()))
    assert fused.keys() == expected.keys()
    for k, e in expected.items():
        assert fused[k].dtype == dtype, k
        got = np.array(fused[k].astype(mx.float32), np.float64)
        if k in stored and e is stored[k]:
            assert np.array_equal(got, e), f"{k} changed but holds no fold"
        else:
            bound = unit_roundoff * np.abs(e) + 2.0**-25 + dot_slack.get(k, 0.0)
            assert (np.abs(got - e) <= bound).all(), f"{k}: more than one rounding"


def test_gpu_formulation_matches_timm(tiny_pair, monkeypatch):
    """The ops the tower uses off the CPU (grouped mx.conv2d, repeat for the channel multiplier,
    mlx's erf GELU) run here too, so the Metal/CUDA path is checked against timm as well."""
    import fastvlm_mlx.vision as V

    monkeypatch.setattr(V, "_on_cpu", lambda: False)
    timm_model, tower = tiny_pair
    ours, expected = run_both(timm_model, tower, ref.pixels(1, 256, seed=6))
    assert ref.rel_err(ours, expected) <= TOL
