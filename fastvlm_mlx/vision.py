"""FastViTHD, FastVLM's vision encoder, in MLX.

This is timm's `fastvit_mci3` in its inference (reparameterized) form, channels-last (NHWC)
throughout. Module and parameter names mirror timm's, so a timm or transformers state dict maps
onto this module by a transpose of the conv weights (see weights.py). Two deliberate departures:
- pointwise (1x1, dense) convs are `nn.Linear`: in channels-last they are plain matmuls, which MLX
  runs faster than `conv2d`; their weights are the conv's with the 1x1 dims squeezed away;
- the eval-mode BatchNorm of every ConvFFN is folded at import into the depthwise conv before it,
  which therefore carries a bias here.
The classification/pooling head is not built: FastVLM uses the feature map.

Speed (see BENCHMARKS.md for the measurements behind each choice):
- depthwise and channel-multiplier-2 convs go through `depthwise_conv2d`: on MLX's CPU backend,
  grouped `conv2d` is a plain loop, so there it is computed as a sum of shifted, scaled copies;
  on a GPU it is `conv2d`'s depthwise kernel;
- `FastViTHD.fuse()` (called at load) folds every layer scale into the linear before it and
  every ConvFFN conv bias into the linear after it: two elementwise kernels less per block;
- off the CPU, where each kernel costs ~10 us whatever its size, the elementwise work between
  convs and matmuls runs as a few compiled kernels (`_add_gelu`, `_add_twice`, ...): a conv's
  bias and its GELU are one kernel, and a residual add rides in the matmul before it
  (`mx.addmm`). scripts/kernel_count.py counts the kernels (BENCHMARKS.md).
"""

import mlx.core as mx
import mlx.nn as nn

from .config import VisionConfig


def _on_cpu() -> bool:
    """Whether MLX runs on its CPU backend, where two ops below take a vectorized detour."""
    return mx.default_device() == mx.cpu


# erf(z) ~= z P(z^2) / Q(z^2) on z in [-4, 4] (erf is +-1 to float32 precision outside): the
# rational approximation Eigen and XLA use for float32 erf, max abs error ~5e-7 against mx.erf.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


@mx.compile
def _gelu_rational(x: mx.array) -> mx.array:
    z = mx.clip(x.astype(mx.float32) * 0.7071067811865476, -4.0, 4.0)
    z2 = z * z
    p, q = _ERF_P[0], _ERF_Q[0]
    for c in _ERF_P[1:]:
        p = p * z2 + c
    for c in _ERF_Q[1:]:
        q = q * z2 + c
    return (0.5 * x * (1.0 + z * p / q)).astype(x.dtype)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as timm's nn.GELU.

    MLX's CPU backend evaluates erf one scalar at a time (~25 ns an element here, half the
    tower's CPU time), so on the CPU the erf is a rational polynomial that compiles into one
    vectorized kernel, 7x faster; `mx.compile` is per shape because shapeless kernels lose the
    contiguous fast path. Elsewhere it is mlx's own `nn.gelu`.
    """
    if _on_cpu():
        return _gelu_rational(x)
    return nn.gelu(x)


# The GPU path's elementwise kernels. Each is one fused kernel: MLX fuses elementwise chains
# inside `mx.compile` (compiled functions called in them, nn.gelu too, are traced inline), never
# across a conv or a matmul. Every array they use is an argument, so new weights are read at each
# call; traced once per shape. Called inside another compiled function they are inlined, and
# its fusion may split them again (`mx.compile(tower)` counts more kernels: BENCHMARKS.md).
@mx.compile
def _add_gelu(x: mx.array, bias: mx.array) -> mx.array:
    """A conv's bias and the GELU after it."""
    return nn.gelu(x + bias)


@mx.compile
def _add_twice(x: mx.array, a: mx.array, b: mx.array):
    """(x + a, x + a + b) in one kernel with two outputs: the first feeds the next conv, the
    second is the residual base that `mx.addmm` adds to the branch's last matmul, so the
    residual add costs no kernel of its own (b is that matmul's bias)."""
    y = x + a
    return y, y + b


@mx.compile
def _gated_gelu(x: mx.array, gate_logits: mx.array) -> mx.array:
    """GELU(x * sigmoid(gate)): the squeeze-excite scale and the final conv's GELU."""
    return nn.gelu(x * mx.sigmoid(gate_logits))


