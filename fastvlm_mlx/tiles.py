"""AnyRes tiles: an image as a global view and tiles, each encoded at the tower's resolution.

The rules are those of Apple's code (ml-fastvlm, `llava/mm_utils.py` and
`llava/model/llava_arch.py`), which a checkpoint trained with `image_aspect_ratio: "anyres"`
expects, and which `--tiles` applies to a single-view checkpoint:

1. the grid: of the candidate resolutions (`image_grid_pinpoints`, (width, height) pairs, each a
   multiple of the tile size), the one that keeps the most of the image's pixels once it is
   scaled to fit (scale = min(W / w, H / h), sizes truncated), ties to the least padding;
2. the image resized (bicubic) to fit that resolution, keeping its aspect (the scaled side
   rounded up, capped at the target), pasted at floor((target - size) / 2) on black;
3. cut into non-overlapping tiles of the tile size, in raster order (row by row, left to right);
4. the global view: the whole image resized (bicubic) to tile x tile, squashed, not padded; it is
   the first view, the tiles follow;
5. each view's features (row-major, (tile / 64)^2 of them) projected by the connector, then
   merged (`mm_patch_merge_type`):
   - `flat`: every view's rows in view order (global first);
   - `spatial`: the global view's rows, then the tiles' rows laid out as one feature map of
     (rows x g) x (cols x g) cells, read row-major across tiles;
   - `spatial_unpad`: as `spatial`, but the map first loses the rows (or columns) that are the
     padding of step 2, by the image's original size (sizes truncated, the cut split evenly, an
     odd cell kept), and every row of the map ends with the learned `image_newline` vector.

A Tiling is this whole recipe; `None` where one is expected means the single square view
(`image_aspect_ratio: "pad"`, processing.preprocess_image).
"""

import ast
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

# What Apple's code runs; anything else is refused when a model is converted or loaded.
ASPECT_RATIOS = ("pad", "anyres")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
MAX_GRID = 8  # tiles per side for --tiles: 8x8 of the smallest tile is already 4096 image tokens

Size = Tuple[int, int]  # (width, height), as PIL and Apple's code give sizes


class TilingError(ValueError):
    """A tiling setting that cannot be run; the message says why in one line."""


# ---------------------------------------------------------------------------------------------
# The settings (a checkpoint's config, the --tiles option)


def parse_pinpoints(value) -> Tuple[Size, ...]:
    """`image_grid_pinpoints` as Apple's configs hold it: a list of [width, height] pairs, or the
    same list as a string (Apple's code reads it with ast.literal_eval)."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise TilingError(f"image_grid_pinpoints {value!r} is not a list of [width, height] pairs") from None
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p)
        for p in value)
    if not ok:
        raise TilingError(f"image_grid_pinpoints {value!r} is not a list of [width, height] pairs "
                          "of positive whole numbers")
    return tuple((int(w), int(h)) for w, h in value)


def check_settings(image_aspect_ratio, image_grid_pinpoints, mm_patch_merge_type, image_size: int,
                   mm_use_im_start_end=False):
    """A config's image settings, checked and normalized: (aspect ratio, pinpoints as lists or
    None, merge type). Refuses, in one line, what this runtime cannot run as Apple's code does."""
    if mm_use_im_start_end:
        raise TilingError("mm_use_im_start_end: true (<im_start>/<im_end> around each image) is "
                          "not supported; Apple's FastVLM checkpoints do not use it")
    aspect = "pad" if image_aspect_ratio is None else image_aspect_ratio
    if aspect not in ASPECT_RATIOS:
        if isinstance(aspect, str) and aspect.startswith("anyres_max"):
            why = "LLaVA-OneVision's tiling, which Apple's FastVLM code does not have"
        else:
            why = "Apple's FastVLM code pads to a square ('pad') or tiles ('anyres')"
        raise TilingError(f"image_aspect_ratio {aspect!r} is not supported: {why}")
    merge = "flat" if mm_patch_merge_type is None else mm_patch_merge_type
    if merge not in MERGE_TYPES:
        raise TilingError(f"mm_patch_merge_type {merge!r} is not supported: one of "
                          f"{', '.join(MERGE_TYPES)}")
    if aspect != "anyres":
        return aspect, None, merge
    if image_grid_pinpoints is None:
        raise TilingError("image_aspect_ratio 'anyres' needs image_grid_pinpoints")
    pinpoints = parse_pinpoints(image_grid_pinpoints)
    bad = [p for p in pinpoints if p[0] % image_size or p[1] % image_size]
    if bad:
        raise TilingError(f"image_grid_pinpoints {list(bad[0])} is not a whole number of "
                          f"{image_size} px tiles (the tower's resolution)")
    return aspect, [list(p) for p in pinpoints], merge


