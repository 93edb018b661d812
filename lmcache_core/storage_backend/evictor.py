"""LRU accounting under a byte budget, shared by the memory and disk tiers.

Exact byte accounting in the style of cachetools: an entry larger than the whole
budget is refused up front, never allowed to evict everything. Not thread-safe:
each backend calls it under its own lock.

Interrupt-safe given an ``ident`` hashed and compared in C: a ``KeyboardInterrupt``
(Ctrl-C, or whatever a signal handler raises) landing in any method leaves the
index whole, with the change made or not. The ``OrderedDict`` is keyed by ``ident(key)``, a tuple of builtins hashed and
compared in C, never by the key object itself: CPython's C ``OrderedDict`` calls a
key's ``__eq__`` again after unlinking a node, and an interrupt landing in a
Python ``__eq__`` (a dataclass's) there left its linked list and its table out of
step, so every later eviction raised ``KeyError``. Each change is one statement
whose interruption points all come before it takes effect.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)


def _same(key: K) -> Hashable:
    return key


class LRUIndex(Generic[K]):
    """Keys in least- to most-recently-used order with their sizes in bytes.

    Args:
        budget_bytes: the byte budget.
        ident: maps a key to what the index is keyed by internally: equal keys, equal
            idents; best a tuple of ``str``/``int`` (hashed and compared in C, so no
            interrupt can land inside a table operation). Default: the key itself.
    """

    def __init__(self, budget_bytes: int, ident: Callable[[K], Hashable] | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self.used = 0
        self._ident: Callable[[K], Hashable] = ident or _same
        self._entries: OrderedDict[Hashable, tuple[K, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return self._ident(key) in self._entries  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[K]:
        return iter([key for key, _ in self._entries.values()])

    def items(self) -> list[tuple[K, int]]:
        """``(key, size)`` pairs, least recently used first (a snapshot)."""
        return list(self._entries.values())

    def size_of(self, key: K) -> int | None:
        entry = self._entries.get(self._ident(key))
        return None if entry is None else entry[1]

    def touch(self, key: K) -> None:
        """Mark ``key`` most recently used (no-op when absent)."""
        i = self._ident(key)
        if i in self._entries:
            self._entries.move_to_end(i)

    def add(self, key: K, size: int, *, recent: bool = True) -> None:
        """Record ``key`` (replacing an older size); ``recent=False`` puts it at the LRU end."""
        i = self._ident(key)
        old = self._entries.get(i)
        # One statement each, with no interruption point between the table's change
        # and the count's: ``used`` always matches the entries.
        self._entries[i] = (key, size)
        self.used += size - (0 if old is None else old[1])
        # A replaced entry keeps its place until moved; an interrupt before the move
        # leaves it whole, only not yet most recently used.
        self._entries.move_to_end(i, last=recent)

    def pop(self, key: K) -> int | None:
        i = self._ident(key)
        entry = self._entries.get(i)
        if entry is None:
            return None
        del self._entries[i]
        self.used -= entry[1]
        return entry[1]

    def check_fits(self, size: int) -> None:
        """``ValueError`` when one entry of ``size`` bytes can never fit."""
        if size > self.budget:
            raise ValueError(
                f"chunk of {size} bytes is larger than the whole budget of {self.budget} bytes"
            )

    def victims_for(self, size: int, exclude: K | None = None) -> list[K]:
        """Least recently used keys to drop so that ``size`` more bytes fit."""
        need = self.used + size - self.budget
        skip = None if exclude is None else self._ident(exclude)
        if skip is not None and skip in self._entries:
            need -= self._entries[skip][1]  # replacing a key frees its old bytes
        return self._oldest(need, skip)

    def victims_over_budget(self, keep: K | None = None) -> list[K]:
        """Least recently used keys to drop so that ``used <= budget``, never ``keep``.

        For use after ``add``: ``keep`` is the entry just added, already counted in
        ``used`` (``victims_for(0, exclude=key)`` would subtract it a second time and
        leave the budget exceeded by one entry). ``check_fits`` made sure ``keep``
        alone fits, so dropping the others always suffices.
        """
        return self._oldest(self.used - self.budget, None if keep is None else self._ident(keep))

    def oldest(self, nbytes: int, skip: K | None = None) -> list[K]:
        """Least recently used keys other than ``skip`` whose sizes add up to ``nbytes``
        (fewer when the index holds less): what to drop to free ``nbytes`` whatever the
        budget says, as when the medium itself is full."""
        return self._oldest(nbytes, None if skip is None else self._ident(skip))

    def _oldest(self, need: int, skip: Hashable | None) -> list[K]:
        """Least recently used keys, other than the one of ident ``skip``, whose sizes add up to ``need``."""
        victims: list[K] = []
        if need <= 0:
            return victims
        for i, (key, size) in self._entries.items():
            if i == skip:
                continue
            victims.append(key)
            need -= size
            if need <= 0:
                break
        return victims
