"""Images in -> pixels; prompt in -> token ids with one image slot per feature row.

Preprocessing follows the reference (`image_aspect_ratio: pad`): RGB, pad to a square with black
at offset floor((side - w) / 2), bicubic resize (PIL) to the model resolution, scale to [0, 1], no
mean/std normalisation (AnyRes tiles, `image_aspect_ratio: anyres` or `--tiles`, are tiles.py's).
The prompt follows the reference `qwen_2` template; the text around each `<image>` marker is
tokenized separately and the marker becomes N image-token slots (N per image: with tiles it
depends on the image's size), which is how Apple's reference splices (its vocabulary has no image
token) and what transformers' port gives with its real `<image>` token.
"""

import errno
import functools
import hashlib
import io
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from PIL import Image, ImageOps

from . import fetch
from .config import InputError, ModelConfig  # noqa: F401 (InputError: processing.InputError is public)
from .tiles import Tiling, checkpoint_tiling

IMAGE_MARKER = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_PROMPT = "Describe the image."

ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]


def is_whole_number(value) -> bool:
    """An int (numpy's too), and not a bool, which Python counts as one."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_resolution(size: int, stride: int = 64) -> int:
    if not is_whole_number(size) or size <= 0 or size % stride:
        raise InputError(f"resolution {size} is not supported: it must be a positive multiple of {stride}")
    return int(size)


# Settings with sane defaults; tests and apps lower them (argument, or environment variable).
DEFAULT_MAX_PIXELS = 100_000_000  # a decoded image above this is refused (decompression bombs)
DEFAULT_MAX_URL_BYTES = 50 * 2**20  # an image URL's body above this is refused
DEFAULT_URL_TIMEOUT = 15.0  # seconds per image URL, everything included (connect, redirects, body)


def _setting(value, env: str, default, cast):
    if value is not None:
        return cast(value)
    raw = os.environ.get(env)
    if raw:
        try:
            return cast(raw)
        except ValueError:
            raise InputError(f"{env}={raw!r} is not a number") from None
    return default


def pixel_cap(value: Optional[int] = None, default: int = DEFAULT_MAX_PIXELS) -> int:
    return _setting(value, "FASTVLM_MAX_PIXELS", default, int)


def url_byte_cap(value: Optional[int] = None) -> int:
    return _setting(value, "FASTVLM_MAX_URL_BYTES", DEFAULT_MAX_URL_BYTES, int)


def url_timeout(value: Optional[float] = None) -> float:
    return _setting(value, "FASTVLM_URL_TIMEOUT", DEFAULT_URL_TIMEOUT, float)


def is_url(image) -> bool:
    return isinstance(image, str) and image.lower().startswith(("http://", "https://"))


def fetch_url(url: str, timeout: Optional[float] = None, max_bytes: Optional[int] = None,
              allow_private: bool = True, cancel=None) -> bytes:
    """GET an http(s) URL within a total deadline, with a cap on the body size (the settings
    above when not given); see fetch.fetch_url for ALLOW_PRIVATE and CANCEL."""
    return fetch.fetch_url(url, url_timeout(timeout), url_byte_cap(max_bytes), allow_private, cancel)


def _open(source, name: str, cap: int) -> Image.Image:
    """Decode an encoded image (a path or a file object), refusing bombs and broken files."""
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > cap:
                raise InputError(
                    f"image {name} is {w}x{h} = {w * h} pixels, over the cap of {cap} "
                    "(FASTVLM_MAX_PIXELS / --max-pixels)"
                )
            im.load()
            return im.copy()
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"image {name} is too large: {e}") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        reason = str(e) or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "not a supported image file"
        raise InputError(f"cannot read image {name}: {reason}") from None


# The decoding rules (README, "Image decoding"). Apple's predict.py decodes with
# Image.open(f).convert("RGB"); where these rules differ from that, the comment says why.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": 16-bit PNGs in older Pillows
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# What Pillow raises on a broken EXIF block: SyntaxError ("not a TIFF file"), struct.error, and
# from malformed tags ZeroDivisionError, IndexError, KeyError, TypeError, ValueError (Pillow
# issues #4215, #5580, #8348, #8605). Nothing else is caught.
EXIF_ERRORS = (SyntaxError, struct.error, ArithmeticError, LookupError, TypeError, ValueError)
EXIF_ORIENTATION = 0x0112


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright as stored); 1 when there is none or it is unreadable."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except EXIF_ERRORS:
        return 1
    return value if value in range(1, 9) else 1


def has_transparency(image: Image.Image) -> bool:
    """An alpha band, a transparent palette entry or a transparent colour key (`transparency`)."""
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _upright(image: Image.Image) -> Image.Image:
    # Rule 1: EXIF orientation is applied. Phone photos are stored sideways with a tag, and a
    # sideways photo is a worse input for the model than this deviation from Apple's decode,
    # which ignores the tag. A broken EXIF block is no reason to refuse the pixels: they are
    # decoded as stored.
    try:
        return ImageOps.exif_transpose(image)
    except EXIF_ERRORS:
        return image


def to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit and float samples -> 8-bit levels (rule 3); any other mode as it is."""
    if image.mode in SIXTEEN_BIT_MODES:
        return _scaled_16_bit(image)
    if image.mode == "F":
        return _clipped_float(image)
    return image


