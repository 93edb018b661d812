"""What each tier of an opened store holds, and whether it answered at all.

The library's ``contains`` is a hint that turns an unreachable remote into
"absent" (and counts it in ``stats["unavailable"]``): right for a serving engine,
which must not stall, wrong for an operator asking what is cached. These helpers
let a command tell "not stored" from "could not ask".
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from lmcache_core.errors import StoreUnavailableError

if TYPE_CHECKING:
    from lmcache_core.key import CacheEngineKey
    from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface
    from lmcache_core.store_ops import Store

# Counters a backend bumps when it answered "absent" without an answer from its
# medium: a remote's "unavailable" (timeout, refused connection, open circuit, after
# its retries) and a hybrid's "remote_errors" (its remote raised). A remote's own
# "remote_errors" counts every failed attempt, also one a retry then made good, so
# it is not watched.
_NO_ANSWER_COUNTERS = ("unavailable",)
_HYBRID_NO_ANSWER_COUNTERS = ("unavailable", "remote_errors")


def tiers_of(store: Store) -> list[tuple[str, LMCBackendInterface]]:
    """The store's tiers as (name, backend), fastest first; a single-tier store is its own tier."""
    return store.tiers() or [(store.describe(), store.backend)]


def holding_tiers(store: Store, key: CacheEngineKey) -> tuple[list[str], list[str]]:
    """(tiers that hold ``key``, persistent tiers that lack it), each tier described safely.

    A tiered store's ``contains`` answers from any tier; a write its remote refused
    leaves the chunk in the local tiers only, which is not "stored" for a shared cache.
    """
    missing = set(store.backend.missing_tiers(key))
    tiers = store.tiers()
    if tiers is None:
        where = store.describe()
        return ([], [where]) if missing else ([where], [])
    held: list[str] = []
    lacking: list[str] = []
    for name, tier in tiers:
        (lacking if name in missing else held).append(tier.describe())
    return held, lacking


def _watched(store: Store) -> list[LMCBackendInterface]:
    """The tiers, then the store's own backend (a hybrid counts its remote's errors too)."""
    backend = store.backend
    return [tier for _, tier in tiers_of(store) if tier is not backend] + [backend]


def _no_answers(backend: Any) -> int:
    from lmcache_core.storage_backend.hybrid_backend import LMCHybridBackend

    stats = getattr(backend, "stats", None)
    if stats is None:
        return 0
    names = _HYBRID_NO_ANSWER_COUNTERS if isinstance(backend, LMCHybridBackend) else _NO_ANSWER_COUNTERS
    return sum(int(stats[name]) for name in names)


@contextmanager
def answered(store: Store, what: str) -> Iterator[None]:
    """Run the body's ``contains`` calls; raise if any tier could not be asked.

    Args:
        what: the question, for the error ("whether chunks are cached").

    Raises:
        StoreUnavailableError: a tier (or the store) answered "absent" without an
            answer from its medium: timeout, refused connection, open circuit.
    """
    if store.is_disk:  # files: existence is answered by the kernel (and torch stays unloaded)
        yield
        return
    watched = _watched(store)
    before = [_no_answers(b) for b in watched]
    yield
    for backend, count in zip(watched, before, strict=True):
        if _no_answers(backend) > count:
            from lmcache_cli.log_lines import store_failure_cause

            name = getattr(backend, "display_url", None) or backend.describe()
            # The store's own words, when it logged them ("EXISTS: authentication
            # failed"): this line replaces that warning on stderr (see log_lines).
            cause = store_failure_cause(name)
            detail = f": {cause}" if cause else " (no answer, refused, or circuit open)"
            raise StoreUnavailableError(name, f"could not ask {what}{detail}")
