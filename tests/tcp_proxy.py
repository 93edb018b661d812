"""A loopback TCP proxy for fault tests: forward, blackhole, delay or reset.

Point a client at ``proxy.port`` instead of the server's port, then switch
``proxy.mode`` at any time; the new mode applies to open connections too, so a
client's pooled sockets hang (or break) exactly like new ones::

    with TcpProxy(("127.0.0.1", server_port)) as proxy:
        client = connect(port=proxy.port)
        proxy.set_mode("blackhole")   # accepted, never answered
        ...
        proxy.set_mode("forward")     # the server "comes back"

Modes:
    ``forward``: pass bytes both ways (after ``delay`` seconds, if set).
    ``delay``: like forward, but every chunk of bytes waits ``delay`` seconds.
    ``trickle``: like forward, but the server's bytes reach the client ``trickle_bytes``
    at a time, each after ``delay`` seconds (a slow or hostile server that never lets a
    read time out); the client's go on at once.
    ``blackhole``: accept, read and discard what the client sends, never answer.
    ``stall``: read nothing either way (a server stuck in a long command): the
    client's sends block once the socket buffers are full. Bytes already read are
    still passed on when the mode changes back.
    ``reset``: close connections at once with a TCP RST (SO_LINGER 0).
    ``truncate``: like forward, but each connection passes at most ``cut_after``
    bytes from the server, then both sides are closed cleanly (a reply cut short).
    ``flip``: like forward, but every ``flip_every``-th byte a connection passes from
    the server has its lowest bit flipped (corruption in transit: any reply longer
    than that is damaged, however the client reuses connections).

With no ``target`` only ``blackhole`` and ``reset`` make sense. Thread-safe: the
mode may be changed from any thread. Not meant for production traffic.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
from typing import Literal

Mode = Literal["forward", "delay", "trickle", "blackhole", "reset", "truncate", "flip", "stall"]
_MODES = ("forward", "delay", "trickle", "blackhole", "reset", "truncate", "flip", "stall")
_FORWARDING = ("forward", "delay", "trickle", "truncate", "flip")
_POLL = 0.05  # how often idle threads notice a mode change or stop()


class TcpProxy:
    """A TCP proxy on ``127.0.0.1:<free port>`` whose behaviour can be switched.

    Args:
        target: ``(host, port)`` to forward to, or None for a server that never answers.
        mode: initial mode (see the module docstring).
        delay: seconds each forwarded chunk waits in ``delay`` mode.

    Thread-safe.
    """

    def __init__(
        self, target: tuple[str, int] | None = None, mode: Mode = "forward", delay: float = 1.0
    ) -> None:
        if target is None and mode in ("forward", "delay"):
            mode = "blackhole"
        self.target = target
        self.delay = delay
        self.cut_after = 0
        self.flip_every = 0
        self.trickle_bytes = 1
        self._mode: Mode = "forward"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.set_mode(mode)  # after _lock/_conns: "reset" aborts open connections
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(_POLL)
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- control ---------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(
        self,
        mode: Mode,
        delay: float | None = None,
        cut_after: int | None = None,
        flip_every: int | None = None,
        trickle_bytes: int | None = None,
    ) -> None:
        """Switch behaviour; applies to open connections as well as new ones."""
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        if mode in _FORWARDING and self.target is None:
            raise ValueError(f"mode {mode!r} needs a target to forward to")
        if delay is not None:
            self.delay = delay
        if trickle_bytes is not None:
            if trickle_bytes < 1:
                raise ValueError(f"trickle_bytes must be >= 1, got {trickle_bytes}")
            self.trickle_bytes = trickle_bytes
        if cut_after is not None:
            self.cut_after = cut_after
        if flip_every is not None:
            if flip_every < 1:
                raise ValueError(f"flip_every must be >= 1, got {flip_every}")
            self.flip_every = flip_every
        self._mode = mode
        if mode == "reset":
            self.reset_all()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def reset_all(self) -> None:
        """Abort every open connection with a RST."""
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for s in conns:
            _abort(s)

    def close(self) -> None:
        """Stop accepting and drop every connection. Idempotent."""
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self._listener.close()
        except OSError:
            pass
        self.reset_all()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- machinery -------------------------------------------------------------------

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._conns.update(socks)

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._conns.discard(s)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self._mode == "reset":
                _abort(client)
                continue
            threading.Thread(
                target=self._serve, args=(client,), name="tcp-proxy-conn", daemon=True
            ).start()

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        upstream: socket.socket | None = None
        try:
            if self.target is not None and self._mode in _FORWARDING:
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    _abort(client)
                    return
                self._track(upstream)
            self._pump(client, upstream)
        finally:
            self._untrack(client, *([upstream] if upstream is not None else []))

    def _pump(self, client: socket.socket, upstream: socket.socket | None) -> None:
        socks = [client] + ([upstream] if upstream is not None else [])
        sent_down = 0  # bytes passed from the server to the client ("truncate", "flip")
        while not self._stop.is_set():
            mode = self._mode
            if mode == "reset":
                for s in socks:
                    _abort(s)
                return
            if mode == "stall":
                self._stop.wait(_POLL)
                continue
            try:
                readable, _, _ = select.select(socks, [], [], _POLL)
            except (OSError, ValueError):
                return  # a socket was closed under us (reset_all)
            for s in readable:
                try:
                    data = s.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                mode = self._mode
                if mode == "blackhole" or upstream is None:
                    continue  # swallowed: the sender waits for an answer forever
                if mode == "delay" and self._stop.wait(self.delay):
                    return
                other = upstream if s is client else client
                if mode == "trickle" and other is client:
                    if not self._trickle(client, data):
                        return
                    continue
                if mode == "truncate" and other is client:
                    data = data[: max(0, self.cut_after - sent_down)]
                if mode == "flip" and other is client and self.flip_every:
                    every = self.flip_every
                    first = -(sent_down + 1) % every  # index in data of the next multiple
                    if first < len(data):
                        flipped = bytearray(data)
                        for i in range(first, len(data), every):
                            flipped[i] ^= 0x01
                        data = bytes(flipped)
                if other is client:
                    sent_down += len(data)
                try:
                    other.sendall(data)
                except OSError:
                    return
                if mode == "truncate" and sent_down >= self.cut_after:
                    return  # the caller's finally closes both sockets: a clean FIN mid-reply


    def _trickle(self, client: socket.socket, data: bytes) -> bool:
        """Pass ``data`` on in ``trickle_bytes`` pieces, one each ``delay`` s, while the mode
        stays "trickle" (then the rest at once); False once the proxy stops or the client is gone."""
        view = memoryview(data)
        while view:
            if self._mode == "trickle":
                if self._stop.wait(self.delay):
                    return False
                piece, view = view[: self.trickle_bytes], view[self.trickle_bytes :]
            else:
                piece, view = view, view[len(view) :]
            try:
                client.sendall(piece)
            except OSError:
                return False
        return True


def _abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0 so the peer sees a RST, not a clean FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