def _shifted_sum_conv(x: mx.array, weight: mx.array, stride: int) -> mx.array:
    """Depthwise conv as sum_ij shift_ij(x) * w_ij: one strided slice and one multiply-add per tap.

    Written by hand because MLX's CPU backend runs grouped `conv2d` as a scalar loop (~1 GFLOP/s
    here); these elementwise ops are vectorized: 3x faster per conv, 2.2x on the whole tower at
    256 px (BENCHMARKS.md). The taps are summed in the kernel's row-major order.
    """
    C, K = weight.shape[0], weight.shape[1]
    pad = K // 2
    B, H, W, _ = x.shape
    Ho, Wo = (H + 2 * pad - K) // stride + 1, (W + 2 * pad - K) // stride + 1
    x = mx.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    taps = weight.reshape(C, K * K).T
    out = None
    for i in range(K):
        for j in range(K):
            shifted = x[:, i : i + stride * (Ho - 1) + 1 : stride, j : j + stride * (Wo - 1) + 1 : stride]
            term = shifted * taps[i * K + j]
            out = term if out is None else out + term
    return out


def depthwise_conv2d(x: mx.array, weight: mx.array, stride: int = 1) -> mx.array:
    """Grouped conv with one input channel per group: weight (C_in * m, K, K, 1), 'same' padding.

    A channel multiplier m > 1 (FastViTHD's downsamples and final conv have m = 2) is a depthwise
    conv over the input with each channel repeated m times: output channel o reads input o // m,
    exactly as a grouped conv does, but it takes the depthwise path.
    """
    multiplier = weight.shape[0] // x.shape[-1]
    if multiplier > 1:
        x = mx.repeat(x, multiplier, axis=-1)
    if _on_cpu():
        return _shifted_sum_conv(x, weight, stride)
    K = weight.shape[1]
    return mx.conv2d(x, weight, stride=stride, padding=K // 2, groups=x.shape[-1])


class DepthwiseConv2d(nn.Module):
    """`nn.Conv2d(groups=in_chs)` with the same parameters (weight (out, K, K, 1), bias)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1):
        super().__init__()
        scale = (1 / kernel_size**2) ** 0.5
        self.weight = mx.random.uniform(-scale, scale, (out_chs, kernel_size, kernel_size, 1))
        self.bias = mx.zeros((out_chs,))
        self.stride = stride

    def __call__(self, x: mx.array) -> mx.array:
        y = depthwise_conv2d(x, self.weight, self.stride)
        return y + self.bias if "bias" in self else y


def _conv_without_bias(conv: nn.Module, x: mx.array) -> mx.array:
    """A DepthwiseConv2d or nn.Conv2d without its bias add, which the caller fuses."""
    if isinstance(conv, DepthwiseConv2d):
        return depthwise_conv2d(x, conv.weight, conv.stride)
    return mx.conv2d(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
    if kernel_size == 1 and stride == 1 and groups == 1:
        return nn.Linear(in_chs, out_chs)
    if groups == in_chs and out_chs % in_chs == 0:
        return DepthwiseConv2d(in_chs, out_chs, kernel_size, stride)
    return nn.Conv2d(
        in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups
    )


class SqueezeExcite(nn.Module):
    """timm's SEModule: global mean -> fc1 -> ReLU -> fc2 -> sigmoid gate."""

    def __init__(self, chs: int, rd_chs: int):
        super().__init__()
        self.fc1 = nn.Linear(chs, rd_chs)
        self.fc2 = nn.Linear(rd_chs, chs)

    def __call__(self, x: mx.array) -> mx.array:
        s = x.mean(axis=(1, 2), keepdims=True)
        s = self.fc2(nn.relu(self.fc1(s)))
        return x * mx.sigmoid(s)

    def gate_logits(self, x: mx.array) -> mx.array:
        """The gate before its sigmoid; the mean's 1/(H*W) rides in fc1's matmul (GPU path)."""
        _, H, W, _ = x.shape
        s = x.sum(axis=(1, 2), keepdims=True)
        s = mx.addmm(self.fc1.bias, s, self.fc1.weight.T, alpha=1.0 / (H * W))
        return self.fc2(nn.relu(s))


class MobileOneBlock(nn.Module):
    """conv -> (squeeze-excite) -> GELU, the branches already fused into `reparam_conv`.

    In the inference form timm's ReparamLargeKernelConv (with `lkc_use_act`) computes the same
    thing, so it is built with this class too; only `reparam_conv` holds parameters in both.
    """

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, groups=1, use_se=False, rd_chs=0):
        super().__init__()
        self.reparam_conv = _conv(in_chs, out_chs, kernel_size, stride, groups)
        if use_se:
            self.se = SqueezeExcite(out_chs, rd_chs)

    def __call__(self, x: mx.array) -> mx.array:
        conv = self.reparam_conv
        if not _on_cpu() and not isinstance(conv, nn.Linear) and "bias" in conv:
            return self._conv_bias_gelu(x)
        x = conv(x)
        if "se" in self:
            x = self.se(x)
        return gelu(x)

    def _conv_bias_gelu(self, x: mx.array) -> mx.array:
        """GPU path: the conv, then its bias, the squeeze-excite scale and GELU fused."""
        x = _conv_without_bias(self.reparam_conv, x)
        bias = self.reparam_conv.bias
        if "se" in self:
            x = x + bias
            return _gated_gelu(x, self.se.gate_logits(x))
        return _add_gelu(x, bias)


