"""Check this port against the PyTorch reference, on the real weights and this machine's device.

    python -m fastvlm_mlx.verify [--model apple/FastVLM-0.5B] [--image IMG] [--prompt P]
                                 [--tokens N] [--converted DIR] [--json]

The reference is built from the SOURCE checkpoint (--model): transformers'
`FastVlmForConditionalGeneration` for the transformers layout; for Apple's layout, timm's
`fastvit_mci3` (inference form) + the mlp2x_gelu connector + transformers' `Qwen2ForCausalLM`,
loaded by the documented key mapping. It runs in float32 on the CPU. Ours runs twice on the
default MLX device: in float32 (converted from the same source into a temporary directory) and as
converted (--converted DIR, else what `fastvlm_mlx.load(--model)` converts into its cache, float16).

Each part is fed the reference's own inputs, so a fault is named where it is, not where it
shows up downstream: our vision tower gets the reference's pixels, our connector the reference's
vision features, our decoder the reference's prompt ids and connector output. The end-to-end
figures (our pixels, our prompt, greedy decoding through `fastvlm_mlx.generate`) come on top.

The reference is reference.py's; the source is read by checkpoint.py, as the converter reads it.
This module measures, judges against the thresholds, reports and maps every failure to an exit code.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import _cli, checkpoint
from .reference import (
    ReferenceNotInstalled,
    ReferenceRun,
    ReferenceUnavailable,
    check_reference_packages,
    decode_image,
    load_reference,
    reference_prompt,
    run_reference,
)

DEFAULT_MODEL = _cli.DEFAULT_MODEL
DEFAULT_PROMPT = "Describe the image."
DEFAULT_TOKENS = 16
EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "images" / "chelsea.jpg"

EXIT_OK = 0  # every figure within its threshold
EXIT_DIVERGED = 1  # a figure beyond its threshold; the parts that diverged are named
EXIT_USAGE = 2  # bad arguments or input: unreadable image, not a checkpoint, unsupported layout
EXIT_NO_REFERENCE = 3  # torch, transformers or timm is not installed
EXIT_NO_WEIGHTS = 4  # a hub id that is neither in the local cache nor downloadable (offline?)
EXIT_ERROR = 5  # verify itself failed (an unexpected error, reported in one line)

EXIT_CODES = f"""exit codes:
  {EXIT_OK}  every figure within its threshold
  {EXIT_DIVERGED}  a figure beyond its threshold; the diverged part(s) are named
     (preprocessing, vision, connector, decoder, or end-to-end)
  {EXIT_USAGE}  bad arguments or input (image, checkpoint directory, unsupported layout)
  {EXIT_NO_REFERENCE}  the PyTorch reference is not installed (torch, transformers, timm)
  {EXIT_NO_WEIGHTS}  the weights are not available: a hub id not in the local cache, offline
  {EXIT_ERROR}  verify itself failed (unexpected error)"""

# ---------------------------------------------------------------------------------------------
# Thresholds. Relative errors are ||ours - reference|| / ||reference|| over the whole tensor.
#
# float32: both sides compute in float32 (unit roundoff u = 2^-24 ~ 6e-8), but with different
# conv algorithms, summation orders and erf approximations, through ~50 vision blocks and 24-28
# decoder layers. The parity tests measure <= 1e-4 on random weights (the full tower at 1024 px
# included); the bounds leave 10x for real weights' wider activations and Metal's kernels, and
# stay far below what a mis-mapped tensor gives (order 1e-1 to 1). The connector is two matmuls
# on identical inputs, hence the tighter bound.
#
# float16 (u = 2^-11 ~ 4.9e-4): weights, inputs and every activation are rounded. The connector
# rounds each of input, weights, hidden and output once (~20u); the tower and the decoder compound
# rounding over their depth (~60u); end to end adds both (~100u). bfloat16 (u = 2^-8 ~ 3.9e-3)
# gets the same multiples of its own u, i.e. 8x float16's. These columns catch precision trouble
# (overflow, a layer that needs float32); mapping faults are caught tightly by the float32 column,
# which runs the same conversion code.
THRESHOLDS = {
    "float32": {"vision": 1e-3, "connector": 1e-4, "decoder": 1e-3, "end_to_end": 2e-3},
    "float16": {"vision": 3e-2, "connector": 1e-2, "decoder": 3e-2, "end_to_end": 5e-2},
    "bfloat16": {"vision": 0.25, "connector": 8e-2, "decoder": 0.25, "end_to_end": 0.4},
}
# Pixels: the reference and we both resize with PIL's bicubic on 8-bit images, so the tensors
# should be equal; half an 8-bit level allows float rescaling noise and nothing else (a different
# filter, pad offset or normalisation moves many pixels by whole levels).
PIXEL_TOL = 0.5 / 255
# A token choice is a near-tie, not a fault, when the reference's margin between the two tokens is
# within this many times the column's decoder bound times the logits' RMS (the error the bound
# allows on one logit, with room for the two logits moving in opposite directions).
TIE_FACTOR = 4.0
PARTS = ("preprocessing", "vision", "connector", "decoder")


class VerifyError(Exception):
    """A one-line problem with its exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# The source checkpoint


