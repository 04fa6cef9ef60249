"""FastVLM with random weights at the released shapes, and a synthetic tokenizer: a model that
runs anywhere with no download (the benchmark's `--arch`, the scripts).

The vision tower is FastViTHD as released (122.7M parameters), the decoder one of the released
Qwen2 shapes (`ARCHS`), the special token ids Qwen2's. Random weights need no real tokenizer,
but the prompt still goes through the template and tokenization, and the answer through
mlx-lm's detokenizer, so both cost what they cost with the real model.
"""

from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig, VisionConfig

# The released decoders (fastvlm-reference.md). Tokens ids are Qwen2's.
ARCHS = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                 tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               tie_word_embeddings=False),
}
ENDOFTEXT, IM_START, IM_END, IMAGE_ID = 151643, 151644, 151645, 151646


def arch_config(arch: str) -> ModelConfig:
    text = dict(ARCHS[arch], rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)
    return ModelConfig(text_config=text, image_size=1024, image_token_id=IMAGE_ID,
                       eos_token_id=[IM_END, ENDOFTEXT])


def synthetic_processor(config: ModelConfig):
    """A word-level tokenizer over the model's vocabulary, Qwen2's special ids in place."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .processing import Processor

    vocab_size = config.text_config["vocab_size"]
    specials = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
    words = "system user assistant You are a helpful assistant. Describe the image in detail".split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    vocab.update({f"w{i}": i for i in range(len(vocab), ENDOFTEXT)})
    vocab.update(specials)
    vocab.update({f"w{i}": i for i in range(IMAGE_ID, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))  # ids are all taken
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    return Processor(
        tokenizer=TokenizerWrapper(fast, eos_token_ids=config.eos_token_id),
        image_size=config.image_size, image_token_id=config.image_token_id,
        stride=config.vision_config.stride, eos_token_ids=list(config.eos_token_id),
    )


def tame_random_weights(model: nn.Module) -> None:
    """Layer scales of 0.01 (timm initializes them at 1e-5): with mlx's default of 1 the 44
    residual blocks of random weights overflow float16, and inf/NaN timings mean nothing."""
    from mlx.utils import tree_flatten

    scales = [(k, mx.full(v.shape, 0.01, v.dtype)) for k, v in tree_flatten(model.parameters())
              if "layer_scale" in k]
    model.load_weights(scales, strict=False)


def random_model(arch: str, dtype: mx.Dtype, q_bits: Optional[int], q_group_size: int):
    """(model, processor): random weights at ARCH's shapes in DTYPE, the decoder and connector
    quantized to Q_BITS as the converter quantizes them, ready to run (fused, evaluated)."""
    from .convert import quantize_model
    from .model import Model

    config = arch_config(arch)
    model = Model(config)
    tame_random_weights(model)
    model.set_dtype(dtype)
    if q_bits:
        quantize_model(model, config.to_dict(), q_bits, q_group_size)
    model.vision_tower.fuse()
    model.eval()
    mx.eval(model.parameters())
    return model, synthetic_processor(config)


def small_config() -> ModelConfig:
    """A small FastVLM: one block per stage of a narrow FastViTHD (the same block types) at
    256 px, and a two-layer decoder over Qwen2's vocabulary, so that the synthetic tokenizer fits."""
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=128, vocab_size=ARCHS["0.5b"]["vocab_size"], tie_word_embeddings=True,
                rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
    vision = VisionConfig(depths=[1, 1, 1, 1, 1], widths=[16, 32, 64, 128, 256])
    return ModelConfig(text_config=text, vision_config=vision, image_size=256,
                       image_token_id=IMAGE_ID, eos_token_id=[IM_END, ENDOFTEXT])


def write_small_model(dst: Union[str, Path]) -> Path:
    """A converted model directory of random weights at `small_config()`'s shapes, with the
    synthetic tokenizer, written as the converter writes (atomically, into a new DST): what a
    check of the installed tools runs without a download or torch
    (scripts/check_runtime_install.sh)."""
    from .convert import save_converted, write_atomically
    from .model import Model

    config = small_config()
    model = Model(config)
    tame_random_weights(model)
    model.set_dtype(mx.float16)  # as converted models are
    mx.eval(model.parameters())
    tokenizer = synthetic_processor(config).tokenizer._tokenizer

    def write(tmp: Path) -> None:
        save_converted(tmp, model, config.to_dict(), None)
        tokenizer.save_pretrained(str(tmp))

    dst = Path(dst)
    write_atomically(dst, write, force=False)
    return dst
