"""The PyTorch oracle for the tests: timm's fastvit_mci3 and transformers' FastVLM, random weights.

Every tensor is randomized at a sane scale (layer scales, BatchNorm statistics and biases too), so
that each one moves the output and a mis-mapped tensor cannot hide. The depthwise mixers (RepMixer,
RepCPE) are identity-centred, as trained ones are, so the signal survives the depth of the tower.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

TINY_LAYERS = [1, 1, 1, 1, 1]
IM_START, IM_END, ENDOFTEXT, IMAGE = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>"


def _identity_kernel(w: torch.Tensor) -> torch.Tensor:
    k = torch.zeros_like(w)
    k[:, 0, w.shape[2] // 2, w.shape[3] // 2] = 1.0
    return k


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, gamma=(0.1, 0.5)) -> None:
    g = torch.Generator().manual_seed(seed)

    def normal(t, std, mean=0.0):
        return torch.randn(t.shape, generator=g) * std + mean

    def uniform(t, lo, hi):
        return torch.rand(t.shape, generator=g) * (hi - lo) + lo

    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            new = uniform(t, 0.5, 2.0)
        elif name.endswith("running_mean"):
            new = normal(t, 0.1)
        elif ".bn." in name and name.endswith("weight"):
            new = uniform(t, 0.5, 1.5)
        elif name.endswith("gamma"):
            new = uniform(t, *gamma)
        elif t.ndim == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
            new = normal(t, 0.1, 1.0)
        elif t.ndim == 1:  # biases: small, so the image (not the biases) drives the features
            new = normal(t, 0.02)
        elif ("token_mixer.reparam_conv" in name or "pos_emb.reparam_conv" in name) and t.ndim == 4:
            new = _identity_kernel(t) + normal(t, 0.3 / t.shape[-1])
        elif "embed_tokens" in name:
            new = normal(t, 1.0)
        elif "lm_head" in name:
            new = normal(t, 1.0)
        else:
            # He scale: most of these feed a GELU, which would otherwise halve the signal each time.
            fan_in = t[0].numel()
            new = normal(t, math.sqrt(2.0 / fan_in))
        t.copy_(new.to(t.dtype))


def timm_tower(layers=TINY_LAYERS, seed=0):
    import timm

    m = timm.create_model(
        "fastvit_mci3", pretrained=False, inference_mode=True, layers=tuple(layers), num_classes=0
    )
    randomize_(m.eval(), seed)
    return m


def text_config(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128):
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab_size,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False,
    )


def vision_config(layers=TINY_LAYERS):
    """Our VisionConfig fields for a fastvit_mci3 with these depths."""
    return {"depths": list(layers)}


@torch.no_grad()
def transformers_vlm(layers=TINY_LAYERS, image_token_id=5, seed=0, **text):
    """transformers' FastVlmForConditionalGeneration with a real (reduced) FastViTHD."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config

    tc = Qwen2Config(**text_config(**text))
    vc = dict(
        model_type="timm_wrapper", architecture="fastvit_mci3", hidden_size=3072,
        do_pooling=False, model_args={"inference_mode": True, "layers": list(layers)},
    )
    cfg = FastVlmConfig(vision_config=vc, text_config=tc, image_token_index=image_token_id)
    m = FastVlmForConditionalGeneration(cfg).eval()
    randomize_(m, seed)
    # Decoder blocks write small updates, so the current token dominates the residual stream and
    # greedy decoding does not collapse onto one token.
    for name, p in m.model.language_model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            p.mul_(0.3)
    return m


def pixels(n=1, size=256, seed=0) -> np.ndarray:
    """Random images in [0, 1], NCHW float32."""
    return np.random.default_rng(seed).random((n, 3, size, size), dtype=np.float32)


def rel_err(ours, ref) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def write_tokenizer(path: Path, vocab_size=400) -> dict:
    """A tiny byte-level BPE tokenizer with Qwen2's special tokens and chat template.

    No tokenizer can be downloaded in tests; this one is trained here on a few sentences.
    Returns the ids of the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [ENDOFTEXT, IM_START, IM_END, IMAGE]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "You are a helpful assistant.", "Describe the image.", "What is in this picture?",
        "A cat sits on a mat next to a red ball.", "system user assistant",
        "The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IMAGE],
    )
    fast.chat_template = template
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return {s: tok.token_to_id(s) for s in specials}


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))
