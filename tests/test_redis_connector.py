"""RedisConnector against real redis-server processes (and a real 3-node cluster)."""

from __future__ import annotations

import os
import sys
import time
import uuid

import pytest

from lmcache_core.errors import StoreFullError, StoreUnavailableError
from lmcache_core.key import CacheEngineKey
from lmcache_core.storage_backend.connector.redis_connector import (
    LARGE_REPLY_BYTES,
    RedisConnector,
    escape_glob,
    split_prefix,
)
from tests.conftest import make_key
from tests.tcp_proxy import TcpProxy

TIMEOUT = 2.0


def _b(value: bytes | bytearray | memoryview | None) -> bytes:
    """The bytes of a connector result that must be present."""
    assert value is not None
    return bytes(value)


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def conn(redis_server):
    c = RedisConnector(redis_server.url, timeout=TIMEOUT, prefix=_prefix())
    yield c
    c.close()


def _value(n: int, seed: int = 0) -> tuple[bytes, memoryview]:
    header = b"H%07d" % seed
    payload = memoryview(bytes((seed + i) % 251 for i in range(256)) * (n // 256 + 1))[:n]
    return header, payload


# -- URLs, prefix, masking ------------------------------------------------------------


def test_split_prefix_and_escape_glob():
    assert split_prefix("redis://h:1/0?prefix=ab%2A&db=2") == ("redis://h:1/0?db=2", "ab*")
    assert split_prefix("redis://h:1/0") == ("redis://h:1/0", None)
    assert escape_glob("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"


def test_prefix_defaults_option_and_query(redis_server):
    assert RedisConnector(redis_server.url, timeout=1).prefix == "lmcache:"
    assert RedisConnector(redis_server.url + "?prefix=q:", timeout=1).prefix == "q:"
    assert RedisConnector(redis_server.url, timeout=1, prefix="o:").prefix == "o:"
    with pytest.raises(ValueError, match="prefix"):
        RedisConnector(redis_server.url + "?prefix=a:", timeout=1, prefix="b:")
    with pytest.raises(ValueError, match="prefix"):
        RedisConnector(redis_server.url, timeout=1, prefix="")


@pytest.mark.parametrize(
    "url",
    ["http://h:1", "redis+cluster://", "redis+cluster://h:notaport", "redis+cluster://h:1/3"],
)
def test_bad_urls_are_value_errors(url):
    with pytest.raises(ValueError):
        RedisConnector(url, timeout=1)


def test_cluster_url_parsing_and_masking():
    from lmcache_core.storage_backend.connector.redis_connector import _parse_cluster_url

    args = _parse_cluster_url("redis+cluster://al%40ice:p%3Aw@h1:7000,[::1]:7001?ssl=true&socket_keepalive=1")
    assert [(n.host, n.port) for n in args["startup_nodes"]] == [("h1", 7000), ("::1", 7001)]
    assert args["kwargs"]["username"] == "al@ice" and args["kwargs"]["password"] == "p:w"
    assert args["kwargs"]["ssl"] is True
    c = RedisConnector("redis+cluster://u:secret-pw@127.0.0.1:1,127.0.0.1:2", timeout=1)
    assert "secret-pw" not in c.display_url and "secret-pw" not in repr(c)
    assert c.display_url == "redis+cluster://u:***@127.0.0.1:1,127.0.0.1:2"


def test_password_and_db_from_url_and_masked(redis_server_factory):
    server = redis_server_factory("--requirepass", "s3cr3t-pw", "--user", "alice", "on", ">alice-pw", "~*", "&*", "+@all")
    for url in (
        f"redis://:s3cr3t-pw@127.0.0.1:{server.port}/3",
        f"redis://alice:alice-pw@127.0.0.1:{server.port}/3",
    ):
        c = RedisConnector(url + "?prefix=pw:", timeout=TIMEOUT)
        assert "pw@" not in c.display_url and "***" in c.display_url
        assert "s3cr3t" not in repr(c) and "alice-pw" not in repr(c)
        c.put(make_key(1), [b"hello"])
        assert _b(c.get(make_key(1))) == b"hello"
        c.close()
    with server.client(password="s3cr3t-pw", db=3) as raw:
        assert raw.get(b"pw:" + make_key(1).to_string().encode()) == b"hello"
    with server.client(password="s3cr3t-pw", db=0) as raw:
        assert raw.dbsize() == 0  # the /3 in the URL chose the database
    bad = RedisConnector(f"redis://:wrong-pw@127.0.0.1:{server.port}/0", timeout=TIMEOUT)
    with pytest.raises(StoreUnavailableError) as info:
        bad.get(make_key(1))
    assert "wrong-pw" not in str(info.value)
    assert "***" in str(info.value)


def test_unix_socket_with_db_query(redis_server_factory):
    server = redis_server_factory(unixsocket=True)
    c = RedisConnector(f"{server.unix_url}?db=2&prefix=ux:", timeout=TIMEOUT)
    c.put(make_key(1), [b"over a unix socket"])
    assert _b(c.get(make_key(1))) == b"over a unix socket"
    assert [o.key for o in c.list()] == [make_key(1)]
    with server.client(db=2) as raw:
        assert raw.exists(b"ux:" + make_key(1).to_string().encode())
    c.close()


def test_missing_redis_package_says_what_to_install(monkeypatch, redis_server):
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install 'lmcache-toolkit\[redis\]'"):
        RedisConnector(redis_server.url, timeout=1)


# -- bytes in, bytes out ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1000, LARGE_REPLY_BYTES + 123, 3 * 1024 * 1024])
def test_put_get_exact_bytes(conn, size):
    header, payload = _value(size, seed=size % 7)
    conn.put(make_key(size), [header, payload])
    got = conn.get(make_key(size))
    assert bytes(got) == header + bytes(payload)
    assert conn.exists(make_key(size))


def test_resp3_protocol_option(redis_server):
    c = RedisConnector(redis_server.url, timeout=TIMEOUT, prefix=_prefix(), protocol=3)
    header, payload = _value(LARGE_REPLY_BYTES * 2, seed=5)
    c.put(make_key(1), [header, payload])
    c.put(make_key(2), [b"small"])
    assert _b(c.get(make_key(1))) == header + bytes(payload)
    assert [_b(v) for v in c.get_many([make_key(2), make_key(1)])] == [b"small", header + bytes(payload)]
    assert {o.key for o in c.list()} == {make_key(1), make_key(2)}
    c.close()


def test_zero_copy_put_is_used_on_standalone(conn):
    # The standalone fast path must be active on the redis-py this project pins;
    # if redis-py's internals move, this fails so someone looks (puts still work).
    assert conn.zero_copy_put


def test_get_many_aligned_with_misses_and_large_values(conn):
    keys = [make_key(f"m{i}") for i in range(5)]
    values = {}
    for i, k in enumerate(keys):
        if i in (1, 3):
            continue
        header, payload = _value(LARGE_REPLY_BYTES * (i + 1), seed=i)
        values[k] = header + bytes(payload)
    conn.put_many([(k, [v]) for k, v in values.items()])
    got = conn.get_many(keys)
    assert len(got) == 5
    assert got[1] is None and got[3] is None
    for k, g in zip(keys, got, strict=True):
        if k in values:
            assert _b(g) == values[k]
    assert conn.get_many([]) == []


def test_get_many_sizes_its_mgets_by_the_values_it_reads(redis_server_private):
    c = RedisConnector(redis_server_private.url, timeout=TIMEOUT, prefix="mg:")
    c.mget_budget_bytes = 4000
    small = {make_key(f"s{i}"): b"s%03d" % i * 25 for i in range(10)}  # 100 bytes each
    big = {make_key(f"b{i}"): b"B%03d" % i * 500 for i in range(6)}  # 2000 bytes each
    c.put_many([(k, [v]) for k, v in {**small, **big}.items()])
    with redis_server_private.client() as raw:

        def mget_calls() -> int:
            return int(raw.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))

        c.get(next(iter(big)))  # the latest read says: values are 2000 bytes
        before = mget_calls()
        assert [_b(v) for v in c.get_many(list(big))] == list(big.values())
        assert mget_calls() - before == 3  # two per MGET
        c.get(next(iter(small)))  # now 100 bytes: forty per MGET
        before = mget_calls()
        assert [_b(v) for v in c.get_many(list(small))] == list(small.values())
        assert mget_calls() - before == 1
    keys = [make_key("s0"), make_key("absent"), make_key("b5"), make_key("s9"), make_key("absent2")]
    got = c.get_many(keys)
    assert got[1] is None and got[4] is None
    assert [_b(got[0]), _b(got[2]), _b(got[3])] == [small[keys[0]], big[keys[2]], small[keys[3]]]
    c.close()


def test_delete_and_get_head(conn):
    header, payload = _value(LARGE_REPLY_BYTES + 10)
    conn.put(make_key(1), [header, payload])
    size = len(header) + len(payload)
    assert conn.get_head(make_key(1), 8) == (header[:8], size)
    assert conn.get_head(make_key(1), len(header) + 4) == (header + bytes(payload[:4]), size)
    assert conn.get_head(make_key(1), size + 100) == (header + bytes(payload), size)  # shorter object
    assert conn.get_head(make_key(2), 8) is None
    conn.put(make_key(3), [b""])
    assert conn.get_head(make_key(3), 8) == (b"", 0)  # an empty value is there, not absent
    assert conn.delete(make_key(1)) is True
    assert conn.delete(make_key(1)) is False
    assert conn.get(make_key(1)) is None
    assert not conn.exists(make_key(1))
    assert conn.get_head(make_key(1), 8) is None


# -- listing ----------------------------------------------------------------------------


def test_list_uses_escaped_prefix_and_skips_foreign_entries(redis_server):
    tag = uuid.uuid4().hex[:8]
    globby = RedisConnector(redis_server.url, timeout=TIMEOUT, prefix=f"g{tag}[ab]*?\\:")
    # Names an unescaped pattern "g<tag>[ab]*?\:*" would match, but which are not our prefix.
    lookalike = RedisConnector(redis_server.url, timeout=TIMEOUT, prefix=f"g{tag}aXY:")
    lookalike.put(make_key("other"), [b"x"])
    mine = {make_key(i, model=m) for i in range(3) for m in ("org/a", "b")}
    for k in mine:
        globby.put(k, [b"chunk-bytes"])
    with redis_server.client() as raw:
        p = globby.prefix.encode()
        raw.set(p + b"not-a-key", b"x")
        raw.set(p + b"vllm@m@1@0@NOTHEX", b"x")
        raw.set(p + b"\xff\xfe@bad-utf8", b"x")
        raw.hset(p + make_key("hash").to_string().encode(), "f", "v")  # a key name, wrong type
        raw.set(p + make_key("empty").to_string().encode(), b"")
    listed = {o.key: o for o in globby.list()}
    # An empty value at a chunk's name is a chunk cut short: listed (size 0), so
    # verify sees it and --fix can remove it.
    assert set(listed) == mine | {make_key("empty")}
    assert listed.pop(make_key("empty")).size == 0
    assert all(o.size == len(b"chunk-bytes") and o.mtime is None for o in listed.values())
    assert globby.get(make_key("hash")) is None  # WRONGTYPE is a miss, not an error
    assert globby.get_head(make_key("hash"), 8) is None
    assert {o.key for o in lookalike.list()} == {make_key("other")}


def test_list_many_keys_spans_scan_batches(conn):
    keys = [make_key(f"many{i}") for i in range(1500)]
    conn.put_many([(k, [b"v"]) for k in keys])
    assert {o.key for o in conn.list()} == set(keys)


# -- cluster ------------------------------------------------------------------------------


def test_cluster_spreads_keys_over_slots_and_lists_all(redis_cluster):
    c = RedisConnector(redis_cluster.url, timeout=TIMEOUT, prefix=_prefix())
    keys = [make_key(f"c{i}") for i in range(40)]
    c.put_many([(k, [b"h", memoryview(b"payload-%d" % i)]) for i, k in enumerate(keys[:20])])
    for i, k in enumerate(keys[20:], start=20):
        c.put(k, [b"h", b"payload-%d" % i])
    per_node = []
    for node in redis_cluster.nodes:
        with node.client() as raw:
            per_node.append(sum(1 for _ in raw.scan_iter(match=escape_glob(c.prefix) + "*")))
    assert sum(per_node) == 40
    assert sum(1 for n in per_node if n > 0) >= 2, per_node  # really spread over masters
    assert {o.key for o in c.list()} == set(keys)
    got = c.get_many([keys[0], make_key("absent"), keys[39]])
    assert _b(got[0]) == b"hpayload-0" and got[1] is None and _b(got[2]) == b"hpayload-39"
    assert c.get_head(keys[5], 4) == (b"hpay", len(b"hpayload-5"))
    assert c.delete(keys[0]) and not c.exists(keys[0])
    # Large values take the zero-copy put and recv_into get on cluster nodes too.
    assert c.zero_copy_put
    header, payload = _value(LARGE_REPLY_BYTES * 2 + 5, seed=3)
    big_keys = [make_key(f"big{i}") for i in range(4)]
    c.put(big_keys[0], [header, payload])
    c.put_many([(k, [header, payload]) for k in big_keys[1:]])
    assert _b(c.get(big_keys[0])) == header + bytes(payload)
    assert [_b(v) for v in c.get_many(big_keys)] == [header + bytes(payload)] * 4
    c.close()


def test_cluster_url_with_several_nodes(redis_cluster):
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in redis_cluster.ports)
    c = RedisConnector(url, timeout=TIMEOUT, prefix=_prefix())
    c.put(make_key(1), [b"x"])
    assert _b(c.get(make_key(1))) == b"x"
    c.close()


# -- failures -------------------------------------------------------------------------------


def test_dead_server_is_unavailable_fast_and_recovers_after_restart(redis_server_private):
    c = RedisConnector(redis_server_private.url, timeout=TIMEOUT, prefix="d:")
    c.put(make_key(1), [b"before"])
    redis_server_private.kill()
    for call in (lambda: c.get(make_key(1)), lambda: c.put(make_key(2), [b"x"]), lambda: list(c.list())):
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            call()
        assert time.monotonic() - start < TIMEOUT * 3
    redis_server_private.restart()
    # The pooled connection died with the server; the same connector reconnects by itself.
    assert c.get(make_key(1)) is None  # the server restarted empty
    c.put(make_key(1), [b"after"])
    assert _b(c.get(make_key(1))) == b"after"
    c.close()


def test_blackholed_server_times_out_within_bound():
    with TcpProxy(None, mode="blackhole") as proxy:
        c = RedisConnector(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.5)
        for call in (
            lambda: c.get(make_key(1)),
            lambda: c.put(make_key(1), [b"h", memoryview(b"x" * 4_000_000)]),
            lambda: c.exists(make_key(1)),
            lambda: c.get_many([make_key(1), make_key(2)]),
            # A staged put (4 MiB and more): its first step times out like any SET.
            lambda: c.put_chunk(make_key(1), _unsealed(make_key(1), _big_chunk(0))),
        ):
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                call()
            assert time.monotonic() - start < 0.5 * 3
        c.close()


def test_maxmemory_noeviction_is_store_full_and_reads_keep_working(redis_server_factory):
    server = redis_server_factory("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    c = RedisConnector(server.url, timeout=TIMEOUT, prefix="full:")
    c.put(make_key(0), [b"first"])
    with pytest.raises(StoreFullError) as info:
        for i in range(1, 50):
            c.put(make_key(i), [b"h", memoryview(b"\0" * 512 * 1024)])
    assert isinstance(info.value, OSError)
    assert _b(c.get(make_key(0))) == b"first"
    assert c.exists(make_key(0))
    c.close()


def test_closed_connector_refuses_calls(redis_server):
    c = RedisConnector(redis_server.url, timeout=TIMEOUT, prefix=_prefix())
    c.put(make_key(1), [b"x"])
    c.close()
    c.close()  # idempotent
    with pytest.raises(StoreUnavailableError, match="closed"):
        c.get(make_key(1))


def test_fork_child_gets_its_own_client(conn):
    conn.put(make_key("fork"), [b"from parent"])
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: use the inherited connector, report, and leave at once
        try:
            ok = _b(conn.get(make_key("fork"))) == b"from parent"
            conn.put(make_key("child"), [b"from child"])
            os.write(write_fd, b"ok" if ok else b"bad")
        except BaseException as exc:  # noqa: BLE001
            os.write(write_fd, repr(exc).encode()[:200])
        finally:
            os._exit(0)
    os.close(write_fd)
    report = os.read(read_fd, 256)
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert report == b"ok"
    # The parent's pooled sockets were not touched by the child.
    assert _b(conn.get(make_key("child"))) == b"from child"
    assert _b(conn.get(make_key("fork"))) == b"from parent"


def test_fork_while_another_thread_holds_the_client_lock(redis_server):
    c = RedisConnector(redis_server.url, timeout=TIMEOUT, prefix=_prefix())
    c.put(make_key(1), [b"x"])
    c.close()
    c = RedisConnector(redis_server.url, timeout=TIMEOUT, prefix=c.prefix)  # no client yet
    with c._lock:  # as if a parent thread were building the client at fork() time
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if bytes(c.get(make_key(1)) or b"") == b"x" else 1)
            finally:
                os._exit(2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the child deadlocked on a lock inherited from the parent")
    assert os.waitstatus_to_exitcode(status) == 0
    assert _b(c.get(make_key(1))) == b"x"
    c.close()


def test_key_type_checked(conn):
    with pytest.raises(TypeError):
        conn.get("vllm@m@1@0@ab")  # type: ignore[arg-type]
    assert isinstance(make_key(1), CacheEngineKey)


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(redis_server_factory, tmp_path):
    """A redis-server with a TLS port, its self-signed certificate as the CA."""
    import shutil
    import subprocess

    from tests.servers_redis import free_port

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make a test certificate (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    tls_port = free_port()
    redis_server_factory(
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
    )
    return tls_port, cert


def test_rediss_tls_with_ca_option_and_url_options(tls_redis):
    tls_port, cert = tls_redis
    c = RedisConnector(f"rediss://127.0.0.1:{tls_port}/0", timeout=TIMEOUT, prefix=_prefix(), ssl_ca_certs=str(cert))
    header, payload = _value(LARGE_REPLY_BYTES * 3)
    c.put(make_key(1), [header, payload])
    assert _b(c.get(make_key(1))) == header + bytes(payload)
    assert [_b(v) for v in c.get_many([make_key(1)])] == [header + bytes(payload)]
    c.close()
    # ssl options as URL query parameters, next to the prefix
    c = RedisConnector(f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none&prefix=tls:", timeout=TIMEOUT)
    c.put(make_key(2), [b"x"])
    assert _b(c.get(make_key(2))) == b"x"
    c.close()
    # an untrusted certificate is refused, not silently accepted
    c = RedisConnector(f"rediss://127.0.0.1:{tls_port}/0", timeout=TIMEOUT)
    with pytest.raises(StoreUnavailableError):
        c.get(make_key(1))
    c.close()


# -- the recv_into reply path under concurrency and interruption ---------------------------


def test_threads_never_see_each_others_replies(conn):
    import threading

    sizes = [LARGE_REPLY_BYTES - 3, LARGE_REPLY_BYTES - 2, LARGE_REPLY_BYTES, LARGE_REPLY_BYTES + 1, 100, 700_000]
    values = {}
    for i, size in enumerate(sizes):
        header, payload = _value(size, seed=i)
        values[make_key(f"th{i}")] = header + bytes(payload)
    conn.put_many([(k, [v]) for k, v in values.items()])
    keys = list(values)
    errors: list[str] = []

    def worker(t: int) -> None:
        for n in range(15):
            k = keys[(t + n) % len(keys)]
            if _b(conn.get(k)) != values[k]:
                errors.append(f"get {k}")
            batch = keys[n % 3 :: 2]
            if [_b(v) for v in conn.get_many(batch)] != [values[b] for b in batch]:
                errors.append(f"get_many {batch}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]


def test_reply_cut_by_timeout_is_never_read_by_the_next_call(redis_server):
    import threading

    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        c = RedisConnector(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.6, prefix=_prefix())
        a, b = b"A" * (4 * 1024 * 1024), b"B" * (3 * LARGE_REPLY_BYTES)
        c.put(make_key("a"), [a])
        c.put(make_key("b"), [b])
        # Let the start of the 4 MiB reply through, slowly, then stop it mid-payload.
        proxy.set_mode("delay", delay=0.2)
        outcome: list[BaseException | None] = []

        def read_a() -> None:
            try:
                c.get(make_key("a"))
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)

        reader = threading.Thread(target=read_a)
        reader.start()
        time.sleep(0.5)
        proxy.set_mode("blackhole")
        reader.join(10)
        assert isinstance(outcome[0], StoreUnavailableError), outcome
        proxy.set_mode("forward")
        # The half-read reply died with its connection; no later call reads its tail.
        assert _b(c.get(make_key("b"))) == b
        assert _b(c.get(make_key("a"))) == a
        c.close()


def test_fetch_group_keys_follows_the_values_it_reads(redis_server_private):
    """Unknown size: split evenly (None). Small values: many per MGET. Large: one each."""
    c = RedisConnector(redis_server_private.url, timeout=TIMEOUT, prefix="fg:")
    try:
        assert c.fetch_group_keys() is None  # cold: no guess that turns 1000 keys into 1000 requests
        assert c.get_many([make_key("absent1"), make_key("absent2")]) == [None, None]
        assert c.fetch_group_keys() is None  # misses say nothing about sizes
        c.put(make_key("small"), [b"s" * 4096])
        c.put(make_key("large"), [b"L" * (600 * 1024)])
        c.get(make_key("small"))
        assert c.fetch_group_keys() == (1024 * 1024) // 4096
        c.get(make_key("large"))
        assert c.fetch_group_keys() == 1
    finally:
        c.close()


# -- hashing a chunk's payload as its reply arrives (get_hashed) -----------------------


def test_get_hashed_hashes_a_large_chunk_as_it_arrives_and_nothing_else(conn):
    import threading

    import torch

    from lmcache_core import chunk_format

    big, small = make_key("big"), make_key("small")
    big_blob = chunk_format.encode_bytes(torch.randn(8, 2, 64, 8, 16).to(torch.bfloat16), big.to_string())
    small_blob = chunk_format.encode_bytes(torch.randn(2, 2, 4, 2, 8), small.to_string())
    assert len(big_blob) > LARGE_REPLY_BYTES > len(small_blob)
    conn.put(big, [big_blob])
    conn.put(small, [small_blob])
    value, digest = conn.get_hashed(big)
    assert _b(value) == big_blob
    assert digest == chunk_format.parse_header(big_blob).checksum  # every payload byte, hashed on arrival
    value, digest = conn.get_hashed(small)  # read by redis-py's own buffer: nothing hashed
    assert _b(value) == small_blob and digest is None
    assert conn.get_hashed(make_key("absent")) == (None, None)
    # Nothing left for the next read on this thread (the connector's own module: another
    # test re-imports redis_connector, and the fresh module has a thread-local of its own).
    assert sys.modules[type(conn).__module__]._arriving.payload is None
    # Threads at once: each one's digest is of its own reply.
    results: list = []

    def read(k):
        value, digest = conn.get_hashed(k)
        results.append(digest == chunk_format.parse_header(_b(value)).checksum)

    big2 = make_key("big2")
    conn.put(big2, [chunk_format.encode_bytes(torch.randn(8, 2, 64, 8, 16), big2.to_string())])
    threads = [threading.Thread(target=read, args=(big if i % 2 else big2,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8


def test_a_chunk_damaged_in_redis_is_still_caught_when_hashed_on_arrival(redis_server):
    import torch

    from lmcache_core import chunk_format
    from lmcache_core.storage_backend import open_backend

    prefix = _prefix()
    store = open_backend(f"{redis_server.url}?prefix={prefix}", dst_device="cpu")
    key = make_key("damaged")
    chunk = torch.randn(8, 2, 64, 8, 16).to(torch.bfloat16)
    try:
        blob = bytearray(chunk_format.encode_bytes(chunk, key.to_string()))
        blob[-100] ^= 0x04
        store.connector.put(key, [bytes(blob)])
        _, digest = store.connector.get_hashed(key)
        assert digest is not None and digest != chunk_format.parse_header(blob).checksum  # the fast path ran
        assert store.get(key) is None
        assert store.stats["corrupt"] == 1
        store.put(key, chunk)
        assert torch.equal(store.get(key), chunk)
    finally:
        store.close()


def test_a_large_redis_get_is_not_hashed_twice_and_hostile_large_values_are_corrupt_misses(redis_server, monkeypatch):
    import json
    import struct

    import torch

    from lmcache_core import chunk_format
    from lmcache_core.storage_backend import open_backend

    store = open_backend(f"{redis_server.url}?prefix={_prefix()}", dst_device="cpu")
    key, bad_dtype, cut = make_key("once"), make_key("dtype-list"), make_key("cut")
    chunk = torch.randn(8, 2, 64, 8, 16).to(torch.bfloat16)
    calls = []
    real = chunk_format.verify_payload
    monkeypatch.setattr(chunk_format, "verify_payload", lambda h, p: (calls.append(1), real(h, p)))
    try:
        store.put(key, chunk)
        assert torch.equal(store.get(key), chunk)
        assert calls == []  # hashed once, as it arrived
        head = json.dumps({"kv_chunk": {"dtype": [], "shape": [1], "data_offsets": [0, 2]}}).encode()
        store.connector.put(bad_dtype, [struct.pack("<Q", len(head)) + head + bytes(LARGE_REPLY_BYTES)])
        blob = chunk_format.encode_bytes(chunk, cut.to_string())
        store.connector.put(cut, [blob[: len(blob) - 1000]])
        breaker_failures = store.stats["remote_errors"]
        for k in (bad_dtype, cut, bad_dtype, cut):
            assert store.get(k) is None
        assert store.stats["corrupt"] == 4  # bad chunks, not a failing server
        assert store.stats["remote_errors"] == breaker_failures
        assert torch.equal(store.get(key), chunk)  # the breaker stayed closed
    finally:
        store.close()


# -- staged puts: a large chunk is hashed as it is sent, then published whole ------------


def _big_chunk(seed: int = 0):
    import torch

    from lmcache_core.storage_backend.connector.redis_connector import STREAM_PUT_BYTES

    g = torch.Generator().manual_seed(seed)
    t = torch.randn(8, 2, 64, 8, 128, generator=g)  # 4 MiB of float32, plus the header
    assert t.numel() * 4 >= STREAM_PUT_BYTES
    return t


def _unsealed(key: CacheEngineKey, tensor):
    from lmcache_core import chunk_format

    return chunk_format.UnsealedChunk(tensor, key.to_string())


def _staging_keys(raw) -> list[bytes]:
    return list(raw.scan_iter(match=b"*@lmcache-staging@*"))


class _Steps:
    """Spies on a connector's staging steps: the publish replies, and plain SETs."""

    def __init__(self, conn, monkeypatch, before_publish=None) -> None:
        self.published: list = []  # the script's replies
        self.plain_sets = 0
        real_outcome, real_put, real_put_by = conn._outcome, conn.put, conn.put_chunk_by

        def outcome(client, *args):
            if args[0] == "EVAL" and before_publish is not None:
                before_publish(name=args[3], staging=args[4], offset=args[5])
            reply = real_outcome(client, *args)
            if args[0] == "EVAL":
                self.published.append(reply)
            return reply

        def put(key, parts):
            self.plain_sets += 1
            return real_put(key, parts)

        def put_chunk_by(key, chunk, deadline):  # a blocking plain SET, on the caller's thread
            self.plain_sets += 1
            return real_put_by(key, chunk, deadline)

        monkeypatch.setattr(conn, "_outcome", outcome)
        monkeypatch.setattr(conn, "put", put)
        monkeypatch.setattr(conn, "put_chunk_by", put_chunk_by)


def test_a_large_chunk_is_staged_then_published_whole_and_leaves_nothing_behind(redis_server, monkeypatch):
    import torch

    from lmcache_core import chunk_format
    from lmcache_core.storage_backend import open_backend

    prefix = _prefix()
    store = open_backend(f"{redis_server.url}?prefix={prefix}", dst_device="cpu")
    conn = store.connector
    key, small_key = make_key("staged"), make_key("small")
    old, new = _big_chunk(1), _big_chunk(2)
    seen: dict = {}

    def before_publish(name, staging, offset):
        # Between the two steps: readers still get the old value; the staged one is under
        # the prefix, whole, with a TTL and zeros where the checksum goes.
        with redis_server.client() as raw:
            seen["old"] = raw.get(name) == chunk_format.encode_bytes(old, key.to_string())
            seen["pttl"] = raw.pttl(staging)
            staged = raw.get(staging)
            seen["staged"] = (staging.startswith(prefix.encode()), len(staged), staged[offset : offset + 32])

    try:
        store.put(key, old)
        steps = _Steps(conn, monkeypatch, before_publish)
        store.put(key, new)
        assert steps.published == [1] and steps.plain_sets == 0
        assert seen["old"] and 0 < seen["pttl"] <= conn._staging_ttl_ms
        assert seen["staged"] == (True, chunk_format.UnsealedChunk(new, key.to_string()).size, b"0" * 32)
        with redis_server.client() as raw:
            assert raw.get(conn._name(key)) == chunk_format.encode_bytes(new, key.to_string())
            assert raw.pttl(conn._name(key)) == -1  # the staging TTL did not follow the value
            assert _staging_keys(raw) == []
        assert torch.equal(store.get(key), new)
        # Below STREAM_PUT_BYTES a chunk is one plain SET.
        store.put(small_key, torch.randn(4, 4))
        assert steps.published == [1] and steps.plain_sets == 1
        assert {o.key for o in conn.list()} == {key, small_key}
    finally:
        store.close()


def test_staged_keys_gone_before_publishing_fall_back_and_then_turn_staging_off(conn, redis_server, monkeypatch):
    from lmcache_core import chunk_format
    from lmcache_core.storage_backend.connector.redis_connector import STAGING_GONE_LIMIT

    vanish = {"on": True}

    def before_publish(name, staging, offset):
        if vanish["on"]:
            with redis_server.client() as raw:
                assert raw.delete(staging) == 1  # expired, evicted, on another server: as if

    steps = _Steps(conn, monkeypatch, before_publish)

    def put(i: int) -> None:
        key, t = make_key(f"vanished{i}"), _big_chunk(30 + i)
        conn.put_chunk(key, chunk_format.UnsealedChunk(t, key.to_string()))
        assert _b(conn.get(key)) == chunk_format.encode_bytes(t, key.to_string())

    for i in range(STAGING_GONE_LIMIT - 1):
        put(i)
    vanish["on"] = False
    put(10)  # a publish that works starts the count again
    vanish["on"] = True
    for i in range(STAGING_GONE_LIMIT - 1):
        put(20 + i)
    assert conn.staged_puts  # vanished keys, but never the limit in a row
    put(30)
    assert steps.published == [0] * (STAGING_GONE_LIMIT - 1) + [1] + [0] * STAGING_GONE_LIMIT
    assert steps.plain_sets == 2 * STAGING_GONE_LIMIT - 1  # one per vanished key
    assert not conn.staged_puts


def test_the_publish_script_recognises_a_retry_and_refuses_anything_else(conn, redis_server):
    from lmcache_core import chunk_format
    from lmcache_core.storage_backend.connector.redis_connector import _PUBLISH_SCRIPT

    key, t = make_key("retry"), _big_chunk(7)
    chunk = chunk_format.UnsealedChunk(t, key.to_string())
    conn.put_chunk(key, chunk)
    name, c = conn._name(key), conn._client()
    gone = name + b"@lmcache-staging@gone"

    def publish(target, digest):
        return c.execute_command("EVAL", _PUBLISH_SCRIPT, 2, target, gone, chunk.checksum_offset, digest, chunk.size)

    assert publish(name, chunk.digest()) == 2  # the reply of the first was lost: it is there
    assert publish(name, b"f" * 32) == 0  # another value under the name
    assert publish(name + b"-absent", chunk.digest()) == 0
    with redis_server.client() as raw:
        raw.hset(name + b"-hash", "f", "v")
    assert publish(name + b"-hash", chunk.digest()) == 0  # not a string: no error either
    assert _b(conn.get(key)) == chunk_format.encode_bytes(t, key.to_string())


_PASSWORD = "s3cr3t-Zq81"


@pytest.mark.parametrize("denied", ["-eval", "-rename", "-persist", "-setrange"])
def test_a_server_that_refuses_a_staging_command_gets_plain_sets(redis_server_private, caplog, monkeypatch, denied):
    # -eval: the script is refused; the others: a command inside it is (an ACL checks each).
    from lmcache_core import chunk_format

    with redis_server_private.client() as raw:
        raw.execute_command("ACL", "SETUSER", "limited", "on", f">{_PASSWORD}", "~*", "+@all", denied)
        c = RedisConnector(
            redis_server_private.url.replace("://", f"://limited:{_PASSWORD}@"), timeout=TIMEOUT, prefix=_prefix()
        )
        steps = _Steps(c, monkeypatch)
        key, t = make_key("acl"), _big_chunk(4)
        c.put_chunk(key, chunk_format.UnsealedChunk(t, key.to_string()))
        assert steps.published == ["refused"] and steps.plain_sets == 1
        assert not c.staged_puts
        assert "staged puts off" in caplog.text and _PASSWORD not in caplog.text
        assert _b(c.get(key)) == chunk_format.encode_bytes(t, key.to_string())
        assert _staging_keys(raw) == []  # the refused one was deleted, not left to expire
        key2 = make_key("acl2")
        c.put_chunk(key2, chunk_format.UnsealedChunk(t, key2.to_string()))  # plain from now on
        assert steps.published == ["refused"] and steps.plain_sets == 2
        assert _b(c.get(key2)) == chunk_format.encode_bytes(t, key2.to_string())
        c.close()


@pytest.mark.parametrize(
    ("reply", "meaning"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", "full"),
        ("ERR Error running script (call to f_1): @user_script:3: -OOM command not allowed when used memory > "
         "'maxmemory'.", "full"),
        ("NOPERM this user has no permissions to run the 'eval' command", "refused"),
        ("ERR unknown command 'EVAL', with args beginning with: ", "refused"),
        ("ERR Error running script (call to f_1): @user_script:5: Unknown Redis command called from Lua script",
         "refused"),
        ("ERR The user executing the script can't run this command or subcommand script: f_1, on @user_script:5.",
         "refused"),
        ("ERR ACL failure in script: User limited has no permissions to run the 'rename' command", "refused"),
        ("CROSSSLOT Keys in request don't hash to the same slot", "refused"),
        ("TRYAGAIN Multiple keys request during rehashing of slot", "moving"),
        ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. "
         "Commands that may modify the data set are disabled, because this instance is configured to report "
         "errors during writes if RDB snapshotting fails (stop-writes-on-bgsave-error option).", None),
        ("READONLY You can't write against a read only replica.", None),
        ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", None),
        ("CLUSTERDOWN The cluster is down", None),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", None),
        ("NOREPLICAS Not enough good replicas to write.", None),
        ("LOADING Redis is loading the dataset in memory", None),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", None),
    ],
)  # fmt: skip
def test_what_a_staging_error_means(reply, meaning):
    # Each reply parsed by redis-py's own parser, as it would reach the connector.
    import redis
    from redis._parsers.base import BaseParser

    from lmcache_core.storage_backend.connector.redis_connector import _staging_error

    exc = BaseParser.parse_error(reply)
    if not isinstance(exc, redis.exceptions.ResponseError):  # LOADING is a ConnectionError: never asked
        assert meaning is None
        return
    assert _staging_error(redis, exc) == meaning


def test_an_acl_limited_to_the_prefix_still_gets_staged_puts(redis_server_private, monkeypatch):
    from lmcache_core import chunk_format

    prefix = _prefix()
    with redis_server_private.client() as raw:
        raw.execute_command("ACL", "SETUSER", "app", "on", ">pw", f"~{prefix}*", "+@all")
    c = RedisConnector(redis_server_private.url.replace("://", "://app:pw@"), timeout=TIMEOUT, prefix=prefix)
    steps = _Steps(c, monkeypatch)
    for i in range(2):
        key, t = make_key(f"app{i}"), _big_chunk(20 + i)
        c.put_chunk(key, chunk_format.UnsealedChunk(t, key.to_string()))
        assert _b(c.get(key)) == chunk_format.encode_bytes(t, key.to_string())
    assert steps.published == [1, 1] and steps.plain_sets == 0 and c.staged_puts
    c.close()


@pytest.mark.parametrize("how", ["option", "url"])
def test_staged_puts_can_be_turned_off(redis_server, monkeypatch, how):
    from lmcache_core import chunk_format

    prefix = _prefix()
    if how == "option":
        c = RedisConnector(redis_server.url, timeout=TIMEOUT, prefix=prefix, staged_puts="false")
    else:
        c = RedisConnector(f"{redis_server.url}?staged_puts=false&prefix={prefix}", timeout=TIMEOUT)
    assert not c.staged_puts and c.prefix == prefix
    steps = _Steps(c, monkeypatch)
    key, t = make_key("off"), _big_chunk(8)
    c.put_chunk(key, chunk_format.UnsealedChunk(t, key.to_string()))
    assert steps.published == [] and steps.plain_sets == 1
    assert _b(c.get(key)) == chunk_format.encode_bytes(t, key.to_string())
    c.close()
    with pytest.raises(ValueError, match="staged_puts"):
        RedisConnector(redis_server.url, timeout=TIMEOUT, staged_puts="maybe")


def test_a_staged_send_cut_midway_is_retried_and_hashed_again(conn, monkeypatch):
    from lmcache_core import chunk_format

    class CutOnce(chunk_format.UnsealedChunk):
        __slots__ = ("passes",)

        def pieces(self, size):
            self.passes += 1
            for i, piece in enumerate(super().pieces(size)):
                if self.passes == 1 and i == 3:
                    raise ConnectionResetError(104, "reset by the test")
                yield piece

    steps = _Steps(conn, monkeypatch)
    key, t = make_key("cut"), _big_chunk(5)
    chunk = CutOnce(t, key.to_string())
    chunk.passes = 0
    conn.put_chunk(key, chunk)
    assert chunk.passes == 2  # redis-py's one retry on a fresh connection, packed anew
    # Published with the digest of the second, whole pass (a hasher that carried on from
    # the cut pass would have written a wrong checksum).
    assert steps.published == [1] and steps.plain_sets == 0
    assert _b(conn.get(key)) == chunk_format.encode_bytes(t, key.to_string())


@pytest.mark.parametrize(
    "name",
    [b"p:vllm@m@1@0@ab", b"{t}:vllm@m@1@0@ab", b"x}y{z}w", b"a{b", b"a{}b", b"a{}b}c", b"}a", b"{", b"{{x}}"],
)
def test_staging_names_share_the_slot_and_start_with_the_prefix(name):
    from redis.crc import key_slot

    from lmcache_core.storage_backend.connector.redis_connector import _staging_name

    prefix = name[:2]
    staging = _staging_name(name, prefix)
    if staging is None:  # only a name without a tag that holds "}", or a prefix with "{"
        start = name.find(b"{")
        assert b"}" in name or b"{" in prefix
        assert not (start != -1 and name.find(b"}", start + 1) > start + 1)
        return
    assert key_slot(staging) == key_slot(name)
    assert staging.startswith(prefix) and staging != _staging_name(name, prefix)


@pytest.mark.parametrize("prefix", ["lmcache:", "{t}:", "t{", "x}y{z}:", "a{b}"])
def test_a_staging_name_never_parses_as_a_key(prefix):
    from lmcache_core.storage_backend.connector.redis_connector import _staging_name

    c = RedisConnector("redis://127.0.0.1:1/0", timeout=1, prefix=prefix)
    key = make_key("parse")
    name = c._name(key)
    assert c._parse_name(name) == key
    staging = _staging_name(name, c._prefix_bytes)
    if prefix == "t{":
        assert staging is None  # no tag in the name, a "{" in the prefix
        return
    assert staging is not None and staging.startswith(c._prefix_bytes)
    assert c._parse_name(staging) is None


@pytest.mark.parametrize(
    "prefix",
    ["cl:", "{tag}:", "x}y{z}:", "a{b:", "x}y{", "{}e:"],
    ids=["plain", "hash-tag", "tag-after-close", "open-brace", "close-first", "empty-tag"],
)
def test_staged_puts_on_a_cluster_keep_the_slot_or_fall_back(redis_cluster, prefix, monkeypatch):
    from lmcache_core import chunk_format

    c = RedisConnector(redis_cluster.url, timeout=TIMEOUT, prefix=prefix + uuid.uuid4().hex[:8] + ":")
    steps = _Steps(c, monkeypatch)
    try:
        for i in range(3):
            key, t = make_key(f"cl{i}"), _big_chunk(10 + i)
            c.put_chunk(key, chunk_format.UnsealedChunk(t, key.to_string()))
            assert _b(c.get(key)) == chunk_format.encode_bytes(t, key.to_string())
        if prefix in ("cl:", "{tag}:", "x}y{z}:"):
            assert steps.published == [1, 1, 1] and steps.plain_sets == 0
        else:  # no tag and a "}" in the name, or a "{" in the prefix: plain SETs
            assert steps.published == [] and steps.plain_sets == 3
        assert c.staged_puts
        assert {o.key for o in c.list()} == {make_key(f"cl{i}") for i in range(3)}
    finally:
        c.close()


def test_staged_puts_into_a_full_redis_are_store_full_and_leave_no_staging_key(redis_server_factory):
    from lmcache_core import chunk_format

    server = redis_server_factory("--maxmemory", "12mb", "--maxmemory-policy", "noeviction")
    c = RedisConnector(server.url, timeout=TIMEOUT, prefix="full:")
    first, t = make_key("first"), _big_chunk(6)
    c.put_chunk(first, chunk_format.UnsealedChunk(t, first.to_string()))
    with pytest.raises(StoreFullError):
        for i in range(8):
            c.put_chunk(make_key(i), chunk_format.UnsealedChunk(t, make_key(i).to_string()))
    assert c.staged_puts  # full is not "refused"
    with server.client() as raw:
        assert _staging_keys(raw) == []
    assert _b(c.get(first)) == chunk_format.encode_bytes(t, first.to_string())
    c.close()


def test_full_at_publish_deletes_the_staged_value_and_tries_a_plain_set(redis_server_private, monkeypatch):
    from lmcache_core import chunk_format

    c = RedisConnector(redis_server_private.url, timeout=TIMEOUT, prefix=_prefix())
    limit = {"maxmemory": b"0"}

    def fill_up(name, staging, offset):
        with redis_server_private.client() as raw:
            raw.config_set("maxmemory-policy", "noeviction")
            raw.config_set("maxmemory", limit["maxmemory"])

    steps = _Steps(c, monkeypatch, fill_up)
    key, t = make_key("fits-after"), _big_chunk(9)
    limit["maxmemory"] = b"1"  # full once the chunk is staged: the publish is refused for memory
    with pytest.raises(StoreFullError):
        c.put_chunk(key, chunk_format.UnsealedChunk(t, key.to_string()))
    assert steps.published == ["full"] and steps.plain_sets == 1  # the plain SET was tried, and refused too
    with redis_server_private.client() as raw:
        assert _staging_keys(raw) == []
        raw.config_set("maxmemory", 0)
    assert c.staged_puts and c.get(key) is None
    limit["maxmemory"] = b"0"
    c.put_chunk(key, chunk_format.UnsealedChunk(t, key.to_string()))
    assert steps.published == ["full", 1]
    assert _b(c.get(key)) == chunk_format.encode_bytes(t, key.to_string())
    c.close()


def test_a_staged_put_whose_caller_timed_out_is_not_published(redis_server, monkeypatch):
    """The caller's wait ends at remote_timeout and it may then change its tensor; a send
    still running would hash the changed bytes as it sends them, so a matching checksum
    could not catch them. Here the staging step is held until the caller has timed out:
    the chunk must not be published, and the staged value must go."""
    import threading

    from lmcache_core import LMCacheEngineConfig
    from lmcache_core.storage_backend.remote_backend import LMCRemoteBackend

    prefix = _prefix()
    cfg = LMCacheEngineConfig.from_defaults(remote_url=f"{redis_server.url}?prefix={prefix}", remote_timeout=0.5)
    backend = LMCRemoteBackend(cfg, None, "cpu")
    conn = backend.connector
    caller_gave_up = threading.Event()
    real_outcome = conn._outcome
    evals: list = []

    def outcome(client, *args):
        if args[0] == "EVAL":
            evals.append(args)
        reply = real_outcome(client, *args)
        if args[0] == "SET" and args[1] != conn._name(key):  # the staging SET is in
            assert caller_gave_up.wait(10), "the caller never timed out"
        return reply

    key, chunk = make_key("abandoned"), _big_chunk(3)
    monkeypatch.setattr(conn, "_outcome", outcome)
    try:
        with pytest.raises(StoreUnavailableError, match="timeout"):
            backend.put(key, chunk)
        chunk.zero_()  # what a caller may do once put has raised
        caller_gave_up.set()
        deadline = time.monotonic() + 10
        with redis_server.client() as raw:
            while _staging_keys(raw) and time.monotonic() < deadline:
                time.sleep(0.05)  # the I/O thread deletes the staged value
            assert _staging_keys(raw) == []
            assert raw.get(conn._name(key)) is None, "the abandoned put was published"
        assert evals == []  # no publish script ran
    finally:
        caller_gave_up.set()
        backend.close()


def test_an_abandoned_chunk_is_not_sent_by_a_plain_set_either(conn):
    """The fallback after a refused or skipped staging step checks too (a retry after the
    caller gave up would send bytes the caller may be changing)."""
    from lmcache_core import chunk_format

    key = make_key("abandoned-plain")
    chunk = chunk_format.UnsealedChunk(_big_chunk(4)[:8], key.to_string())  # small: a plain SET
    chunk.abandon()
    with pytest.raises(StoreUnavailableError, match="abandoned"):
        conn.put_chunk(key, chunk)
    assert conn.get(key) is None


# -- blocking plain SETs on the caller's thread (put_chunk_by) -------------------------------


def test_a_blocking_put_below_the_staging_size_is_sent_on_the_callers_thread(redis_server, monkeypatch):
    import threading

    import torch

    from lmcache_core.storage_backend import open_backend
    from lmcache_core.storage_backend.connector.redis_connector import MIN_BULK_LIMIT, STREAM_PUT_BYTES

    store = open_backend(f"{redis_server.url}?prefix={_prefix()}", dst_device="cpu")
    conn = store.connector
    assert conn.puts_inline(MIN_BULK_LIMIT - 1) and not conn.puts_inline(STREAM_PUT_BYTES)
    # The first put that could pass the server's proto-max-bulk-len asks for it, on an
    # I/O thread; later ones of that size go inline.
    assert not conn.puts_inline(2 << 20)
    calls: list = []
    real = conn.put_chunk_by

    def spy(key, chunk, deadline):
        assert deadline > time.monotonic()
        sent = real(key, chunk, deadline)
        calls.append((threading.current_thread(), sent))
        return sent

    monkeypatch.setattr(conn, "put_chunk_by", spy)
    first, small, big = torch.randn(16), torch.randn(64, 1024), _big_chunk(5)
    # No connection is open yet: nothing is sent inline (opening one waits on the pool's
    # timeouts, not the put's deadline); the put goes by an I/O thread and opens one.
    store.put(make_key("first"), first)
    assert calls == [(threading.current_thread(), False)]
    store.put(make_key("inline"), small)
    assert calls[1] == (threading.current_thread(), True)
    store.put(make_key("staged"), big)  # staged: two commands, on an I/O thread
    assert len(calls) == 2
    for key, value in ((make_key("first"), first), (make_key("inline"), small), (make_key("staged"), big)):
        got = store.get(key)
        assert got is not None and torch.equal(got, value)
    assert store.stats["puts"] == 3
    assert conn.puts_inline(2 << 20)  # the staged put asked the server's bulk limit
    store.put(make_key("two-mib"), torch.randn(512 * 1024))
    assert calls[2:] == [(threading.current_thread(), True)]
    store.close()


def test_cluster_puts_are_not_sent_inline(redis_cluster):
    c = RedisConnector(redis_cluster.url, timeout=TIMEOUT, prefix=_prefix())
    assert not c.puts_inline(1024)  # the cluster client follows MOVED/ASK itself
    c.close()


def test_a_put_given_up_mid_send_waits_no_longer_than_its_deadline_and_drops_its_connection(redis_server):
    """Each send and the reply wait get the time left, not the (much longer) socket timeout;
    the half-sent command's connection is never handed out again."""
    import torch

    from lmcache_core import chunk_format

    with TcpProxy(("127.0.0.1", redis_server.port)) as proxy:
        c = RedisConnector(f"redis://127.0.0.1:{proxy.port}/0", timeout=10.0, prefix=_prefix())
        small_key, big_key, after_key = make_key("small"), make_key("big"), make_key("after")
        small, after = torch.randn(1024), torch.randn(2048)
        assert not c.exists(small_key)  # opens a connection
        assert c.put_chunk_by(small_key, _unsealed(small_key, small), time.monotonic() + TIMEOUT)
        c.put(after_key, [bytes(2 << 20)])  # asks the server's bulk limit, as a first large put does
        proxy.set_mode("stall")  # the server reads nothing more, as if stuck in a long command
        big = torch.randn(8 << 20)  # 32 MiB: far more than the socket buffers hold
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="TimeoutError"):
            c.put_chunk_by(big_key, _unsealed(big_key, big), start + 1.0)
        assert time.monotonic() - start < 2.5  # 1 s, never the 10 s socket timeout
        proxy.set_mode("forward")
        # The only open connection was the half-sent one: dropped, so nothing is sent inline.
        assert not c.put_chunk_by(after_key, _unsealed(after_key, after), time.monotonic() + TIMEOUT)
        c.put_chunk(after_key, _unsealed(after_key, after))  # the usual way: opens a new one
        assert c.get(big_key) is None  # the cut SET never ran
        for k, value in ((small_key, small), (after_key, after)):
            assert torch.equal(chunk_format.decode(_b(c.get(k)), k.to_string()), value)
        c.close()


def test_put_chunk_by_over_tls_sends_part_by_part(tls_redis):
    import torch

    from lmcache_core import chunk_format

    tls_port, cert = tls_redis
    c = RedisConnector(f"rediss://127.0.0.1:{tls_port}/0", timeout=TIMEOUT, prefix=_prefix(), ssl_ca_certs=str(cert))
    assert c.puts_inline((1 << 20) - 1)
    key, value = make_key("tls-inline"), torch.randn(250_000)  # > one TLS record, < 1 MiB
    assert not c.exists(key)  # opens a connection
    assert c.put_chunk_by(key, _unsealed(key, value), time.monotonic() + TIMEOUT)
    got = chunk_format.decode(_b(c.get(key)), key.to_string())
    assert torch.equal(got, value)
    c.close()


def test_a_pool_of_another_class_turns_inline_puts_off_without_a_failure(redis_server, monkeypatch):
    """Only redis-py's own ConnectionPool is known inside; another pool class (a user's, or
    client-side caching's) gets its puts sent by redis-py, on an I/O thread."""
    import redis
    import torch

    from lmcache_core.storage_backend import open_backend

    class UsersPool(redis.ConnectionPool):
        pass

    store = open_backend(f"{redis_server.url}?prefix={_prefix()}", dst_device="cpu")
    conn = store.connector
    pool = conn._client().connection_pool
    monkeypatch.setattr(pool, "__class__", UsersPool)
    assert conn.puts_inline(1024)
    key, value = make_key("users-pool"), torch.randn(256)
    store.put(key, value)
    store.put(key, value)  # a connection is open now: still not inline
    assert not conn.puts_inline(1024)
    got = store.get(key)
    assert got is not None and torch.equal(got, value)
    assert store.stats["remote_errors"] == 0 and store.stats["puts"] == 2
    store.close()