def parse_grid(value) -> Tuple[int, int]:
    """--tiles / tiles=: "2x2" (columns x rows), or a (columns, rows) pair."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        try:
            value = tuple(int(p) for p in parts) if len(parts) == 2 else None
        except ValueError:
            value = None
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= MAX_GRID
        for v in value)
    if not ok:
        raise TilingError(f"tiles {value!r} is not a grid: give columns x rows, such as 2x2 "
                          f"(each 1 to {MAX_GRID})")
    return int(value[0]), int(value[1])


# ---------------------------------------------------------------------------------------------
# The geometry


def select_best_resolution(size: Size, candidates: Sequence[Size]) -> Size:
    """The candidate that keeps the most of the image's pixels once it is scaled to fit, ties to
    the least padding (the first such, in the candidates' order)."""
    w, h = size
    best, kept_best, waste_best = None, 0, math.inf
    for cw, ch in candidates:
        scale = min(cw / w, ch / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = cw * ch - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (cw, ch), kept, waste
    return best


def resize_and_pad(image: Image.Image, target: Size) -> Image.Image:
    """IMAGE scaled (bicubic) to fit TARGET with its aspect kept, centred on black."""
    w, h = image.size
    tw, th = target
    sw, sh = tw / w, th / h
    if sw < sh:
        nw, nh = tw, min(math.ceil(h * sw), th)
    else:
        nw, nh = min(math.ceil(w * sh), tw), th
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def split_tiles(image: Image.Image, tile: int):
    """Non-overlapping TILE x TILE crops in raster order."""
    w, h = image.size
    return [image.crop((x, y, x + tile, y + tile)) for y in range(0, h, tile) for x in range(0, w, tile)]


def unpadded_window(map_size: Tuple[int, int], size: Size) -> Tuple[int, int, int, int]:
    """The cells (top, bottom, left, right) of a MAP_SIZE (rows, columns) feature map of a padded
    image that hold the image of original SIZE (width, height) and not the padding."""
    rows, cols = map_size
    w, h = size
    if w / h > cols / rows:  # wider than the map: padding above and below
        pad = (rows - int(h * (cols / w))) // 2
        return pad, rows - pad, 0, cols
    pad = (cols - int(w * (rows / h))) // 2
    return 0, rows, pad, cols - pad


# ---------------------------------------------------------------------------------------------
# The recipe


@dataclass(frozen=True)
class Tiling:
    """How an image becomes views and its views' features one sequence (module docstring)."""

    pinpoints: Tuple[Size, ...]  # candidate (width, height) resolutions, multiples of tile_size
    tile_size: int  # every view's resolution
    merge: str = "flat"  # mm_patch_merge_type

    @property
    def key(self) -> tuple:
        """What the views depend on (the merge comes after any feature cache)."""
        return ("tiles", self.pinpoints, self.tile_size)

    def grid(self, size: Size) -> Tuple[int, int]:
        """(columns, rows) of tiles for an image of SIZE (width, height)."""
        w, h = select_best_resolution(size, self.pinpoints)
        return w // self.tile_size, h // self.tile_size

    def views(self, image: Image.Image) -> np.ndarray:
        """An RGB image -> (1 + columns x rows, tile, tile, 3) float32 pixels in [0, 1]: the
        global view, then the tiles."""
        t = self.tile_size
        padded = resize_and_pad(image, select_best_resolution(image.size, self.pinpoints))
        views = [image.resize((t, t), Image.Resampling.BICUBIC)] + split_tiles(padded, t)
        return np.stack([np.asarray(v, dtype=np.float32) for v in views]) / np.float32(255.0)

    def n_tokens(self, size: Size, stride: int) -> int:
        """Image tokens for an image of SIZE: (tile / stride)^2 per view, or with spatial_unpad
        the global view's and the unpadded map's, one newline per row."""
        g = self.tile_size // stride
        cols, rows = self.grid(size)
        if self.merge != "spatial_unpad":
            return (1 + cols * rows) * g * g
        top, bottom, left, right = unpadded_window((rows * g, cols * g), size)
        return g * g + (bottom - top) * (right - left + 1)

    def merge_features(self, features, size: Size, newline=None):
        """Projected features of one image's views, (views, g * g, d) as mx.array -> the image's
        rows (n_tokens, d) in prompt order."""
        import mlx.core as mx

        n_views, n, d = features.shape
        if self.merge == "flat":
            return features.reshape(-1, d)
        cols, rows = self.grid(size)
        g = math.isqrt(n)
        if n_views != 1 + cols * rows or g * g != n:
            raise ValueError(f"{n_views} views of {n} features do not make a {cols}x{rows} grid")
        fmap = features[1:].reshape(rows, cols, g, g, d).transpose(0, 2, 1, 3, 4)
        fmap = fmap.reshape(rows * g, cols * g, d)
        if self.merge == "spatial_unpad":
            top, bottom, left, right = unpadded_window((rows * g, cols * g), size)
            fmap = fmap[top:bottom, left:right]
            ends = mx.broadcast_to(newline.astype(fmap.dtype), (fmap.shape[0], 1, d))
            fmap = mx.concatenate([fmap, ends], axis=1)
        return mx.concatenate([features[0], fmap.reshape(-1, d)])


def checkpoint_tiling(config) -> Optional[Tiling]:
    """The tiling a converted model was trained with (None: one square view)."""
    if config.image_aspect_ratio != "anyres":
        return None
    return Tiling(tuple(tuple(p) for p in config.image_grid_pinpoints), config.image_size,
                  config.mm_patch_merge_type)


def runtime_tiling(tiles, tile_size: int, merge: str = "flat") -> Tiling:
    """--tiles COLSxROWS at TILE_SIZE: one fixed grid (Apple's rules with one candidate)."""
    cols, rows = parse_grid(tiles)
    return Tiling(((cols * tile_size, rows * tile_size),), tile_size, merge)
