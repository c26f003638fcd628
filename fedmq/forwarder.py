"""A TCP forwarder on 127.0.0.1 that can be cut and restored: a site's uplink, for the
tests and the sites benchmark (it counts the bytes it carries each way)."""

from __future__ import annotations

import socket
import threading


class Forwarder:
    """A TCP forwarder on 127.0.0.1 to ``target``: ``cut()`` closes every connection
    through it and, until ``restore()``, closes each new one at once, unread (the uplink
    is down). It keeps its listening port meanwhile: a port given up and bound again
    can be taken in between (a client retrying a connection to a port nobody listens on
    may connect the port to itself). Counts the bytes it carried each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up_bytes = 0  # site -> root
        self.down_bytes = 0  # root -> site
        self.connections = 0  # accepted so far
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._down = False
        self.port = 0
        self._listen()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by close()
            if self._down:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._down or self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._socks += [client, upstream]
                self.connections += 1
            for src, dst, way in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pipe, args=(src, dst, way), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if way == "up":
                        self.up_bytes += len(data)
                    else:
                        self.down_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for s in self._socks if s.fileno() != -1) // 2

    def cut(self) -> None:
        with self._lock:
            self._down = True
            socks, self._socks = self._socks, []
        _close(socks)

    def restore(self) -> None:
        with self._lock:
            self._down = False

    def close(self) -> None:
        with self._lock:
            self._down = True
            listener, self._listener = self._listener, None
            socks, self._socks = self._socks, []
        if listener is not None:
            listener.close()
        _close(socks)


def _close(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
