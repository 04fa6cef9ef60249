"""AnyRes tiles (tiles.py) against a PyTorch reference written here from Apple's code
(ml-fastvlm: `process_anyres_image` and its helpers in llava/mm_utils.py, the merge of
`prepare_inputs_labels_for_multimodal` and `unpad_image` in llava/model/llava_arch.py), around
transformers' FastVLM tower, connector and decoder. Each view is preprocessed by transformers'
CLIPImageProcessor set up as Apple's MobileCLIP tower sets it up.

The tiled checkpoints are small: 128 px tiles of the tiny tower (2 x 2 features each), so that
a grid of 2 x 2 tiles is a 4 x 4 feature map, which unpadding visibly cuts.
"""

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

import fastvlm_mlx
import reference as ref
from fastvlm_mlx.convert import ConvertError, convert
from fastvlm_mlx.generate import image_features, prepare_request
from fastvlm_mlx.timing import Timings
from test_convert import assert_one_line_error, copy_tokenizer
from test_convert import run_cli as convert_cli
from test_model import TOL

TILE = 128
PINPOINTS = [[128, 256], [256, 128], [256, 256]]
# Images whose grid differs: (width, height) -> (columns, rows) by Apple's best resolution.
IMAGES = {"wide": ((400, 150), (2, 1)), "tall": ((250, 400), (2, 2)), "tiny": ((40, 30), (1, 2))}
PROMPT = "Describe the image."


# ---------------------------------------------------------------------------------------------
# The reference (Apple's rules, in PyTorch / PIL)