def _scaled_16_bit(image: Image.Image) -> Image.Image:
    # Rule 3: 16-bit samples are scaled (v * 255 / 65535, rounded), as every viewer shows them;
    # Pillow's convert clips them, so all but the darkest 0.4% of the range would be white.
    samples = np.asarray(image).astype(np.int64)
    levels = np.round(np.clip(samples, 0, 65535) * (255 / 65535)).astype(np.uint8)
    key = image.info.get("transparency")  # a 16-bit grey colour key (PNG tRNS): keep it as alpha
    if not isinstance(key, int):
        return Image.fromarray(levels)
    alpha = np.where(samples == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([levels, alpha], axis=-1))  # LA


def _clipped_float(image: Image.Image) -> Image.Image:
    # Rule 3: float samples are 8-bit levels already; clipped to [0, 255] and rounded (Pillow's
    # convert truncates), NaN as black.
    samples = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    return Image.fromarray(np.clip(np.round(samples), 0, 255).astype(np.uint8))


def _onto_white(image: Image.Image) -> Image.Image:
    # Rule 2: transparency is composited onto white, as a browser or image viewer shows it (and
    # qwen-vl-utils' to_rgb does): dark text or a logo on a transparent background stays legible.
    # Apple's decode drops the alpha and shows whatever the encoder stored under transparent
    # pixels, often black, where dark text vanishes. (The square padding stays black: it is the
    # model's mean colour, added later by preprocess_image.)
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded PIL image of any mode -> upright RGB, by the decoding rules above. 16-bit RGB(A)
    PNGs need nothing here: Pillow (13.0, checked) opens them as 8-bit RGB(A) with the high byte,
    floor(v / 256), within one level of the scaled value and equal to it for 8-bit data stored
    as 16 bits (v = 257 x). CMYK, 1-bit and palette images take Pillow's own conversion."""
    image = to_8_bit(_upright(image))
    try:
        if has_transparency(image):
            image = _onto_white(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as e:  # a mode Pillow has no conversion for, such as "La"
        raise InputError(f"cannot convert an image of mode {image.mode} to RGB: {e}") from None


def check_regular_file(path: Path, what: str = "image") -> None:
    """Refuse anything but a regular file, saying what it is (a FIFO or /dev/zero would be read
    for ever, a directory is no image). WHAT names the file's role in the messages."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as e:
        reason = "it is a symlink loop" if e.errno == errno.ELOOP else e.strerror or str(e)
        raise InputError(f"cannot read {what} {path}: {reason}") from None
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise InputError(f"{what} {path} is {kind}, not {'an' if what[0] in 'aeiou' else 'a'} {what} file")


def to_pil(
    image: ImageInput,
    max_pixels: Optional[int] = None,
    timeout: Optional[float] = None,
    max_bytes: Optional[int] = None,
) -> Image.Image:
    """A path, http(s) URL, encoded image bytes, PIL image or HWC numpy array (uint8 RGB(A), or
    float in [0, 1]) -> RGB PIL image, by the decoding rules (`to_rgb`). Images over
    `max_pixels` are refused before decoding."""
    cap = pixel_cap(max_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):  # e.g. a base64 data URL, decoded
        if not len(image):
            raise InputError("cannot read image data: it is empty (0 bytes)")
        image = _open(io.BytesIO(image), "data", cap)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise InputError(f"image array must be HxWx3 (or HxWx4), got shape {arr.shape}")
        if arr.shape[0] * arr.shape[1] > cap:
            raise InputError(f"image array of {arr.shape[1]}x{arr.shape[0]} is over the pixel cap of {cap}")
        if np.issubdtype(arr.dtype, np.floating):
            arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
        elif arr.dtype != np.uint8:
            raise InputError(f"image array must be uint8 or float in [0, 1], got {arr.dtype}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))  # HxWx4: RGBA, rule 2
    if is_url(image):
        image = _open(io.BytesIO(fetch_url(image, timeout, max_bytes)), image, cap)
    elif isinstance(image, (str, Path)):
        path = Path(image)
        check_regular_file(path)
        if path.stat().st_size == 0:
            raise InputError(f"cannot read image {path}: the file is empty (0 bytes)")
        image = _open(path, str(path), cap)
    if not isinstance(image, Image.Image):
        raise InputError(f"unsupported image input of type {type(image).__name__}")
    if image.size[0] * image.size[1] > cap:
        raise InputError(f"image of {image.size[0]}x{image.size[1]} is over the pixel cap of {cap}")
    return to_rgb(image)


def image_digest(image: Image.Image) -> str:
    """A digest of an RGB image's content (its decoded pixels and size), for feature caches."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def preprocess_image(image: ImageInput, size: int) -> np.ndarray:
    """One image -> (size, size, 3) float32 pixels in [0, 1], as the reference computes them."""
    image = to_pil(image)
    w, h = image.size
    side = max(w, h)
    if w != h:
        square = Image.new("RGB", (side, side), (0, 0, 0))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        image = square
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def format_prompt(
    prompt: Union[str, Sequence[dict]],
    num_images: int,
    system: Optional[str] = DEFAULT_SYSTEM,
    add_generation_prompt: bool = True,
) -> str:
    """The reference qwen_2 template, with one `<image>` marker per image.

    `prompt` is the user's text or a list of {"role", "content"} messages. Markers already in
    the text must number `num_images`; otherwise one `<image>\\n` per image goes before the first
    user text.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not messages:
        raise InputError("the prompt is empty")
    if system is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system}] + messages
    markers = sum(str(m.get("content", "")).count(IMAGE_MARKER) for m in messages)
    if markers and markers != num_images:
        raise InputError(f"the prompt has {markers} {IMAGE_MARKER} markers for {num_images} images")
    if not markers and num_images:
        first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if first_user is None:
            raise InputError("the prompt has no user message to attach the images to")
        m = dict(messages[first_user])
        m["content"] = (IMAGE_MARKER + "\n") * num_images + str(m.get("content", ""))
        messages[first_user] = m
    text = "".join(
        f"<|im_start|>{m['role']}\n{m.get('content', '')}<|im_end|>\n" for m in messages
    )
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def check_text(text: str) -> None:
    """Refuse prompt text that is not valid Unicode: a lone surrogate, which the tokenizer cannot
    take, and which is what a command-line argument that is not UTF-8 becomes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the prompt is not valid UTF-8 text (a lone surrogate at character "
                         f"{e.start})") from None


def generation_defaults(path: Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json, as transformers reads
    them: without `do_sample: true` decoding is greedy, whatever temperature the file holds."""
    try:
        cfg = json.loads((Path(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict) or cfg.get("do_sample") is not True:
        return {}
    out = {"temperature": float(cfg.get("temperature", 1.0))}
    for key, cast in (("top_p", float), ("top_k", int), ("min_p", float)):
        if cfg.get(key) is not None:
            out[key] = cast(cfg[key])
    return out


def _is_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(
        isinstance(t, (int, np.integer)) for t in prompt
    )


@dataclass
class Processor:
    """Tokenizer (mlx-lm's TokenizerWrapper) + image preprocessing + the prompt template."""

    tokenizer: object
    image_size: int
    image_token_id: int
    stride: int = 64
    eos_token_ids: List[int] = field(default_factory=list)
    # Sampling defaults of the model (generation_config.json); a caller's options override them.
    generation_defaults: dict = field(default_factory=dict)
    # The checkpoint's AnyRes tiling (tiles.py; None: one square view) and its merge type,
    # which --tiles on a single-view checkpoint follows too.
    tiling: Optional["Tiling"] = None
    patch_merge_type: str = "flat"

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig) -> "Processor":
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        if not (Path(path) / "tokenizer_config.json").is_file() and not (
            Path(path) / "tokenizer.json"
        ).is_file():
            raise InputError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
        # AutoTokenizer reads config.json, whose model_type (ours) transformers does not know,
        # and warns about it; the tokenizer files themselves are standard.
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tokenizer = load_tokenizer(Path(path), eos_token_ids=config.eos_token_id)
        finally:
            hf_logging.set_verbosity(level)
        return cls(
            tokenizer=tokenizer,
            image_size=config.image_size,
            image_token_id=config.image_token_id,
            stride=config.vision_config.stride,
            eos_token_ids=list(config.eos_token_id),
            generation_defaults=generation_defaults(path),
            tiling=checkpoint_tiling(config),
            patch_merge_type=config.mm_patch_merge_type,
        )

    @property
    def stop_token_ids(self) -> frozenset:
        """Every id that ends an answer: the model's EOS ids (`<|im_end|>`, `<|endoftext|>`)
        merged with the tokenizer's own."""
        own = getattr(self.tokenizer, "eos_token_ids", None) or []
        return frozenset(self.eos_token_ids) | frozenset(own)

    @functools.cached_property  # (read on every follow-up turn; the tokenizer does not change)
    def im_end_id(self) -> Optional[int]:
        ids = self.tokenizer.encode("<|im_end|>", add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def prompt_ids(
        self,
        prompt,
        n_images: int,
        size: Optional[int] = None,
        system: Optional[str] = DEFAULT_SYSTEM,
        *,
        image_tokens: Optional[Sequence[int]] = None,
    ) -> List[int]:
        """A conversation's first turn -> ids with the image slots. PROMPT is the user's text
        (default DEFAULT_PROMPT), a list of chat messages, or ids already holding the slots
        (mlx-lm style), which are checked and passed through. IMAGE_TOKENS: each image's slot
        count (`image_tokens`; default tokens_per_image(size) each)."""
        if isinstance(prompt, mx.array):
            prompt = prompt.tolist()
        if image_tokens is None:
            image_tokens = [self.tokens_per_image(size)] * n_images
        if len(image_tokens) != n_images:
            raise ValueError(f"{len(image_tokens)} image token counts for {n_images} images")
        if _is_ids(prompt):
            ids = [int(t) for t in prompt]
            slots = sum(t == self.image_token_id for t in ids)
            want = sum(image_tokens)
            if slots != want:
                raise InputError(f"the prompt ids hold {slots} image slots; {n_images} image(s) need {want}")
            return ids
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            prompt = DEFAULT_PROMPT
        return self.encode(format_prompt(prompt, n_images, system), size, image_tokens)

    def follow_up_ids(self, prompt, history: Sequence[int], size: Optional[int] = None) -> List[int]:
        """A later turn of the conversation HISTORY (the ids already in its KV cache): the user's
        text in the template, the previous answer closed first unless it ended on <|im_end|>;
        or ids to append as they are (a continuation after a rewind). No images."""
        if isinstance(prompt, mx.array):
            prompt = prompt.tolist()
        if _is_ids(prompt):
            if self.image_token_id in prompt:
                raise InputError("follow-up turns cannot add images")
            return [int(t) for t in prompt]
        if not isinstance(prompt, str):
            raise InputError("a follow-up turn takes the user's text or token ids")
        if IMAGE_MARKER in prompt:
            raise InputError("follow-up turns cannot add images")
        closed = bool(history) and history[-1] == self.im_end_id
        text = ("" if closed else "<|im_end|>") + (
            f"\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        )
        return self.encode(text, size)

    def tokens_per_image(self, size: Optional[int] = None) -> int:
        """Image tokens of one square view at SIZE (default the trained resolution)."""
        return ((size or self.image_size) // self.stride) ** 2

    def image_tokens(self, images: Sequence[Image.Image], size: Optional[int] = None,
                     tiling: Optional[Tiling] = None) -> List[int]:
        """Each decoded image's slot count: one square view at SIZE, or with TILING (tiles.py)
        the count its grid, hence its size, gives."""
        if tiling is None:
            return [self.tokens_per_image(size)] * len(images)
        return [tiling.n_tokens(im.size, self.stride) for im in images]

    def pixels(self, images: Sequence[ImageInput], size: Optional[int] = None) -> mx.array:
        """Images -> (N, S, S, 3) float32 pixels, channels-last."""
        size = check_resolution(size or self.image_size, self.stride)
        return mx.array(np.stack([preprocess_image(im, size) for im in images]))

    def encode(self, text: str, size: Optional[int] = None,
               image_tokens: Optional[Sequence[int]] = None) -> List[int]:
        """Prompt text -> ids; the i-th `<image>` becomes image_tokens[i] image slots (default
        tokens_per_image(size) each)."""
        check_text(text)
        chunks = text.split(IMAGE_MARKER)
        if image_tokens is not None and len(image_tokens) != len(chunks) - 1:
            raise InputError(f"the prompt has {len(chunks) - 1} {IMAGE_MARKER} markers for "
                             f"{len(image_tokens)} images")
        ids: List[int] = []
        for i, chunk in enumerate(chunks):
            if i:  # (built per image: a text-only prompt builds no slots, whatever the size)
                ids += [self.image_token_id] * (
                    self.tokens_per_image(size) if image_tokens is None else image_tokens[i - 1])
            if chunk:
                ids += self.tokenizer.encode(chunk, add_special_tokens=False)
        return ids