class PatchEmbed(nn.Module):
    """Downsample between stages: 7x7 stride-2 conv with channel multiplier 2, then 1x1."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int):
        super().__init__()
        self.proj = [
            MobileOneBlock(in_chs, out_chs, kernel_size, stride=2, groups=in_chs),
            MobileOneBlock(out_chs, out_chs, 1),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.proj:
            x = layer(x)
        return x


class DepthwiseConv(nn.Module):
    """A depthwise conv whose fused kernel already holds the identity branch.

    It is timm's RepMixer (x + ls * (mixer(x) - norm(x)), fused) and RepConditionalPosEnc
    (x + pos_enc(x), fused): both are one depthwise conv with bias at inference.
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.reparam_conv = DepthwiseConv2d(dim, dim, kernel_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.reparam_conv(x)


class ConvNorm(nn.Module):
    """timm's ConvNormAct without an act: its BatchNorm is folded into `conv` at import."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = DepthwiseConv2d(dim, dim, kernel_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


class ConvMlp(nn.Module):
    """ConvFFN: depthwise 7x7 (+ folded BN) -> 1x1 C->4C -> GELU -> 1x1 4C->C."""

    def __init__(self, dim: int, hidden: int, kernel_size: int):
        super().__init__()
        self.conv = ConvNorm(dim, kernel_size)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.hidden(x))

    def hidden(self, x: mx.array) -> mx.array:
        """Everything before fc2, which the GPU path runs as an `mx.addmm` with the residual."""
        return gelu(self.fc1(self.conv(x)))

    def fuse(self) -> None:
        """fc1(conv(x) + b) == fc1'(conv(x)) with fc1' bias += W1 b: one elementwise op less."""
        conv = self.conv.conv
        if "bias" in conv:
            w1, b1, b = (_f32(t) for t in (self.fc1.weight, self.fc1.bias, conv.bias))
            self.fc1.bias = (b1 + w1 @ b).astype(self.fc1.bias.dtype)
            conv.pop("bias")


class LayerScale2d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.gamma


def _f32(t: mx.array) -> mx.array:
    return t.astype(mx.float32)


def _fold_layer_scale(block: nn.Module, scale_name: str, linear: nn.Linear) -> None:
    """gamma * (W x + b) == (gamma W) x + gamma b: one elementwise op less per residual branch."""
    if scale_name not in block:
        return
    gamma = _f32(block[scale_name].gamma)
    linear.weight = (_f32(linear.weight) * gamma[:, None]).astype(linear.weight.dtype)
    linear.bias = (_f32(linear.bias) * gamma).astype(linear.bias.dtype)
    block.pop(scale_name)


def _scaled(block: nn.Module, scale_name: str, x: mx.array) -> mx.array:
    return block[scale_name](x) if scale_name in block else x


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, cfg: VisionConfig):
        super().__init__()
        self.token_mixer = DepthwiseConv(dim, cfg.repmixer_kernel_size)
        self.mlp = ConvMlp(dim, int(dim * cfg.mlp_ratio), cfg.ffn_kernel_size)
        self.layer_scale = LayerScale2d(dim)

    def __call__(self, x: mx.array) -> mx.array:
        if not _on_cpu():
            return self._forward_gpu(x)
        x = self.token_mixer(x)
        return x + _scaled(self, "layer_scale", self.mlp(x))

    def _forward_gpu(self, x: mx.array) -> mx.array:
        """6 kernels (fused block): mixer conv, its bias (two outputs), ConvFFN conv, fc1, GELU,
        fc2 with the residual as `mx.addmm`'s base."""
        mixer = self.token_mixer.reparam_conv
        x = depthwise_conv2d(x, mixer.weight, mixer.stride)
        if "layer_scale" in self:  # not fused at load: the plain form
            x = x + mixer.bias
            return x + self.layer_scale(self.mlp(x))
        fc2 = self.mlp.fc2
        x, base = _add_twice(x, mixer.bias, fc2.bias)
        return mx.addmm(base, self.mlp.hidden(x), fc2.weight.T)

    def fuse(self) -> None:
        _fold_layer_scale(self, "layer_scale", self.mlp.fc2)
        self.mlp.fuse()


class Attention(nn.Module):
    """Global multi-head self-attention over the h*W+w (row-major) tokens, no mask."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        qkv = self.qkv(x.reshape(B, H * W, C))
        q, k, v = qkv.reshape(B, H * W, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        o = o.transpose(0, 2, 1, 3).reshape(B, H * W, C)
        return self.proj(o).reshape(B, H, W, C)


class AttentionBlock(nn.Module):
    def __init__(self, dim: int, cfg: VisionConfig):
        super().__init__()
        # timm's LayerNorm2d normalizes over channels: in channels-last that is a plain LayerNorm.
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.token_mixer = Attention(dim, cfg.head_dim)
        self.layer_scale_1 = LayerScale2d(dim)
        self.mlp = ConvMlp(dim, int(dim * cfg.mlp_ratio), cfg.ffn_kernel_size)
        self.layer_scale_2 = LayerScale2d(dim)

    def __call__(self, x: mx.array) -> mx.array:
        if not _on_cpu():
            return self._forward_gpu(x)
        x = x + _scaled(self, "layer_scale_1", self.token_mixer(self.norm(x)))
        return x + _scaled(self, "layer_scale_2", self.mlp(x))

    def _forward_gpu(self, x: mx.array) -> mx.array:
        """The first residual add and the second's base in one kernel; fc2 adds the base."""
        y = self.token_mixer(self.norm(x))
        if "layer_scale_1" in self or "layer_scale_2" in self:  # not fused at load: the plain form
            x = x + _scaled(self, "layer_scale_1", y)
            return x + _scaled(self, "layer_scale_2", self.mlp(x))
        fc2 = self.mlp.fc2
        x, base = _add_twice(x, y, fc2.bias)
        return mx.addmm(base, self.mlp.hidden(x), fc2.weight.T)

    def fuse(self) -> None:
        _fold_layer_scale(self, "layer_scale_1", self.token_mixer.proj)
        _fold_layer_scale(self, "layer_scale_2", self.mlp.fc2)
        self.mlp.fuse()


class FastVitStage(nn.Module):
    def __init__(self, in_chs: int, dim: int, index: int, cfg: VisionConfig):
        super().__init__()
        if index > 0:
            self.downsample = PatchEmbed(in_chs, dim, cfg.downsample_kernel_size)
        if cfg.pos_embs[index]:
            self.pos_emb = DepthwiseConv(dim, cfg.pos_emb_kernel_size)
        block = RepMixerBlock if cfg.token_mixers[index] == "repmixer" else AttentionBlock
        self.blocks = [block(dim, cfg) for _ in range(cfg.depths[index])]

    def __call__(self, x: mx.array) -> mx.array:
        if "downsample" in self:
            x = self.downsample(x)
        if "pos_emb" in self:
            x = self.pos_emb(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class FastViTHD(nn.Module):
    """Images (B, S, S, 3) in [0, 1] -> features (B, S/64, S/64, 3072), channels-last."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        w0 = config.widths[0]
        self.stem = [
            MobileOneBlock(3, w0, 3, stride=2),
            MobileOneBlock(w0, w0, 3, stride=2, groups=w0),
            MobileOneBlock(w0, w0, 1),
        ]
        chs = [w0] + list(config.widths)
        self.stages = [
            FastVitStage(chs[i], chs[i + 1], i, config) for i in range(len(config.depths))
        ]
        n = config.num_features
        self.final_conv = MobileOneBlock(
            config.widths[-1], n, 3, groups=config.widths[-1], use_se=True,
            rd_chs=int(n * config.se_ratio),
        )

    def fuse(self) -> "FastViTHD":
        """The inference form, made once at load: every layer scale folded into the linear
        before it, and every ConvFFN's depthwise-conv bias into the fc1 after it.

        The parameters then no longer hold those tensors. Each fold is computed in float32 and
        rounded once to the weights' dtype, so in half precision it adds one rounding of that
        dtype to the folded tensors and nothing more; in float32 it is float32 rounding.
        """
        for stage in self.stages:
            for blk in stage.blocks:
                blk.fuse()
        return self

    def check_input(self, shape) -> None:
        stride = self.config.stride
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"vision tower expects pixels of shape (B, S, S, 3), got {tuple(shape)}")
        _, h, w, _ = shape
        if h != w or h % stride or h == 0:
            raise ValueError(
                f"image resolution {h}x{w} is not supported: it must be square and a multiple of {stride}"
            )

    def __call__(self, x: mx.array) -> mx.array:
        self.check_input(x.shape)
        for layer in self.stem:
            x = layer(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_conv(x)