def clip_processor(tile):
    """Apple's MobileCLIPVisionTower.image_processor."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(crop_size={"height": tile, "width": tile}, image_mean=[0.0, 0.0, 0.0],
                              image_std=[1.0, 1.0, 1.0], size={"shortest_edge": tile})


def ref_best_resolution(size, pinpoints):
    ow, oh = size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        s = min(w / ow, h / oh)
        eff = min(int(ow * s) * int(oh * s), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def ref_views(image: Image.Image, pinpoints, tile) -> torch.Tensor:
    """process_anyres_image: the global view, then the tiles of the resized and padded image,
    each through the CLIP processor; (views, 3, tile, tile)."""
    tw, th = ref_best_resolution(image.size, pinpoints)
    ow, oh = image.size
    if tw / ow < th / oh:
        nw, nh = tw, min(math.ceil(oh * (tw / ow)), th)
    else:
        nw, nh = min(math.ceil(ow * (th / oh)), tw), th
    padded = Image.new("RGB", (tw, th), (0, 0, 0))
    padded.paste(image.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [padded.crop((x, y, x + tile, y + tile)) for y in range(0, th, tile) for x in range(0, tw, tile)]
    views = [image.resize((tile, tile))] + tiles
    proc = clip_processor(tile)
    return torch.stack([proc.preprocess(v, return_tensors="pt")["pixel_values"][0] for v in views])


def ref_unpad(t: torch.Tensor, size) -> torch.Tensor:
    """unpad_image on a (C, H, W) feature map."""
    ow, oh = size
    h, w = t.shape[1:]
    if ow / oh > w / h:
        new_h = int(oh * (w / ow))
        pad = (h - new_h) // 2
        return t[:, pad:h - pad, :]
    new_w = int(ow * (h / oh))
    pad = (w - new_w) // 2
    return t[:, :, pad:w - pad]


def ref_merge(feats: torch.Tensor, size, pinpoints, tile, merge, newline, control=None):
    """The merge of prepare_inputs_labels_for_multimodal for one image's projected features
    (views, g * g, d). CONTROL breaks one rule on purpose: "tile_order" (the first two tiles
    swapped), "newline_first" (the newline at each row's start)."""
    if control == "tile_order":
        feats = feats[[0, 2, 1] + list(range(3, feats.shape[0]))]
    if merge == "flat":
        return feats.flatten(0, 1)
    base, tiles = feats[0], feats[1:]
    g = math.isqrt(base.shape[0])
    w, h = ref_best_resolution(size, pinpoints)
    cols, rows = w // tile, h // tile
    tiles = tiles.view(rows, cols, g, g, -1)
    if merge == "spatial_unpad":
        t = tiles.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        t = ref_unpad(t, size)
        nl = newline[:, None, None].expand(*t.shape[:-1], 1)
        t = torch.cat((nl, t) if control == "newline_first" else (t, nl), dim=-1)
        t = t.flatten(1, 2).transpose(0, 1)
    else:
        t = tiles.permute(0, 2, 1, 3, 4).flatten(0, 3)
    return torch.cat((base, t), dim=0)


@torch.no_grad()
def ref_logits(model, ids, slot, image, pinpoints, tile, merge, newline, control=None):
    """Reference logits: IDS with the image's merged features in place of the slot run
    (SLOT: the image-token id of IDS)."""
    views = ref_views(image, pinpoints, tile)
    feats = model.get_image_features(pixel_values=views).pooler_output
    merged = ref_merge(feats, image.size, pinpoints, tile, merge, newline, control)
    slots = [i for i, t in enumerate(ids) if t == slot]
    first, last = slots[0], slots[-1]
    embed = model.get_input_embeddings()
    emb = torch.cat([embed(torch.tensor(ids[:first])), merged, embed(torch.tensor(ids[last + 1:]))])
    return model(inputs_embeds=emb[None]).logits[0].float().numpy(), merged.shape[0]


def ours_logits(model, processor, image, **options):
    """Logits along stream_generate's own path: prepare_request -> image_features -> splice."""
    req = prepare_request(model, processor, PROMPT, [image], None, **options)
    feats = image_features(model, req.images, req.size, None, Timings(), tiling=req.tiling)
    emb = model.embed(mx.array([req.ids]), feats)
    fed = mx.array([[0 if t == processor.image_token_id else t for t in req.ids]])
    return np.array(model.language_model(fed, input_embeddings=emb)[0]), req


def sample_image(name, seed=0):
    (w, h), _ = IMAGES[name]
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# Tiled checkpoints


def newline_vector(hidden=64, seed=3):
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * 0.5


def write_tiled(path: Path, tiny_source, merge, layout="apple", dtype=torch.float32,
                pinpoints=PINPOINTS, tile=TILE, newline=True, **settings) -> Path:
    """The tiny checkpoint as a tiled one: image_aspect_ratio anyres, PINPOINTS, MERGE, and
    (with NEWLINE) a learned model.image_newline, in Apple's or transformers' layout."""
    from safetensors.torch import save_file

    _, src, _ = tiny_source
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.checkpoint_state(src).items()}
    image_settings = {"image_aspect_ratio": "anyres", "image_grid_pinpoints": pinpoints,
                      "mm_patch_merge_type": merge, **settings}
    if layout == "apple":
        copy_tokenizer(src, path)
        state = {ref.to_apple_key(k): v for k, v in state.items()}
        cfg = {**ref.apple_config(tile, ref.text_config()), **image_settings}
    else:
        shutil.copytree(src, path, ignore=shutil.ignore_patterns("*.safetensors*"))
        cfg = {**json.loads((src / "config.json").read_text()), **image_settings}
        ref.save_json(path / "preprocessor_config.json", {"crop_size": {"height": tile, "width": tile}})
    if newline:
        state["model.image_newline"] = newline_vector().to(dtype)
    ref.save_json(path / "config.json", cfg)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=["spatial_unpad", "flat", "spatial"])
def tiled(request, tiny_source, module_tmp):
    merge = request.param
    base = module_tmp(f"tiled_{merge}")
    src = write_tiled(base / "src", tiny_source, merge, newline=merge == "spatial_unpad")
    out = convert(src, base / "mlx", dtype="float32")
    return merge, fastvlm_mlx.load(out)


# ---------------------------------------------------------------------------------------------
# Parity with the reference


