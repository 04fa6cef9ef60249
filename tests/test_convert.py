"""The converter: every source layout -> one MLX layout that load() reads and that computes what
the PyTorch reference computes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import fastvlm_mlx
import reference as ref
from conftest import reference_logits
from fastvlm_mlx.convert import ConvertError, convert, write_atomically
from fake_model import fake_model, marker_of
from fastvlm_mlx.processing import format_prompt

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)


def image_and_pixels(seed=0, size=256):
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image, (image.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


def check_matches_reference(converted: Path, tiny_source, n_tokens=8):
    """Logits over all positions (<= 1e-4) and greedy tokens equal transformers' (float32)."""
    model_ref, _, ids = tiny_source
    model, processor = fastvlm_mlx.load(converted)
    image, x = image_and_pixels()
    input_ids = processor.encode(format_prompt("Describe the image.", 1))
    ref_ids = [ids[ref.IMAGE] if i == processor.image_token_id else i for i in input_ids]
    expected = reference_logits(model_ref, [ref_ids], x)
    got = np.array(model(mx.array([input_ids]), processor.pixels([image])))
    err = ref.rel_err(got, expected)
    assert err <= 1e-4, err
    # greedy continuation: the reference's generate vs our model stepping on its own cache
    with torch.no_grad():
        out = model_ref.generate(
            input_ids=torch.tensor([ref_ids]), pixel_values=torch.from_numpy(x),
            max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
    expected_tokens = out[0, len(ref_ids):].tolist()
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([input_ids]), processor.pixels([image]), cache=cache)
    tokens = []
    for _ in range(n_tokens):
        t = int(logits[0, -1].argmax())
        tokens.append(t)
        logits = model(mx.array([[t]]), cache=cache)
    assert tokens == expected_tokens
    return model, processor