def resolve_source(model: str) -> Path:
    """A local checkpoint directory, or a hub id fetched (or found in the local cache)."""
    try:
        return checkpoint.resolve_source(model)
    except checkpoint.SourceUnavailable as e:
        raise VerifyError(
            f"the weights of {model} are not available: not in the local Hugging Face cache and "
            f"not downloadable ({e.reason}); offline? download them where the hub is reachable "
            f"(hf download {model} --local-dir PATH), bring PATH here and pass --model PATH",
            EXIT_NO_WEIGHTS,
        ) from None


def source_layout(src: Path) -> str:
    """The layout by tensor names (safetensors headers only, no tensor is read): one the
    reference can be built from."""
    layout = checkpoint.source_layout(src)
    if layout not in ("apple", "transformers"):
        raise VerifyError(
            f"{src} is in the {layout} layout: verify builds the PyTorch reference from a source "
            "checkpoint (Apple or transformers layout); pass that as --model and this directory "
            "as --converted"
        )
    return layout


# ---------------------------------------------------------------------------------------------
# Ours


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def tie_margin(logits: np.ndarray, bound: float) -> float:
    return TIE_FACTOR * bound * float(np.sqrt(np.mean(np.square(logits, dtype=np.float64))))


def topk_check(ours: np.ndarray, ref: np.ndarray, k: int, tie: float):
    """(overlap of the top-k sets, ok): every token in the reference's top k that is clearly
    in it (above the (k+1)-th by more than `tie`) must be in ours."""
    order = np.argsort(-ref)
    ref_top = order[:k]
    ours_top = set(np.argsort(-ours)[:k].tolist())
    clear = [t for t in ref_top.tolist() if ref[t] - ref[order[k]] > tie]
    return len(ours_top & set(ref_top.tolist())), all(t in ours_top for t in clear)


def model_dtype(model):
    """The model's floating dtype (of most parameters; quantized layers keep float scales)."""
    import collections

    import mlx.core as mx
    from mlx.utils import tree_flatten

    counts = collections.Counter(
        v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
    )
    return counts.most_common(1)[0][0]


def dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def measure(model, processor, image, prompt: str, r: ReferenceRun, n_tokens: int, thresholds: dict,
            judge_precision: bool = True) -> dict:
    """Our figures for one model, each part fed the reference's inputs, then end to end."""
    import mlx.core as mx

    import fastvlm_mlx
    from .processing import format_prompt

    dtype = model_dtype(model)
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    out: dict = {}

    # vision: the reference's pixels in
    vision = f32(model.encode_images(mx.array(r.pixels.transpose(0, 2, 3, 1))))
    out["vision_rel_err"] = rel_err(vision, r.vision)
    # connector: the reference's vision features in, in the model's dtype as our pipeline has them
    connector = f32(model.project(mx.array(r.vision).astype(dtype)))
    out["connector_rel_err"] = rel_err(connector, r.connector)
    # decoder: the reference's prompt ids (our slot id in its image slots) and connector output
    ids = [processor.image_token_id if i == r.image_token_id else i for i in r.ids]
    ids_mx = mx.array([ids])
    emb = model.embed(ids_mx, mx.array(r.connector).astype(dtype))
    logits = f32(model.language_model(ids_mx, input_embeddings=emb)[0, -1])
    tie = tie_margin(r.logits, thresholds["decoder"])
    out["decoder_rel_err"] = rel_err(logits, r.logits)
    out["decoder_top1"] = bool(logits.argmax() == r.logits.argmax())
    out["decoder_top1_ok"] = out["decoder_top1"] or topk_check(logits, r.logits, 1, tie)[1]
    out["decoder_top5"], out["decoder_top5_ok"] = topk_check(logits, r.logits, 5, tie)

    # end to end: our pixels and our prompt
    our_ids = processor.encode(format_prompt(prompt, 1))
    e2e = f32(model(mx.array([our_ids]), processor.pixels([image]))[0, -1])
    tie = tie_margin(r.logits, thresholds["end_to_end"])
    out["e2e_rel_err"] = rel_err(e2e, r.logits)
    out["e2e_top1"] = bool(e2e.argmax() == r.logits.argmax())
    out["e2e_top1_ok"] = out["e2e_top1"] or topk_check(e2e, r.logits, 1, tie)[1]
    out["e2e_top5"], out["e2e_top5_ok"] = topk_check(e2e, r.logits, 5, tie)

    # Greedy tokens through the user's path, with the feature cache off so that the vision tower
    # is in it; that run warms up the path (kernels compiled per shape, first-call set-up), and
    # TTFT is taken from a second, one-token run.
    result = fastvlm_mlx.generate(
        model, processor, prompt, images=[image], max_tokens=n_tokens, temperature=0.0,
        feature_cache=False,
    )
    ttft_ms = fastvlm_mlx.generate(
        model, processor, prompt, images=[image], max_tokens=1, temperature=0.0,
        feature_cache=False,
    ).timings.ttft_ms
    eos = stop_ids(processor)
    tokens = list(result.token_ids)
    agree = 0
    for i, t in enumerate(r.tokens):
        if i < len(tokens) and tokens[i] == t:
            agree += 1
            continue
        if i == len(tokens) and result.finish_reason == "stop" and t in eos:
            agree += 1  # both stopped here
        break
    out["greedy_agree"], out["greedy_total"] = agree, len(r.tokens)
    out["greedy_ok"] = agree == len(r.tokens)
    if not out["greedy_ok"]:
        # A divergence at a near-tie of the reference is rounding, not a fault.
        step = r.step_logits[agree]
        if agree < len(tokens):
            ours_logit = step[tokens[agree]]
        else:  # we stopped (or ran out) where the reference went on
            ours_logit = max(step[e] for e in eos if e < len(step)) if eos else -np.inf
        margin = float(step[r.tokens[agree]] - ours_logit)
        out["greedy_margin"] = margin
        out["greedy_ok"] = margin <= tie_margin(step, thresholds["end_to_end"])
    out["ttft_ms"] = ttft_ms
    out["tokens"] = tokens
    out["judged"] = judge_precision
    return out


def stop_ids(processor) -> set:
    return set(processor.eos_token_ids or []) | set(
        getattr(processor.tokenizer, "eos_token_ids", None) or []
    )


def failures(col: dict, thresholds: dict) -> Dict[str, List[str]]:
    """Part -> what failed in this column."""
    fails: Dict[str, List[str]] = {}

    def check(part, name, value, bound):
        if not value <= bound:  # NaN fails too
            fails.setdefault(part, []).append(f"{name} {value:.1e} > {bound:.0e}")

    check("vision", "vision features rel err", col["vision_rel_err"], thresholds["vision"])
    if not col["judged"]:
        return fails
    check("connector", "connector output rel err", col["connector_rel_err"], thresholds["connector"])
    check("decoder", "first-step logits rel err", col["decoder_rel_err"], thresholds["decoder"])
    if not col["decoder_top1_ok"]:
        fails.setdefault("decoder", []).append("top-1 differs")
    if not col["decoder_top5_ok"]:
        fails.setdefault("decoder", []).append(f"top-5 {col['decoder_top5']}/5")
    check("end-to-end", "end-to-end logits rel err", col["e2e_rel_err"], thresholds["end_to_end"])
    if not col["e2e_top1_ok"]:
        fails.setdefault("end-to-end", []).append("end-to-end top-1 differs")
    if not col["e2e_top5_ok"]:
        fails.setdefault("end-to-end", []).append(f"end-to-end top-5 {col['e2e_top5']}/5")
    if not col["greedy_ok"]:
        fails.setdefault("greedy", []).append(
            f"greedy tokens {col['greedy_agree']}/{col['greedy_total']}"
        )
    return fails