@pytest.mark.parametrize("name", list(IMAGES))
def test_tiled_checkpoint_matches_the_reference(tiled, tiny_source, name):
    merge, (model, processor) = tiled
    ref_model, _, ids = tiny_source
    image = sample_image(name)
    (size, grid) = IMAGES[name]
    assert processor.tiling.grid(size) == grid == (lambda r: (r[0] // TILE, r[1] // TILE))(
        ref_best_resolution(size, PINPOINTS))
    got, req = ours_logits(model, processor, image)
    expected, n_rows = ref_logits(ref_model, req.ids, processor.image_token_id, image, PINPOINTS,
                                  TILE, merge, newline_vector())
    assert req.n_image_tokens == n_rows  # the exact image-token count, by the reference's merge
    err = ref.rel_err(got, expected)
    print(f"{merge} {name}: {n_rows} image tokens, rel err {err:.2e}")
    assert err <= TOL
    if merge == "flat":
        return
    # Controls: a reference that breaks the tile order, or puts the newline at the rows' start,
    # is far from ours; so this test fails if ours breaks either rule.
    for control in ("tile_order", "newline_first") if merge == "spatial_unpad" else ("tile_order",):
        if control == "tile_order" and grid[0] * grid[1] < 2:
            continue
        wrong, _ = ref_logits(ref_model, req.ids, processor.image_token_id, image, PINPOINTS, TILE,
                              merge, newline_vector(), control)
        assert ref.rel_err(got, wrong) > 100 * TOL, control


def test_image_token_counts_follow_the_grid_and_the_unpadding():
    """By hand from Apple's rules: g = 128 / 64 = 2 features a side per view."""
    from fastvlm_mlx.tiles import Tiling

    unpad = Tiling(tuple(map(tuple, PINPOINTS)), TILE, "spatial_unpad")
    flat = Tiling(tuple(map(tuple, PINPOINTS)), TILE, "flat")
    # wide 400x150 -> 2x1 tiles, a 2x4 map: int(150 * 4/400) = 1 row of image, pad (2-1)//2 = 0,
    # so both rows stay: 4 + 2 * (4 + 1) = 14. tall 250x400 -> 2x2, a 4x4 map: int(250 * 4/400)
    # = 2 columns, pad 1 each side: 4 + 4 * (2 + 1) = 16. tiny 40x30 -> 1x2, a 4x2 map:
    # int(30 * 2/40) = 1 row, pad 1: 4 + 2 * 3 = 10.
    assert [unpad.n_tokens(IMAGES[n][0], 64) for n in ("wide", "tall", "tiny")] == [14, 16, 10]
    assert [flat.n_tokens(IMAGES[n][0], 64) for n in ("wide", "tall", "tiny")] == [12, 20, 12]


def test_views_equal_the_reference_preprocessing():
    from fastvlm_mlx.tiles import Tiling

    tiling = Tiling(tuple(map(tuple, PINPOINTS)), TILE)
    for name in IMAGES:
        image = sample_image(name, seed=4)
        got = tiling.views(image).transpose(0, 3, 1, 2)
        expected = ref_views(image, PINPOINTS, TILE).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# --tiles on a single-view checkpoint


def test_runtime_tiles_match_the_reference(tiny_loaded, tiny_source):
    """tiles=(2, 1) at 128 px on the 256 px single-view model: Apple's rules with the one
    candidate 256 x 128, the global view first, merged flat (the checkpoint's merge)."""
    model, processor = tiny_loaded
    ref_model, _, _ = tiny_source
    image = sample_image("tall")
    with pytest.warns(UserWarning, match="differs from the model's trained 256"):
        got, req = ours_logits(model, processor, image, tiles=(2, 1), tile_size=128)
    assert req.n_image_tokens == 3 * 4 and req.tiling.merge == "flat"
    expected, n_rows = ref_logits(ref_model, req.ids, processor.image_token_id, image,
                                  [[256, 128]], 128, "flat", None)
    assert n_rows == 12 and ref.rel_err(got, expected) <= TOL
    wrong, _ = ref_logits(ref_model, req.ids, processor.image_token_id, image, [[256, 128]], 128,
                          "flat", None, "tile_order")
    assert ref.rel_err(got, wrong) > 100 * TOL


# ---------------------------------------------------------------------------------------------
# The converter and the loader


@pytest.mark.parametrize("layout", ["apple", "transformers"])
def test_bfloat16_tiled_checkpoint_round_trips_with_its_newline(tiny_source, tmp_path, layout):
    """Apple releases bfloat16: the settings and image_newline survive the conversion (to
    float32 exactly), in either layout, pinpoints in the string form too."""
    src = write_tiled(tmp_path / "src", tiny_source, "spatial_unpad", layout, torch.bfloat16,
                      pinpoints=str([tuple(p) for p in PINPOINTS]))
    out = convert(src, tmp_path / "out", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["image_aspect_ratio"], cfg["image_grid_pinpoints"], cfg["mm_patch_merge_type"]) == (
        "anyres", PINPOINTS, "spatial_unpad")
    assert cfg["image_size"] == TILE
    model, processor = fastvlm_mlx.load(out)
    expected = newline_vector().to(torch.bfloat16).float().numpy()
    assert model.image_newline.dtype == mx.float32
    np.testing.assert_array_equal(np.array(model.image_newline), expected)
    assert processor.tiling.pinpoints == tuple(map(tuple, PINPOINTS))
    # converted again (our own layout), nothing changes
    again = convert(out, tmp_path / "again", dtype="float32")
    assert json.loads((again / "config.json").read_text()) == cfg
    np.testing.assert_array_equal(np.array(fastvlm_mlx.load(again)[0].image_newline), expected)


BAD_SETTINGS = [
    (dict(image_aspect_ratio="square"), "image_aspect_ratio 'square' is not supported"),
    (dict(image_aspect_ratio="anyres_max_9"), "LLaVA-OneVision"),
    (dict(mm_patch_merge_type="unpad"), "mm_patch_merge_type 'unpad' is not supported"),
    (dict(mm_use_im_start_end=True), "mm_use_im_start_end"),
    (dict(image_grid_pinpoints=[[128, 200]]), "not a whole number of 128 px tiles"),
    (dict(image_grid_pinpoints="[(128, 256), oops]"), "not a list of [width, height] pairs"),
    (dict(image_grid_pinpoints=None), "needs image_grid_pinpoints"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS)
def test_settings_that_cannot_run_are_refused_in_one_line(tiny_source, tmp_path, settings, message):
    src = write_tiled(tmp_path / "src", tiny_source, "spatial_unpad")
    cfg = json.loads((src / "config.json").read_text())
    ref.save_json(src / "config.json", {k: v for k, v in {**cfg, **settings}.items() if v is not None})
    with pytest.raises(ConvertError, match=message.replace("[", r"\[").replace("(", r"\(")) as e:
        convert(src, tmp_path / "out", dtype="float32")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_newline_the_merge_needs_is_required(tiny_source, tmp_path):
    src = write_tiled(tmp_path / "src", tiny_source, "spatial_unpad", newline=False)
    with pytest.raises(ConvertError, match="missing tensor 'image_newline'"):
        convert(src, tmp_path / "out", dtype="float32")


def test_cli_and_loader_refuse_in_one_line(tiny_source, tmp_path):
    src = write_tiled(tmp_path / "src", tiny_source, "spatial_unpad", mm_patch_merge_type="spatial_x")
    assert_one_line_error(convert_cli("--model", src, "--out", tmp_path / "o"),
                          "mm_patch_merge_type 'spatial_x' is not supported")
    # a converted model whose config.json was edited afterwards
    good = convert(write_tiled(tmp_path / "good", tiny_source, "flat", newline=False),
                   tmp_path / "mlx", dtype="float32")
    cfg = json.loads((good / "config.json").read_text())
    ref.save_json(good / "config.json", {**cfg, "image_aspect_ratio": "anyres_max_4"})
    from fastvlm_mlx.config import ModelLoadError

    with pytest.raises(ModelLoadError, match="anyres_max_4' is not supported") as e:
        fastvlm_mlx.load(good)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# --tiles in every entry point (the tiny 256 px single-view model, 128 px tiles)

pytestmark_tiles = pytest.mark.filterwarnings("ignore:resolution 128 differs")
TILES = dict(tiles=(2, 1), tile_size=128)


@pytest.fixture(scope="module")
def wide_png(module_tmp):
    path = module_tmp("tiles") / "wide.png"
    sample_image("wide", seed=9).save(path)
    return path


@pytestmark_tiles
def test_generate_cli_takes_tiles_and_refuses_bad_ones_in_one_line(tiny_converted, tiny_loaded, wide_png):
    from test_generate import run_cli

    r = run_cli("--model", tiny_converted, "--image", wide_png, "--tiles", "2x1", "--tile-size", "128",
                "--max-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    api = fastvlm_mlx.generate(*tiny_loaded, None, [wide_png], max_tokens=4, **TILES)
    assert out["image_tokens"] == api.image_tokens == 12 and out["resolution"] == 128
    assert out["token_ids"] == api.token_ids
    for flags, needle in ((["--tiles", "0x2"], "is not a grid"), (["--tiles", "big"], "is not a grid"),
                          (["--tiles", "2x2", "--tile-size", "100"], "multiple of 64"),
                          (["--tile-size", "128"], "tile_size needs tiles")):
        r = run_cli("--model", tiny_converted, "--image", wide_png, *flags, "--max-tokens", "2")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], r.stderr


@pytestmark_tiles
def test_feature_cache_keys_hold_the_tiling_and_vision_covers_every_view(tiny_loaded, wide_png):
    from fastvlm_mlx.feature_cache import FeatureCache

    model, processor = tiny_loaded
    cache = FeatureCache()
    one = fastvlm_mlx.generate(model, processor, None, [wide_png], max_tokens=2, resolution=128,
                               feature_cache=cache)
    tiled = fastvlm_mlx.generate(model, processor, None, [wide_png], max_tokens=2, feature_cache=cache,
                                 **TILES)
    assert not tiled.feature_cache_hit and tiled.timings.vision_ms > 0  # not the single view's
    assert (one.image_tokens, tiled.image_tokens) == (4, 12)
    again = fastvlm_mlx.generate(model, processor, None, [wide_png], max_tokens=2, feature_cache=cache,
                                 **TILES)
    assert again.feature_cache_hit and again.timings.vision_ms == 0
    assert again.token_ids == tiled.token_ids
    other = fastvlm_mlx.generate(model, processor, None, [wide_png], max_tokens=2, feature_cache=cache,
                                 tiles=(1, 2), tile_size=128)
    assert not other.feature_cache_hit
    assert len(cache) == 3


@pytestmark_tiles
def test_batch_with_and_without_tiles_equals_each_alone(tiny_loaded, wide_png):
    from fastvlm_mlx.batch import RunningBatch, batch_generate

    model, processor = tiny_loaded
    tall = sample_image("tall", seed=2)
    solo = [fastvlm_mlx.generate(model, processor, None, [im], max_tokens=4, feature_cache=False, **TILES)
            for im in (wide_png, tall)]
    got = batch_generate(model, processor, [None, None], [[wide_png], [tall]], max_tokens=4,
                         feature_cache=False, **TILES)
    assert [r.token_ids for r in got] == [r.token_ids for r in solo]
    assert [r.image_tokens for r in got] == [12, 12]
    # one batch, one request tiled and one not
    batch = RunningBatch(model, processor, feature_cache=False)
    handles = [batch.add(None, [wide_png], max_tokens=4, **TILES), batch.add(None, [tall], max_tokens=4)]
    streams = {h: [] for h in handles}
    while len(batch):
        for h, r in batch.step().items():
            streams[h].append(r)
    plain = fastvlm_mlx.generate(model, processor, None, [tall], max_tokens=4, feature_cache=False)
    results = [fastvlm_mlx.generate.collect(iter(streams[h])) for h in handles]
    assert [r.token_ids for r in results] == [solo[0].token_ids, plain.token_ids]
    assert [r.image_tokens for r in results] == [12, 16]


@pytestmark_tiles
def test_chat_session_with_tiles(tiny_loaded, wide_png):
    from fastvlm_mlx.chat import ChatSession

    model, processor = tiny_loaded
    session = ChatSession(model, processor, [wide_png], max_tokens=4, **TILES)
    first = session.generate("What is this?")
    assert first.image_tokens == 12
    assert first.token_ids == fastvlm_mlx.generate(model, processor, "What is this?", [wide_png],
                                                   max_tokens=4, **TILES).token_ids
    second = session.generate("And then?")
    assert second.token_ids and len(session.history) > first.prompt_tokens + len(first.token_ids)
    from fastvlm_mlx.processing import InputError

    with pytest.raises(InputError, match="is not a grid"):
        ChatSession(model, processor, [wide_png], tiles=(9, 1))


@pytestmark_tiles
def test_server_tiles_extension_field(tiny_loaded, wide_png):
    from fastvlm_mlx.server import create_app
    from test_server import KEY, LiveServer, data_url, user

    model, processor = tiny_loaded
    server = LiveServer(create_app(model, processor, model_id="tiny", api_key=KEY, tile_size=128))
    try:
        msgs = [user("What is this?", data_url(wide_png.read_bytes()))]
        want = fastvlm_mlx.generate(model, processor, "What is this?", [wide_png], max_tokens=4,
                                    feature_cache=False, **TILES)
        for tiles in ("2x1", [2, 1]):
            r = server.post({"messages": msgs, "max_tokens": 4, "tiles": tiles})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["image_tokens"] == 12
            assert body["choices"][0]["message"]["content"] == want.text
        plain = server.post({"messages": msgs, "max_tokens": 4})
        assert plain.status_code == 200 and plain.json()["usage"]["image_tokens"] == 16
        for bad in ("0x1", "2by2", [2, 2, 2], 3):
            r = server.post({"messages": msgs, "max_tokens": 4, "tiles": bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
    finally:
        server.close()
