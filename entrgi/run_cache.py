"""A small least-recently-used store for denoising runs kept between batches and calls.

A run's static buffers and captured CUDA graphs can replay any batch of the same
shapes, so the sampler keeps a few per denoiser (``Denoiser.run_cache``) instead of
capturing again for every batch and every ``generate`` call.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")


class RunCache:
    """Up to ``capacity`` values by key; the least recently used one is dropped first.
    ``clear()`` drops them all; their graphs' memory stays in the shared graph pool for
    the next capture."""

    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, object] = OrderedDict()

    def get_or_build(self, key: Hashable, build: Callable[[], T]) -> tuple[T, bool]:
        """The value stored under ``key`` (marked most recent), else ``build()`` stored;
        returns (value, whether it was reused)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key], True
        value = build()
        self._entries[key] = value
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value, False

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
