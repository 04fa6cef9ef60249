"""Time to first token: one definition and one clock, for the CLI, the API, the server and the
benchmark (its peers included).

TTFT is measured as Apple's app does: from just before preprocessing to the first sampled token,
model load and image decoding excluded. It is the sum of five parts, each closed by an `mx.eval`
(or, for a peer, its device sync), so that the lazy graph cannot move work from one part into
another. Callers that spend time of their own on a part (the server tokenizes before the model is
free) pass it in when the Timings is made; nobody patches a finished one.
"""

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

TTFT_PARTS = ("preprocess_ms", "vision_ms", "connector_ms", "prefill_ms", "first_token_ms")


@dataclass
class Timings:
    load_ms: float = 0.0  # reading and decoding image files / URLs: outside TTFT
    preprocess_ms: float = 0.0  # pixels, template and tokenization, splice
    vision_ms: float = 0.0  # encoder; 0 when every image's features came from a cache
    connector_ms: float = 0.0
    prefill_ms: float = 0.0  # every prompt position but the last, into the KV cache
    first_token_ms: float = 0.0  # the last position, the first token sampled and evaluated
    decode_tps: float = 0.0  # tokens per second after the first
    peak_memory_gb: float = 0.0
    feature_cache_hit: bool = False
    queue_ms: Optional[float] = None  # the server only: the wait before the model was free
    # Batched requests only (batch.py): the whole batch's vision-tower call, of which
    # `vision_ms` is this request's share.
    batch_vision_ms: Optional[float] = None
    # Batched requests only: the most requests decoded together in one step with this one.
    batch_size: Optional[int] = None

    @property
    def ttft_ms(self) -> float:
        """preprocess + vision + connector + prefill + first token."""
        return sum(getattr(self, part) for part in TTFT_PARTS)

    def to_dict(self) -> dict:
        d = asdict(self)
        for optional in ("queue_ms", "batch_vision_ms", "batch_size"):
            if d[optional] is None:
                del d[optional]
        d["ttft_ms"] = self.ttft_ms
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


class Clock:
    """Milliseconds between boundaries. `sync` (default: nothing) runs before each reading:
    MLX code calls `lap()` right after an `mx.eval`; a torch peer passes its device sync."""

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.sync = sync
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1e3, now
        return ms


def ms_since(t0: float) -> float:
    """Milliseconds since `time.perf_counter()` read t0 (load and queue times)."""
    return (time.perf_counter() - t0) * 1e3
