"""Checkpoint layouts -> this package's parameter names.

Each layout is a rename onto our names (which mirror timm's FastViT and mlx-lm's Qwen2), then one
set of tensor rules:
- conv weights (O, I/groups, kh, kw) -> (O, kh, kw, I/groups); 1x1 dense convs -> (O, I);
- every ConvFFN BatchNorm (eval mode) is folded into the bias-free depthwise conv before it;
- layer scales (C, 1, 1) -> (C,);
- what the inference graph does not use is dropped (pooling head, BN step counters, rotary caches).
`check_weights` then compares the result against the model, naming any missing, unknown or
misshaped tensor. Nothing here reads files: the loader and the converter hand in the tensors.
"""

import re
from typing import Dict, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which timm's ConvFFN BatchNorm uses

# Apple's flat `network.i` list -> timm stages (fastvit_mci3: downsample and RepCPE are entries).
APPLE_NETWORK = {
    0: "stages.0.blocks", 1: "stages.1.downsample", 2: "stages.1.blocks",
    3: "stages.2.downsample", 4: "stages.2.blocks", 5: "stages.3.downsample",
    6: "stages.3.pos_emb", 7: "stages.3.blocks", 8: "stages.4.downsample",
    9: "stages.4.pos_emb", 10: "stages.4.blocks",
}


def is_unused(key: str) -> bool:
    """Tensors no layout's inference graph uses, dropped on purpose: the vision pooling head
    (`head.proj` in Apple's layout, `head.fc` in timm's, `head` in mlx-vlm's), BatchNorm step
    counters and precomputed rotary frequencies."""
    if key.endswith(("num_batches_tracked", "rotary_emb.inv_freq")):
        return True
    return "vision" in key and re.search(r"\.head\.(proj|fc\.|weight|bias)", key) is not None


class WeightError(ValueError):
    """A checkpoint tensor that is missing, unknown, misshaped or of an unknown layout."""


# Apple's module names -> timm's, within a vision tensor's name. Apple's `lkb_reparam` (the
# ReparamLargeKernelConv opening each downsample) and its `reparam_conv` become one name.
APPLE_VISION_RENAMES = (
    ("patch_embed.", "stem."), ("conv_exp.", "final_conv."), ("se.reduce.", "se.fc1."),
    ("se.expand.", "se.fc2."), ("convffn.", "mlp."), ("lkb_reparam.", "reparam_conv."),
)


def apple_vision_name(key: str) -> str:
    """Apple's (ml-fastvlm) FastViTHD names -> timm's names."""
    m = re.match(r"network\.(\d+)(.*)", key)
    if m:
        i = int(m.group(1))
        if i not in APPLE_NETWORK:
            raise WeightError(f"unknown vision tensor {key!r}: no stage for network.{i}")
        key = APPLE_NETWORK[i] + m.group(2)
    for old, new in APPLE_VISION_RENAMES:
        key = key.replace(old, new)
    return re.sub(r"(layer_scale(_[12])?)$", r"\1.gamma", key)


# Apple's learned row-end vector of `spatial_unpad` (tiles.py), `model.image_newline` in Apple's
# layout and in transformers' (LLaVA-NeXT's name; transformers' FastVLM port has none);
# `image_newline` in older transformers exports and in ours.
IMAGE_NEWLINE = "image_newline"


