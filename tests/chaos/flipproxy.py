"""A TCP proxy that flips one byte of chosen content on its way to the client.

For protocols the HTTP fault proxy cannot parse (NFS over TCP, a peer protocol): the proxy
forwards both directions unchanged, and in the server-to-client direction looks for given
byte patterns (e.g. 32 bytes of a file at a known offset). Once armed, each pattern found is
corrupted once (its middle byte XORed), so the bytes arrive the right length with the wrong
content, exactly what a bad NIC or a broken middlebox does, and a retry reads them intact.

A pattern split across two reads is still found: the last `len(pattern) - 1` bytes of each
read are held back until the next read, or for at most 20 ms when the server sends nothing.
Every thread is joined by `stop()`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Sequence
from types import TracebackType

_HOLD_SECONDS = 0.02
_STOP_TIMEOUT = 10.0


class FlipProxy:
    def __init__(self, upstream: tuple[str, int], patterns: Sequence[bytes]) -> None:
        if not patterns or len({len(p) for p in patterns}) != 1 or len(patterns[0]) < 2:
            raise ValueError("patterns must be non-empty and of one length of at least 2")
        self._upstream = upstream
        self._patterns = list(patterns)
        self._pending = list(patterns)
        self._lock = threading.Lock()
        self._armed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.flipped: list[bytes] = []
        """The patterns corrupted so far, in order."""
        self.connections = 0
        self._accepting = threading.Thread(target=self._accept, name="flipproxy-accept")

    def start(self) -> FlipProxy:
        self._accepting.start()
        return self

    def arm(self) -> None:
        """From now on, corrupt each pattern the first time it passes."""
        with self._lock:
            self._armed = True

    def __enter__(self) -> FlipProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            for target, args in ((self._up, (client, upstream)), (self._down, (upstream, client))):
                thread = threading.Thread(target=target, args=args, name="flipproxy-pump")
                thread.start()
                self._threads.append(thread)

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _shutdown(upstream)

    def _corrupt(self, buffer: bytearray) -> None:
        with self._lock:
            if not self._armed:
                return
            for pattern in list(self._pending):
                at = buffer.find(pattern)
                if at >= 0:
                    buffer[at + len(pattern) // 2] ^= 0x5A
                    self._pending.remove(pattern)
                    self.flipped.append(pattern)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        keep = len(self._patterns[0]) - 1
        held = bytearray()
        try:
            while not self._stopping.is_set():
                ready, _, _ = select.select([upstream], [], [], _HOLD_SECONDS)
                if not ready:
                    if held:
                        client.sendall(held)
                        held.clear()
                    continue
                data = upstream.recv(65536)
                if not data:
                    break
                held += data
                self._corrupt(held)
                if len(held) > keep:
                    client.sendall(held[:-keep])
                    del held[:-keep]
            if held:
                client.sendall(held)
        except OSError:
            pass
        finally:
            _shutdown(client)

    def stop(self) -> None:
        self._stopping.set()
        # shutdown() wakes a thread blocked in accept(); close() alone does not on Linux.
        _shutdown(self._listener)
        self._listener.close()
        if self._accepting.is_alive():
            self._accepting.join(_STOP_TIMEOUT)
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)
        for thread in self._threads:
            thread.join(_STOP_TIMEOUT)
        for sock in sockets:
            sock.close()
        if any(t.is_alive() for t in [self._accepting, *self._threads]):
            raise RuntimeError("flip proxy threads did not stop")


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
