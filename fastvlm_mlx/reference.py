"""verify's PyTorch reference, built from a source checkpoint and run in float32 on the CPU.

For the transformers layout it is transformers' `FastVlmForConditionalGeneration`; for Apple's,
timm's `fastvit_mci3` (inference form) + the mlp2x_gelu connector + transformers'
`Qwen2ForCausalLM`, loaded by the documented key mapping. The reference decodes the image itself
(Apple's `predict.py`, with our deliberate deviations named), pads and resizes it with the CLIP
image processor, writes the qwen_2 template out, and decodes greedily: `run_reference` keeps
every result as numpy, so the torch model can be freed before ours is loaded.

A reference that cannot be built raises `ReferenceUnavailable` (`ReferenceNotInstalled` when
torch, transformers or timm is missing); verify maps them to its exit codes.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List

import numpy as np

from .checkpoint import (
    APPLE_IMAGE_TOKEN,
    resolution,
    source_config,
    source_state_dict,
    text_fields,
    vision_depths,
)
from .extras import EXTRAS, install_line, missing


class ReferenceUnavailable(Exception):
    """The PyTorch reference cannot be built from this source; the message says why in one line."""


class ReferenceNotInstalled(ReferenceUnavailable):
    """torch, transformers or timm is not installed."""


def check_reference_packages() -> None:
    """torch, transformers and timm findable; looked up, not imported, so that nothing (such as
    transformers' own warning about a missing torch) is printed before our one line."""
    absent = missing(EXTRAS["verify"])
    if absent:
        raise ReferenceNotInstalled(
            f"verify needs the PyTorch reference, and {', '.join(absent)} "
            f"{'is' if len(absent) == 1 else 'are'} not installed: {install_line('verify')}"
        )



@dataclass
class Reference:
    layout: str
    description: str
    size: int  # the trained resolution
    image_token_id: int  # the slot id in the reference's prompt ids
    tokenizer: object
    vision: Callable  # pixels (1, 3, S, S) -> features (1, N, C)
    connector: Callable  # features -> (1, N, d)
    embed_tokens: Callable
    lm: Callable  # forward(inputs_embeds= | input_ids=, past_key_values=, use_cache=) -> .logits
    preprocessor: dict = field(default_factory=dict)

    def prompt_ids(self, text: str, n_slots: int) -> List[int]:
        if self.layout == "apple":
            # LLaVA's tokenizer_image_token: the text around <image> is tokenized piece by piece.
            ids: List[int] = []
            for i, chunk in enumerate(text.split("<image>")):
                if i:
                    ids += [self.image_token_id] * n_slots
                ids += self.tokenizer(chunk).input_ids
            return ids
        # transformers' LlavaProcessor: <image> repeated once per feature row, one tokenization.
        ids = self.tokenizer(text.replace("<image>", "<image>" * n_slots)).input_ids
        if ids.count(self.image_token_id) != n_slots * text.count("<image>"):
            raise ReferenceUnavailable(
                f"the source's tokenizer does not map <image> to image_token_index {self.image_token_id}"
            )
        return ids

    def embed(self, ids: List[int], features):
        import torch

        ids_t = torch.tensor([ids])
        slots = ids_t == self.image_token_id
        emb = self.embed_tokens(torch.where(slots, torch.zeros_like(ids_t), ids_t))
        emb[slots] = features.reshape(-1, emb.shape[-1]).to(emb.dtype)
        return emb


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:
        pass


def load_reference(src: Path, layout: str) -> Reference:
    import torch
    from transformers import AutoTokenizer

    _quiet_transformers()
    cfg = source_config(src)
    pre_file = src / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    size = resolution(src, cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:
        raise ReferenceUnavailable(f"cannot load the tokenizer of {src} ({type(e).__name__}: {e})") from None
    common = dict(size=size, tokenizer=tokenizer, preprocessor=pre)
    if layout == "transformers":
        from transformers import FastVlmForConditionalGeneration

        try:
            model, info = FastVlmForConditionalGeneration.from_pretrained(
                str(src), dtype=torch.float32, output_loading_info=True
            )
        except Exception as e:
            raise ReferenceUnavailable(f"transformers cannot load {src} ({type(e).__name__}: {e})") from None
        if info.get("missing_keys"):
            # from_pretrained would fill these with random values: no reference then.
            raise ReferenceUnavailable(f"{src} lacks tensor {sorted(info['missing_keys'])[0]!r}")
        model.eval()
        apple_vocabulary(model, tokenizer)
        tower = model.model.vision_tower

        def vision(x):
            # As FastVlmModel.get_image_features: the feature map flattened row-major to tokens.
            return tower(x, return_dict=True).last_hidden_state.flatten(2).permute(0, 2, 1)

        return Reference(
            layout=layout,
            description="transformers FastVlmForConditionalGeneration",
            image_token_id=int(model.config.image_token_id),
            vision=vision,
            connector=model.model.multi_modal_projector,
            embed_tokens=model.get_input_embeddings(),
            lm=model,
            **common,
        )
    return _apple_reference(src, cfg, common)


def apple_vocabulary(model, tokenizer) -> None:
    """As Apple's `load_pretrained_model`: the embeddings and head resized to len(tokenizer), so
    the checkpoint's padded rows are never produced (our decoder's logits stop there too)."""
    if len(tokenizer) < model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def _load_strict(module, state: dict, what: str) -> None:
    """load_state_dict that names the first missing or unexpected tensor (BN counters aside)."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise ReferenceUnavailable(f"the checkpoint lacks {what} tensor {missing[0]!r} ({len(missing)} missing)")
    if result.unexpected_keys:
        raise ReferenceUnavailable(f"unknown {what} tensor {result.unexpected_keys[0]!r} in the checkpoint")


def _apple_reference(src: Path, cfg: dict, common: dict) -> Reference:
    """timm fastvit_mci3 + mlp2x_gelu + Qwen2ForCausalLM, by the documented key mapping."""
    import timm
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .weights import WeightError, apple_vision_name, is_unused

    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in source_state_dict(src).items()
        if not is_unused(k)  # the pooling head, BN step counters, rotary caches
    }
    prefix = "model.vision_tower.vision_tower.model."
    vision_state, projector_state, text_state = {}, {}, {}
    try:
        for k, v in state.items():
            if k.startswith(prefix):
                vision_state[apple_vision_name(k[len(prefix):])] = v
            elif k.startswith("model.mm_projector."):
                projector_state[k[len("model.mm_projector."):]] = v
            else:
                text_state[k] = v
    except WeightError as e:
        raise ReferenceUnavailable(f"{src}: {e}") from None
    depths = vision_depths(vision_state, prefix="")
    if len(depths) != 5 or not all(depths):
        raise ReferenceUnavailable(f"{src}: the vision tower does not have the 5 stages of FastViTHD")
    tower = timm.create_model(
        "fastvit_mci3", pretrained=False, inference_mode=True, layers=tuple(depths), num_classes=0,
    ).eval()
    _load_strict(tower, vision_state, "vision")

    if "0.weight" not in projector_state:
        raise ReferenceUnavailable(f"{src} has no mm_projector.0.weight")
    d_in = int(cfg.get("mm_hidden_size", projector_state["0.weight"].shape[1]))
    d = projector_state["0.weight"].shape[0]
    # LLaVA's mlp2x_gelu: Linear -> GELU (exact, erf) -> Linear; indices 0 and 2 as in the keys.
    connector = torch.nn.Sequential(torch.nn.Linear(d_in, d), torch.nn.GELU(), torch.nn.Linear(d, d)).eval()
    _load_strict(connector, projector_state, "connector")

    embed = text_state.get("model.embed_tokens.weight")
    if embed is None:
        raise ReferenceUnavailable(f"{src} has no model.embed_tokens.weight")
    text = text_fields(cfg)
    # The config's tie_word_embeddings is not reliable in Apple's releases: the tensors decide.
    # A tied head is given as a copy of the embeddings, which computes the same.
    text_state.setdefault("lm_head.weight", embed)
    text.update(vocab_size=int(embed.shape[0]), tie_word_embeddings=False)
    lm = Qwen2ForCausalLM(Qwen2Config(**text)).float().eval()
    _load_strict(lm, text_state, "decoder")
    apple_vocabulary(lm, common["tokenizer"])

    def vision(x):
        return tower.forward_features(x).flatten(2).permute(0, 2, 1)

    return Reference(
        layout="apple",
        description="timm fastvit_mci3 + mlp2x_gelu + transformers Qwen2ForCausalLM",
        image_token_id=APPLE_IMAGE_TOKEN,
        vision=vision,
        connector=connector,
        embed_tokens=lm.get_input_embeddings(),
        lm=lm,
        **common,
    )


def expand2square(image, background=(0, 0, 0)):
    """LLaVA's expand2square (image_aspect_ratio: pad): the image centred on a square."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


# Our deliberate deviations from Apple's decode (README, "Image decoding"), as the report names them.
DEVIATION_EXIF = ("EXIF orientation {} applied (Apple's predict.py ignores it; a sideways photo is "
                  "the worse input)")
DEVIATION_ALPHA = ("transparency composited onto white (Apple's predict.py drops the alpha and shows "
                   "what lies under it, often black)")
DEVIATION_16_BIT = "16-bit samples scaled to 8 bits (Apple's convert('RGB') clips them, nearly all to white)"
DEVIATION_FLOAT = "float samples rounded to 8 bits (Apple's convert('RGB') truncates them)"


def reference_image(source):
    """(the reference's decode of SOURCE, the deviations applied). SOURCE is a path, encoded
    bytes or an image in memory; the decode is Apple's predict.py, `Image.open(f).convert('RGB')`,
    except where the file needs one of our deliberate deviations: that rule is applied here too
    and named, so that the pixel check still compares everything else."""
    import io

    from PIL import Image, ImageOps

    from .processing import EXIF_ERRORS, exif_orientation, has_transparency, to_8_bit, to_pil

    if isinstance(source, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, Path)):
        image = Image.open(source)
    elif isinstance(source, Image.Image):
        image = source
    else:  # an array is not decoded: both sides take its pixels
        return to_pil(source), []
    image.load()
    deviations = []
    orientation = exif_orientation(image)
    if orientation != 1:
        try:
            image = ImageOps.exif_transpose(image)
            deviations.append(DEVIATION_EXIF.format(orientation))
        except EXIF_ERRORS:
            pass  # a broken EXIF block: decoded as stored, on both sides
    eight_bit = to_8_bit(image)  # Pillow has no scaling conversion: rule 3 is ours (test_processing)
    if eight_bit is not image:
        deviations.append(DEVIATION_FLOAT if image.mode == "F" else DEVIATION_16_BIT)
        image = eight_bit
    if has_transparency(image):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # an opaque alpha band changes nothing
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            deviations.append(DEVIATION_ALPHA)
    return image.convert("RGB"), deviations


def decode_image(image):
    """(what our side reads, our decode, the reference's decode, its deviations). A URL is
    fetched once, and its bytes are decoded both ways."""
    from .processing import fetch_url, is_url, to_pil

    source = fetch_url(image) if is_url(image) else image
    ours = to_pil(source)  # first: a bad image is refused in our one line
    return (source, ours, *reference_image(source))


def reference_pixels(image, size: int, preprocessor: dict) -> np.ndarray:
    """The reference preprocessing: pad to a square (Apple's `image_aspect_ratio: pad`), then the
    CLIP image processor with the source's preprocessor_config.json, else the documented one
    (shortest edge and crop = the trained size, bicubic, mean 0, std 1). transformers' own
    LlavaProcessor skips the pad; on the padded square its resize-and-crop is a plain resize."""
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # transformers 5
    except ImportError:  # transformers 4: the PIL implementation has the plain name
        from transformers import CLIPImageProcessor
    keys = (
        "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
        "rescale_factor", "do_normalize", "image_mean", "image_std",
    )
    settings = dict(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], resample=3,
    )
    settings.update({k: preprocessor[k] for k in keys if k in preprocessor})
    mean = settings["image_mean"]
    background = tuple(int(x * 255) for x in mean)  # LLaVA pads with the mean colour (black here)
    processor = CLIPImageProcessor(**settings)
    pixels = processor(expand2square(image, background), return_tensors="np")["pixel_values"]
    return np.asarray(pixels, np.float32)


