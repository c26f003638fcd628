"""A RabbitMQ cluster with its MQTT plugin on this machine: for tests and benchmarks.

Debian's ``rabbitmq-server`` (3.10: MQTT 3.1.1 only) started as 2-3 separate
Erlang nodes (``fedmq-a@localhost``, ...) that form one cluster at boot, each
with its own MQTT listener on 127.0.0.1. Everything the nodes need lives in one
directory: the config, a definitions file, the Erlang cookie (``HOME``), the
node databases and logs. Nothing binds anything but 127.0.0.1, including the
node's own Erlang port mapper (``epmd``), which is started here on a free port
and stopped with the nodes, so no other RabbitMQ on the machine is touched.

Accounts come from a ``BrokerHome`` (the same passwords, keys and credentials
files as a mosquitto federation) and are loaded at boot from a definitions
file: users, permissions, and topic permissions on ``amq.topic`` that mirror
fedmq's mosquitto ACL (``broker/acl.py``). RabbitMQ maps the MQTT topic
``fedmq/f/updates/bob`` to the routing key ``fedmq.f.updates.bob``, and the
topic permissions are regular expressions over routing keys with
``{username}`` standing for the account name.

A '.' in an MQTT topic is a level separator for RabbitMQ ('fedmq/f/updates/a.b'
is delivered as 'fedmq/f/updates/a/b' and does not match 'updates/+'), so a
federation or device name with a '.' cannot work there and is refused when
the cluster is made (``check_rabbit_name``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import BrokerError, ConfigError
from broker.home import BrokerHome, dump_toml, load_credentials, write_secret_file
from broker.launcher import wait_for_port

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
NODE_LETTERS = "abcdefghij"
BOOT_TIMEOUT = 120.0  # seconds for a node to boot and join (3.10 on 2 cores: ~10-20 s)


def listen_ports(count: int) -> list[int]:
    """``count`` different free loopback ports below the ephemeral range. A node boots for
    seconds after its ports are chosen; a port from the ephemeral range (what binding port
    0 gives) may be taken meanwhile by any outgoing connection on the machine, and the node
    dies with eaddrinuse. Different from each other: one random port drawn twice gave
    epmd and a node's MQTT listener the same one, and that node never booted."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random(secrets.randbits(32))
    ports: list[int] = []
    for _ in range(200 * count):
        port = rng.randrange(10000, max(low, 10001))
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise BrokerError(f"no {count} free loopback ports between 10000 and {low}")


def rabbit_installed() -> bool:
    """Whether Debian's rabbitmq-server (with its MQTT plugin) is on this machine."""
    return (RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("erl") is not None


def check_rabbit_name(kind: str, name: str) -> str:
    """``name`` if it can be a topic level on RabbitMQ's MQTT plugin, else ConfigError."""
    if "." in name:
        raise ConfigError(
            f"{kind} {name!r} contains '.', which RabbitMQ's MQTT plugin treats as a topic "
            f"level separator (its topics are AMQP routing keys): its messages would not "
            f"reach the aggregator; use '-' or '_' instead"
        )
    return name


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def topic_permissions(federation: str, role: str) -> tuple[str, str]:
    """(write, read) regular expressions over routing keys: fedmq's ACL for ``role``.

    The read check applies to subscription filters as routing-key patterns ('+' is
    '*'), so the aggregator's ``updates/+`` is matched as the literal ``updates.*``; a
    denied publish or subscribe closes the connection (3.10 has no MQTT 5 reason codes)."""
    base = r"^fedmq\." + re.escape(federation) + r"\."
    if role == "device":
        write = base + r"(updates|status|secagg|receipts)\.{username}$"
        read = base + r"(model|state|round|inbox\.{username}|receipts\.[^.*#]+)$"
    elif role == "aggregator":
        write = base + r"(model|state|aggregator|round|inbox\.[^.*#]+)$"
        read = base + r"(model|state|aggregator|round|control|(updates|status|secagg)\.[^.#]+)$"
    elif role == "operator":
        write = base + r"control$"
        read = base + r"(state|aggregator)$"
    else:
        raise ConfigError(f"no RabbitMQ permissions for role {role!r}")
    return write, read


def definitions(home: BrokerHome, vhost: str = "/") -> dict:
    """Users, permissions and topic permissions of every account of ``home``."""
    users, permissions, topic_perms = [], [], []
    for account, role in sorted(home.accounts().items()):
        creds = load_credentials(home.credentials_path(account))
        users.append(
            {
                "name": account,
                "password_hash": password_hash(creds["password"]),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": "",
            }
        )
        # resources: only MQTT is exposed (no AMQP listener); what a client may do is
        # the topic permissions' business. Its session queue is declared in its name.
        permissions.append(
            {"user": account, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
        )
        write, read = topic_permissions(home.federation, role)
        topic_perms.append(
            {"user": account, "vhost": vhost, "exchange": "amq.topic", "write": write, "read": read}
        )
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_perms,
    }


@dataclass
class RabbitNode:
    name: str  # fedmq-a@localhost
    mqtt_port: int
    dist_port: int
    directory: Path
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.mqtt_port}"

    @property
    def short(self) -> str:
        return self.name.split("@")[0]


