"""A bounded cache of vision-encoder outputs, so that an image asked about again (a follow-up,
another question, the server's next request) is not encoded again.

Keys hold the image's content digest, the resolution and the dtype: a cache keyed on tokens
alone would serve one image's features for another, since every image's slots hold the same
placeholder id. `default_feature_cache(model)` is the one a model uses unless told otherwise; it
is kept here, beside the model, not inside the nn.Module (it is no parameter).
"""

import collections
import os
import threading
import weakref
from typing import Dict, Optional

import mlx.core as mx

from .processing import InputError

DEFAULT_FEATURE_CACHE_SIZE = 16  # images; FASTVLM_FEATURE_CACHE_SIZE overrides it


class FeatureCache:
    """An LRU of vision features, at most `max_items` of them (0: cache nothing). Thread-safe:
    the server's handlers and its model worker share one."""

    def __init__(self, max_items: int = DEFAULT_FEATURE_CACHE_SIZE):
        self.max_items = max_items
        self._items: "collections.OrderedDict[tuple, mx.array]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Optional[mx.array]:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: mx.array) -> None:
        if self.max_items <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def feature_cache_size() -> int:
    raw = os.environ.get("FASTVLM_FEATURE_CACHE_SIZE")
    if raw is None or raw == "":
        return DEFAULT_FEATURE_CACHE_SIZE
    try:
        size = int(raw)
    except ValueError:
        size = -1
    if size < 0:
        raise InputError(f"FASTVLM_FEATURE_CACHE_SIZE={raw!r} is not a whole number >= 0")
    return size


_DEFAULTS: Dict[int, FeatureCache] = {}
_DEFAULTS_LOCK = threading.Lock()


def default_feature_cache(model) -> FeatureCache:
    """The model's own feature cache, made on first use and dropped with the model."""
    with _DEFAULTS_LOCK:
        cache = _DEFAULTS.get(id(model))
        if cache is None:
            cache = _DEFAULTS[id(model)] = FeatureCache(feature_cache_size())
            weakref.finalize(model, _DEFAULTS.pop, id(model), None)
        return cache


def resolve_feature_cache(feature_cache, model) -> Optional[FeatureCache]:
    """A FeatureCache as given; True: the model's own; False or None: none."""
    if feature_cache is True:
        return default_feature_cache(model)
    if feature_cache is False or feature_cache is None:
        return None
    return feature_cache
