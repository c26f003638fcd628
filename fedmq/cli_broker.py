"""``fedmq broker ...``: make, run and manage a secured mosquitto for one federation.

All state lives in a broker home directory (see ``broker/home.py``), by
default ``./fedmq-broker``. Passwords never appear on the terminal: they live
in the 0600 credentials files the commands point at.
"""

from __future__ import annotations

import functools
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from broker.errors import BrokerError, ConfigError, FedmqError
from broker.home import BrokerHome

DEFAULT_HOME = Path("fedmq-broker")
DEFAULT_PORT, DEFAULT_TLS_PORT = 1883, 8883
LIST_DEVICES = 20  # devices `init`/`up` list one by one; past that, the first and a count


def _errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Anticipated errors become one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FedmqError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def _home_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--home",
        "home_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="FEDMQ_BROKER_HOME",
        help=f"Broker home directory. [env FEDMQ_BROKER_HOME; default ./{DEFAULT_HOME}]",
    )(func)


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _reload_message(home: BrokerHome, what: str) -> str:
    pid = home.reload()
    if pid is not None:
        return f"broker reloaded (pid {pid}): {what}"
    return "no broker is running for this home: the change applies at the next `fedmq broker up`"


@click.group()
def broker() -> None:
    """Run the MQTT broker of a federation: mosquitto with passwords, ACL and TLS.

    \b
    Typical session (devices on the LAN dial broker.lan):
      fedmq broker init ./fedmq-broker --federation demo --host broker.lan
      fedmq broker up --home ./fedmq-broker --bind 0.0.0.0   # foreground, Ctrl-C stops it
      fedmq broker add-device pi-kitchen --home ./fedmq-broker
    """


