"""LRU accounting under a byte budget, shared by the memory and disk tiers.

Exact byte accounting in the style of cachetools: an entry larger than the whole
budget is refused up front, never allowed to evict everything. Not thread-safe:
each backend calls it under its own lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)


class LRUIndex(Generic[K]):
    """Keys in least- to most-recently-used order with their sizes in bytes."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self.used = 0
        self._sizes: OrderedDict[K, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._sizes))

    def size_of(self, key: K) -> int | None:
        return self._sizes.get(key)

    def touch(self, key: K) -> None:
        """Mark ``key`` most recently used (no-op when absent)."""
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def add(self, key: K, size: int, *, recent: bool = True) -> None:
        """Record ``key`` (replacing an older size); ``recent=False`` puts it at the LRU end."""
        old = self._sizes.pop(key, None)
        if old is not None:
            self.used -= old
        self._sizes[key] = size
        if not recent:
            self._sizes.move_to_end(key, last=False)
        self.used += size

    def pop(self, key: K) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used -= size
        return size

    def check_fits(self, size: int) -> None:
        """``ValueError`` when one entry of ``size`` bytes can never fit."""
        if size > self.budget:
            raise ValueError(
                f"chunk of {size} bytes is larger than the whole budget of {self.budget} bytes"
            )

    def victims_for(self, size: int, exclude: K | None = None) -> list[K]:
        """Least recently used keys to drop so that ``size`` more bytes fit."""
        need = self.used + size - self.budget
        if exclude is not None and exclude in self._sizes:
            need -= self._sizes[exclude]  # replacing a key frees its old bytes
        return self._oldest(need, skip=exclude)

    def victims_over_budget(self, keep: K | None = None) -> list[K]:
        """Least recently used keys to drop so that ``used <= budget``, never ``keep``.

        For use after ``add``: ``keep`` is the entry just added, already counted in
        ``used`` (``victims_for(0, exclude=key)`` would subtract it a second time and
        leave the budget exceeded by one entry). ``check_fits`` made sure ``keep``
        alone fits, so dropping the others always suffices.
        """
        return self._oldest(self.used - self.budget, skip=keep)

    def oldest(self, nbytes: int, skip: K | None = None) -> list[K]:
        """Least recently used keys other than ``skip`` whose sizes add up to ``nbytes``
        (fewer when the index holds less): what to drop to free ``nbytes`` whatever the
        budget says, as when the medium itself is full."""
        return self._oldest(nbytes, skip=skip)

    def _oldest(self, need: int, skip: K | None) -> list[K]:
        """Least recently used keys other than ``skip`` whose sizes add up to ``need``."""
        victims: list[K] = []
        for key, s in self._sizes.items():
            if need <= 0:
                break
            if key == skip:
                continue
            victims.append(key)
            need -= s
        return victims
