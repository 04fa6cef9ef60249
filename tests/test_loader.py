"""fastvlm_mlx.load on a converted directory: the loaded model computes what transformers does."""

import mlx.core as mx
import numpy as np
import pytest

import fastvlm_mlx
import reference as ref
from conftest import reference_logits
from fastvlm_mlx.config import ModelLoadError


def test_load_converted_matches_reference(tiny_source, tiny_loaded):
    model_ref, _, ids = tiny_source
    model, processor = tiny_loaded
    assert processor.image_size == 256 and processor.tokens_per_image() == 16
    text = "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    input_ids = processor.encode(text)
    assert input_ids.count(ids[ref.IMAGE]) == 16
    # transformers' own tokenization of the expanded prompt gives the same ids
    expanded = text.replace("<image>", "<image>" * 16)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_source[1]))
    assert tok(expanded, add_special_tokens=False)["input_ids"] == input_ids
    image = np.random.default_rng(41).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x = (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
    expected = reference_logits(model_ref, [input_ids], x)
    got = model(mx.array([input_ids]), processor.pixels([image]))
    assert ref.rel_err(np.array(got), expected) <= 1e-4


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_load_with_dtype(tiny_converted, dtype):
    model, _ = fastvlm_mlx.load(tiny_converted, dtype=dtype)
    assert model.vision_tower.stem[0].reparam_conv.weight.dtype == dtype
    assert model.language_model.model.embed_tokens.weight.dtype == dtype


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="is empty"):
        fastvlm_mlx.load(tmp_path)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="no config.json"):
        fastvlm_mlx.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        fastvlm_mlx.load(tmp_path)


def test_missing_weights_are_named(tiny_converted, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_converted, d)
    w = mx.load(str(d / "model.safetensors"))
    del w["language_model.model.norm.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), w)
    with pytest.raises(ModelLoadError, match=r"missing tensor 'language_model\.model\.norm\.weight'"):
        fastvlm_mlx.load(d)


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend's default")
def test_clis_run_float32_on_the_cpu(tiny_source, tmp_path):
    """A float16 model run by the generate CLI on MLX's CPU computes in float32 (its half
    precision matmul is slow): its logprobs are the float32 load's, to float32 rounding, and
    not the float16 load's; --dtype float16 gives those."""
    import json
    import subprocess
    import sys

    from fastvlm_mlx.convert import convert
    from fastvlm_mlx.generate import generate

    f16 = convert(tiny_source[1], tmp_path / "f16", dtype="float16")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)

    def cli(*extra):
        p = subprocess.run(
            [sys.executable, "-m", "fastvlm_mlx.generate", "--model", str(f16), "--image", str(image),
             "--max-tokens", "4", "--json", *extra], capture_output=True, text=True, timeout=180,
        )
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)["logprobs"]

    def api(dtype):
        model, processor = fastvlm_mlx.load(f16, dtype=dtype)
        return generate(model, processor, images=[str(image)], max_tokens=4).logprobs

    as_f32, as_f16 = api(mx.float32), api(None)
    assert np.abs(np.subtract(as_f32, as_f16)).max() > 1e-3, "float16 and float32 agree: weak test"
    np.testing.assert_allclose(cli(), as_f32, atol=1e-4, rtol=0)
    np.testing.assert_allclose(cli("--dtype", "float16"), as_f16, atol=1e-4, rtol=0)