def reference_prompt(prompt: str) -> str:
    """The reference qwen_2 conversation template, written out (fastvlm-reference.md)."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    )


@dataclass
class ReferenceRun:
    pixels: np.ndarray  # (1, 3, S, S)
    ids: List[int]
    image_token_id: int
    vision: np.ndarray  # (1, N, 3072)
    connector: np.ndarray  # (1, N, d)
    logits: np.ndarray  # first step (vocab,)
    tokens: List[int]  # greedy, the stop token included if one was hit
    step_logits: List[np.ndarray]  # the reference's logits at each greedy step
    ttft_ms: float


def run_reference(ref: Reference, image, prompt: str, n_tokens: int, eos: set) -> ReferenceRun:
    """The reference on IMAGE, its own decode (`reference_image`): pixels, prompt, greedy tokens."""
    import warnings

    import torch

    # transformers' own deprecation notices (its cache argument's name changes between
    # versions) are about the reference's internals, nothing the user can act on.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for _ in range(2):  # the first pass warms up; TTFT is the second's, as ours is
            t0 = time.perf_counter()
            pixels = reference_pixels(image, ref.size, ref.preprocessor)
            n_slots = (ref.size // 64) ** 2
            ids = ref.prompt_ids(reference_prompt(prompt), n_slots)
            vision = ref.vision(torch.from_numpy(pixels))
            connector = ref.connector(vision)
            out = ref.lm(inputs_embeds=ref.embed(ids, connector), use_cache=True)
            logits = out.logits[0, -1].float()
            token = int(logits.argmax())
            ttft_ms = (time.perf_counter() - t0) * 1e3
        tokens, steps = [token], [logits.numpy()]
        past = out.past_key_values
        while len(tokens) < n_tokens and token not in eos:
            out = ref.lm(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            step = out.logits[0, -1].float()
            token = int(step.argmax())
            tokens.append(token)
            steps.append(step.numpy())
    return ReferenceRun(
        pixels=pixels, ids=ids, image_token_id=ref.image_token_id, vision=vision.numpy(),
        connector=connector.numpy(), logits=steps[0], tokens=tokens, step_logits=steps,
        ttft_ms=ttft_ms,
    )