def test_transformers_layout(tiny_source, tmp_path):
    out = convert(tiny_source[1], tmp_path / "out", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "fastvlm" and cfg["image_size"] == 256
    assert cfg["image_token_id"] == tiny_source[2][ref.IMAGE]
    assert cfg["vision_config"]["depths"] == [1, 1, 1, 1, 1]
    assert cfg["text_config"]["tie_word_embeddings"] is False
    assert cfg["eos_token_id"] == [tiny_source[2][ref.IM_END], tiny_source[2][ref.ENDOFTEXT]]
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    check_matches_reference(out, tiny_source)


def write_apple(path: Path, tiny_source, fmt: str) -> Path:
    _, src, _ = tiny_source
    copy_tokenizer(src, path)
    state = {ref.to_apple_key(k): v.contiguous() for k, v in ref.checkpoint_state(src).items()}
    assert not any("timm_model" in k for k in state)
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(path / "model.safetensors"))
    # no preprocessor_config.json: the resolution comes from mm_vision_tower's suffix
    ref.save_json(path / "config.json", ref.apple_config(256, ref.text_config()))
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_apple_layout(tiny_source, tmp_path, fmt):
    src = write_apple(tmp_path / "apple", tiny_source, fmt)
    out = convert(src, tmp_path / "out", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["image_size"] == 256  # from mobileclip_l_256
    assert cfg["image_token_id"] == -200  # no image token in Apple's vocabulary
    assert cfg["text_config"]["tie_word_embeddings"] is False  # lm_head.weight exists
    check_matches_reference(out, tiny_source)


def write_mlx_vlm(path: Path, tiny_source, bits=None) -> Path:
    _, src, _ = tiny_source
    copy_tokenizer(src, path)
    weights = {k: mx.array(v) for k, v in ref.to_mlx_vlm(ref.checkpoint_state(src)).items()}
    cfg = ref.apple_config(256, ref.text_config())
    cfg["image_token_index"] = -200
    if bits:
        for k in [k for k in weights if k.startswith("language_model.") and weights[k].ndim == 2]:
            w, scales, biases = mx.quantize(weights[k], group_size=64, bits=bits)
            base = k[: -len(".weight")]
            weights.update({k: w, f"{base}.scales": scales, f"{base}.biases": biases})
        cfg["quantization"] = {"group_size": 64, "bits": bits}
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    ref.save_json(path / "config.json", cfg)
    ref.save_json(path / "preprocessor_config.json", {"crop_size": {"height": 256, "width": 256}})
    return path


def test_mlx_vlm_layout(tiny_source, tmp_path):
    src = write_mlx_vlm(tmp_path / "mlxvlm", tiny_source)
    check_matches_reference(convert(src, tmp_path / "out", dtype="float32"), tiny_source)


def test_quantized_mlx_vlm_layout(tiny_source, tmp_path):
    """A 4-bit mlx-community export computes what the reference does with the same (dequantized)
    decoder weights."""
    src = write_mlx_vlm(tmp_path / "q", tiny_source, bits=4)
    out = convert(src, tmp_path / "out", dtype="float32")
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    model, processor = fastvlm_mlx.load(out)
    # the reference, with its decoder weights replaced by the dequantized 4-bit ones
    _, tiny_dir, ids = tiny_source
    deq = ref.transformers_vlm(image_token_id=ids[ref.IMAGE])
    deq.load_state_dict(ref.checkpoint_state(tiny_dir))
    qw = mx.load(str(src / "model.safetensors"))
    with torch.no_grad():
        for name, p in deq.named_parameters():
            key = None
            if name.startswith("model.language_model."):
                key = "language_model.model." + name[len("model.language_model."):]
            elif name.startswith("lm_head."):
                key = "language_model." + name
            if key and key.replace(".weight", ".scales") in qw and key.endswith(".weight"):
                b = key[: -len(".weight")]
                w = mx.dequantize(qw[key], qw[b + ".scales"], qw[b + ".biases"], group_size=64, bits=4)
                p.copy_(torch.from_numpy(np.array(w)))
    ref.apple_vocabulary(deq, tiny_dir)
    image, x = image_and_pixels(1)
    input_ids = processor.encode(format_prompt("Describe the image.", 1))
    ref_ids = [ids[ref.IMAGE] if i == -200 else i for i in input_ids]
    got = np.array(model(mx.array([input_ids]), processor.pixels([image])))
    assert ref.rel_err(got, reference_logits(deq, [ref_ids], x)) <= 1e-4


# ------------------------------------------------------------------------------------------------
# Half-precision sources (Apple releases bfloat16): conversion rounds each tensor once, to the
# dtype asked for, and nowhere else.

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Unit roundoff (half an ulp, relative) of the target dtypes: round-to-nearest moves a value by
# at most this fraction of itself; below the smallest normal float16 (2^-14) the spacing is
# absolute, 2^-24, so half of that is the floor.
UNIT_ROUNDOFF = {mx.float16: 2.0**-11, mx.bfloat16: 2.0**-8}
FLOAT16_FLOOR = 2.0**-25


def write_source(path: Path, tiny_source, layout: str, dtype: torch.dtype, upcast=False) -> Path:
    """The tiny checkpoint with every floating tensor rounded to `dtype`, in `layout`; stored
    in `dtype`, or with `upcast` the same values stored in float32."""
    from safetensors.torch import save_file

    _, src, _ = tiny_source
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.checkpoint_state(src).items()}
    if upcast:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if layout == "apple":
        copy_tokenizer(src, path)
        state = {ref.to_apple_key(k): v for k, v in state.items()}
        ref.save_json(path / "config.json", ref.apple_config(256, ref.text_config()))
    else:
        shutil.copytree(src, path, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def upcast_oracle(tiny_source, half_dtype):
    """transformers' FastVLM in float32 on the half-precision values, upcast (Apple's vocabulary)."""
    _, src, ids = tiny_source
    oracle = ref.transformers_vlm(image_token_id=ids[ref.IMAGE])
    oracle.load_state_dict({k: v.to(half_dtype).float() if v.is_floating_point() else v
                            for k, v in ref.checkpoint_state(src).items()})
    return ref.apple_vocabulary(oracle, src)


def tower_output(model, seed=5):
    x = mx.array(ref.pixels(1, 256, seed=seed).transpose(0, 2, 3, 1))
    return np.array(model.encode_images(x).astype(mx.float32))


@pytest.mark.parametrize("layout", ["transformers", "apple"])
@pytest.mark.parametrize("source", ["bfloat16", "float16"])
def test_half_precision_source_to_float32_is_exact(tiny_source, tmp_path, layout, source):
    half = write_source(tmp_path / "half", tiny_source, layout, HALF[source])
    model, processor = fastvlm_mlx.load(convert(half, tmp_path / "f32", dtype="float32"))
    # The same values, upcast to float32 before conversion: conversion of a half-precision
    # source must add nothing to them. Same shapes, same kernels: float32 rounding at most.
    upcast = write_source(tmp_path / "up", tiny_source, layout, HALF[source], upcast=True)
    model_up, _ = fastvlm_mlx.load(convert(upcast, tmp_path / "up32", dtype="float32"))
    err = ref.rel_err(tower_output(model), tower_output(model_up))
    print(f"{layout} {source} -> float32: tower rel err vs the upcast conversion {err:.1e}")
    assert err <= 1e-6

    # And the whole model against transformers in float32 on the upcast values: greedy ids and
    # raw logprobs (logprob differences of float32 logits: ~1e-5, bound 1e-4 as elsewhere).
    oracle = upcast_oracle(tiny_source, HALF[source])
    image, x = image_and_pixels(3)
    prompt_ids = processor.encode(format_prompt("Describe the image.", 1))
    ids = tiny_source[2]
    ref_ids = [ids[ref.IMAGE] if i == processor.image_token_id else i for i in prompt_ids]
    tokens, logprobs = ref.greedy(oracle, ref_ids, x, 8)
    r = fastvlm_mlx.generate(model, processor, "Describe the image.", images=[image], max_tokens=8,
                             feature_cache=False)
    assert r.token_ids == tokens[: len(r.token_ids)] and len(r.token_ids) >= 4
    np.testing.assert_allclose(r.logprobs, logprobs[: len(r.token_ids)], atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["transformers", "apple"])
@pytest.mark.parametrize("source,target", [("bfloat16", "float16"), ("float16", "bfloat16"),
                                           ("bfloat16", "bfloat16")])
def test_half_precision_source_to_half_rounds_once(tiny_source, tmp_path, layout, source, target):
    """Every converted tensor is the float32 conversion of the upcast values, rounded once to
    the target dtype (a fold rounded to the source dtype first would be two roundings)."""
    half = write_source(tmp_path / "half", tiny_source, layout, HALF[source])
    upcast = write_source(tmp_path / "up", tiny_source, layout, HALF[source], upcast=True)
    exact = mx.load(str(convert(upcast, tmp_path / "f32", dtype="float32") / "model.safetensors"))
    rounded = mx.load(str(convert(half, tmp_path / "h", dtype=target) / "model.safetensors"))
    u = UNIT_ROUNDOFF[getattr(mx, target)]
    assert exact.keys() == rounded.keys()
    worst = 0.0
    for k, e in exact.items():
        assert rounded[k].dtype == getattr(mx, target), k
        e = np.array(e, np.float64)
        r = np.array(rounded[k].astype(mx.float32), np.float64)
        ratio = np.abs(r - e) / (u * np.abs(e) + FLOAT16_FLOOR)
        worst = max(worst, float(ratio.max()))
        assert (ratio <= 1).all(), f"{k}: more than one {target} rounding"
    print(f"{layout} {source} -> {target}: worst error {worst:.2f} of one rounding")


def test_own_output_is_a_no_op(tiny_converted, tiny_source, tmp_path):
    out = convert(tiny_converted, tmp_path / "again", dtype="float32")
    a = mx.load(str(Path(tiny_converted) / "model.safetensors"))
    b = mx.load(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def first_step_logprobs(path):
    model, processor = fastvlm_mlx.load(path)
    image, _ = image_and_pixels(2)
    input_ids = processor.encode(format_prompt("Describe the image.", 1))
    logits = model(mx.array([input_ids]), processor.pixels([image]))[0, -1].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits)), model, processor


