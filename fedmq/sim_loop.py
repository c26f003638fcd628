"""Many paho clients driven by one selector loop: no network thread per client.

paho 2 supports an external event loop: the client tells us when its socket opens
and closes and when it has bytes to write (``on_socket_*`` callbacks), and we call
``loop_read``/``loop_write`` when the selector says the socket is ready and
``loop_misc`` about once a second (keepalive pings, timeouts). One thread then
serves thousands of clients, so every callback of every client runs on it: no
locks are needed between devices.

Dialling is the one thing paho does blocking (``reconnect()`` connects TCP and
completes the TLS handshake before it returns), which would serialise a ramp of
thousands on round trips to a busy broker. So the loop makes the connection
itself, non-blocking and many at a time (``max_dialling``): TCP connect, then the
TLS handshake (the broker's certificate and host name checked by the context),
and hands the ready socket to paho's ``reconnect()`` through ``SimClient``, which
sends CONNECT on it. New dials are paced at ``rate`` per second; a lost client is
redialled with exponential backoff, as paho's threaded loop would.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

MISC_EVERY = 1.0  # seconds between loop_misc passes over every client
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
DIAL_TIMEOUT = 15.0  # seconds for TCP connect plus TLS handshake


class SimClient(mqtt.Client):
    """A paho client whose next connection is a socket the loop has already connected.

    Overrides paho's ``_create_socket`` (paho-mqtt 2.x), the one place it dials: the
    rest of ``reconnect()`` (session state, CONNECT) is paho's own."""

    _ready_socket: socket.socket | None = None

    def _create_socket(self):  # noqa: ANN202 (paho's signature)
        sock, self._ready_socket = self._ready_socket, None
        return sock if sock is not None else super()._create_socket()


@dataclass
class _Dial:
    client: SimClient
    sock: socket.socket
    started: float
    tls: bool = False  # past TCP, in the TLS handshake


