"""``BrokerHome``: the directory that holds one federation's secured mosquitto.

    home.toml             settings: federation, host names, tls / client_certs / plaintext
    accounts.json         which accounts exist and their roles (no secrets)
    passwd, acl           mosquitto's password file (0600) and ACL
    mosquitto.conf        written by ``write_config``; mosquitto.log next to it
    pki/                  ca.key (0600), ca.crt, server.key (0600), server.crt
    keys/                 aggregator.key (0600), aggregator.pub, devices/<id>.pub
    credentials/          <account>.toml (0600) plus the files they point at:
                          ca.crt, aggregator.pub, <id>.ed25519, <account>.crt/.key
    data/                 mosquitto persistence and mosquitto.pid
    upstream/             a site's home only (``init --bridge-to``): the bundle of the
                          site's device account at the root federation (0600), which
                          the bridge logs in with and the site aggregator signs with

A credentials file is everything one process needs to reach the broker; a
device's bundle is its .toml plus the files named in it (``bundle_files``).
``load_credentials`` and ``settings_from_credentials`` read one back.
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker import identity
from broker.acl import AGGREGATOR_USER, OPERATOR_USER, check_device_id, render_acl
from broker.connection import (
    ConnectionSettings,
    check_cluster,
    check_mqtt_version,
    parse_address,
)
from broker.errors import BrokerError, ConfigError
from broker.launcher import RunningBroker, start_mosquitto
from broker.mosquitto_conf import Bridge, MosquittoConfig, render
from broker.passwords import (
    generate_password,
    hash_password,
    read_password_file,
    write_password_hashes,
    write_secret_file,
)
from broker.pki import CertificateAuthority
from broker.signing import generate_keypair, load_private, load_public
from broker.topics import check_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HOME_FILE = "home.toml"
ROLES = {AGGREGATOR_USER: "aggregator", OPERATOR_USER: "operator"}
PATH_KEYS = (
    "ca_file",
    "cert_file",
    "key_file",
    "signing_key",
    "model_key",
    "device_keys",
    "registry_key",
)
STRING_KEYS = (
    "federation",
    "broker",
    "username",
    "password",
    "device_id",
    "role",
    "identity_cert",
)
_WILDCARD_BINDS = ("", "0.0.0.0", "::", "*")


# --------------------------------------------------------------------------- TOML


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(values: Mapping[str, Any], header: str = "") -> str:
    """A flat TOML document (strings, bools, ints, lists of them)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not valid TOML: {exc}") from None


# --------------------------------------------------------------------------- credentials


def load_credentials(path: str | Path) -> dict[str, Any]:
    """Read and check a credentials file; ConfigError naming the file on any problem.

    Returns every key of the file; the known ones are checked, string keys
    missing from the file are ``None`` (``broker`` is ``""``), and the path keys
    (``ca_file`` ... ``device_keys``) are ``Path``s resolved against the file's
    directory, ``None`` when absent. Unknown keys are passed through unchanged.
    """
    path = Path(path)
    raw = _read_toml(path, "credentials file")
    out: dict[str, Any] = dict(raw)

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{path}: {message}")

    for key in (*STRING_KEYS, *PATH_KEYS):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"{key} must be a string, not {type(value).__name__}")
        out[key] = value
    for key in ("federation", "username", "password"):
        if not raw.get(key):
            raise fail(f"{key} is missing")
    for kind, key in (("federation name", "federation"), ("device id", "device_id")):
        if out[key] is not None:
            try:
                check_name(kind, out[key])
            except (ValueError, ConfigError) as exc:
                raise fail(str(exc)) from None
    out["broker"] = out["broker"] or ""
    if out["broker"]:
        try:
            parse_address(out["broker"])
        except ConfigError as exc:
            raise fail(str(exc)) from None
    for key in PATH_KEYS:
        if out[key] is None:
            continue
        resolved = (path.parent / out[key]).resolve()
        exists = resolved.is_dir() if key == "device_keys" else resolved.is_file()
        if not exists:
            raise fail(f"{key} {out[key]!r} not found (looked for {resolved})")
        out[key] = resolved
    if (out["cert_file"] is None) != (out["key_file"] is None):
        raise fail("cert_file and key_file go together: give both or neither")
    if out["cert_file"] is not None and out["ca_file"] is None:
        raise fail("a client certificate needs ca_file (TLS)")
    return out