def test_quantized_outputs_load_generate_and_stay_close(tiny_source, tmp_path):
    fp16, _, _ = first_step_logprobs(convert(tiny_source[1], tmp_path / "f16", dtype="float16"))
    p = np.exp(fp16)
    kl = {}
    for bits in (4, 8):
        out = convert(tiny_source[1], tmp_path / f"q{bits}", quantize=True, q_bits=bits, q_group_size=32)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
        q, model, processor = first_step_logprobs(out)
        assert model.language_model.model.layers[0].self_attn.q_proj.bits == bits
        assert model.multi_modal_projector.linear_1.bits == bits
        assert "scales" not in model.vision_tower.stem[0].reparam_conv  # the tower stays float16
        kl[bits] = float((p * (fp16 - q)).sum())
        print(f"{bits}-bit vs float16, first-step log-probs: max |diff| "
              f"{float(np.abs(fp16 - q).max()):.3f}, KL {kl[bits]:.4f}, "
              f"top-1 {'same' if q.argmax() == fp16.argmax() else 'differs'}")
        # and it generates: greedy steps on its own KV cache
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(model)
        image, _ = image_and_pixels(2)
        ids = processor.encode(format_prompt("Describe the image.", 1))
        logits = model(mx.array([ids]), processor.pixels([image]), cache=cache)
        for _ in range(4):
            t = int(logits[0, -1].argmax())
            assert 0 <= t < 512
            logits = model(mx.array([[t]]), cache=cache)
    # The random test decoder has a deliberately sharp lm_head, so 4-bit noise moves it a lot;
    # 8 bits must move it far less, and little in absolute terms.
    assert kl[8] < 0.05
    assert kl[8] < kl[4] / 4


