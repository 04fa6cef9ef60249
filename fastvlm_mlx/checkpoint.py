"""A source checkpoint: where it is, what it holds, and the config of ours it gives.

A source is a local directory or a Hugging Face hub id (fetched with huggingface-hub, into its
cache), in any layout weights.py reads (Apple's, transformers', mlx-vlm's, ours). Its tensors
are read from *.safetensors, else pytorch_model*.bin: as MLX arrays for the converter, or as
torch tensors for verify's PyTorch reference. The converter (convert.py), load() of an
unconverted source (loader.py, through the converter) and verify all read sources here.
"""

import glob
import json
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import mlx.core as mx

from .config import ModelConfig, ModelLoadError, VisionConfig
from .extras import install_line
from .weights import WeightError, detect_layout, from_torch

SOURCE_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt", "*.jinja", "*.model"]
# Apple's (LLaVA's) sentinel: its vocabulary has no image token, `<image>` marks the splice.
APPLE_IMAGE_TOKEN = -200
# mlx-lm's Qwen2 `ModelArgs` fields taken from the source's config (the tensors give the rest).
QWEN2_FIELDS = (
    "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
    "rms_norm_eps", "num_key_value_heads", "max_position_embeddings", "rope_theta",
    "rope_scaling",
)


class ConvertError(ModelLoadError):
    """A source that cannot be read or converted; the message names the problem in one line.
    (`fastvlm_mlx.convert.ConvertError` is this class.)"""


class SourceUnavailable(ConvertError):
    """A hub id that is neither in the local cache nor downloadable (offline, unknown repo)."""

    def __init__(self, source: str, reason: str):
        super().__init__(
            f"cannot fetch {source} from the Hugging Face hub ({reason}); offline? download it "
            f"where the hub is reachable (hf download {source} --local-dir PATH), bring PATH here "
            f"and pass --model PATH, or convert it once: python -m fastvlm_mlx convert --model "
            f"PATH --out mlx/{source.rsplit('/', 1)[-1]}"
        )
        self.source, self.reason = source, reason


# ---------------------------------------------------------------------------------------------
# Where it is

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def looks_like_path(text: str) -> bool:
    """Whether TEXT, which names nothing on disk, was meant as a local path: it is not of a hub
    id's form (`org/name`: no leading / or ~, one /), starts with ., or its parent directory
    exists (`mlx/FastVLM-0.5b` beside an `mlx/` folder)."""
    return not HUB_ID.fullmatch(text) or text.startswith(".") or Path(text).parent.is_dir()


def resolve_source(src) -> Path:
    """A local directory, or a hub id fetched with huggingface-hub (its cache, its progress bars)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConvertError(f"{path} is not a directory")
        return path
    if looks_like_path(str(src)):
        hint = "" if HUB_ID.fullmatch(str(src)) else " (nor a Hugging Face repo id, which is org/name)"
        raise ConvertError(f"{src}: no such directory{hint}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src), allow_patterns=SOURCE_PATTERNS))
    except Exception as e:  # offline, unknown repo, network: huggingface-hub has many types
        raise SourceUnavailable(str(src), type(e).__name__) from None


def weights_bytes(src: Path) -> int:
    """The size of the source's weight files on disk."""
    return sum(Path(f).stat().st_size for f in _weight_files(src))


def check_source(src: Path) -> dict:
    """Refuse what is not a checkpoint (an empty directory, an Apple app bundle, no or a broken
    config.json); returns its config.json."""
    if not any(src.iterdir()):
        raise ConvertError(f"{src} is empty")
    refuse_app_bundle(src)
    return source_config(src)


def refuse_app_bundle(src: Path) -> None:
    if list(src.glob("*.mlpackage")) or list(src.glob("*/*.mlpackage")):
        raise ConvertError(
            f"{src} is an Apple app bundle: its vision tower is a CoreML package, not weights; "
            f"convert apple/FastVLM-0.5B (or -1.5B, -7B) instead"
        )


def source_config(src: Path) -> dict:
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{src} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{cfg_file} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{cfg_file} is not a JSON object")
    return cfg


# ---------------------------------------------------------------------------------------------
# What it holds


