"""One behaviour suite, run unchanged over every backend in ``backend_cases``."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.conftest import CASES, make_key

MiB = 1024**2
GB = 1024**3

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]


def chunk(seed: int = 0, shape: tuple[int, ...] = (2, 2, 16, 2, 8), dtype: torch.dtype = torch.float16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float32)
    return t.to(dtype)


def same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    """Exact equality of dtype, shape and bytes."""
    if a is None:
        return False
    a = a.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_put_get_bytes_dtype_shape_equal(open_store, dtype):
    store = open_store()
    key, value = make_key(1), chunk(1, dtype=dtype)
    store.put(key, value)
    assert same(store.get(key), value)


def test_huggingface_layout_and_odd_shapes(open_store):
    store = open_store()
    k1 = make_key(2, fmt="huggingface")
    v1 = chunk(2, shape=(3, 2, 4, 7, 5))
    k2 = make_key(3)
    v2 = chunk(3, shape=(1, 2, 1, 1, 1), dtype=torch.float32)  # a one-token tail chunk
    store.put(k1, v1)
    store.put(k2, v2)
    assert same(store.get(k1), v1)
    assert same(store.get(k2), v2)


def test_non_contiguous_input_is_stored_by_value(open_store):
    store = open_store()
    base = chunk(4, shape=(2, 2, 8, 4, 8))
    view = base.transpose(2, 3)
    assert not view.is_contiguous()
    store.put(make_key(4), view)
    assert same(store.get(make_key(4)), view.contiguous())


def test_miss_is_none_and_contains(open_store):
    store = open_store()
    assert store.get(make_key("absent")) is None
    assert not store.contains(make_key("absent"))
    store.put(make_key(5), chunk(5))
    assert store.contains(make_key(5))
    assert not store.contains(make_key(6))


def test_overwrite_keeps_latest(open_store):
    store = open_store()
    store.put(make_key(7), chunk(7))
    store.put(make_key(7), chunk(8))
    assert same(store.get(make_key(7)), chunk(8))


def test_remove(open_store):
    store = open_store()
    store.put(make_key(9), chunk(9))
    assert store.remove(make_key(9)) is True
    assert store.get(make_key(9)) is None
    assert not store.contains(make_key(9))
    assert store.remove(make_key(9)) is False


def test_list_returns_exactly_the_stored_keys(open_store):
    store = open_store()
    keys = {make_key(i, model=m) for i in range(4) for m in ("org/a", "b")}
    for i, k in enumerate(sorted(keys, key=str)):
        store.put(k, chunk(i))
    assert set(store.list()) == keys
    infos = store.list_info()
    assert {i.key for i in infos} == keys


def test_batched_put_and_get_aligned_with_misses(open_store):
    store = open_store()
    items = [(make_key(f"b{i}"), chunk(i)) for i in range(5)]
    assert store.batched_put(items) == 5
    keys = [items[0][0], make_key("gap"), items[1][0], items[2][0], make_key("gap2"), items[4][0]]
    got = list(store.batched_get(keys))
    assert len(got) == len(keys)
    assert got[1] is None and got[4] is None
    for g, expected in zip([got[0], got[2], got[3], got[5]], [items[0][1], items[1][1], items[2][1], items[4][1]], strict=True):
        assert same(g, expected)


def test_nonblocking_put_read_your_writes(open_store):
    store = open_store()
    items = [(make_key(f"nb{i}"), chunk(i)) for i in range(6)]
    for k, v in items:
        store.put(k, v, blocking=False)
    for k, v in items:
        assert store.contains(k)
        assert same(store.get(k), v)


def test_batched_put_nonblocking(open_store):
    store = open_store()
    items = [(make_key(f"bnb{i}"), chunk(i)) for i in range(4)]
    assert store.batched_put(items, blocking=False) == 4
    got = store.batched_get([k for k, _ in items])
    assert all(same(g, v) for g, (_, v) in zip(got, items, strict=True))


def test_close_drains_pending_writes(open_store, case):
    store = open_store()
    items = [(make_key(f"drain{i}"), chunk(i)) for i in range(8)]
    for k, v in items:
        store.put(k, v, blocking=False)
    store.close()
    store.close()  # idempotent
    reader = open_store() if case.persistent else store
    for k, v in items:
        assert same(reader.get(k), v), k


PERSISTENT = [c for c in CASES if c.persistent]
EVICTING = [c for c in CASES if c.evicts]


@pytest.mark.parametrize("case", PERSISTENT, ids=[c.name for c in PERSISTENT])
def test_persistent_store_reopens_with_chunks(open_store, case):
    first = open_store()
    first.put(make_key("p"), chunk(11))
    first.close()
    second = open_store()
    assert same(second.get(make_key("p")), chunk(11))
    assert make_key("p") in second.list()


@pytest.mark.parametrize("case", EVICTING, ids=[c.name for c in EVICTING])
def test_lru_eviction_order(open_store, case):
    value = chunk(0, shape=(4, 2, 64, 4, 32), dtype=torch.float16)  # 256 KiB
    nbytes = value.numel() * value.element_size()
    # Room for three chunks (plus file headers), not four.
    store = open_store(budget_gb=(3 * nbytes + 4096) / GB)
    a, b, c, d = (make_key(x) for x in "abcd")
    store.put(a, value)
    store.put(b, value)
    store.put(c, value)
    assert store.get(a) is not None  # a becomes most recently used
    store.put(d, value)
    assert store.contains(a) and store.contains(c) and store.contains(d)
    assert not store.contains(b)
    assert store.get(b) is None


@pytest.mark.parametrize("case", EVICTING, ids=[c.name for c in EVICTING])
def test_chunk_larger_than_budget_is_refused_and_evicts_nothing(open_store, case):
    small = chunk(0)
    store = open_store(budget_gb=64 * 1024 / GB)
    store.put(make_key("small"), small)
    with pytest.raises(ValueError, match="larger than"):
        store.put(make_key("huge"), torch.zeros(1024 * 1024, dtype=torch.float32))
    assert same(store.get(make_key("small")), small)


@pytest.mark.parametrize("bad", [None, "fmt@m@1@0@ab", 42])
def test_bad_key_type_raises(open_store, bad):
    store = open_store()
    with pytest.raises(TypeError):
        store.put(bad, chunk(0))
    with pytest.raises(TypeError):
        store.get(bad)


@pytest.mark.parametrize("bad", [None, [1.0, 2.0], b"bytes"])
def test_non_tensor_value_raises(open_store, bad):
    store = open_store()
    with pytest.raises(TypeError):
        store.put(make_key(0), bad)


def test_concurrent_threads(open_store):
    store = open_store()
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(10):
                k, v = make_key(f"t{t}-{i}"), chunk(t * 100 + i)
                store.put(k, v, blocking=(i % 2 == 0))
                got = store.get(k)
                assert same(got, v)
                if i % 3 == 0:
                    store.remove(k)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in range(4):
        for i in range(10):
            assert store.contains(make_key(f"t{t}-{i}")) == (i % 3 != 0)