def run_cli(*args, env=None):
    return subprocess.run(
        [str(Path(sys.executable).with_name("fastvlm-convert")), *map(str, args)], cwd=ROOT,
        capture_output=True,
        text=True, env={**os.environ, **(env or {})}, timeout=300,
    )


def assert_one_line_error(r, *needles):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_sources_are_refused_in_one_line(tiny_source, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("--model", empty, "--out", tmp_path / "o1"), "is empty")

    unknown = tmp_path / "unknown"
    copy_tokenizer(tiny_source[1], unknown)
    ref.save_json(unknown / "config.json", {"model_type": "bert"})
    mx.save_safetensors(str(unknown / "model.safetensors"), {"encoder.weight": mx.zeros((2, 2))})
    assert_one_line_error(run_cli("--model", unknown, "--out", tmp_path / "o2"), "unknown checkpoint layout")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_source[1], truncated)
    f = truncated / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(run_cli("--model", truncated, "--out", tmp_path / "o3"), "model.safetensors")

    no_tok = tmp_path / "notok"
    shutil.copytree(tiny_source[1], no_tok)
    for name in TOKENIZER_FILES:
        (no_tok / name).unlink(missing_ok=True)
    assert_one_line_error(run_cli("--model", no_tok, "--out", tmp_path / "o4"), "no tokenizer")

    bundle = tmp_path / "FastVLM-0.5B-fp16"
    (bundle / "fastvithd.mlpackage").mkdir(parents=True)
    ref.save_json(bundle / "config.json", {})
    assert_one_line_error(run_cli("--model", bundle, "--out", tmp_path / "o5"), "CoreML", "apple/FastVLM")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_misshaped_tensor_is_named_and_nothing_is_written(tiny_source, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_source[1], bad)
    w = mx.load(str(bad / "model.safetensors"))
    w["model.multi_modal_projector.linear_2.bias"] = mx.zeros((65,))
    mx.save_safetensors(str(bad / "model.safetensors"), w)
    with pytest.raises(ConvertError, match=r"linear_2\.bias.*\(65,\).*\(64,\)"):
        convert(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no output, no temp dir


def test_non_empty_destination_needs_force_and_force_replaces_only_a_converted_model(
        tiny_source, tiny_converted, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert_one_line_error(run_cli("--model", tiny_source[1], "--out", dst), "--force")
    # --force does not delete what a conversion did not write.
    r = run_cli("--hf-path", tiny_source[1], "--mlx-path", dst, "--force", "--dtype", "float32")
    assert_one_line_error(r, "keep.txt", "does not write")
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    # It replaces a converted model, and only that.
    (dst / "keep.txt").unlink()
    shutil.copytree(tiny_converted, dst, dirs_exist_ok=True)
    (dst / "model.safetensors").write_bytes(b"an older conversion")
    r = run_cli("--hf-path", tiny_source[1], "--mlx-path", dst, "--force", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert (dst / "model.safetensors").read_bytes() == (tiny_converted / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_force_through_a_symlink_replaces_its_target_every_time(tmp_path):
    target = tmp_path / "models" / "tiny"
    target.parent.mkdir()
    fake_model("a")(target.parent)  # (a file beside, which nothing may touch)
    (target.parent / "config.json").rename(target.parent / "notes.json")
    target.mkdir()
    fake_model("old")(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    for marker in ("b", "c", "d"):
        write_atomically(link, fake_model(marker))
        assert link.is_symlink() and marker_of(link) == marker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "models"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors", "notes.json",
                                                               "tiny", "tokenizer.json"]


def test_force_onto_a_file_is_refused_each_time_and_old_leftovers_do_not_block(tiny_source, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for _ in range(2):
        assert_one_line_error(run_cli("--model", tiny_source[1], "--out", a_file, "--force"),
                              "not a directory")
    assert a_file.read_text() == "mine"
    # What an older version left beside --out after a --force onto a symlink or a file (its
    # `.NAME.old`, which it then could not remove) no longer makes every later --force fail.
    dst = tmp_path / "dst"
    dst.mkdir()
    fake_model("old")(dst)
    for leftover in ("file", "symlink"):
        old = tmp_path / ".dst.old"
        if leftover == "file":
            old.write_text("left by a killed run")
        else:
            old.symlink_to(a_file)
        write_atomically(dst, fake_model(leftover))
        assert marker_of(dst) == leftover and not os.path.lexists(old)
    assert a_file.read_text() == "mine"


KILL_SCRIPT = """
import os, shutil, signal, sys
from pathlib import Path
import fastvlm_mlx.convert as C
sys.path.insert(0, sys.argv[3])
from fake_model import fake_model

kill_after, calls = int(sys.argv[2]), [0]
if sys.argv[4] == "without-exchange":  # a system without renameat2 / renamex_np
    C._exchange = lambda a, b: False

def counted(fn):
    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        calls[0] += 1
        if calls[0] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return run

for module, name in [(os, "rename"), (os, "replace"), (os, "rmdir"), (os, "unlink"), (shutil, "rmtree"),
                     (C, "_exchange")]:
    if hasattr(module, name):
        setattr(module, name, counted(getattr(module, name)))
C.write_atomically(Path(sys.argv[1]), fake_model("new"))
print(calls[0])
"""


@pytest.mark.parametrize("system", ["with-exchange", "without-exchange"])
def test_killed_at_any_step_the_output_is_the_old_model_or_the_new_one(tmp_path, system):
    """kill -9 after each file-system step of replacing a model: --out always holds a complete
    model (without an atomic exchange, once the next run has put back what was aside), and the
    next run cleans up what the killed one left."""
    dst = tmp_path / "out" / "model"

    def run(kill_after):
        return subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(dst), str(kill_after),
                               str(ROOT / "tests"), system], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    dst.parent.mkdir()
    dst.mkdir()
    fake_model("old")(dst)
    steps = int(run(10**6).stdout)  # a run that is not killed counts its steps
    assert steps >= 2 and marker_of(dst) == "new"
    for kill_after in range(1, steps + 1):
        shutil.rmtree(dst)
        dst.mkdir()
        fake_model("old")(dst)
        r = run(kill_after)
        assert r.returncode == -9, r.stderr
        if system == "without-exchange":
            from fastvlm_mlx.convert import remove_leftovers

            remove_leftovers(dst)  # what the next run does first
        assert marker_of(dst) in ("old", "new"), kill_after
    write_atomically(dst, fake_model("after"))
    assert marker_of(dst) == "after"
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model"], "leftovers of killed runs"


def dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()


def test_a_model_left_aside_by_a_killed_run_is_put_back(tmp_path):
    """Killed between the two renames of the fallback (no atomic exchange): the old model is
    aside and --out absent; the next run puts it back first."""
    from fastvlm_mlx.convert import remove_leftovers

    aside = tmp_path / f".model.old-{dead_pid()}-aside"
    aside.mkdir()
    fake_model("old")(aside)
    remove_leftovers(tmp_path / "model")
    assert marker_of(tmp_path / "model") == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_killed_runs_are_removed_and_those_of_running_ones_kept(tmp_path):
    dead = dead_pid()
    dst = tmp_path / "model"
    dst.mkdir()
    fake_model("old")(dst)
    for name in (f".model.tmp-{dead}-abc123", ".model.tmp-k3j9x_q1", f".model.old-{dead}-xyz",
                 f".model.tmp-{os.getpid()}-running"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("half")
    (tmp_path / "unrelated").mkdir()
    write_atomically(dst, fake_model("new"))
    assert marker_of(dst) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".model.tmp-{os.getpid()}-running", "model",
                                                          "unrelated"]


def convert_cli(*args, cwd=ROOT, preexec_fn=None):
    """The converter's CLI, run from CWD (the worktree's package on the path)."""
    return subprocess.run([sys.executable, "-m", "fastvlm_mlx.convert", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=300, preexec_fn=preexec_fn)


def test_out_dot_is_one_line(tiny_source, tmp_path):
    assert_one_line_error(convert_cli("--model", tiny_source[1], "--out", ".", cwd=tmp_path),
                          "current directory")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_source, tmp_path):
    def small_files():  # a full disk, as far as this process can tell: writes past 1 MB fail
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    r = convert_cli("--model", tiny_source[1], "--out", tmp_path / "full" / "model", "--dtype",
                    "float32", preexec_fn=small_files)
    assert_one_line_error(r, "cannot write", "disk full")
    assert list((tmp_path / "full").iterdir()) == [], "a failed write left files behind"


def test_a_refused_pickle_is_one_line_and_never_unpickled(tiny_source, tmp_path):
    import pickle

    evil = tmp_path / "evil"
    copy_tokenizer(tiny_source[1], evil)
    shutil.copy2(tiny_source[1] / "config.json", evil / "config.json")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Exploit()}))
    r = convert_cli("--model", evil, "--out", tmp_path / "o")
    assert_one_line_error(r, "pytorch_model.bin")
    # torch's message spans lines; only one-line warnings may come beside it
    assert [l for l in r.stderr.splitlines() if not l.startswith("warning: ")] == [
        next(l for l in r.stderr.splitlines() if l.startswith("error: "))], r.stderr
    assert not marker.exists(), "the pickle was unpickled"


def fill_hub_cache(hf_home: Path, repo: str, files_from: Path) -> None:
    """A local Hugging Face hub cache holding REPO, as huggingface-hub lays it out."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        shutil.copy2(f, snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)


def test_hub_ids_offline(tiny_source, tmp_path):
    hf_home = tmp_path / "hf"
    fill_hub_cache(hf_home, "test-org/FastVLM-tiny", tiny_source[1])
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "FASTVLM_MLX_CACHE": str(tmp_path / "cache")}
    r = run_cli("--model", "test-org/FastVLM-tiny", "--out", tmp_path / "out", "--dtype", "float32", env=env)
    assert r.returncode == 0, r.stderr
    check_matches_reference(tmp_path / "out", tiny_source)

    r = run_cli("--model", "test-org/not-there", "--out", tmp_path / "o2", env=env)
    assert_one_line_error(r, "--model PATH")

    # load(hub id) converts once into the cache and reuses it after that
    script = (
        "import fastvlm_mlx, fastvlm_mlx.convert as c, fastvlm_mlx.loader as l\n"
        "calls = []\n"
        "real = c.convert\n"
        "c.convert = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "for _ in range(2):\n"
        "    model, processor = fastvlm_mlx.load('test-org/FastVLM-tiny')\n"
        "print(len(calls), l.converted_path('test-org/FastVLM-tiny'))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    n_calls, path = r.stdout.split()
    assert n_calls == "1"
    assert Path(path).parent == tmp_path / "cache"