def _weight_files(src: Path) -> List[str]:
    """*.safetensors, else pytorch_model*.bin."""
    files = sorted(glob.glob(str(src / "*.safetensors")))
    files = files or sorted(glob.glob(str(src / "pytorch_model*.bin")))
    if not files:
        raise ConvertError(f"{src} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def _read_each(files: List[str], read: Callable[[str], dict]) -> dict:
    out = {}
    for f in files:
        try:
            out.update(read(f))
        except Exception as e:  # each reader raises its own types for a truncated or corrupt file
            hint = ", truncated or corrupt?" if f.endswith(".safetensors") else ""
            raise ConvertError(f"{f} cannot be read{hint} ({e})") from None
    return out


def _torch_load(f: str) -> dict:
    import torch

    return torch.load(f, map_location="cpu", weights_only=True)


def read_source_weights(src: Path) -> Dict[str, mx.array]:
    """The source's tensors as MLX arrays, in their stored dtype and names."""
    files = _weight_files(src)
    if files[0].endswith(".safetensors"):
        return _read_each(files, mx.load)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConvertError(
            f"{src} holds pytorch_model.bin, which needs torch to read: {install_line('verify')} "
            "(or pip install torch)"
        ) from None
    return _read_each(files, lambda f: from_torch(_torch_load(f)))


def source_state_dict(src: Path) -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """The source's tensors as torch tensors (verify's PyTorch reference), in their stored dtype."""
    files = _weight_files(src)
    if files[0].endswith(".safetensors"):
        from safetensors.torch import load_file

        return _read_each(files, load_file)
    return _read_each(files, _torch_load)


def tensor_names(src: Path) -> List[str]:
    """The source's tensor names; of safetensors, from their headers only (no tensor is read)."""
    files = _weight_files(src)
    if not files[0].endswith(".safetensors"):
        return list(source_state_dict(src))
    from safetensors import safe_open

    def names(f):
        with safe_open(f, framework="numpy") as fh:
            return dict.fromkeys(fh.keys())

    return list(_read_each(files, names))


def source_layout(src: Path, names: Optional[Iterable[str]] = None) -> str:
    """The layout (apple, transformers, mlx-vlm, fastvlm_mlx) by the tensors' names, never by
    the directory's name; NAMES default to `tensor_names(src)`."""
    try:
        return detect_layout(tensor_names(src) if names is None else names)
    except WeightError as e:
        raise ConvertError(f"{src}: {e}") from None


def vision_depths(names: Iterable[str], prefix: str = "vision_tower.") -> list:
    """Blocks per stage, counted from timm's names (ours under PREFIX)."""
    pattern = re.compile(re.escape(prefix) + r"stages\.(\d+)\.blocks\.(\d+)\.")
    depths = {}
    for k in names:
        m = pattern.match(k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depths[s] = max(depths.get(s, 0), b + 1)
    if not depths:
        raise ConvertError("the checkpoint holds no vision tower blocks")
    return [depths.get(i, 0) for i in range(max(depths) + 1)]


# ---------------------------------------------------------------------------------------------
# The config of ours it gives


def resolution(src: Path, cfg: dict) -> int:
    """preprocessor_config.json (crop_size, else size), else mm_vision_tower's suffix, else 1024."""
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        for key in ("crop_size", "size"):
            v = p.get(key)
            if isinstance(v, dict):
                v = v.get("height", v.get("shortest_edge"))
            if isinstance(v, int):
                return v
    m = re.search(r"_(\d+)$", str(cfg.get("mm_vision_tower", "")))
    return int(m.group(1)) if m else 1024


def token_id(tokenizer_dir: Path, token: str) -> Optional[int]:
    """TOKEN's id in the directory's tokenizer.json (added tokens first), if it has one."""
    f = tokenizer_dir / "tokenizer.json"
    if not f.is_file():
        return None
    tok = json.loads(f.read_text())
    for t in tok.get("added_tokens", []):
        if t.get("content") == token:
            return t["id"]
    return tok.get("model", {}).get("vocab", {}).get(token)


def text_fields(cfg: dict) -> dict:
    """The QWEN2_FIELDS of the source's decoder config: its text_config, else (Apple's layout)
    the top level."""
    text_src = cfg.get("text_config") or cfg
    return {k: text_src[k] for k in QWEN2_FIELDS if k in text_src}


def quantization_block(cfg: dict) -> Optional[dict]:
    """An MLX export's quantization block (mlx-lm's format), reduced to what load needs."""
    q = cfg.get("quantization") or cfg.get("quantization_config")
    if not q:
        return None
    return {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}


def build_config(src: Path, layout: str, weights: Dict[str, mx.array]) -> ModelConfig:
    """Our config.json from the source's config and tensors (sanitized names)."""
    try:
        return _build_config(src, layout, weights)
    except ConvertError:
        raise
    except ValueError as e:  # ModelConfig's checks (the image settings, tiles.py)
        raise ConvertError(f"{src / 'config.json'}: {e}") from None


# The source config's image settings, in Apple's names (tiles.py); transformers' port of
# FastVLM has none of them, and a source without them is Apple's released setting, one padded
# square view.
IMAGE_SETTINGS = ("image_aspect_ratio", "image_grid_pinpoints", "mm_patch_merge_type",
                  "mm_use_im_start_end")


def _build_config(src: Path, layout: str, weights: Dict[str, mx.array]) -> ModelConfig:
    cfg_file = src / "config.json"
    cfg = source_config(src)
    if layout == "fastvlm_mlx":
        return ModelConfig.from_dict(cfg)
    text = text_fields(cfg)
    embed = weights.get("language_model.model.embed_tokens.weight")
    if embed is None:
        raise ConvertError("missing tensor 'embed_tokens.weight'")
    text["vocab_size"] = int(embed.shape[0])
    # The configs' tie_word_embeddings flag is not reliable: the tensors decide.
    text["tie_word_embeddings"] = "language_model.lm_head.weight" not in weights
    if layout in ("apple", "mlx-vlm"):
        # Apple's vocabulary has no image token; mlx-vlm keeps Apple's -200 sentinel too.
        image_token = APPLE_IMAGE_TOKEN
    else:
        image_token = cfg.get("image_token_index", cfg.get("image_token_id"))
        if image_token is None:
            image_token = token_id(src, "<image>")
        if image_token is None:
            raise ConvertError(f"{cfg_file} names no image token (image_token_index)")
    eos = [i for i in (token_id(src, "<|im_end|>"), token_id(src, "<|endoftext|>")) if i is not None]
    return ModelConfig(
        text_config=text,
        vision_config=VisionConfig(depths=vision_depths(weights)),
        image_size=resolution(src, cfg),
        image_token_id=int(image_token),
        eos_token_id=eos or [151645, 151643],
        quantization=quantization_block(cfg),
        **{k: cfg[k] for k in IMAGE_SETTINGS if cfg.get(k) is not None},
    )