def settings_from_credentials(
    credentials: str | Path | Mapping[str, Any], broker: str | None = None
) -> ConnectionSettings:
    """``ConnectionSettings`` from a credentials file (or its loaded dict).

    ``broker`` ("HOST:PORT") overrides the file's address; one of them must be set.
    """
    creds = credentials if isinstance(credentials, Mapping) else load_credentials(credentials)
    address = broker or creds.get("broker") or ""
    if not address:
        where = credentials if not isinstance(credentials, Mapping) else "the credentials"
        raise ConfigError(f"{where}: no broker address: pass --broker HOST:PORT")
    host, port = parse_address(address)
    where = credentials if not isinstance(credentials, Mapping) else "the credentials"
    return ConnectionSettings(
        host=host,
        port=port,
        username=creds["username"],
        password=creds["password"],
        ca_file=creds.get("ca_file"),
        cert_file=creds.get("cert_file"),
        key_file=creds.get("key_file"),
        mqtt_version=check_mqtt_version(creds.get("mqtt_version"), str(where)),
        cluster=check_cluster(creds.get("cluster"), str(where)),
    )


# --------------------------------------------------------------------------- the home


def _write_settings(home: Path, settings: Mapping[str, Any]) -> None:
    header = "fedmq broker home settings: written by fedmq, see broker/home.py"
    write_secret_file(home / HOME_FILE, dump_toml(settings, header), mode=0o644)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