def diverged_parts(fails: List[dict]) -> List[str]:
    """The parts to name. Parts are fed the reference's inputs, so a fault upstream does not
    show as one downstream; end-to-end and greedy failures are named only when no part failed
    (greedy decoding, KV cache and positions, belongs to the decoder)."""
    failed = {f["part"] for f in fails}
    named = [p for p in PARTS if p in failed]
    if not named and "end-to-end" in failed:
        named.append("end-to-end")
    if not named and "greedy" in failed:
        named.append("decoder")
    return named


# ---------------------------------------------------------------------------------------------
# The report


def format_table(report: dict) -> str:
    cols = report["columns"]
    w0, w = 44, 26

    def row(label, cells):
        return (label.ljust(w0) + "".join(str(c).ljust(w) for c in cells)).rstrip()

    def fig(value, bound, judged=True):
        ok = value <= bound
        return f"{value:.2e} {'<=' if ok else '>'} {bound:.0e}" + ("" if ok or not judged else " FAIL")

    def topk(c, p):
        top1 = "same" if c[f"{p}_top1"] else ("tie" if c[f"{p}_top1_ok"] else "differs")
        bad = c["judged"] and not (c[f"{p}_top1_ok"] and c[f"{p}_top5_ok"])
        return f"{top1} / {c[f'{p}_top5']} of 5" + (" FAIL" if bad else "")

    def greedy(c):
        s = f"{c['greedy_agree']} of {c['greedy_total']}"
        if "greedy_margin" in c:
            s += f" (tie {c['greedy_margin']:.2g})" if c["greedy_ok"] else (" FAIL" if c["judged"] else "")
        return s

    def each(fn):
        return [fn(c, c["thresholds"]) for c in cols.values()]

    pre = report["preprocessing"]
    pixels = fig(pre["pixels_max_diff"], PIXEL_TOL)
    decode = "Apple's, Image.open(f).convert('RGB')"
    if pre["decode_deviations"]:
        decode = "Apple's, with our deliberate deviations: " + "; ".join(pre["decode_deviations"])
    prompt = f"same ({pre['prompt_tokens']} ids)"
    if not pre["prompt_ok"]:
        prompt = f"differ {pre['prompt_detail']} FAIL"
    lines = [
        f"fastvlm-verify: {report['model']} ({report['layout']} layout), {report['image']} at "
        f"{report['resolution']} px, prompt {report['prompt']!r}",
        f"reference: PyTorch, float32 on the CPU: {report['reference']}",
        f"ours: MLX on {report['device']}: " + "; ".join(f"{n} = {c['source']}" for n, c in cols.items()),
        "",
        row("", list(cols)),
        row("preprocessing  image decode", [decode]),
        row("               pixels, max |diff|", [pixels]),
        row("               prompt tokens", [prompt]),
    ]
    if not pre["resolution_ok"]:
        lines.append(row("               resolution", [pre["resolution_detail"] + " FAIL"]))
    lines += [
        row("vision         features, rel err", each(lambda c, t: fig(c["vision_rel_err"], t["vision"]))),
        row("connector      output, rel err",
            each(lambda c, t: fig(c["connector_rel_err"], t["connector"], c["judged"]))),
        row("decoder        first-step logits, rel err",
            each(lambda c, t: fig(c["decoder_rel_err"], t["decoder"], c["judged"]))),
        row("               top-1 / top-5", each(lambda c, t: topk(c, "decoder"))),
        row("end to end     first-step logits, rel err",
            each(lambda c, t: fig(c["e2e_rel_err"], t["end_to_end"], c["judged"]))),
        row("               top-1 / top-5", each(lambda c, t: topk(c, "e2e"))),
        row("               greedy tokens agreeing", each(lambda c, t: greedy(c))),
        row("TTFT           ours, this device", each(lambda c, t: f"{c['ttft_ms']:.1f} ms")),
        row("               reference, CPU float32", [f"{report['reference_ttft_ms']:.1f} ms"]),
    ]
    for n, c in cols.items():
        if not c["judged"]:
            lines.append(f"({n}: quantized, so only the vision tower, which stays in float, is judged)")
    return "\n".join(lines)


