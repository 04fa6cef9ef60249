"""A conversation about fixed image(s): a prompt cache, its token history and `rewind`, over
`stream_generate` (as mlx-lm's chat.py: no pipeline of its own). The first turn encodes the
images (or takes their features from the cache); every later turn appends its text to the same
KV cache.

    session = ChatSession(model, processor, ["cat.jpg"])
    session.generate("What is in the picture?").text
    session.generate("And what colour is it?").text

    python -m fastvlm_mlx chat --image cat.jpg          # the interactive REPL (or generate --chat)
"""

import sys
import time
from typing import Iterator, List, Optional, Sequence

from . import _cli
from .generate import (
    GenerationOptions,
    GenerationResponse,
    GenerationResult,
    Prompt,
    check_video_args,
    cli_video,
    collect,
    generation_options,
    resolve_views,
    stream_generate,
    stream_to_stdout,
)
from .loader import load, runtime_dtype
from .processing import DEFAULT_SYSTEM, ImageInput, to_pil
from .timing import Timings, ms_since


class ChatSession:
    """`session.stream(prompt)` yields GenerationResponses, `session.generate(prompt)` returns a
    GenerationResult. `prompt` is the user's text, a list of chat messages (first turn only),
    or token ids (on the first turn with the image slots, mlx-lm style; later, appended as they
    are). Options are stream_generate's; a turn may override the sampling ones."""

    def __init__(
        self,
        model,
        processor,
        images: Optional[Sequence[ImageInput]] = None,
        system: Optional[str] = DEFAULT_SYSTEM,
        resolution: Optional[int] = None,
        feature_cache=True,
        max_pixels: Optional[int] = None,
        tiles=None,
        tile_size: Optional[int] = None,
        **options,
    ):
        from mlx_lm.models.cache import make_prompt_cache

        self.model, self.processor, self.system = model, processor, system
        self.feature_cache = feature_cache
        # Checked now, so that a bad option fails before the first turn.
        self.options = GenerationOptions.for_model(model, options, defaults=processor.generation_defaults)
        # The views' resolution and tiling (stream_generate's tiles, tile_size), checked now.
        self.resolution, self.tiling = resolve_views(model, processor, resolution, tiles, tile_size)
        self.tiles = tiles
        t0 = time.perf_counter()  # image decoding is outside TTFT
        self.images = [to_pil(im, max_pixels=max_pixels) for im in images or []]
        self.load_ms = ms_since(t0)
        self.prompt_cache = make_prompt_cache(model.language_model, max_kv_size=self.options.max_kv_size)
        self.history: List[int] = []  # the ids in prompt_cache, image slots as image_token_id
        self.prompt_ids: List[int] = []  # the first turn's prompt
        self.turns = 0

    @property
    def token_ids(self) -> List[int]:
        """The conversation so far, as fed to the decoder, image slots as image_token_id."""
        return self.history

    @property
    def image_end(self) -> int:
        """How many leading tokens hold the images' slots (0: none)."""
        slots = [i for i, t in enumerate(self.history) if t == self.processor.image_token_id]
        return slots[-1] + 1 if slots else 0

    def can_rewind(self, n: int) -> bool:
        """Whether `rewind(n)` is possible: the image slots stay within the first n tokens and
        the KV cache can be trimmed (a rotating cache that has wrapped cannot)."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        return (self.turns > 0 and max(self.image_end, 1) <= n <= len(self.history)
                and can_trim_prompt_cache(self.prompt_cache))

    def rewind(self, n: int) -> None:
        """Keep only the first n tokens of the conversation (KV cache included), so that another
        continuation can follow as token ids: `session.stream(ids)`. The server uses this to
        reuse the longest common prefix of a stateless request's conversation."""
        from mlx_lm.models.cache import trim_prompt_cache

        if not self.can_rewind(n):
            raise ValueError(f"cannot rewind this conversation of {len(self.history)} tokens to {n}")
        trim_prompt_cache(self.prompt_cache, len(self.history) - n)
        del self.history[n:]
        del self.prompt_ids[n:]

    def stream(self, prompt: Prompt = None, images: Optional[Sequence] = None, *,
               load_ms: float = 0.0, preprocess_ms: float = 0.0, queue_ms: Optional[float] = None,
               **overrides) -> Iterator[GenerationResponse]:
        """One turn; OVERRIDES change this turn's sampling options. IMAGES (later turns only)
        are the session's images again, from a caller who knows their rows are in the cache
        (the server): they are not encoded again. load_ms, preprocess_ms, queue_ms: time the
        caller spent on this turn (see stream_generate)."""
        responses = stream_generate(
            self.model, self.processor, prompt, feature_cache=self.feature_cache,
            **self._turn(images, load_ms, preprocess_ms, queue_ms, overrides))
        prompt_tokens = 0
        try:
            for r in responses:
                prompt_tokens = r.prompt_tokens
                yield r
        finally:
            responses.close()
            self.end_turn(prompt_tokens)

    def add_to(self, batch, prompt: Prompt = None, images: Optional[Sequence] = None, *,
               load_ms: float = 0.0, preprocess_ms: float = 0.0, queue_ms: Optional[float] = None,
               **overrides) -> int:
        """`stream`'s turn, decoded as a row of BATCH (a batch.RunningBatch on this session's
        model; its feature cache is the batch's): returns the row's handle. Once the row has
        finished or was removed, the caller ends the turn with `end_turn`."""
        return batch.add(prompt, **self._turn(images, load_ms, preprocess_ms, queue_ms, overrides))

    def _turn(self, images, load_ms, preprocess_ms, queue_ms, overrides) -> dict:
        """A turn's arguments for stream_generate or RunningBatch.add, but the prompt."""
        self._first_turn = not self.history
        return dict(
            images=self.images if self._first_turn else images, prompt_cache=self.prompt_cache,
            history=self.history, system=self.system, resolution=self.resolution,
            tiles=self.tiles, tile_size=self.resolution if self.tiles is not None else None,
            load_ms=load_ms + (self.load_ms if self._first_turn else 0.0),
            preprocess_ms=preprocess_ms, queue_ms=queue_ms, **vars(self.options.replace(**overrides)))

    def end_turn(self, prompt_tokens: int) -> None:
        """The turn is over (PROMPT_TOKENS: its prompt's length, 0 if it never answered)."""
        self.turns += 1
        if self._first_turn:
            self.prompt_ids = self.history[:prompt_tokens]

    def generate(self, prompt: Prompt = None, **overrides) -> GenerationResult:
        return collect(self.stream(prompt, **overrides))