class BrokerHome:
    """An existing broker home directory; make one with ``BrokerHome.create``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()
        settings_file = self.path / HOME_FILE
        if not settings_file.is_file():
            raise ConfigError(
                f"{self.path} is not a fedmq broker home (no {HOME_FILE}); make one with "
                f"`fedmq broker init {path} --federation NAME`"
            )
        raw = _read_toml(settings_file, "broker home settings")
        try:
            self.federation: str = check_name("federation name", raw["federation"])
            self.hostnames: tuple[str, ...] = tuple(raw["hostnames"])
            self.tls: bool = raw["tls"]
            self.client_certs: bool = raw["client_certs"]
            self.plaintext: bool = raw["plaintext"]
            self.broker_address: str = raw.get("broker", "")
            self.bridge_to: str = raw.get("bridge_to", "")  # a site's root broker, HOST:PORT
            self.bridge_credentials: str = raw.get("bridge_credentials", "")
            flags = (self.tls, self.client_certs, self.plaintext)
            types_ok = (
                all(isinstance(flag, bool) for flag in flags)
                and all(isinstance(h, str) for h in self.hostnames)
                and isinstance(self.broker_address, str)
                and isinstance(self.bridge_to, str)
                and isinstance(self.bridge_credentials, str)
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"{settings_file}: broken broker home settings ({exc})") from None
        if not types_ok:
            raise ConfigError(f"{settings_file}: broken broker home settings (wrong value types)")

    # ----------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        path: str | Path,
        federation: str,
        *,
        hostnames: Iterable[str] = ("localhost", "127.0.0.1"),
        tls: bool = True,
        client_certs: bool = False,
        plaintext: bool = True,
        bridge_to: str | None = None,
        bridge_credentials: str | Path | None = None,
    ) -> BrokerHome:
        """Make a new home with its PKI, the aggregator and operator accounts, passwd and acl.

        With ``bridge_credentials`` (a device bundle of the root federation, made there by
        ``fedmq broker add-device SITE``) the home is a site's: its broker bridges to the
        root's at ``bridge_to`` (default: the bundle's address)."""
        path = Path(path).absolute()
        try:
            check_name("federation name", federation)
        except ValueError as exc:  # older topics.check_name raised ValueError
            raise ConfigError(str(exc)) from None
        hostnames = tuple(hostnames)
        if not hostnames:
            raise ConfigError("give at least one host name or IP address for the broker")
        if client_certs and not tls:
            raise ConfigError("client certificates need TLS: drop --no-tls or --client-certs")
        if not tls and not plaintext:
            raise ConfigError("with neither TLS nor plaintext the broker would have no listener")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"{path} already exists and is not an empty directory")
        upstream = None
        if bridge_credentials is not None:
            upstream = _upstream_bundle(Path(bridge_credentials), federation, bridge_to)
        elif bridge_to:
            raise ConfigError("--bridge-to needs --bridge-credentials (the site's root bundle)")
        path.parent.mkdir(parents=True, exist_ok=True)
        # build in a sibling directory and rename: a failure leaves nothing half-made
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            for sub in ("pki", "keys", "keys/devices", "credentials", "data"):
                (staging / sub).mkdir(mode=0o700, parents=True)
            settings = {
                "federation": federation,
                "hostnames": list(hostnames),
                "tls": tls,
                "client_certs": client_certs,
                "plaintext": plaintext,
                "broker": "",
            }
            if upstream is not None:
                settings |= _copy_upstream(staging / "upstream", *upstream)
            _write_settings(staging, settings)
            if tls:
                ca = CertificateAuthority.create(
                    staging / "pki/ca.key", staging / "pki/ca.crt", name=f"fedmq {federation} CA"
                )
                ca.issue_server(staging / "pki/server.key", staging / "pki/server.crt", hostnames)
                shutil.copyfile(staging / "pki/ca.crt", staging / "credentials/ca.crt")
            generate_keypair(staging / "keys/aggregator.key", staging / "keys/aggregator.pub")
            shutil.copyfile(staging / "keys/aggregator.pub", staging / "credentials/aggregator.pub")
            home = cls(staging)
            home._registry()
            home._save_accounts({})
            for account in (AGGREGATOR_USER, OPERATOR_USER):
                home._add_account(account, ROLES[account])
            if path.exists():
                path.rmdir()
            staging.rename(path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.chmod(path, 0o700)
        return cls(path)

    # ----------------------------------------------------------------- paths

    passwd_path = property(lambda self: self.path / "passwd")
    acl_path = property(lambda self: self.path / "acl")
    accounts_path = property(lambda self: self.path / "accounts.json")
    conf_path = property(lambda self: self.path / "mosquitto.conf")
    log_path = property(lambda self: self.path / "mosquitto.log")
    data_dir = property(lambda self: self.path / "data")
    pid_path = property(lambda self: self.path / "data" / "mosquitto.pid")
    ca_path = property(lambda self: self.path / "pki" / "ca.crt")
    credentials_dir = property(lambda self: self.path / "credentials")
    device_keys_dir = property(lambda self: self.path / "keys" / "devices")
    aggregator_key_path = property(lambda self: self.path / "keys" / "aggregator.key")
    aggregator_public_key_path = property(lambda self: self.path / "keys" / "aggregator.pub")
    registry_key_path = property(lambda self: self.path / "keys" / "registry.key")

    @property
    def upstream_path(self) -> Path | None:
        """A site's credentials at the root federation (``--upstream`` of its aggregator)."""
        return self.path / self.bridge_credentials if self.bridge_credentials else None

    def upstream(self) -> dict[str, Any] | None:
        """A site's loaded root credentials, or None for a home that is not a site's."""
        return None if self.upstream_path is None else load_credentials(self.upstream_path)

    def bridge(self) -> Bridge | None:
        creds = self.upstream()
        if creds is None:
            return None
        return Bridge(
            address=self.bridge_to,
            root_federation=creds["federation"],
            site=creds["username"],
            username=creds["username"],
            password=creds["password"],
            ca_file=creds["ca_file"],
            cert_file=creds["cert_file"],
            key_file=creds["key_file"],
        )

    def _registry(self) -> Ed25519PrivateKey:
        """The federation registry's key, which certifies device keys for secure
        aggregation (``broker/identity.py``); made on first use in a home from before it."""
        if not self.registry_key_path.exists():
            generate_keypair(self.registry_key_path, self.path / "keys" / "registry.pub")
            shutil.copyfile(self.path / "keys/registry.pub", self.credentials_dir / "registry.pub")
        return load_private(self.registry_key_path)

    def credentials_path(self, account: str) -> Path:
        """The credentials file of ``account`` (a device id, or a service account name)."""
        if account not in self.accounts():
            raise ConfigError(f"no account {account!r} in the broker home {self.path}")
        return self.credentials_dir / f"{account}.toml"

    def bundle_files(self, account: str) -> list[Path]:
        """The credentials file and every file it refers to: what to copy to that machine."""
        creds = load_credentials(self.credentials_path(account))
        files = [self.credentials_path(account)]
        return files + [creds[k] for k in PATH_KEYS if isinstance(creds[k], Path)]

    # ----------------------------------------------------------------- accounts

    def accounts(self) -> dict[str, str]:
        """``{account: role}``, roles being 'aggregator', 'operator' or 'device'."""
        try:
            raw = json.loads(self.accounts_path.read_text())
            return {name: info["role"] for name, info in raw["accounts"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"{self.accounts_path}: cannot read the account list ({exc})"
            ) from None

    def devices(self) -> list[str]:
        return sorted(a for a, role in self.accounts().items() if role == "device")

    def _save_accounts(self, accounts: Mapping[str, Mapping[str, str]]) -> None:
        doc = {"federation": self.federation, "accounts": dict(accounts)}
        write_secret_file(self.accounts_path, json.dumps(doc, indent=2) + "\n", mode=0o644)

    def _load_accounts(self) -> dict[str, dict[str, str]]:
        self.accounts()  # validates
        return json.loads(self.accounts_path.read_text())["accounts"]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise changes to passwd/acl/accounts between processes."""
        with open(self.path / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _add_account(self, account: str, role: str, broker: str | None = None) -> Path:
        path, password = self._account_files(account, role, broker)
        accounts = self._load_accounts()
        accounts[account] = {"role": role, "created": _now()}
        self._save_accounts(accounts)
        hashes = read_password_file(self.passwd_path) if self.passwd_path.exists() else {}
        hashes[account] = hash_password(password)
        self._write_security_files(hashes)
        return path

    def _account_files(
        self,
        account: str,
        role: str,
        broker: str | None,
        *,
        registry: Ed25519PrivateKey | None = None,
        ca: CertificateAuthority | None = None,
    ) -> tuple[Path, str]:
        """Write one account's credentials (and a device's keys); (credentials file, password).

        Leaves accounts.json and passwd alone: the caller records the account, once per
        batch (``add_devices`` adds thousands with one write of each)."""
        password = generate_password()
        creds: dict[str, Any] = {
            "role": role,
            "federation": self.federation,
            "broker": broker if broker is not None else self.broker_address,
            "username": account,
            "password": password,
        }
        if role == "device":
            creds["device_id"] = account
        if self.tls:
            creds["ca_file"] = "ca.crt"
        if self.client_certs:
            ca = ca or CertificateAuthority.load(self.path / "pki/ca.key", self.ca_path)
            key, crt = (self.credentials_dir / f"{account}{ext}" for ext in (".key", ".crt"))
            ca.issue_client(account, key, crt)
            creds["cert_file"], creds["key_file"] = f"{account}.crt", f"{account}.key"
        if role == "device":
            key = generate_keypair(
                self.credentials_dir / f"{account}.ed25519", self.device_keys_dir / f"{account}.pub"
            )
            creds["signing_key"] = f"{account}.ed25519"
            creds["model_key"] = "aggregator.pub"
            cert = identity.certify(
                registry or self._registry(), self.federation, account, key.public_key()
            )
            creds["registry_key"] = "registry.pub"
            creds["identity_cert"] = base64.b64encode(cert).decode()
        elif role == "aggregator":
            creds["signing_key"] = "../keys/aggregator.key"
            creds["device_keys"] = "../keys/devices"
        return self._write_credentials(account, creds), password

    def _write_credentials(self, account: str, creds: Mapping[str, Any]) -> Path:
        header = (
            f"fedmq credentials of {creds['role']} {account!r} in federation {self.federation!r}.\n"
            "Secret (holds a password): keep it 0600. Relative paths are relative to this file."
        )
        return write_secret_file(self.credentials_dir / f"{account}.toml", dump_toml(creds, header))

    def _write_security_files(self, hashes: Mapping[str, str]) -> None:
        bridge = self.bridge()
        upstream = None if bridge is None else (bridge.root_federation, bridge.site)
        acl = render_acl(self.federation, upstream=upstream)
        write_secret_file(self.acl_path, acl, mode=0o600)
        write_password_hashes(self.passwd_path, hashes)

    def add_device(self, device_id: str, *, broker: str | None = None) -> Path:
        """Create a device account; return its credentials file. Call ``reload()`` afterwards.

        ``broker`` ("HOST:PORT", as the device must dial it) overrides the home's address.
        """
        check_device_id(device_id)
        if broker:
            self.check_client_address(broker)
        with self._locked():
            if device_id in self.accounts():
                raise ConfigError(f"device {device_id!r} already exists in {self.path}")
            return self._add_account(device_id, "device", broker)

    def add_devices(self, device_ids: Iterable[str], *, broker: str | None = None) -> list[Path]:
        """Create many device accounts in one pass; their credentials files, in order.

        Each device gets what ``add_device`` gives it (its own password, Ed25519 signing
        key, registry identity certificate, credentials file), but passwd and
        accounts.json are written once for the whole batch, not once per device (which
        is quadratic: 10,000 devices would rewrite a 10,000-line passwd 10,000 times).
        All or nothing: on a failure no new account is recorded and the files written
        so far are removed. Call ``reload()`` afterwards.
        """
        ids = [check_device_id(d) for d in device_ids]
        if broker:
            self.check_client_address(broker)
        if len(set(ids)) != len(ids):
            twice = next(d for d, n in Counter(ids).items() if n > 1)
            raise ConfigError(f"device {twice!r} is listed twice")
        with self._locked():
            existing = self.accounts()
            clash = [d for d in ids if d in existing]
            if clash:
                more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
                raise ConfigError(f"device {clash[0]!r}{more} already exists in {self.path}")
            registry = self._registry()
            ca = (
                CertificateAuthority.load(self.path / "pki/ca.key", self.ca_path)
                if self.client_certs
                else None
            )
            paths: list[Path] = []
            hashes = read_password_file(self.passwd_path) if self.passwd_path.exists() else {}
            accounts = self._load_accounts()
            try:
                for device_id in ids:
                    path, password = self._account_files(
                        device_id, "device", broker, registry=registry, ca=ca
                    )
                    paths.append(path)
                    hashes[device_id] = hash_password(password)
                    accounts[device_id] = {"role": "device", "created": _now()}
                self._write_security_files(hashes)
                self._save_accounts(accounts)
            except BaseException:
                for device_id in ids[: len(paths) + 1]:
                    self._remove_device_files(device_id)
                raise
            return paths

    def remove_device(self, device_id: str) -> None:
        """Revoke a device: drop it from passwd and accounts, delete its keys and bundle."""
        with self._locked():
            if self.accounts().get(device_id) != "device":
                raise ConfigError(f"no device {device_id!r} in {self.path}")
            hashes = read_password_file(self.passwd_path)
            hashes.pop(device_id, None)
            self._write_security_files(hashes)
            accounts = self._load_accounts()
            del accounts[device_id]
            self._save_accounts(accounts)
            self._remove_device_files(device_id)

    def _remove_device_files(self, device_id: str) -> None:
        for suffix in (".toml", ".ed25519", ".crt", ".key"):
            (self.credentials_dir / f"{device_id}{suffix}").unlink(missing_ok=True)
        (self.device_keys_dir / f"{device_id}.pub").unlink(missing_ok=True)

    def device_public_keys(self) -> dict[str, Ed25519PublicKey]:
        """``{device_id: Ed25519 public key}`` of every device of this home."""
        return {d: load_public(self.device_keys_dir / f"{d}.pub") for d in self.devices()}

    # ----------------------------------------------------------------- running mosquitto

    def mosquitto_config(
        self, port: int | None, tls_port: int | None = None, bind: str = "127.0.0.1"
    ) -> MosquittoConfig:
        """The config for these listeners; ConfigError if they contradict the home's settings."""
        if port is not None and not self.plaintext:
            raise ConfigError(
                f"{self.path} has plaintext switched off: start it with a TLS port only"
            )
        if tls_port is not None and not self.tls:
            raise ConfigError(f"{self.path} was made without TLS: it has no TLS listener")
        if self.tls and tls_port is None:
            raise ConfigError(f"{self.path} uses TLS (its credentials name a CA): give a TLS port")
        if port is None and tls_port is None:
            raise ConfigError("give at least one port")
        pki = self.path / "pki"
        return MosquittoConfig(
            data_dir=self.data_dir,
            port=port,
            bind=bind,
            tls_port=tls_port,
            password_file=self.passwd_path,
            acl_file=self.acl_path,
            ca_file=pki / "ca.crt" if self.tls else None,
            cert_file=pki / "server.crt" if self.tls else None,
            key_file=pki / "server.key" if self.tls else None,
            require_client_cert=self.client_certs,
            bridge=self.bridge(),
        )

    def write_config(
        self, port: int | None, tls_port: int | None = None, bind: str = "127.0.0.1"
    ) -> Path:
        """Write mosquitto.conf and fill the broker address into the credentials files."""
        config = self.mosquitto_config(port, tls_port, bind)
        # a bridge's password is inline (mosquitto 2.0 has no file for it): then 0600
        write_secret_file(
            self.conf_path, render(config), mode=0o644 if config.bridge is None else 0o600
        )
        host = self.client_host(bind)
        host = f"[{host}]" if ":" in host else host
        self._set_broker_address(f"{host}:{tls_port if tls_port is not None else port}")
        return self.conf_path

    def client_host(self, bind: str = "127.0.0.1") -> str:
        """The host name clients dial: one the server certificate names.

        The listening address itself when the home names it (``--host``),
        else the first of the home's names: with ``--host broker.lan`` a
        certificate holds only broker.lan, and a client that dials 127.0.0.1
        fails TLS verification."""
        if bind not in _WILDCARD_BINDS and _same_host(bind, self.hostnames):
            return bind
        return self.hostnames[0]

    def check_client_address(self, address: str) -> None:
        """ConfigError if a client dialling ``address`` would fail TLS verification."""
        host, _port = parse_address(address)
        if self.tls and not _same_host(host, self.hostnames):
            names = ", ".join(self.hostnames)
            raise ConfigError(
                f"{host} is not a name in the broker's certificate ({names}): a device dialling "
                f"it would fail TLS verification; use one of those names, or make a broker "
                f"home whose `fedmq broker init --host` includes {host}"
            )

    def _set_broker_address(self, address: str) -> None:
        """Point every credentials file that follows the home's address at ``address``."""
        with self._locked():
            old = self.broker_address
            for account in self.accounts():
                creds_path = self.credentials_dir / f"{account}.toml"
                creds = _read_toml(creds_path, "credentials file")
                if creds.get("broker", "") in ("", old):
                    creds["broker"] = address
                    self._write_credentials(account, creds)
            settings = _read_toml(self.path / HOME_FILE, "broker home settings")
            settings["broker"] = address
            _write_settings(self.path, settings)
            self.broker_address = address

    def start(
        self,
        port: int | None,
        tls_port: int | None = None,
        bind: str = "127.0.0.1",
        *,
        timeout: float = 10.0,
        foreground_log: bool = False,
    ) -> RunningBroker:
        """Write the config and start mosquitto; the caller stops the returned broker."""
        pid = self.running_pid()
        if pid is not None:
            raise BrokerError(f"a mosquitto (pid {pid}) already runs for {self.path}")
        conf = self.write_config(port, tls_port, bind)
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1"}.get(
            bind, bind
        )
        running = start_mosquitto(
            conf,
            host=host,
            port=port,
            tls_port=tls_port,
            log_path=self.log_path,
            timeout=timeout,
            foreground_log=foreground_log,
        )
        # mosquitto listens before it installs its signal handlers: until then a
        # SIGHUP (reload) would kill it
        if not _wait_for_sighup_handler(running.pid, timeout):
            running.stop()
            raise BrokerError(f"mosquitto (pid {running.pid}) did not finish starting")
        return running

    def running_pid(self) -> int | None:
        """The pid of the mosquitto running for this home (from data/mosquitto.pid), or None."""
        try:
            pid = int(self.pid_path.read_text().strip())
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError):
            return None
        # "<pid> (<comm>) <state> ...": a killed but not yet reaped mosquitto is a zombie (Z)
        comm, _, rest = stat.partition("(")[2].rpartition(")")
        return pid if comm == "mosquitto" and rest.split()[:1] != ["Z"] else None

    def reload(self) -> int | None:
        """SIGHUP the running mosquitto so it re-reads passwd and acl; its pid, or None."""
        pid = self.running_pid()
        if pid is None:
            return None
        if not _wait_for_sighup_handler(pid, 10.0):
            raise BrokerError(f"mosquitto (pid {pid}) is not ready to reload; try again")
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return None
        return pid


