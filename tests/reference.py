"""The PyTorch oracle for the tests: timm's fastvit_mci3 and transformers' FastVLM, random weights.

Every tensor is randomized at a sane scale (layer scales, BatchNorm statistics and biases too), so
that each one moves the output and a mis-mapped tensor cannot hide. The depthwise mixers (RepMixer,
RepCPE) are identity-centred, as trained ones are, so the signal survives the depth of the tower.
"""

import json
import math
import re
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


def tokenizer_length(path: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(path)))


@torch.no_grad()
def apple_vocabulary(model, tokenizer_dir: Path):
    """The model as Apple's `load_pretrained_model` leaves it: embeddings and lm_head resized
    to len(tokenizer), so the checkpoint's padded rows can never be produced (in place)."""
    model.resize_token_embeddings(tokenizer_length(tokenizer_dir))
    return model


def checkpoint_state(path: Path) -> dict:
    """The tensors of a transformers checkpoint directory, as saved (torch tensors)."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@torch.no_grad()
def greedy(model, prompt_ids, pixels_nchw, n_tokens: int):
    """transformers' greedy continuation: (token ids, log-softmax of the raw logits at each)."""
    out = model.generate(
        input_ids=torch.tensor([prompt_ids]), pixel_values=torch.from_numpy(pixels_nchw),
        max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, eos_token_id=None,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    logprobs = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.logits, tokens)]
    return tokens, logprobs


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


# --- Other checkpoint layouts, built from a transformers-layout state dict by the documented
# --- mappings (fastvlm-reference.md, "Checkpoint layouts").

APPLE_NETWORK = {
    "stages.0.blocks": 0, "stages.1.downsample": 1, "stages.1.blocks": 2, "stages.2.downsample": 3,
    "stages.2.blocks": 4, "stages.3.downsample": 5, "stages.3.pos_emb": 6, "stages.3.blocks": 7,
    "stages.4.downsample": 8, "stages.4.pos_emb": 9, "stages.4.blocks": 10,
}


def to_apple_key(key: str) -> str:
    for old, new in (
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.language_model.", "model."),
    ):
        if key.startswith(old):
            return new + key[len(old):]
    prefix = "model.vision_tower.timm_model."
    if not key.startswith(prefix):
        return key
    k = key[len(prefix):]
    m = re.match(r"(stages\.\d+\.(?:blocks|downsample|pos_emb))(.*)", k)
    if m:
        k = f"network.{APPLE_NETWORK[m.group(1)]}{m.group(2)}"
    for old, new in (
        ("stem.", "patch_embed."), ("final_conv.", "conv_exp."), ("se.fc1.", "se.reduce."),
        ("se.fc2.", "se.expand."), ("mlp.", "convffn."), ("proj.0.reparam_conv.", "proj.0.lkb_reparam."),
    ):
        k = k.replace(old, new)
    k = re.sub(r"(layer_scale(_[12])?)\.gamma$", r"\1", k)
    return "model.vision_tower.vision_tower.model." + k


def to_mlx_vlm(state: dict) -> dict:
    """mlx-vlm's export: Apple's vision names under vision_tower.vision_model. (stem as
    patch_embed.blocks.N), MLX conv layout, layer scales (1, 1, C), head.proj kept, projector
    mm_projector.0/.2, decoder under language_model. Values: numpy float32."""
    out = {}
    for k, v in state.items():
        v = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
        k = to_apple_key(k)
        if k.startswith("model.vision_tower.vision_tower.model."):
            k = "vision_tower.vision_model." + k[len("model.vision_tower.vision_tower.model."):]
            k = k.replace(".patch_embed.", ".patch_embed.blocks.")
            if v.ndim == 4:
                v = v.transpose(0, 2, 3, 1)
            if re.search(r"layer_scale(_[12])?$", k):
                v = v.reshape(1, 1, -1)
        elif k.startswith("model.mm_projector."):
            k = k[len("model."):]
        elif k.startswith("model."):
            k = "language_model." + k
        elif k.startswith("lm_head."):
            k = "language_model." + k
        out[k] = np.ascontiguousarray(v)
    out["vision_tower.vision_model.head.proj"] = np.zeros((3072, 768), np.float32)
    return out


def apple_config(size: int, text: dict) -> dict:
    return {
        "model_type": "llava_qwen2", "architectures": ["LlavaQwen2ForCausalLM"],
        "mm_vision_tower": f"mobileclip_l_{size}", "mm_hidden_size": 3072,
        "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad",
        # Apple's configs say tied even where lm_head.weight exists: the tensors must decide.
        **{**text, "tie_word_embeddings": True},
    }


class CountingTower:
    """Counts calls of model.vision_tower, in any thread (its class is swapped for a counting
    subclass while the context is open)."""

    def __init__(self, model):
        self.tower, self.calls = model.vision_tower, 0

    def __enter__(self):
        counter, base = self, type(self.tower)

        class Counted(base):
            def __call__(self, x):
                counter.calls += 1
                return base.__call__(self, x)

        self.tower.__class__ = Counted
        return self

    def __exit__(self, *exc):
        self.tower.__class__ = type(self.tower).__mro__[1]


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LocalHTTP:
    """A loopback HTTP server of a test's own. ROUTES maps a path to `answer(handler)`, which
    writes the response; `served` counts the requests per path and `open` the connections still
    being answered (`max_open` their most at once)."""

    def __init__(self, routes):
        import collections
        import http.server
        import threading

        server = self
        self.routes, self.served, self.open, self.max_open = routes, collections.Counter(), 0, 0
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                answer = server.routes.get(self.path)
                with server.lock:
                    server.served[self.path] += 1
                    server.open += 1
                    server.max_open = max(server.max_open, server.open)
                try:
                    if answer is None:
                        self.send_error(404)
                    else:
                        answer(self)
                except OSError:  # the client went away
                    pass
                finally:
                    with server.lock:
                        server.open -= 1

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send_bytes(data: bytes, content_type: str = "image/png"):
    """A LocalHTTP route answering DATA."""

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return answer


def redirect_to(location: str):
    """A LocalHTTP route answering 302 to LOCATION."""

    def answer(handler):
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def drip(seconds: float, every: float = 0.1):
    """A LocalHTTP route promising a 1 MB body and sending one byte every EVERY seconds, for at
    most SECONDS (a bounded loop), or until the client goes away."""
    import time

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(10**6))
        handler.end_headers()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            handler.wfile.write(b"\0")
            handler.wfile.flush()
            time.sleep(every)

    return answer