def _rename_transformers(key: str) -> Optional[str]:
    if key in ("model.image_newline", IMAGE_NEWLINE):
        return IMAGE_NEWLINE
    for old, new in (
        ("model.vision_tower.timm_model.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _rename_apple(key: str) -> Optional[str]:
    if key == "model.image_newline":
        return IMAGE_NEWLINE
    prefix = "model.vision_tower.vision_tower.model."
    if key.startswith(prefix):
        return "vision_tower." + apple_vision_name(key[len(prefix):])
    m = re.match(r"model\.mm_projector\.([02])\.(.*)", key)
    if m:
        return f"multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "language_model." + key
    if key.startswith("lm_head."):
        return "language_model." + key
    return None


def _rename_mlx_vlm(key: str) -> Optional[str]:
    prefix = "vision_tower.vision_model."
    if key.startswith(prefix):
        return "vision_tower." + apple_vision_name(
            key[len(prefix):].replace("patch_embed.blocks.", "patch_embed.")
        )
    m = re.match(r"mm_projector\.([02])\.(.*)", key)
    if m:
        return f"multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    if key.startswith("language_model."):
        return key
    return None


def _rename_ours(key: str) -> Optional[str]:
    if key == IMAGE_NEWLINE or key.startswith(("vision_tower.", "multi_modal_projector.", "language_model.")):
        return key
    return None


# Layout name -> (a key prefix only it has, renamer, tensors in PyTorch layout?). Detection reads
# the tensors' names, never the directory's name.
LAYOUTS: Dict[str, tuple] = {
    "transformers": ("model.vision_tower.timm_model.", _rename_transformers, True),
    "apple": ("model.vision_tower.vision_tower.model.", _rename_apple, True),
    "mlx-vlm": ("vision_tower.vision_model.", _rename_mlx_vlm, False),
    "fastvlm_mlx": ("vision_tower.stem.", _rename_ours, False),
}


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    for name, (marker, _, _) in LAYOUTS.items():
        if any(k.startswith(marker) for k in keys):
            return name
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise WeightError(f"unknown checkpoint layout (first keys: {sample})")


def _fold_batchnorms(weights: Dict[str, mx.array]) -> None:
    """ConvFFN: depthwise conv (no bias) -> BatchNorm(eval)  ==  one conv with a bias.

    The fold is computed in float32 and left there: casting it back to the source's dtype
    (bfloat16 in Apple's releases) would round it once more before the converter's one cast to
    the dtype asked for, and a float32 conversion of a bf16 checkpoint would carry bf16 error.
    """
    for bn in [k[: -len(".running_var")] for k in weights if k.endswith(".mlp.conv.bn.running_var")]:
        parts = {}
        for p in ("weight", "bias", "running_mean", "running_var"):
            name = f"{bn}.{p}"
            if name not in weights:
                raise WeightError(f"missing tensor {name!r} (BatchNorm to fold)")
            parts[p] = weights.pop(name).astype(mx.float32)
        conv = bn[: -len("bn")] + "conv"
        if f"{conv}.weight" not in weights:
            raise WeightError(f"missing tensor {conv + '.weight'!r} (conv before {bn})")
        w = weights[f"{conv}.weight"]
        scale = parts["weight"] * mx.rsqrt(parts["running_var"] + BN_EPS)
        shape = (-1,) + (1,) * (w.ndim - 1)
        weights[f"{conv}.weight"] = w.astype(mx.float32) * scale.reshape(shape)
        weights[f"{conv}.bias"] = parts["bias"] - parts["running_mean"] * scale


def _to_mlx_tensor(key: str, value: mx.array, torch_layout: bool) -> mx.array:
    if not key.startswith("vision_tower."):
        return value
    if value.ndim == 4:
        if torch_layout:  # torch conv (O, I/g, kh, kw) -> MLX (O, kh, kw, I/g)
            value = value.transpose(0, 2, 3, 1)
        if value.shape[1:3] == (1, 1):  # every 1x1 conv of FastViTHD is dense: our nn.Linear
            value = value.reshape(value.shape[0], -1)
    elif key.endswith(".gamma") and value.ndim == 3:  # (C, 1, 1) or mlx-vlm's (1, 1, C)
        value = value.reshape(-1)
    return value


def sanitize(weights: Dict[str, mx.array], layout: Optional[str] = None) -> Dict[str, mx.array]:
    """A checkpoint's tensors (as mx arrays) -> our names and tensor layout.

    Unknown keys are kept under their source name, so that `check_weights` reports them.
    """
    layout = layout or detect_layout(weights)
    _, rename, torch_layout = LAYOUTS[layout]
    out = {}
    for key, value in weights.items():
        if is_unused(key):
            continue
        new = rename(key)
        out[new if new is not None else key] = value
    if layout == "fastvlm_mlx":  # our own output: nothing to do
        return out
    _fold_batchnorms(out)
    return {k: _to_mlx_tensor(k, v, torch_layout) for k, v in out.items()}


def check_weights(model: nn.Module, weights: Dict[str, mx.array]) -> None:
    """Every model parameter present with its shape, and no tensor left over."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unknown = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightError(f"missing tensor {missing[0]!r}{more}")
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise WeightError(f"unknown tensor {unknown[0]!r}{more}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightError(
                f"tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
            )


def from_torch(state_dict) -> Dict[str, mx.array]:
    """A torch state dict -> mx arrays (float32 where the source is a float type)."""
    out = {}
    for k, t in state_dict.items():
        t = t.detach().cpu()
        out[k] = mx.array(t.float().numpy() if t.is_floating_point() else t.numpy())
    return out


def cast_floating(weights: Dict[str, mx.array], dtype: mx.Dtype) -> Dict[str, mx.array]:
    """Floating-point tensors to `dtype`; integer ones (packed quantized weights) untouched."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def load_into(model: nn.Module, weights: Dict[str, mx.array], dtype=None) -> nn.Module:
    """Check and load sanitized weights; cast floating tensors to `dtype` if given."""
    check_weights(model, weights)
    if dtype is not None:
        weights = cast_floating(weights, dtype)
    model.load_weights(list(weights.items()), strict=True)
    return model