@dataclass
class RabbitCluster:
    """``nodes`` RabbitMQ nodes in one cluster; ``start`` boots them, ``stop`` stops them."""

    path: Path
    home: BrokerHome
    nodes: list[RabbitNode] = field(default_factory=list)
    epmd_port: int = 0
    epmd: subprocess.Popen | None = None
    prefetch: int = 10

    @classmethod
    def create(
        cls,
        path: Path,
        federation: str,
        devices: Iterable[str],
        *,
        nodes: int = 3,
        prefix: str = "fedmq",
    ) -> RabbitCluster:
        """A broker home (plaintext) for ``devices`` spread round-robin over ``nodes`` nodes."""
        if not 1 <= nodes <= len(NODE_LETTERS):
            raise ConfigError(f"a cluster of {nodes} nodes? use 1 to {len(NODE_LETTERS)}")
        devices = list(devices)
        check_rabbit_name("federation name", federation)
        for device in devices:
            check_rabbit_name("device id", device)
        path = Path(path).absolute()
        path.mkdir(parents=True, exist_ok=True)
        home = BrokerHome.create(path / "home", federation, tls=False, plaintext=True)
        epmd_port, *ports = listen_ports(1 + 2 * nodes)
        cluster = cls(path, home, epmd_port=epmd_port)
        for i in range(nodes):
            letter = NODE_LETTERS[i]
            cluster.nodes.append(
                RabbitNode(
                    f"{prefix}-{letter}@localhost",
                    ports[2 * i],
                    ports[2 * i + 1],
                    path / f"node-{letter}",
                )
            )
        addresses = [n.address for n in cluster.nodes]
        for i, device in enumerate(devices):  # the first ones away from the aggregator's
            home.add_device(device, broker=addresses[(i + 1) % nodes])
        # the aggregator dials the first node and keeps its retained messages on every node
        cluster.set_account(
            "fedmq-aggregator", broker=addresses[0], cluster=addresses if nodes > 1 else None
        )
        cluster.set_account("fedmq-operator", broker=addresses[-1])
        return cluster

    # -- accounts ------------------------------------------------------------------------
    def set_account(self, account: str, **values) -> Path:
        """Rewrite keys of ``account``'s credentials file (None removes a key)."""
        path = self.home.credentials_path(account)
        import tomllib

        raw = tomllib.loads(path.read_text())
        for key, value in values.items():
            if value is None:
                raw.pop(key, None)
            else:
                raw[key] = value
        header = "".join(
            line[2:] + "\n" for line in path.read_text().splitlines() if line.startswith("# ")
        )
        write_secret_file(path, dump_toml(raw, header.rstrip("\n")))
        return path

    def credentials(self, account: str) -> Path:
        return self.home.credentials_path(account)

    def node_of(self, account: str) -> RabbitNode:
        address = load_credentials(self.credentials(account))["broker"]
        return next(n for n in self.nodes if n.address == address)

    def add_devices(self, devices: Iterable[str]) -> None:
        """More device accounts on a running cluster (one definitions import)."""
        devices = list(devices)
        for device in devices:
            check_rabbit_name("device id", device)
        start = len(self.home.devices())
        for i, device in enumerate(devices):
            node = self.nodes[(start + i + 1) % len(self.nodes)]
            self.home.add_device(device, broker=node.address)
        self._write_definitions()
        self.ctl(self.nodes[0], "import_definitions", str(self.definitions_path))

    # -- files ---------------------------------------------------------------------------
    definitions_path = property(lambda self: self.path / "definitions.json")
    cookie_home = property(lambda self: self.path / "erlang-home")

    def _write_definitions(self) -> None:
        write_secret_file(self.definitions_path, json.dumps(definitions(self.home)), mode=0o600)

    def _write_files(self) -> None:
        self._write_definitions()
        self.cookie_home.mkdir(exist_ok=True)
        cookie = self.cookie_home / ".erlang.cookie"
        if not cookie.exists():
            write_secret_file(cookie, secrets.token_hex(16).upper(), mode=0o400)
        peers = "\n".join(
            f"cluster_formation.classic_config.nodes.{i} = {n.name}"
            for i, n in enumerate(self.nodes, 1)
        )
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            (node.directory / "rabbitmq.conf").write_text(
                "\n".join(
                    [
                        "listeners.tcp = none",  # no AMQP: clients get MQTT only
                        f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}",
                        "mqtt.allow_anonymous = false",
                        "mqtt.vhost = /",
                        "mqtt.exchange = amq.topic",
                        f"mqtt.prefetch = {self.prefetch}",
                        f"load_definitions = {self.definitions_path}",
                        "cluster_formation.peer_discovery_backend = classic_config",
                        peers,
                        f"log.file.level = {os.environ.get('FEDMQ_RABBIT_LOG', 'warning')}",
                        "log.console = false",
                        "vm_memory_high_watermark.relative = 0.2",
                        "disk_free_limit.absolute = 50MB",
                        "",
                    ]
                )
            )
            (node.directory / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
            (node.directory / "rabbitmq-env.conf").write_text("")

    def env(self, node: RabbitNode) -> dict[str, str]:
        d = node.directory
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(self.cookie_home),  # the shared Erlang cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            # loopback distribution; no scheduler busy-waiting (2 shared cores, 3 nodes)
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                "-kernel inet_dist_use_interface {127,0,0,1} "
                "+sbwt none +sbwtdcpu none +sbwtdio none"
            ),
            "RABBITMQ_CTL_ERL_ARGS": "+sbwt none",
        }

    # -- processes -----------------------------------------------------------------------
    def ctl(self, node: RabbitNode, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n NODE ARGS``; BrokerError with its output when it fails."""
        proc = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", node.name, *args],
            env=self.env(node),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise BrokerError(
                f"rabbitmqctl {' '.join(args)} on {node.name} failed: "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        return proc.stdout

    def start(self, timeout: float = BOOT_TIMEOUT) -> RabbitCluster:
        """Boot the nodes; each finds the others (classic config peer discovery)."""
        if not rabbit_installed():
            raise BrokerError(
                "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)"
            )
        self._write_files()
        self.epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env={**os.environ, "ERL_EPMD_ADDRESS": "127.0.0.1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.epmd_port, 10)
        try:
            deadline = time.monotonic() + timeout
            # one node at a time: nodes booting together race to join the MQTT plugin's
            # Raft cluster (client id tracking) and one can hang for good in
            # "cluster_change_not_permitted"; a node that boots after the first joins it
            for node in self.nodes:
                self._boot(node)
                self._wait_mqtt(node, deadline)
            self._check_cluster()
        except BaseException:
            self.stop()
            raise
        return self

    def _boot(self, node: RabbitNode) -> None:
        log = open(node.directory / "stdout.log", "ab")  # noqa: SIM115 (the child owns it)
        node.proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=self.env(node),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends the whole tree
        )
        log.close()

    def _wait_mqtt(self, node: RabbitNode, deadline: float) -> None:
        while True:
            if node.proc is not None and node.proc.poll() is not None:
                raise BrokerError(
                    f"RabbitMQ node {node.name} exited with code {node.proc.returncode} while "
                    f"starting; see {node.directory / 'log'}"
                )
            try:
                wait_for_port("127.0.0.1", node.mqtt_port, 0.5)
                return
            except BrokerError:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"RabbitMQ node {node.name} did not open its MQTT port "
                        f"{node.mqtt_port}; see {node.directory / 'log'}"
                    ) from None

    def _check_cluster(self) -> None:
        status = self.ctl(self.nodes[0], "cluster_status", "--formatter", "json")
        running = set(json.loads(status).get("running_nodes", []))
        missing = [n.name for n in self.nodes if n.name not in running]
        if missing:
            raise BrokerError(f"RabbitMQ nodes {missing} did not join the cluster")

    def stop_node(self, node: RabbitNode, timeout: float = 30.0) -> None:
        """SIGTERM to the node's process group (rabbitmq-server, erl, its port programs)."""
        proc = node.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything left in its group (erl_child_setup, inet_gethost)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
        node.proc = None

    def stop(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
            list(pool.map(self.stop_node, self.nodes))
        if self.epmd is not None:
            if self.epmd.poll() is None:
                self.epmd.terminate()
                self.epmd.wait(10)
            self.epmd = None

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
