"""fastvlm-verify on random-weight checkpoints of both source layouts: it passes on a faithful
conversion, names the part a fault is in, and fails in one line where it cannot run. The
reference's own decode (fastvlm_mlx.reference, `R`; `ref` is the tests' oracle) is checked
without the models."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import fastvlm_mlx.processing as P
import reference as ref
from fastvlm_mlx import reference as R
from fastvlm_mlx import verify as V
from fastvlm_mlx.convert import convert

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "images" / "chelsea.jpg"  # a real photo, not square: the pad matters
TOKENS = "6"


@pytest.fixture(scope="module")
def apple_source(tiny_source, module_tmp):
    """The tiny model in Apple's layout (llava_qwen2 names, no preprocessor_config.json: the
    resolution comes from mm_vision_tower's suffix)."""
    _, src, _ = tiny_source
    path = module_tmp("apple_src")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).exists():
            shutil.copy2(src / f, path / f)
    from safetensors.torch import save_file

    state = {ref.to_apple_key(k): v.contiguous() for k, v in ref.checkpoint_state(src).items()}
    save_file(state, str(path / "model.safetensors"))
    ref.save_json(path / "config.json", ref.apple_config(256, ref.text_config()))
    return path


@pytest.fixture(scope="module")
def sources(tiny_source, apple_source, module_tmp):
    """layout -> (source checkpoint, our float16 conversion of it): what load() caches."""
    out = module_tmp("verify_converted")
    return {
        "transformers": (tiny_source[1], convert(tiny_source[1], out / "hf16", dtype="float16")),
        "apple": (apple_source, convert(apple_source, out / "apple16", dtype="float16")),
    }


@pytest.fixture(scope="module")
def rotated(module_tmp):
    """The photo stored turned anticlockwise, with EXIF orientation 6: shown upright. Apple's
    decode ignores the tag; ours applies it."""
    path = module_tmp("rotated") / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(IMAGE).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    return path


