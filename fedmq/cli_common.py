"""Options shared by the CLI's commands: how to reach the broker and who we are.

Each value comes, in this order, from its flag, its ``FEDMQ_*`` environment
variable, or the credentials file given with ``--config`` (what
``fedmq broker add-device`` writes). Secrets belong in the file or the
environment: a password on the command line shows in ``ps``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from broker.connection import ConnectionSettings, settings_from
from broker.errors import ConfigError

CONNECTION_KEYS = (
    "config_file",
    "broker",
    "federation",
    "username",
    "password",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
)


@dataclass(frozen=True)
class Connection:
    """The connection flags of one command, resolved against its credentials file."""

    config_file: Path | None
    broker: str | None
    federation: str | None
    username: str | None
    password: str | None
    password_file: Path | None
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None

    def resolve(self) -> tuple[ConnectionSettings, str, dict[str, Any]]:
        """(settings, federation, the credentials file's values); flags override the file."""
        config = read_config(self.config_file)
        broker = self.broker or config.get("broker")
        federation = self.federation or config.get("federation")
        if not broker:
            raise ConfigError("no broker address: pass --broker HOST:PORT (or --config FILE)")
        if not federation:
            raise ConfigError("no federation: pass --federation NAME (or --config FILE)")
        settings = settings_from(
            broker,
            username=self.username or config.get("username"),
            password=self.password if self.password is not None else config.get("password"),
            password_file=self.password_file,
            ca_file=self.ca_file or config.get("ca_file"),
            cert_file=self.cert_file or config.get("cert_file"),
            key_file=self.key_file or config.get("key_file"),
            mqtt_version=config.get("mqtt_version"),
            cluster=config.get("cluster"),
            where=str(self.config_file or "the credentials"),
        )
        return settings, federation, config


def connection_options(func: Callable) -> Callable:
    """--config, --broker, --federation and the credential flags, passed as ``connection``."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="FEDMQ_CONFIG",
            help="Credentials file (TOML) written by `fedmq broker add-device` or `broker init`. "
            "[env FEDMQ_CONFIG]",
        ),
        click.option(
            "--broker",
            envvar="FEDMQ_BROKER",
            help="Broker address HOST:PORT. [env FEDMQ_BROKER; default from --config]",
        ),
        click.option(
            "--federation",
            envvar="FEDMQ_FEDERATION",
            help="Federation name (topic root fedmq/<name>/). [env FEDMQ_FEDERATION]",
        ),
        click.option("--username", envvar="FEDMQ_USERNAME", help="MQTT user. [env FEDMQ_USERNAME]"),
        click.option(
            "--password",
            envvar="FEDMQ_PASSWORD",
            help="MQTT password; prefer the env var or --password-file. [env FEDMQ_PASSWORD]",
        ),
        click.option(
            "--password-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="FEDMQ_PASSWORD_FILE",
            help="File holding the MQTT password. [env FEDMQ_PASSWORD_FILE]",
        ),
        click.option(
            "--ca-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="FEDMQ_CA_FILE",
            help="CA certificate: connect with TLS and verify the broker. [env FEDMQ_CA_FILE]",
        ),
        click.option(
            "--cert-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="FEDMQ_CERT_FILE",
            help="Client certificate, when the broker requires one. [env FEDMQ_CERT_FILE]",
        ),
        click.option(
            "--key-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar="FEDMQ_KEY_FILE",
            help="Private key of the client certificate. [env FEDMQ_KEY_FILE]",
        ),
    ]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        values = {key: kwargs.pop(key) for key in CONNECTION_KEYS}
        return func(*args, connection=Connection(**values), **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def read_config(config_file: Path | None) -> dict[str, Any]:
    if config_file is None:
        return {}
    from broker.home import load_credentials

    return load_credentials(config_file)


def arch_option(func: Callable) -> Callable:
    """--arch NAME=package.module:function (repeatable): a locally registered architecture."""
    return click.option(
        "--arch",
        "arch",
        multiple=True,
        metavar="NAME=MODULE:FUNCTION",
        envvar="FEDMQ_ARCHITECTURES",
        help="Register an architecture beyond linear/mlp/cnn1d under NAME (repeatable; also the "
        "[architectures] table of --config). A task can only name one. "
        "[env FEDMQ_ARCHITECTURES, space-separated]",
    )(func)


def architectures(config: dict[str, Any], config_file: Path | None, arch: tuple[str, ...]):
    """This machine's registered architectures: the config file's table, then --arch; imported
    now (local configuration only), so a typo fails at start rather than at the first round."""
    from broker import zoo

    entries = zoo.parse_registry(config.get("architectures"), f"{config_file}: [architectures]")
    entries.update(zoo.parse_arch_options(arch))
    return zoo.load_registry(entries, "registered architectures")


def fedmq_errors(func: Callable) -> Callable:
    """Anticipated errors become one line on stderr and exit code 1; Ctrl-C exits 130."""
    from broker.errors import FedmqError

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FedmqError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise SystemExit(130) from None

    return wrapper


def setup_logging(verbose: int) -> None:
    import sys

    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_path=False, markup=False
        )
        fmt = "%(name)s: %(message)s"
    else:  # a log file or a pipe: one plain line per record, no wrapping
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", handlers=[handler], force=True)
    logging.getLogger("fedmq").setLevel(level)