@broker.command(short_help="Create a broker home (PKI, passwords, ACL, keys).")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--federation", required=True, help="Federation name: the topic root fedmq/<name>/.")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="DNS name or IP address devices use to reach the broker; goes into the server "
    "certificate, and the first one into the credentials files. Repeat for several. "
    "[default: localhost and 127.0.0.1]",
)
@click.option("--no-tls", is_flag=True, help="No TLS listener and no certificates (testing only).")
@click.option(
    "--client-certs",
    is_flag=True,
    help="Also require a client certificate on the TLS listener (combine with --no-plaintext: "
    "the plaintext listener takes a password alone).",
)
@click.option("--no-plaintext", is_flag=True, help="Never open an unencrypted listener.")
@click.option(
    "--bridge-credentials",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Make a site's broker: the site's credentials at the root federation (made there "
    "with `fedmq broker add-device SITE`; the files it names sit beside it). They are copied "
    "into DIRECTORY/upstream/ and the broker bridges to the root's with them.",
)
@click.option(
    "--bridge-to",
    metavar="HOST:PORT",
    help="The root broker's address as this site dials it. [default: the bundle's]",
)
@_errors
def init(
    directory: Path,
    federation: str,
    hosts: tuple[str, ...],
    no_tls: bool,
    client_certs: bool,
    no_plaintext: bool,
    bridge_credentials: Path | None,
    bridge_to: str | None,
) -> None:
    """Create a broker home in DIRECTORY: CA and server certificate, password file, ACL,
    signing keys, and the aggregator and operator accounts.

    \b
    A site (its own broker and edge aggregator, bridged to the root federation):
      (at the root)  fedmq broker add-device site-a --home ./root-broker
      (at the site)  fedmq broker init ./site-broker --federation farm-a \\
                         --bridge-credentials site-a.toml --bridge-to root.example:8883
    """
    home = BrokerHome.create(
        directory,
        federation,
        hostnames=hosts or ("localhost", "127.0.0.1"),
        tls=not no_tls,
        client_certs=client_certs,
        plaintext=not no_plaintext,
        bridge_to=bridge_to,
        bridge_credentials=bridge_credentials,
    )
    _describe(home)
    click.echo("next:")
    click.echo(f"  fedmq broker up --home {_q(home.path)}")
    click.echo(f"  fedmq broker add-device DEVICE_ID --home {_q(home.path)}")
    if home.upstream_path is not None:
        aggregator = home.credentials_path("fedmq-aggregator")
        click.echo(
            f"  fedmq aggregator start --config {_q(aggregator)} "
            f"--upstream {_q(home.upstream_path)} --run-dir RUN_DIR"
        )


def _describe(home: BrokerHome) -> None:
    listeners = [name for name, on in (("plaintext", home.plaintext), ("TLS", home.tls)) if on]
    click.echo(f"broker home {home.path} for federation {home.federation!r}")
    click.echo(
        f"  listeners: {' + '.join(listeners)}; client certificates: "
        f"{'required' if home.client_certs else 'no'}"
    )
    if home.tls:
        click.echo(f"  CA certificate: {home.ca_path}")
    bridge = home.bridge()
    if bridge is not None:
        click.echo(
            f"  bridge: to {bridge.address} as {bridge.site!r} of the root federation "
            f"{bridge.root_federation!r} ({'TLS' if bridge.ca_file else 'plaintext'}); "
            f"root credentials: {home.upstream_path}"
        )
    click.echo("  credentials (secret, 0600):")
    accounts = sorted(home.accounts().items(), key=lambda kv: (kv[1], kv[0]))
    devices = [a for a, role in accounts if role == "device"]
    for account, role in accounts:
        if role == "device" and len(devices) > LIST_DEVICES and account != devices[0]:
            continue
        click.echo(f"    {role:<10} {home.credentials_dir / f'{account}.toml'}")
        if role == "device" and len(devices) > LIST_DEVICES:  # a simulated fleet: one line
            click.echo(f"    {'':<10} ... and {len(devices) - 1:,} more, up to {devices[-1]}")


@broker.command(short_help="Run mosquitto in the foreground.")
@_home_option
@click.option(
    "--federation",
    default="demo",
    show_default=True,
    help=f"Federation of the home created when --home is omitted and ./{DEFAULT_HOME} is new.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help=f"Plaintext MQTT port; 0 opens none. [default {DEFAULT_PORT} if the home allows it]",
)
@click.option(
    "--tls-port",
    type=click.IntRange(1, 65535),
    metavar="PORT",
    help=f"TLS MQTT port. [default {DEFAULT_TLS_PORT} if the home uses TLS]",
)
@click.option(
    "--bind",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The default serves this machine only: for devices on the "
    "LAN give 0.0.0.0 (every interface) or this machine's LAN address.",
)
@_errors
def up(
    home_dir: Path | None, federation: str, port: int | None, tls_port: int | None, bind: str
) -> None:
    """Run mosquitto in the foreground for a broker home until Ctrl-C or SIGTERM.

    Without --home, uses ./fedmq-broker and creates it (federation --federation) if missing.
    Writes the address clients dial (a name in the server certificate, see `init --host`)
    into the home's credentials files.

    \b
    Listening on the LAN (devices on other machines):
      fedmq broker up --home ./fedmq-broker --bind 0.0.0.0
    """
    if home_dir is None and not (DEFAULT_HOME / "home.toml").exists():
        BrokerHome.create(DEFAULT_HOME, federation)
        click.echo(f"created broker home ./{DEFAULT_HOME} for federation {federation!r}")
    home = BrokerHome(home_dir or DEFAULT_HOME)
    source = click.get_current_context().get_parameter_source("federation")
    if source != click.core.ParameterSource.DEFAULT and federation != home.federation:
        raise ConfigError(f"{home.path} holds federation {home.federation!r}, not {federation!r}")
    if port is None:
        port = DEFAULT_PORT if home.plaintext else 0
    if tls_port is None and home.tls:
        tls_port = DEFAULT_TLS_PORT
    running = home.start(port or None, tls_port, bind)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        _describe(home)
        if port:
            click.echo(f"  listening on {_hostport(bind, port)}  (plaintext)")
        if tls_port:
            click.echo(f"  listening on {_hostport(bind, tls_port)}  (TLS)")
        click.echo(f"  clients dial {home.broker_address} (written into the credentials files)")
        if _loopback(bind) and not all(_loopback(h) for h in home.hostnames):
            click.echo(
                f"  note: listening on {bind} serves this machine only; for devices on the "
                "LAN restart with --bind 0.0.0.0 (or this machine's LAN address)"
            )
        click.echo(f"  log: {home.log_path}")
        _say_fd_limit(home, running.fd_limit)
        click.echo(f"mosquitto running (pid {running.pid}); Ctrl-C stops it")
        code = running.proc.wait()
        if code != 0:  # 0: it was stopped by a signal (Ctrl-C reaches it too)
            raise BrokerError(f"mosquitto exited with code {code}:\n{running.log_tail()}")
    except KeyboardInterrupt:
        click.echo("stopping mosquitto")
    finally:
        running.stop()
        signal.signal(signal.SIGTERM, previous)
    click.echo("stopped")


def fd_limit_lines(fd_limit: int | None, devices: int) -> list[str]:
    """What `broker up` says about mosquitto's open-files limit for ``devices`` devices."""
    from broker.launcher import FD_OVERHEAD, clients_for

    if fd_limit is None:
        return ["  file descriptors: unknown (no /proc); each client needs one"]
    room = clients_for(fd_limit)
    lines = [f"  file descriptors: {fd_limit:,} (room for about {room:,} clients)"]
    needed = devices + 2 + FD_OVERHEAD  # the devices, the aggregator and the operator
    if needed > fd_limit:
        lines.append(
            f"  warning: {devices:,} devices need about {needed:,} file descriptors but "
            f"mosquitto got {fd_limit:,}: connections past {room:,} will be refused. Raise "
            "the hard limit (`ulimit -Hn`, LimitNOFILE= in a systemd unit), or start the broker "
            "as root with CAP_SYS_RESOURCE, which lets it raise the limit itself"
        )
    return lines


def _say_fd_limit(home: BrokerHome, fd_limit: int | None) -> None:
    for line in fd_limit_lines(fd_limit, len(home.devices())):
        click.echo(line, err=line.startswith("  warning"))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@broker.command("add-device", short_help="Add a device and write its credentials.")
@click.argument("device_id")
@_home_option
@click.option(
    "--broker",
    "address",
    help="HOST:PORT the device dials, when it differs from the address `up` wrote; with "
    "TLS, HOST must be a name in the server certificate (`init --host`).",
)
@_errors
def add_device(device_id: str, home_dir: Path | None, address: str | None) -> None:
    """Create the account of device DEVICE_ID and write its credentials bundle.

    A running broker is reloaded, so the device can connect at once. The password
    stays in the bundle (0600): copy the listed files to the device.
    """
    home = BrokerHome(home_dir or DEFAULT_HOME)
    path = home.add_device(device_id, broker=address)
    click.echo(f"added device {device_id!r} to federation {home.federation!r}")
    click.echo(_reload_message(home, f"{device_id} can connect now"))
    click.echo("copy these files to the device, into one directory (they are secret):")
    for file in home.bundle_files(device_id):
        click.echo(f"  {file}")
    if not home.broker_address and not address:
        click.echo(
            "note: no broker address yet; `fedmq broker up` fills it in, or add "
            "--broker HOST:PORT to the agent command"
        )
    click.echo("then run on the device:")
    click.echo(f"  fedmq agent run --config {_q(path)} --data <your data file>")


@broker.command("add-devices", short_help="Add many devices at once (numbered ids).")
@click.option("--prefix", required=True, help="Device ids are PREFIX followed by a number.")
@click.option("--count", type=click.IntRange(min=1), required=True, help="How many devices.")
@click.option(
    "--start", type=click.IntRange(min=0), default=0, show_default=True, help="First number."
)
@_home_option
@click.option("--broker", "address", help="HOST:PORT the devices dial (as for add-device).")
@_errors
def add_devices(
    prefix: str, count: int, start: int, home_dir: Path | None, address: str | None
) -> None:
    """Create COUNT device accounts, PREFIX00000 upwards, in one pass.

    Each device gets its own password, signing key, identity certificate and
    credentials file, as with add-device; the password file and account list are
    written once for the whole batch, so 10,000 devices take seconds. A running
    broker is reloaded. Used for `fedmq simulate` fleets.

    \b
    Example: sim00000 ... sim09999
      fedmq broker add-devices --prefix sim --count 10000 --home ./fedmq-broker
    """
    import time

    home = BrokerHome(home_dir or DEFAULT_HOME)
    width = max(5, len(str(start + count - 1)))
    ids = [f"{prefix}{i:0{width}d}" for i in range(start, start + count)]
    began = time.perf_counter()
    paths = home.add_devices(ids, broker=address)
    seconds = time.perf_counter() - began
    click.echo(
        f"added {len(paths):,} devices ({ids[0]} ... {ids[-1]}) to federation "
        f"{home.federation!r} in {seconds:.1f} s"
    )
    click.echo(f"credentials: {home.credentials_dir}/<device>.toml")
    click.echo(_reload_message(home, "they can connect now"))


@broker.command("remove-device", short_help="Revoke a device and reload the broker.")
@click.argument("device_id")
@_home_option
@_errors
def remove_device(device_id: str, home_dir: Path | None) -> None:
    """Revoke device DEVICE_ID: delete its account, keys and bundle; reload the broker.

    New connections with its credentials are refused from then on.
    """
    home = BrokerHome(home_dir or DEFAULT_HOME)
    home.remove_device(device_id)
    click.echo(f"removed device {device_id!r} from federation {home.federation!r}")
    click.echo(_reload_message(home, f"{device_id} is locked out"))


if __name__ == "__main__":  # python -m fedmq.cli_broker ...
    broker(prog_name="fedmq broker")