def verdict_line(report: dict) -> str:
    if report["ok"]:
        return "verify: OK, every figure within its threshold"
    details = "; ".join(f"{f['part']} ({f['column']}): {', '.join(f['what'])}" for f in report["failures"])
    return f"error: diverged: {', '.join(report['diverged'])}; {details}"


# ---------------------------------------------------------------------------------------------
# The run


def load_float32(src: Path, tmp: Path):
    """Our model converted from SRC in float32 (into TMP) and loaded: the user's own path
    (converter, then load), without the rounding of a half-precision file, so that this column
    measures the port alone."""
    import contextlib
    import io

    from .convert import convert
    from .loader import load_converted

    with contextlib.redirect_stderr(io.StringIO()):  # mlx-lm's progress bar for a temporary file
        path = convert(src, tmp / "float32", dtype="float32")
    return load_converted(path)


def check_preprocessing(processor, source, prompt: str, r: ReferenceRun, size: int,
                        deviations: List[str]) -> dict:
    """Our pixels (our decode of SOURCE, the file or URL bytes), template and prompt ids against
    the reference's (no dtype changes these); DEVIATIONS: what the reference's decode took from
    our rules, where they deliberately differ from Apple's."""
    from .processing import format_prompt

    pixels = np.array(processor.pixels([source], size=size)).transpose(0, 3, 1, 2)
    diff = float(np.abs(pixels - r.pixels).max()) if pixels.shape == r.pixels.shape else float("inf")
    text = format_prompt(prompt, 1)
    ours = processor.encode(text, size=size)
    ref = [processor.image_token_id if i == r.image_token_id else i for i in r.ids]
    detail = ""
    if text != reference_prompt(prompt):
        detail = "(the template differs from the reference's)"
    elif ours != ref:
        at = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        detail = f"at position {at} ({len(ours)} vs {len(ref)} ids)"
    return {
        "decode_deviations": deviations, "pixels_max_diff": diff, "pixels_ok": diff <= PIXEL_TOL,
        "prompt_tokens": len(ref), "prompt_ok": not detail, "prompt_detail": detail,
        "resolution_ok": processor.image_size == size,
        "resolution_detail": f"ours {processor.image_size} px, the reference's {size} px",
    }


def verify(model: str, image, prompt: str = DEFAULT_PROMPT, tokens: int = DEFAULT_TOKENS,
           converted: Optional[str] = None, image_name: Optional[str] = None) -> dict:
    """Run the whole check and return the report (what --json prints). Raises VerifyError, or
    ValueError/OSError for bad input."""
    try:
        return _verify(model, image, prompt, tokens, converted, image_name)
    except ReferenceNotInstalled as e:
        raise VerifyError(str(e), EXIT_NO_REFERENCE) from None
    except ReferenceUnavailable as e:
        raise VerifyError(str(e), EXIT_USAGE) from None


