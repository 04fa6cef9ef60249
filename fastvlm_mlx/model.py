"""FastVLM: FastViTHD -> mlp2x_gelu connector -> mlx-lm's Qwen2, and the splice between them."""

import functools
from typing import List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .vision import FastViTHD
from .weights import check_weights


class Connector(nn.Module):
    """`mlp2x_gelu`: Linear(3072 -> d) -> GELU (erf) -> Linear(d -> d), with biases."""

    def __init__(self, in_dims: int, out_dims: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dims, out_dims)
        self.linear_2 = nn.Linear(out_dims, out_dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.gelu(self.linear_1(x)))


@functools.lru_cache(maxsize=None)
def language_model_class() -> type:
    """`LanguageModel`: mlx-lm's Qwen2 decoder, its logits cut to the tokenizer's vocabulary.

    Qwen2 checkpoints pad `embed_tokens` and `lm_head` past the tokenizer (151,936 rows for
    151,665 tokens). Apple's loader resizes both to len(tokenizer), so the padded ids are never
    produced and hold no softmax mass. Cutting the logits here does the same for every consumer
    (our first token, mlx-lm's `generate_step` and `BatchGenerator`, logprobs) and keeps the
    checkpoint's tensors as they are. `vocab_limit` None means the whole head.

    Defined on first use: importing any part of mlx_lm runs its package `__init__`, which imports
    transformers (and torch, when installed), 1-3 s; only building a model needs the decoder, so
    `import fastvlm_mlx` and every tool's `--help` stay fast.
    """
    from mlx_lm.models import qwen2

    class LanguageModel(qwen2.Model):
        vocab_limit: Optional[int] = None

        def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
            logits = super().__call__(inputs, cache=cache, input_embeddings=input_embeddings)
            n = self.vocab_limit
            return logits if n is None or n >= logits.shape[-1] else logits[..., :n]

    return LanguageModel


def splice_image_features(
    input_ids: mx.array,
    text_embeddings: mx.array,
    image_features: mx.array,
    image_token_id: int,
) -> mx.array:
    """Put one row of image features at each image-token slot of the prompt.

    input_ids (B, L) holds `image_token_id` once per feature row; image_features (N, d) holds the
    rows of every image in the order their slots appear (row-major over the batch). The slots
    are found on the host, which costs a sync on a small integer array and nothing else.
    """
    is_image = input_ids == image_token_id
    n_slots = int(is_image.sum().item())
    if n_slots != image_features.shape[0]:
        raise ValueError(
            f"the prompt has {n_slots} image-token slots but the images give "
            f"{image_features.shape[0]} feature rows"
        )
    if n_slots == 0:
        return text_embeddings
    # Slot k of the flattened prompt takes feature row k: a gather by running count.
    row = mx.maximum(mx.cumsum(is_image.reshape(-1).astype(mx.int32)) - 1, 0)
    rows = image_features.astype(text_embeddings.dtype)[row].reshape(text_embeddings.shape)
    return mx.where(is_image[..., None], rows, text_embeddings)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = FastViTHD(config.vision_config)
        from mlx_lm.models import qwen2  # on first use: see language_model_class

        text_args = qwen2.ModelArgs.from_dict(config.text_config)
        self.multi_modal_projector = Connector(
            config.vision_config.num_features, text_args.hidden_size
        )
        self.language_model = language_model_class()(text_args)
        if config.has_image_newline:  # the row-end feature of spatial_unpad tiles (tiles.py)
            self.image_newline = mx.zeros((text_args.hidden_size,))

    def limit_vocabulary(self, n: int) -> None:
        """Never produce ids >= n (the tokenizer's length): see language_model_class."""
        self.language_model.vocab_limit = min(int(n), self.language_model.args.vocab_size)

    @property
    def head_dim(self) -> int:
        """The width of one attention head: what a quantized KV cache's groups must divide."""
        args = self.language_model.args
        return args.hidden_size // args.num_attention_heads

    @property
    def vocab_size(self) -> int:
        """How many ids the model can produce: the width of its logits."""
        lm = self.language_model
        return lm.vocab_limit if lm.vocab_limit is not None else lm.args.vocab_size

    # The three stages of an image's way into the prompt, kept apart so each can be timed.
    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """Pixels (B, S, S, 3) in [0, 1] -> vision features (B, (S/64)^2, 3072), row-major."""
        pixel_values = pixel_values.astype(self.vision_tower.stem[0].reparam_conv.weight.dtype)
        features = self.vision_tower(pixel_values)
        B, H, W, C = features.shape
        return features.reshape(B, H * W, C)

    def project(self, features: mx.array) -> mx.array:
        return self.multi_modal_projector(features)

    def embed(
        self,
        input_ids: mx.array,
        image_features: Optional[Union[mx.array, Sequence[mx.array]]] = None,
    ) -> mx.array:
        """Token embeddings with the projected image features spliced into the image slots."""
        embed_tokens = self.language_model.model.embed_tokens
        # Image slots may hold an id outside the vocabulary (Apple's layout has no image token);
        # they are overwritten below, so embed a valid id there.
        is_image = input_ids == self.config.image_token_id
        text = embed_tokens(mx.where(is_image, 0, input_ids))
        if image_features is None:
            feats = mx.zeros((0, text.shape[-1]), text.dtype)
        elif isinstance(image_features, (list, tuple)):
            feats = mx.concatenate([f.reshape(-1, f.shape[-1]) for f in image_features])
        else:
            feats = image_features.reshape(-1, image_features.shape[-1])
        return splice_image_features(input_ids, text, feats, self.config.image_token_id)

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        cache: Optional[List] = None,
    ) -> mx.array:
        """Logits for every position of `input_ids`, with `pixel_values` spliced in."""
        features = None
        if pixel_values is not None:
            features = self.project(self.encode_images(pixel_values))
        embeddings = self.embed(input_ids, features)
        return self.language_model(input_ids, cache=cache, input_embeddings=embeddings)

    @property
    def layers(self):
        # mlx-lm's cache helpers (make_prompt_cache) look for the decoder's layers here.
        return self.language_model.layers


def build_model(config: ModelConfig, weights: dict) -> Model:
    """Build the model, quantizing the layers the checkpoint holds quantized, and load weights."""
    model = Model(config)
    if config.quantization:
        q = config.quantization
        nn.quantize(
            model,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model
