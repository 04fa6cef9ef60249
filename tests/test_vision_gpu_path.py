"""The tower's GPU path (compiled elementwise kernels, residuals in mx.addmm) against timm, on
the CPU: `_on_cpu` is patched to False, so the formulation a GPU runs is the one computed here.
And the kernel counter of scripts/kernel_count.py."""

import importlib.util
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import fastvlm_mlx.vision as V
import reference as ref
from fastvlm_mlx.config import VisionConfig
from test_vision import TOL, mlx_tower, run_both

FULL_LAYERS = [2, 12, 24, 4, 2]


@pytest.fixture
def gpu_path(monkeypatch):
    monkeypatch.setattr(V, "_on_cpu", lambda: False)


@pytest.fixture(scope="module")
def tiny_timm():
    return ref.timm_tower(ref.TINY_LAYERS, seed=11)


def gpu_error(timm_model, tower, size=256, seed=12) -> float:
    ours, expected = run_both(timm_model, tower, ref.pixels(1, size, seed=seed))
    assert ours.shape == expected.shape
    return ref.rel_err(ours, expected)


def assert_matches_timm(timm_model, tower, size=256, label=""):
    err = gpu_error(timm_model, tower, size)
    print(f"GPU path {label} {size}px rel err {err:.2e}")
    assert err <= TOL, f"GPU path {label} {size}px: rel err {err:.2e} > {TOL:.0e}"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_gpu_path_matches_timm(gpu_path, tiny_timm, fused):
    """Both forms: as loaded (layer scales folded: the residual rides in fc2's addmm) and not."""
    tower = mlx_tower(tiny_timm, ref.TINY_LAYERS)
    if fused:
        tower.fuse()
    assert_matches_timm(tiny_timm, tower, 256, "fused" if fused else "unfused")


def test_full_tower_gpu_path_matches_timm(gpu_path):
    timm_model = ref.timm_tower(FULL_LAYERS, seed=13)
    tower = mlx_tower(timm_model, FULL_LAYERS).fuse()
    assert_matches_timm(timm_model, tower, 256, "full tower")


def test_new_weights_after_a_compiled_call_are_used(gpu_path, tiny_timm):
    """The compiled kernels take the weights as arguments: weights loaded after a first call
    (same shapes: no retrace) and the tree changed by fuse() both reach the output."""
    other = ref.timm_tower(ref.TINY_LAYERS, seed=14)
    tower = mlx_tower(tiny_timm, ref.TINY_LAYERS)
    assert_matches_timm(tiny_timm, tower, 256, "first weights")
    tower.load_weights(tree_flatten(mlx_tower(other, ref.TINY_LAYERS).parameters()))
    assert gpu_error(tiny_timm, tower) > 100 * TOL  # it moved
    assert_matches_timm(other, tower, 256, "reloaded")
    tower.fuse()
    assert_matches_timm(other, tower, 256, "fused after the first call")


def _buggy_add_twice(x, a, b):
    y = x + a
    return y, y + 0.99 * b  # fc2's bias 1% short


def _buggy_add_gelu(x, bias):
    return nn.gelu(x + 1.01 * bias)  # a conv bias 1% over


def _buggy_gated_gelu(x, gate_logits):
    return nn.gelu(x * mx.sigmoid(gate_logits + 1e-2))


@pytest.mark.parametrize("name,bug", [
    ("_add_twice", _buggy_add_twice),
    ("_add_gelu", _buggy_add_gelu),
    ("_gated_gelu", _buggy_gated_gelu),
])
def test_a_bug_in_a_compiled_kernel_fails_the_parity_check(gpu_path, tiny_timm, monkeypatch,
                                                           name, bug):
    """The bound is tight enough: a 1% slip in one compiled kernel's bias fails it."""
    tower = mlx_tower(tiny_timm, ref.TINY_LAYERS).fuse()
    monkeypatch.setattr(V, name, mx.compile(bug))
    with pytest.raises(AssertionError, match="rel err"):
        assert_matches_timm(tiny_timm, tower, 256, f"with a bug in {name}")


def test_a_bug_in_one_compiled_block_fails_the_parity_check(gpu_path, tiny_timm, monkeypatch):
    """One block's output 1e-3 too large, every other kernel right: still over the bound."""
    tower = mlx_tower(tiny_timm, ref.TINY_LAYERS).fuse()
    block = tower.stages[1].blocks[0]
    forward = block._forward_gpu
    monkeypatch.setattr(block, "_forward_gpu", lambda x: forward(x) * (1 + 1e-3))
    with pytest.raises(AssertionError, match="rel err"):
        assert_matches_timm(tiny_timm, tower, 256, "with one block off by 1e-3")