def _verify(model: str, image, prompt: str, tokens: int, converted: Optional[str],
            image_name: Optional[str]) -> dict:
    import gc

    check_reference_packages()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import mlx.core as mx

    from .loader import converted_path, load_converted, read_config
    from .processing import Processor

    source, pil, ref_image, deviations = decode_image(image)
    src = resolve_source(model)
    layout = source_layout(src)
    # Converting (once, into load()'s cache) comes first: a source it refuses stops here.
    conv_dir = Path(converted) if converted else converted_path(model)
    conv_config = read_config(conv_dir)
    processor = Processor.from_pretrained(conv_dir, conv_config)

    # The reference runs alone; its results are kept as numpy and the model is freed, so that
    # at most one model is in memory at a time.
    ref = load_reference(src, layout)
    r = run_reference(ref, ref_image, prompt, tokens, stop_ids(processor))
    ref_description, size = ref.description, ref.size
    del ref
    gc.collect()
    pre = check_preprocessing(processor, source, prompt, r, size, deviations)

    columns = {}
    with tempfile.TemporaryDirectory(prefix="fastvlm-verify-") as tmp:
        model32, processor32 = load_float32(src, Path(tmp))
        th = THRESHOLDS["float32"]
        columns["float32"] = dict(
            source="converted from the source in float32 (a temporary copy)", thresholds=th,
            **measure(model32, processor32, pil, prompt, r, tokens, th),
        )
    del model32, processor32
    gc.collect()
    mx.clear_cache()

    ours, processor = load_converted(conv_dir)
    dtype = dtype_name(model_dtype(ours))
    quantized = bool(conv_config.quantization)
    name = dtype + (f" q{conv_config.quantization['bits']}" if quantized else "")
    if name == "float32":
        name = "float32 (converted)"
    th = THRESHOLDS.get(dtype, THRESHOLDS["bfloat16"])
    columns[name] = dict(
        source=str(conv_dir), thresholds=th,
        **measure(ours, processor, pil, prompt, r, tokens, th, judge_precision=not quantized),
    )

    fails = []
    if not (pre["pixels_ok"] and pre["prompt_ok"] and pre["resolution_ok"]):
        what = [text for text, ok in (
            (f"pixels max |diff| {pre['pixels_max_diff']:.1e} > {PIXEL_TOL:.0e}", pre["pixels_ok"]),
            (f"prompt tokens differ {pre['prompt_detail']}", pre["prompt_ok"]),
            (pre["resolution_detail"], pre["resolution_ok"]),
        ) if not ok]
        fails.append({"part": "preprocessing", "column": "all", "what": what})
    for n, c in columns.items():
        fails += [{"part": p, "column": n, "what": w} for p, w in failures(c, c["thresholds"]).items()]
    report = {
        "model": model, "source": str(src), "layout": layout, "converted": str(conv_dir),
        "image": image_name or (str(image) if isinstance(image, (str, Path)) else "(image)"),
        "prompt": prompt, "tokens": tokens, "resolution": size, "reference": ref_description,
        "device": str(mx.default_device()), "reference_ttft_ms": r.ttft_ms,
        "reference_tokens": r.tokens, "preprocessing": pre, "columns": columns,
        "thresholds": {"pixels_max_diff": PIXEL_TOL, "tie_factor": TIE_FACTOR},
        "failures": fails,
    }
    report["diverged"] = diverged_parts(fails)
    report["ok"] = not report["diverged"]
    return report


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(
        prog="fastvlm-verify",
        description=(
            "Check fastvlm-mlx against the PyTorch reference built from the same source "
            "checkpoint, on one image, part by part (preprocessing, vision, connector, decoder)."
        ),
        epilog=EXIT_CODES,
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="the source checkpoint (Apple or transformers layout): a directory or a hub id")
    p.add_argument("--image", default=None,
                   help="image path or URL (default: examples/images/chelsea.jpg of the repository)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="greedy tokens to compare")
    p.add_argument("--converted", default=None, metavar="DIR",
                   help="our converted model to check (default: what fastvlm_mlx.load(--model) "
                        "converts into its cache, float16)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p



def main(argv=None) -> int:
    """verify's own exit codes (EXIT_CODES) under _cli's one-line policy."""
    args = build_parser().parse_args(argv)
    _cli.install_warning_hook()
    if args.tokens < 1:
        _cli.print_error("--tokens must be at least 1")
        return EXIT_USAGE
    image = args.image
    if image is None:
        if not EXAMPLE_IMAGE.is_file():
            _cli.print_error(f"no --image given, and the example image {EXAMPLE_IMAGE} is not there: pass --image IMG")
            return EXIT_USAGE
        image = str(EXAMPLE_IMAGE)
    try:
        report = verify(args.model, image, args.prompt, args.tokens, args.converted,
                        image_name=Path(image).name if args.image is None else image)
    except VerifyError as e:
        _cli.print_error(e)
        return e.code
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # InputError, ModelLoadError, ConvertError, I/O
        _cli.print_error(e)
        return EXIT_USAGE
    except Exception as e:  # never a traceback for the user
        _cli.print_error(f"{type(e).__name__}: {e}")
        return EXIT_ERROR
    if args.json:
        print(json.dumps(report, default=_json_default), flush=True)
    else:
        print(format_table(report), flush=True)
    if report["ok"]:
        if not args.json:
            print(verdict_line(report), file=sys.stderr, flush=True)
        return EXIT_OK
    print(verdict_line(report), file=sys.stderr, flush=True)
    return EXIT_DIVERGED


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