def run(capsys, src, converted, *extra, image=IMAGE):
    rc = V.main(["--model", str(src), "--converted", str(converted), "--image", str(image),
                 "--tokens", TOKENS, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def check_passing_report(report, layout):
    assert report["ok"] and report["diverged"] == [] and report["failures"] == []
    assert report["layout"] == layout and report["resolution"] == 256
    assert set(report["columns"]) == {"float32", "float16"}
    pre = report["preprocessing"]
    assert pre["pixels_max_diff"] == 0.0 and pre["prompt_ok"]
    assert pre["decode_deviations"] == []  # a plain JPEG: Apple's decode, unchanged
    f32, f16 = report["columns"]["float32"], report["columns"]["float16"]
    # float32 agrees with the reference far inside its bounds; float16 is measurably rounded
    for key in ("vision_rel_err", "connector_rel_err", "decoder_rel_err", "e2e_rel_err"):
        assert f32[key] < 1e-5, (key, f32[key])
        assert 1e-5 < f16[key] < 1e-2, (key, f16[key])
    for col in (f32, f16):
        assert col["greedy_agree"] == col["greedy_total"] == int(TOKENS)
        assert col["tokens"] == report["reference_tokens"]
        assert len(set(col["tokens"])) > 2  # the test model does not repeat one token
        assert col["decoder_top1"] and col["decoder_top5"] == 5 and col["ttft_ms"] > 0
    assert report["reference_ttft_ms"] > 0


def test_passes_on_a_transformers_checkpoint(capsys, sources):
    rc, out, err = run(capsys, *sources["transformers"], "--json")
    assert rc == V.EXIT_OK, err
    check_passing_report(json.loads(out), "transformers")
    assert err.strip() == ""  # --json: the report on stdout, nothing else


def test_passes_on_an_apple_checkpoint_and_prints_a_table(sources):
    src, converted = sources["apple"]
    report = V.verify(str(src), str(IMAGE), tokens=int(TOKENS), converted=str(converted))
    check_passing_report(report, "apple")
    table = V.format_table(report)
    for row in ("pixels, max |diff|", "vision         features, rel err", "connector      output",
                "first-step logits", "top-1 / top-5", "greedy tokens", "TTFT", "reference, CPU"):
        assert row in table, row
    assert "timm fastvit_mci3" in table and "float16" in table and "FAIL" not in table
    assert "image decode" in table and "Apple's, Image.open(f).convert('RGB')" in table
    assert V.verdict_line(report) == "verify: OK, every figure within its threshold"


def alter(converted: Path, dst: Path, prefix: str) -> str:
    """A copy of CONVERTED with one tensor under PREFIX scrambled (its values shuffled: what a
    wrong mapping of the same shape looks like). Returns its name."""
    shutil.copytree(converted, dst)
    w = mx.load(str(dst / "model.safetensors"))
    names = sorted(k for k in w if k.startswith(prefix) and w[k].ndim >= 2 and w[k].size >= 1024)
    name = names[len(names) // 2]
    v = np.array(w[name].astype(mx.float32))
    scrambled = np.random.default_rng(0).permutation(v.reshape(-1)).reshape(v.shape)
    w[name] = mx.array(scrambled).astype(w[name].dtype)
    mx.save_safetensors(str(dst / "model.safetensors"), w, metadata={"format": "mlx"})
    return name


@pytest.mark.parametrize("part,prefix", [
    ("vision", "vision_tower."),
    ("connector", "multi_modal_projector."),
    ("decoder", "language_model.model.layers."),
])
def test_an_altered_tensor_is_named(capsys, sources, tmp_path, part, prefix):
    src, converted = sources["transformers"]
    name = alter(converted, tmp_path / "bad", prefix)
    rc, out, err = run(capsys, src, tmp_path / "bad", "--json")
    assert rc == V.EXIT_DIVERGED, err
    report = json.loads(out)
    assert report["diverged"] == [part], (name, report["failures"])
    # the float32 column, converted from the untouched source, still passes
    assert all(f["column"] == "float16" for f in report["failures"]), report["failures"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: diverged: {part};"), err


def faulty_preprocessing(filter=Image.Resampling.BICUBIC, centred=True):
    """Our preprocessing with one fault: another resize filter, or the image pasted at the
    square's corner instead of its centre."""

    def preprocess(image, size):
        im = P.to_pil(image)
        side = max(im.size)
        square = Image.new("RGB", (side, side))
        offset = ((side - im.size[0]) // 2, (side - im.size[1]) // 2) if centred else (0, 0)
        square.paste(im, offset)
        return np.asarray(square.resize((size, size), filter), np.float32) / 255.0

    return preprocess


@pytest.mark.parametrize("fault,rotated_image", [
    (dict(filter=Image.Resampling.BILINEAR), False),
    (dict(centred=False), True),  # a deliberate decode deviation does not hide a real fault
], ids=["bilinear", "corner-pad-rotated"])
def test_a_preprocessing_fault_is_named(capsys, sources, monkeypatch, rotated, fault, rotated_image):
    """Our resize with the wrong filter, or our pad at the wrong offset: only preprocessing is
    named, since every part is fed the reference's own inputs."""
    image = rotated if rotated_image else IMAGE
    bad = faulty_preprocessing(**fault)
    assert np.abs(bad(str(image), 256) - P.preprocess_image(str(image), 256)).max() > 0.05
    monkeypatch.setattr(P, "preprocess_image", bad)
    rc, out, err = run(capsys, *sources["apple"], "--json", image=image)
    assert rc == V.EXIT_DIVERGED, err
    report = json.loads(out)
    assert report["diverged"] == ["preprocessing"], report["failures"]
    assert report["preprocessing"]["pixels_max_diff"] > V.PIXEL_TOL
    assert len(report["preprocessing"]["decode_deviations"]) == int(rotated_image)
    assert err.startswith("error: diverged: preprocessing;")


def test_an_exif_rotated_photo_is_a_reported_deviation_and_passes(sources, rotated):
    src, converted = sources["apple"]
    report = V.verify(str(src), str(rotated), tokens=int(TOKENS), converted=str(converted))
    assert report["ok"], report["failures"]
    pre = report["preprocessing"]
    assert pre["decode_deviations"] == [R.DEVIATION_EXIF.format(6)]
    assert pre["pixels_max_diff"] == 0.0
    table = V.format_table(report)
    assert "with our deliberate deviations: EXIF orientation 6 applied" in table
    assert "FAIL" not in table
    assert '"decode_deviations": ["EXIF orientation 6 applied' in json.dumps(report, default=str)


# --- the two decodes, without the models ------------------------------------------------------


def pixels_apart(image, reference_image):
    """max |our pixels - the reference's| at 256 px, the reference fed REFERENCE_IMAGE."""
    ours = P.preprocess_image(image, 256).transpose(2, 0, 1)[None]
    return float(np.abs(ours - R.reference_pixels(reference_image, 256, {})).max())


def apple_decode(path):
    return Image.open(path).convert("RGB")


def transparent_png(path):
    """The photo with a transparent band (black stored under it) and a half-transparent one."""
    rgba = np.asarray(Image.open(IMAGE).convert("RGBA")).copy()
    rgba[:, :100] = (0, 0, 0, 0)
    rgba[:, 100:200, 3] = 128
    Image.fromarray(rgba).save(path)
    return path


def sixteen_bit_png(path):
    grey = np.asarray(Image.open(IMAGE).convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(path)
    return path


def palette_png(path):
    Image.open(IMAGE).quantize(16).save(path, transparency=0)
    return path


def broken_exif_jpeg(path):
    Image.open(IMAGE).save(path, exif=b"Exif\x00\x00XXXX" + bytes(8), quality=95)
    return path


@pytest.mark.parametrize("make,deviations", [
    (lambda tmp, rot: IMAGE, []),
    (lambda tmp, rot: broken_exif_jpeg(tmp / "b.jpg"), []),  # no rotation on either side
    (lambda tmp, rot: rot, [R.DEVIATION_EXIF.format(6)]),
    (lambda tmp, rot: transparent_png(tmp / "t.png"), [R.DEVIATION_ALPHA]),
    (lambda tmp, rot: palette_png(tmp / "p.png"), [R.DEVIATION_ALPHA]),
    (lambda tmp, rot: sixteen_bit_png(tmp / "g16.png"), [R.DEVIATION_16_BIT]),
], ids=["jpeg", "broken-exif", "exif-rotated", "rgba", "palette-transparent", "16-bit"])
def test_the_reference_decodes_the_file_itself(tmp_path, rotated, make, deviations):
    """Our pixels against the reference's own decode of the same file: equal. Where a
    deviation is named, Apple's plain decode really differs (and would fail the check)."""
    path = make(tmp_path, rotated)
    source, _, ref_image, found = R.decode_image(str(path))
    assert source == str(path) and found == deviations
    assert pixels_apart(str(path), ref_image) == 0.0
    apart = pixels_apart(str(path), apple_decode(path))
    assert (apart > 0.1) if deviations else (apart == 0.0), apart


def test_a_decode_fault_of_ours_is_seen(tmp_path, monkeypatch):
    """The reference decodes (and composites onto white) by itself, so our decode compositing
    onto black shows, where feeding one decoded image to both sides would hide it."""
    path = transparent_png(tmp_path / "t.png")

    def onto_black(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)

    monkeypatch.setattr(P, "_onto_white", onto_black)
    source, _, ref_image, found = R.decode_image(str(path))
    assert found == [R.DEVIATION_ALPHA]
    assert pixels_apart(source, ref_image) > 0.5


def test_a_url_is_fetched_once_and_decoded_both_ways(rotated, monkeypatch):
    data = rotated.read_bytes()
    fetched = []
    monkeypatch.setattr(P, "fetch_url", lambda url, *a, **k: fetched.append(url) or data)
    source, ours, ref_image, found = R.decode_image("https://example.com/rotated.jpg")
    assert fetched == ["https://example.com/rotated.jpg"] and source == data
    assert found == [R.DEVIATION_EXIF.format(6)]
    assert pixels_apart(data, ref_image) == 0.0
    assert P.image_digest(ours) == P.image_digest(P.to_pil(rotated))


def cli(*args, env=None, pre=""):
    code = f"import sys\n{pre}\nfrom fastvlm_mlx.verify import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=120,
    )


def assert_one_line(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_offline_without_the_weights(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "FASTVLM_MLX_CACHE": str(tmp_path / "c")}
    r = cli("--model", "test-org/FastVLM-not-cached", "--image", IMAGE, env=env)
    assert_one_line(r, V.EXIT_NO_WEIGHTS, "test-org/FastVLM-not-cached", "offline", "--model PATH")


# transformers is not among them: mlx-lm (our decoder and tokenizer) depends on it, so the
# package cannot be imported without it, and it is always there.
@pytest.mark.parametrize("missing", ["torch", "timm"])
def test_without_the_reference_packages(missing):
    r = cli("--image", IMAGE, pre=f"sys.modules[{missing!r}] = None")
    assert_one_line(r, V.EXIT_NO_REFERENCE, missing, "not installed", "pip install")
    assert r.returncode not in (V.EXIT_OK, V.EXIT_DIVERGED, V.EXIT_USAGE, V.EXIT_NO_WEIGHTS)


def test_bad_input_is_one_line(capsys, sources, tmp_path):
    src, converted = sources["apple"]
    args = ["--model", str(src), "--converted", str(converted), "--image", str(tmp_path / "no.jpg")]
    assert V.main(args) == V.EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"error: image not found: {tmp_path / 'no.jpg'}"
    # our own converted layout cannot be the reference's source
    assert V.main(["--model", str(converted), "--image", str(IMAGE)]) == V.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--converted" in err and len(err.splitlines()) == 1
    assert V.main(["--model", str(src), "--tokens", "0"]) == V.EXIT_USAGE


def test_a_quantized_conversion_is_judged_on_its_vision_tower(sources, tmp_path):
    src, _ = sources["transformers"]
    q4 = convert(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    report = V.verify(str(src), str(IMAGE), tokens=2, converted=str(q4))
    assert report["ok"], report["failures"]
    col = report["columns"]["float16 q4"]
    assert col["judged"] is False and col["vision_rel_err"] < 1e-2
    assert "not judged" not in V.format_table(report) and "quantized" in V.format_table(report)


def test_near_ties_are_not_faults():
    near = np.array([5.0, 4.999, 1.0, 0.5, 0.2, 0.1, -1.0, -2.0])
    tie = V.tie_margin(near, 1e-3)
    assert 1e-3 < tie < 0.1
    swapped = near[[1, 0, 2, 3, 4, 5, 6, 7]]
    assert V.topk_check(swapped, near, 1, tie) == (0, True)  # either choice is right
    clear = np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1, -1.0, -2.0])
    other = clear.copy()
    other[2] = 6.0  # our first choice is not the reference's clear winner
    assert V.topk_check(other, clear, 1, tie) == (0, False)
    assert V.topk_check(other, clear, 5, tie) == (5, True)
    lost = clear.copy()
    lost[0] = -5.0  # the reference's clear first place falls out of our top 5
    assert V.topk_check(lost, clear, 5, tie) == (4, False)