# -- the kernel counter -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel_count():
    path = Path(__file__).resolve().parents[1] / "scripts" / "kernel_count.py"
    spec = importlib.util.spec_from_file_location("kernel_count", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu_path_kernels(depths) -> int:
    """What the GPU path launches, block by block (`_forward_gpu` and friends):
    stem 6 (conv + bias&GELU, twice; 1x1 + GELU); each downsample 4 (conv + bias&GELU,
    1x1 + GELU); RepMixer block 6 (conv, bias&residual base, conv, fc1, GELU, fc2+residual);
    RepCPE 2 (conv, bias); attention block 9 (LayerNorm, qkv, attention, proj, residual&base,
    conv, fc1, GELU, fc2+residual); final conv 7 (conv, bias, sum, fc1, ReLU, fc2,
    gate&GELU). The convs and matmuls alone are 4 or 5 of each block's kernels."""
    n_repmixer, n_attention = sum(depths[:3]), sum(depths[3:])
    return 6 + 4 * (len(depths) - 1) + 6 * n_repmixer + 2 * 2 + 9 * n_attention + 7


def tiny_half_tower():
    tower = V.FastViTHD(VisionConfig(depths=ref.TINY_LAYERS)).fuse()
    tower.set_dtype(mx.float16)  # as a GPU runs it, so that its attention is one kernel on CUDA
    mx.eval(tower.parameters())
    return tower


def test_kernel_count_of_the_tiny_tower(kernel_count):
    tower = tiny_half_tower()
    counts, _ = kernel_count.tower_kernels(256, mx.float16, tower=tower)
    assert sum(counts.values()) == gpu_path_kernels(ref.TINY_LAYERS)
    assert counts["Convolution"] == 2 * 3 + 2 + 2 + 2 + 4 + 1
    assert counts["LayerNorm"] == counts["ScaledDotProductAttention"] == 2  # one kernel each
    assert not set(counts) & {"Reshape", "Transpose", "Broadcast", "Slice"}  # views
    assert V._on_cpu() and mx.fast.layer_norm.__module__ != kernel_count.__name__  # restored


def test_kernel_count_of_the_full_tower_at_256(kernel_count):
    """The full tower: 315 kernels, from 368 before the GPU path fused its elementwise work
    (BENCHMARKS.md); the 211 convs, matmuls, norms and attentions are the floor."""
    counts, reshapes = kernel_count.tower_kernels(256, mx.float16)
    total = sum(counts.values())
    heavy = sum(counts[k] for k in ("Convolution", "AddMM", "Matmul", "LayerNorm",
                                    "ScaledDotProductAttention", "Sum"))
    assert heavy == 211
    assert total == gpu_path_kernels(FULL_LAYERS) == 315
    assert reshapes == 11  # 5 channel repeats + 6 attention head merges (see the script)


def test_kernel_counter_counts_a_compiled_function_as_its_fused_kernels(kernel_count):
    """A compiled function's primitives are shared by its calls: each call still counts."""
    x, w, b = mx.ones((4, 8)), mx.ones((8, 8)), mx.ones((8,))
    mx.eval(x, w, b)  # inputs, not kernels
    f = mx.compile(lambda x, w, b: nn.gelu(x @ w + b) * 2)
    counts, _ = kernel_count.count_kernels(f(f(x, w, b), w, b).T.reshape(-1))
    assert counts["Matmul"] == 2
    assert sum(n for k, n in counts.items() if k.startswith("Compiled[")) == 2
    assert sum(counts.values()) == 4


def test_kernel_counter_markers_are_not_in_the_graphs_it_counts(kernel_count):
    """The stand-ins' marker primitives never occur in the tower's or decoder's own graphs."""
    tower = tiny_half_tower()
    small_decoder = dict(ref.text_config(), num_hidden_layers=2, model_type="qwen2")
    as_built = [kernel_count.tower_kernels(256, mx.float16, tower=tower, stand_ins=False)[0],
                kernel_count.prefill_kernels(20, mx.float16, stand_ins=False,
                                             text_config=small_decoder)[0]]
    for counts in as_built:
        assert not set(counts) & set(kernel_count._MARKER_LABELS)
    assert as_built[0]["Softmax"] == 2  # the CPU's fallback attention, as built


def test_kernel_count_of_a_decoder_prefill(kernel_count):
    """Per layer: 2 RMSNorms, q/k RoPE, one attention; the last layer only writes its K/V."""
    layers = 3
    counts, _ = kernel_count.prefill_kernels(
        40, mx.float16, text_config=dict(ref.text_config(), num_hidden_layers=layers, model_type="qwen2"))
    assert counts["RMSNorm"] == counts["RoPE"] == 2 * layers - 1
    assert counts["ScaledDotProductAttention"] == layers - 1
    assert counts["SliceUpdate"] == 2 * layers  # K and V into the cache
