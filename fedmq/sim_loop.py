"""Many paho clients driven by one selector loop: no network thread per client.

paho 2 supports an external event loop: the client tells us when its socket opens
and closes and when it has bytes to write (``on_socket_*`` callbacks), and we call
``loop_read``/``loop_write`` when the selector says the socket is ready and
``loop_misc`` about once a second (keepalive pings, timeouts). One thread then
serves thousands of clients, so every callback of every client runs on it: no
locks are needed between devices.

Connecting is paho's own ``reconnect()``: a blocking TCP connect and TLS handshake
(to a broker on the LAN, milliseconds), then CONNECT. The loop paces new
connections (``rate`` per second) and redials a lost client with exponential
backoff, as paho's threaded loop would.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

MISC_EVERY = 1.0  # seconds between loop_misc passes over every client
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0


class ClientLoop:
    """Owns the sockets of the clients it connects; call ``run_once`` repeatedly."""

    def __init__(
        self,
        *,
        rate: float = 500.0,
        on_error: Callable[[Any, str, bool], None] | None = None,
    ):
        self.selector = selectors.DefaultSelector()
        self.rate = rate  # new connections per second
        # (client, message, permanent): a permanent failure (the broker's certificate does
        # not verify) is not redialled; a transient one is, with backoff
        self.on_error = on_error or (lambda client, message, permanent: None)
        self.clients: list[mqtt.Client] = []
        self._due: list[tuple[float, int, mqtt.Client]] = []  # (when, tiebreak, client) to dial
        self._tiebreak = itertools.count()
        self._backoff: dict[int, float] = {}  # id(client) -> next delay
        self._pending: set[mqtt.Client] = set()  # TLS sockets with decrypted bytes unread
        self._next_dial = 0.0
        self._next_misc = time.monotonic() + MISC_EVERY
        self.stopping = False
        self.dials = 0  # connection attempts made
        self.dial_failures = 0

    # -- registering ---------------------------------------------------------------------
    def add(self, client: mqtt.Client, host: str, port: int, **connect_kwargs: Any) -> None:
        """Take ``client`` on; it is dialled when the ramp reaches it (``connect_async``
        arguments as for paho)."""
        client.connect_async(host, port, **connect_kwargs)
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write
        self.clients.append(client)
        self._schedule(client, 0.0)

    def _schedule(self, client: mqtt.Client, delay: float) -> None:
        heapq.heappush(self._due, (time.monotonic() + delay, next(self._tiebreak), client))

    def connection_lost(self, client: mqtt.Client) -> None:
        """Redial ``client`` after its backoff (call from its on_disconnect)."""
        if self.stopping:
            return
        delay = self._backoff.get(id(client), BACKOFF_MIN)
        self._backoff[id(client)] = min(delay * 2, BACKOFF_MAX)
        self._schedule(client, delay)

    def connected(self, client: mqtt.Client) -> None:
        """The broker accepted ``client``: its next loss is redialled quickly again."""
        self._backoff.pop(id(client), None)

    # -- paho's socket callbacks -----------------------------------------------------------
    def _opened(self, client, userdata, sock) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _closed(self, client, userdata, sock) -> None:
        self._pending.discard(client)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client, userdata, sock) -> None:
        try:
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _no_write(self, client, userdata, sock) -> None:
        try:
            self.selector.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    # -- the loop --------------------------------------------------------------------------
    def run_once(self, timeout: float = 0.05) -> None:
        """Dial who is due, serve ready sockets, and every second keep everyone alive."""
        now = time.monotonic()
        self._dial_due(now)
        if self._pending:
            timeout = 0.0
        for key, events in self.selector.select(timeout):
            client = key.data
            if events & selectors.EVENT_READ:
                self._read(client)
            if events & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        for client in list(self._pending):
            self._pending.discard(client)
            self._read(client)
        now = time.monotonic()
        if now >= self._next_misc:
            self._next_misc = now + MISC_EVERY
            for client in self.clients:
                if client.socket() is not None:
                    client.loop_misc()

    def _read(self, client: mqtt.Client) -> None:
        client.loop_read()
        sock = client.socket()
        # a TLS record can hold several MQTT packets: what the selector cannot see
        if sock is not None and getattr(sock, "pending", None) and sock.pending() > 0:
            self._pending.add(client)

    def _dial_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now and not self.stopping:
            if self.rate > 0 and now < self._next_dial:
                return
            _, _, client = heapq.heappop(self._due)
            if client.socket() is not None:
                continue  # already connected (scheduled twice)
            self._next_dial = max(now, self._next_dial) + (1.0 / self.rate if self.rate else 0)
            self.dials += 1
            try:
                client.reconnect()
            except ssl.SSLCertVerificationError as exc:
                self.dial_failures += 1
                self.on_error(client, f"TLS: the broker's certificate does not verify: {exc}", True)
            except (OSError, ValueError) as exc:  # refused, timed out, reset
                self.dial_failures += 1
                self.on_error(client, f"connect failed: {exc}", False)
                self.connection_lost(client)
            now = time.monotonic()

    def waiting_to_dial(self) -> int:
        return len(self._due)

    def close(self) -> None:
        self.stopping = True
        self.selector.close()
