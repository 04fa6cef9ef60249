"""The converted model's config.json, as dataclasses.

The vision architecture is data (depths, widths, mixers), so tests and tools can build reduced
FastViTHD towers with the same block types. The text config is kept as the dict of mlx-lm's Qwen2
`ModelArgs` fields and handed to mlx-lm unchanged. The dtype names (`DTYPES`), whether a directory
holds a converted model (`is_converted`) and the one-line errors (`ModelLoadError` for a model that
cannot be loaded, `InputError` for bad user input) live here too: every other module uses them,
and this one imports only tiles.py (which imports none of ours), to check the image settings.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from .tiles import check_settings

# The floating-point dtypes a model is converted to or run in, by their names on the command line.
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message says why in one line."""


class InputError(ValueError):
    """Bad user input (image, prompt, resolution); the message names the problem in one line."""


def _from_dict(cls, params: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in known})


@dataclass
class VisionConfig:
    """FastViTHD (timm `fastvit_mci3`) in its inference form."""

    depths: List[int] = field(default_factory=lambda: [2, 12, 24, 4, 2])
    widths: List[int] = field(default_factory=lambda: [96, 192, 384, 768, 1536])
    token_mixers: List[str] = field(
        default_factory=lambda: ["repmixer", "repmixer", "repmixer", "attention", "attention"]
    )
    # Stages that start with a RepCPE (conditional positional encoding, a 7x7 depthwise conv).
    pos_embs: List[bool] = field(default_factory=lambda: [False, False, False, True, True])
    mlp_ratio: float = 4.0
    head_dim: int = 32
    repmixer_kernel_size: int = 3
    pos_emb_kernel_size: int = 7
    ffn_kernel_size: int = 7
    downsample_kernel_size: int = 7
    # final_conv widens the last stage by this factor (timm's cls_ratio); 1536 * 2 = 3072 features.
    final_ratio: int = 2
    se_ratio: float = 1 / 16
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        n = len(self.depths)
        for name in ("widths", "token_mixers", "pos_embs"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"vision_config.{name} needs {n} entries, one per stage")
        for mixer in self.token_mixers:
            if mixer not in ("repmixer", "attention"):
                raise ValueError(f"vision_config.token_mixers: unknown mixer {mixer!r}")

    @property
    def num_features(self) -> int:
        return self.widths[-1] * self.final_ratio

    @property
    def stride(self) -> int:
        # stem /4, then one /2 per downsample (every stage but the first).
        return 4 * 2 ** (len(self.depths) - 1)

    @classmethod
    def from_dict(cls, params: dict) -> "VisionConfig":
        return _from_dict(cls, params)


@dataclass
class ModelConfig:
    text_config: dict
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    model_type: str = "fastvlm"
    projector_type: str = "mlp2x_gelu"
    image_size: int = 1024
    image_token_id: int = 151646
    eos_token_id: List[int] = field(default_factory=lambda: [151645, 151643])
    quantization: Optional[dict] = None
    # How an image becomes the tower's views, in Apple's names (tiles.py): one square view
    # ("pad"), or AnyRes tiles beside a global view ("anyres", from image_grid_pinpoints), and
    # how the views' features are merged (flat, spatial, spatial_unpad with `image_newline`).
    image_aspect_ratio: str = "pad"
    image_grid_pinpoints: Optional[List[List[int]]] = None
    mm_patch_merge_type: str = "flat"
    mm_use_im_start_end: bool = False  # refused when true

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"projector_type {self.projector_type!r} is not supported (mlp2x_gelu only)")
        self.text_config = {"model_type": "qwen2", **self.text_config}
        self.image_aspect_ratio, self.image_grid_pinpoints, self.mm_patch_merge_type = check_settings(
            self.image_aspect_ratio, self.image_grid_pinpoints, self.mm_patch_merge_type,
            self.image_size, self.mm_use_im_start_end)

    @property
    def has_image_newline(self) -> bool:
        """Whether the model holds Apple's learned `image_newline` (as Apple's code decides)."""
        return "unpad" in self.mm_patch_merge_type

    @classmethod
    def from_dict(cls, params: dict) -> "ModelConfig":
        if "text_config" not in params:
            raise ValueError("config.json has no text_config: not a fastvlm_mlx model")
        return _from_dict(cls, params)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("quantization", "image_grid_pinpoints"):
            if out[key] is None:
                del out[key]
        if not out["mm_use_im_start_end"]:
            del out["mm_use_im_start_end"]
        return out


def is_converted(path: Path) -> bool:
    """Whether PATH holds a converted model: a config.json in our schema (ModelConfig)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == "fastvlm" and "text_config" in cfg