# ----------------------------------------------------------------------------------------------
# The interactive CLI


def turn_line(t: Timings) -> str:
    parts = f"prefill {t.prefill_ms:.1f} + first token {t.first_token_ms:.1f}"
    if t.vision_ms or t.connector_ms:
        parts = f"vision {t.vision_ms:.1f} + connector {t.connector_ms:.1f} + " + parts
    return f"[TTFT {t.ttft_ms:.1f} ms: preprocess {t.preprocess_ms:.1f} + {parts}; {t.decode_tps:.1f} tok/s]"


def _read_prompt(interactive: bool) -> Optional[str]:
    """The next line from stdin (None at EOF or /exit); empty lines are skipped."""
    while True:
        if interactive:
            sys.stderr.write(">> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return None
        if line.strip():
            return line.strip()


def run_chat(args) -> int:
    """The REPL: the first prompt from --prompt (if given), then one turn per line of stdin."""
    options = dict(generation_options(args), **_cli.tile_options(args))
    check_video_args(args)
    t0 = time.perf_counter()
    images = [to_pil(im, max_pixels=args.max_pixels) for im in args.image]
    load_ms = ms_since(t0)
    model, processor = load(args.model, dtype=runtime_dtype(args.dtype))
    video = cli_video(args, model, processor)  # (its frames fit beside the first prompt)
    if video is not None:
        images, load_ms = video.images, video.decode_ms
    session = ChatSession(model, processor, images, system=args.system, resolution=args.resolution,
                          **options)
    session.load_ms += load_ms  # the images were decoded before the model loaded
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:  # (piped turns need no instructions)
        print(f"fastvlm-chat: {args.model}, {len(images)} image(s). Ask a question; "
              "/exit, Ctrl+D or Ctrl+C ends.", file=sys.stderr, flush=True)
    prompt = args.prompt
    while True:
        if prompt is None:
            try:
                prompt = _read_prompt(interactive)
            except KeyboardInterrupt:
                return 0
            if prompt is None:
                return 0
        try:
            result = stream_to_stdout(session.stream(prompt))
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return 0
        if not args.quiet:
            print(turn_line(result.timings), file=sys.stderr, flush=True)
        prompt = None


def build_parser():
    """generate's flags (but --json): the first turn from --prompt, then one per line of stdin."""
    from .generate import build_parser as generate_parser

    p = generate_parser()
    p.prog = "fastvlm-chat"
    p.description = "Chat with FastVLM about images: one turn per line of stdin (/exit ends)."
    return p


def run_chat_cli(args) -> int:
    if args.json:
        raise ValueError("fastvlm-chat streams its turns; for one JSON answer use fastvlm-generate --json")
    return run_chat(args)


main = _cli.main_of(build_parser, run_chat_cli)


if __name__ == "__main__":  # the package's own copy of this module (see __init__)
    from fastvlm_mlx.chat import main as package_main

    sys.exit(package_main())