def _upstream_bundle(
    credentials: Path, federation: str, bridge_to: str | None
) -> tuple[dict[str, Any], Path, str]:
    """(loaded bundle, its file, the root's address): a site's root credentials, checked."""
    creds = load_credentials(credentials)
    if creds.get("role") != "device" or not creds.get("device_id"):
        raise ConfigError(
            f"{credentials}: not a device's credentials; the root's operator makes the "
            "site's with `fedmq broker add-device SITE` and gives it the bundle"
        )
    if creds["federation"] == federation:
        raise ConfigError(
            f"the site's federation {federation!r} is its root's too: give the site its own "
            "name (e.g. farm-a), or their topics collide over the bridge"
        )
    address = bridge_to or creds["broker"]
    if not address:
        raise ConfigError(f"{credentials}: no root broker address: pass --bridge-to HOST:PORT")
    host, port = parse_address(address)
    if any(c.isspace() for c in host) or ":" in host:
        raise ConfigError(f"--bridge-to {address}: give HOST:PORT with a DNS name or IPv4 address")
    return creds, credentials, f"{host}:{port}"


def _copy_upstream(
    directory: Path, creds: Mapping[str, Any], source: Path, address: str
) -> dict[str, str]:
    """Copy a site's root bundle into ``directory`` (0700, files 0600, paths rewritten to
    the copies); the home settings that point at it."""
    directory.mkdir(mode=0o700)
    copied = dict(creds)
    for key in PATH_KEYS:
        if isinstance(creds.get(key), Path):
            target = directory / creds[key].name
            write_secret_file(target, creds[key].read_bytes())
            copied[key] = target.name
    raw = _read_toml(source, "credentials file")  # unknown keys kept, paths rewritten
    raw |= {k: copied[k] for k in PATH_KEYS if k in raw}
    raw["broker"] = address
    name = f"{creds['username']}.toml"
    header = (
        f"fedmq credentials of site {creds['username']!r} at the root federation "
        f"{creds['federation']!r}.\nSecret (holds a password): keep it 0600."
    )
    write_secret_file(directory / name, dump_toml(raw, header))
    return {"bridge_to": address, "bridge_credentials": f"upstream/{name}"}


def _same_host(host: str, names: Iterable[str]) -> bool:
    """Is ``host`` one of ``names``? (DNS names ignore case; IP addresses compare as such)."""
    import ipaddress

    def norm(name: str) -> str:
        name = name.strip("[]").rstrip(".").lower()
        try:
            return str(ipaddress.ip_address(name))
        except ValueError:
            return name

    return norm(host) in {norm(n) for n in names}


def _wait_for_sighup_handler(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` catches SIGHUP (Linux /proc); True if it does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        caught = [ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")]
        if caught and int(caught[0], 16) & (1 << (signal.SIGHUP - 1)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