class ClientLoop:
    """Owns the sockets of the clients it connects; call ``run_once`` repeatedly."""

    def __init__(
        self,
        *,
        rate: float = 500.0,
        max_dialling: int = 16,
        on_error: Callable[[Any, str, bool], None] | None = None,
    ):
        self.selector = selectors.DefaultSelector()
        self.rate = rate  # new connections per second (0: no pacing)
        # connections being made at once: a few workers' worth stays inside mosquitto's
        # listen backlog (100); past it SYNs are dropped and a dial waits for the retransmit
        self.max_dialling = max_dialling
        # (client, message, permanent): a permanent failure (the broker's certificate does
        # not verify) is not redialled; a transient one is, with backoff
        self.on_error = on_error or (lambda client, message, permanent: None)
        self.clients: list[SimClient] = []
        self._where: dict[int, tuple[str, int, ssl.SSLContext | None]] = {}
        self._addresses: dict[tuple[str, int], tuple] = {}
        self._due: list[tuple[float, int, SimClient]] = []  # (when, tiebreak, client) to dial
        self._tiebreak = itertools.count()
        self._dialling: dict[int, _Dial] = {}
        self._backoff: dict[int, float] = {}  # id(client) -> next delay
        self._pending: set[mqtt.Client] = set()  # TLS sockets with decrypted bytes unread
        self._next_dial = 0.0
        self._next_misc = time.monotonic() + MISC_EVERY
        self.stopping = False
        self.dials = 0  # connection attempts made
        self.dial_failures = 0

    # -- registering ---------------------------------------------------------------------
    def add(
        self,
        client: SimClient,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        **connect_kwargs: Any,
    ) -> None:
        """Take ``client`` on; it is dialled when the ramp reaches it. ``tls`` is the
        context it was given with ``tls_set_context`` (None: plain TCP); the rest are
        ``connect_async`` arguments."""
        client.connect_async(host, port, **connect_kwargs)
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write
        self.clients.append(client)
        self._where[id(client)] = (host, port, tls)
        self._schedule(client, 0.0)

    def _schedule(self, client: SimClient, delay: float) -> None:
        heapq.heappush(self._due, (time.monotonic() + delay, next(self._tiebreak), client))

    def connection_lost(self, client: SimClient) -> None:
        """Redial ``client`` after its backoff (call from its on_disconnect)."""
        if self.stopping:
            return
        delay = self._backoff.get(id(client), BACKOFF_MIN)
        self._backoff[id(client)] = min(delay * 2, BACKOFF_MAX)
        self._schedule(client, delay)

    def connected(self, client: SimClient) -> None:
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
        elif self._due and len(self._dialling) < self.max_dialling and not self.stopping:
            # wake for the next dial: at 75 a second that is every 13 ms, not every select
            next_dial = max(self._due[0][0], self._next_dial if self.rate else 0.0)
            timeout = min(timeout, max(0.0, next_dial - time.monotonic()))
        for key, events in self.selector.select(timeout):
            if isinstance(key.data, _Dial):
                self._advance(key.data)
                continue
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
            for dial in list(self._dialling.values()):
                if now - dial.started > DIAL_TIMEOUT:
                    self._dial_failed(dial, f"no connection within {DIAL_TIMEOUT:g} s", False)

    def _read(self, client: mqtt.Client) -> None:
        client.loop_read()
        sock = client.socket()
        # a TLS record can hold several MQTT packets: what the selector cannot see
        if sock is not None and getattr(sock, "pending", None) and sock.pending() > 0:
            self._pending.add(client)

    # -- dialling ----------------------------------------------------------------------------
    def _dial_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now and not self.stopping:
            if len(self._dialling) >= self.max_dialling:
                return
            if self.rate > 0 and now < self._next_dial:
                return
            _, _, client = heapq.heappop(self._due)
            if client.socket() is not None or id(client) in self._dialling:
                continue  # already connected or connecting (scheduled twice)
            self._next_dial = max(now, self._next_dial) + (1.0 / self.rate if self.rate else 0)
            self._start_dial(client)
            now = time.monotonic()

    def _start_dial(self, client: SimClient) -> None:
        host, port, _ = self._where[id(client)]
        self.dials += 1
        try:
            if (host, port) not in self._addresses:
                info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                self._addresses[(host, port)] = (info[0], info[4])
            family, address = self._addresses[(host, port)]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self.dial_failures += 1
            self.on_error(client, f"connect failed: {exc}", False)
            self.connection_lost(client)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as broker.connection's
        dial = _Dial(client, sock, time.monotonic())
        self._dialling[id(client)] = dial
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._dial_failed(dial, f"connect failed: {os.strerror(code)}", False)
            return
        self.selector.register(sock, selectors.EVENT_WRITE, dial)

    def _advance(self, dial: _Dial) -> None:
        """One step of a connection being made: TCP done, then the TLS handshake."""
        host, _, context = self._where[id(dial.client)]
        try:
            if not dial.tls:
                code = dial.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                if context is None:
                    self._dialled(dial)
                    return
                self.selector.unregister(dial.sock)
                dial.sock = context.wrap_socket(
                    dial.sock, server_hostname=host, do_handshake_on_connect=False
                )
                dial.tls = True
                self.selector.register(dial.sock, selectors.EVENT_WRITE, dial)
            try:
                dial.sock.do_handshake()
            except ssl.SSLWantReadError:
                self.selector.modify(dial.sock, selectors.EVENT_READ, dial)
                return
            except ssl.SSLWantWriteError:
                self.selector.modify(dial.sock, selectors.EVENT_WRITE, dial)
                return
            self._dialled(dial)
        except ssl.SSLCertVerificationError as exc:
            self._dial_failed(dial, f"TLS: the broker's certificate does not verify: {exc}", True)
        except (OSError, ValueError) as exc:  # refused, reset, a TLS alert
            self._dial_failed(dial, f"connect failed: {exc}", False)

    def _dialled(self, dial: _Dial) -> None:
        """Connected (and TLS done): paho takes the socket and sends CONNECT."""
        self.selector.unregister(dial.sock)
        del self._dialling[id(dial.client)]
        dial.client._ready_socket = dial.sock
        try:
            dial.client.reconnect()
        except (OSError, ValueError) as exc:
            self.dial_failures += 1
            self.on_error(dial.client, f"connect failed: {exc}", False)
            self.connection_lost(dial.client)

    def _dial_failed(self, dial: _Dial, message: str, permanent: bool) -> None:
        self._dialling.pop(id(dial.client), None)
        try:
            self.selector.unregister(dial.sock)
        except (KeyError, ValueError):
            pass
        dial.sock.close()
        self.dial_failures += 1
        self.on_error(dial.client, message, permanent)
        if not permanent:
            self.connection_lost(dial.client)

    def waiting_to_dial(self) -> int:
        return len(self._due) + len(self._dialling)

    def close(self) -> None:
        self.stopping = True
        for dial in list(self._dialling.values()):
            dial.sock.close()
        self._dialling.clear()
        self.selector.close()
