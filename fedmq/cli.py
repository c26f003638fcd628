"""The ``fedmq`` command: broker, agent, aggregator and demo.

A thin layer: it parses options, calls the library, and turns fedmq's errors
into one clear line on stderr with exit code 1.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

import click

from fedmq.cli_common import (
    arch_option,
    architectures,
    connection_options,
    fedmq_errors,
    setup_logging,
)

log = logging.getLogger("fedmq.cli")
# device_agent.attacks.KINDS, spelled out so that `fedmq --help` does not import torch
ATTACK_KINDS = ("sign_flip", "scale", "noise", "constant")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="fedmq")
def main(verbose: int, quiet: bool) -> None:
    """fedmq: federated learning for fleets of small devices over MQTT.

    Devices keep their data; the model travels. Start a broker, an aggregator
    and one agent per device, or run `fedmq demo` to see all of it at once.
    """
    setup_logging(-1 if quiet else verbose)


def _register_broker_group() -> None:
    from fedmq.cli_broker import broker

    main.add_command(broker)


_register_broker_group()


def _register_simulate() -> None:
    from fedmq.cli_simulate import simulate

    main.add_command(simulate)


_register_simulate()


def _stop_on_sigterm(stop) -> None:
    """SIGTERM asks the loop to stop cleanly, like Ctrl-C."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop())


# -- agent ---------------------------------------------------------------------------
@main.group()
def agent() -> None:
    """Run a device agent: train on local data each round, publish the update."""


@agent.command("run")
@connection_options
@click.option(
    "--device-id", envvar="FEDMQ_DEVICE_ID", help="This device's id. [env FEDMQ_DEVICE_ID]"
)
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    envvar="FEDMQ_DATA",
    help="Local data: CSV with a header (label column named by the task) or .npz with X and y. "
    "[env FEDMQ_DATA; default: data in --config]",
)
@click.option(
    "--signing-key",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="FEDMQ_SIGNING_KEY",
    help="Ed25519 private key to sign updates. [default from --config]",
)
@click.option(
    "--model-key",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="FEDMQ_MODEL_KEY",
    help="The aggregator's Ed25519 public key: refuse models it did not sign. "
    "[default from --config]",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar="FEDMQ_INSECURE",
    help="Run without a model key or signing key: models unverified, updates unsigned. "
    "[env FEDMQ_INSECURE]",
)
@arch_option
@click.option("--exit-when-done", is_flag=True, help="Exit once the aggregator finishes its run.")
@click.option(
    "--max-rounds", type=click.IntRange(min=1), help="Exit after training this many rounds."
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    envvar="FEDMQ_THREADS",
    help="Torch threads for training. [env FEDMQ_THREADS; default: threads in --config]",
)
@click.option(
    "--train-hours",
    envvar="FEDMQ_TRAIN_HOURS",
    metavar="HH:MM-HH:MM",
    help="Train only in this daily window of local time, e.g. 08:00-18:00 (may wrap "
    "midnight). [env FEDMQ_TRAIN_HOURS; default: hours in [limits] of --config]",
)
@click.option(
    "--min-free-mb",
    type=click.FloatRange(min=0, min_open=True),
    envvar="FEDMQ_MIN_FREE_MB",
    help="Train only with this much memory available. [env FEDMQ_MIN_FREE_MB; [limits]]",
)
@click.option(
    "--max-cpu-temp",
    type=click.FloatRange(min=0, min_open=True),
    envvar="FEDMQ_MAX_CPU_TEMP",
    help="Train only below this CPU temperature in °C, where /sys/class/thermal tells. "
    "[env FEDMQ_MAX_CPU_TEMP; [limits]]",
)
@click.option(
    "--require-mains",
    is_flag=True,
    default=None,
    envvar="FEDMQ_REQUIRE_MAINS",
    help="Train only on mains power, where /sys/class/power_supply tells. "
    "[env FEDMQ_REQUIRE_MAINS; [limits]]",
)
@click.option(
    "--recheck",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds between checks of the limits while a round is held back.",
)
@click.option(
    "--timeout",
    type=float,
    help="Give up after this many seconds, with exit code 2 (errors exit with 1).",
)
@click.option(
    "--attack",
    type=click.Choice(ATTACK_KINDS),
    hidden=True,  # for `fedmq demo --attack` and tests: this device sends poisoned updates
    help="Send poisoned updates of this kind (device_agent/attacks.py). Demos only.",
)
@click.option(
    "--attack-scale",
    type=float,
    hidden=True,
    help="The attack's scale S. [default: per kind]",
)
@fedmq_errors
def agent_run(
    connection,
    device_id,
    data_path,
    signing_key,
    model_key,
    insecure,
    arch,
    exit_when_done,
    max_rounds,
    threads,
    train_hours,
    min_free_mb,
    max_cpu_temp,
    require_mains,
    recheck,
    timeout,
    attack,
    attack_scale,
) -> None:
    """Connect, wait for rounds, train on --data, publish updates. Raw data never leaves.

    A [limits] table in --config (hours, min_free_mb, max_cpu_temp, require_mains), or
    the flags, say when this device may train; a round that comes outside them is held
    back, its status says why, and it trains once they allow while the round is open.

    \b
    Example (credentials from the file `fedmq broker add-device` printed):
      fedmq agent run --config dev1.toml --data sensors.csv
    or, with data = "sensors.csv" in dev1.toml:
      fedmq agent run --config dev1.toml
    """
    from broker.errors import ConfigError
    from broker.topics import check_name
    from device_agent.agent import Agent, AgentConfig
    from fedmq.signing_hooks import agent_hooks, agent_identity

    settings, federation, config = connection.resolve()
    device_id = device_id or config.get("device_id") or settings.username
    if not device_id:
        raise ConfigError("no device id: pass --device-id ID (or --config FILE)")
    check_name("device id", device_id)
    data_path = data_path or _config_path(config, "data", connection.config_file)
    if data_path is None:
        raise ConfigError(
            "no data file: pass --data FILE"
            + (
                f' or put data = "FILE" in {connection.config_file}'
                if connection.config_file
                else " (or --config FILE holding data = ...)"
            )
        )
    sign, verify = agent_hooks(
        signing_key or config.get("signing_key"), model_key or config.get("model_key")
    )
    identity = agent_identity(
        signing_key or config.get("signing_key"),
        config.get("registry_key"),
        config.get("identity_cert"),
    )
    limits = _limits(
        config,
        connection.config_file,
        hours=train_hours,
        min_free_mb=min_free_mb,
        max_cpu_temp=max_cpu_temp,
        require_mains=require_mains,
    )
    threads = threads or _config_threads(config, connection.config_file)
    poison = None
    if attack is not None:
        from device_agent.attacks import Attacker

        poison = Attacker.create(attack, attack_scale, device_id)
        log.warning(
            "ATTACKER: device %s will poison its updates (%s)", device_id, poison.describe()
        )
    elif attack_scale is not None:
        raise ConfigError("--attack-scale needs --attack KIND")
    the_agent = Agent(
        AgentConfig(
            connection=settings,
            federation=federation,
            device_id=device_id,
            data_path=data_path,
            exit_when_done=exit_when_done,
            max_rounds=max_rounds,
            sign=sign,
            verify_model=verify,
            threads=threads,
            architectures=architectures(config, connection.config_file, arch),
            insecure=insecure,
            poison=poison,
            limits=limits,
            recheck_seconds=recheck,
            identity=identity,
        )
    )
    log.info(
        "device %s on %s, federation %s, data %s",
        device_id,
        settings.address,
        federation,
        data_path,
    )
    _stop_on_sigterm(the_agent.stop)
    code = the_agent.run(timeout=timeout)
    if code == 2:  # --timeout: its own exit code, so a script can tell it from an error
        problem = the_agent.connection_problem
        reason = f": {problem}" if problem else " without a finished run"
        click.echo(f"Error: gave up after {timeout:g}s{reason}", err=True)
        raise click.exceptions.Exit(2)


def _limits(config: dict, config_file: Path | None, **flags):
    """The [limits] table of the config file, each key overridden by its flag."""
    from device_agent.resources import Limits

    table = config.get("limits")
    where = f"{config_file}: [limits]" if config_file else "[limits]"
    merged = dict(table) if isinstance(table, dict) else table
    if merged is None or isinstance(merged, dict):
        merged = {**(merged or {}), **{k: v for k, v in flags.items() if v is not None}}
    return Limits.from_table(merged, where)


def _config_path(config: dict, key: str, config_file: Path | None) -> Path | None:
    """A path from the config file, relative to the file's directory like its other paths."""
    from broker.errors import ConfigError

    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{config_file}: {key} must be a file name (a string)")
    path = Path(value).expanduser()
    return path if path.is_absolute() or config_file is None else config_file.parent / path


def _config_threads(config: dict, config_file: Path | None) -> int | None:
    """``threads = N`` of the config file (what scripts/install-agent.sh --threads writes)."""
    from broker.errors import ConfigError

    value = config.get("threads")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{config_file}: threads must be a whole number of at least 1")
    return value


# -- aggregator ------------------------------------------------------------------------
@main.group()
def aggregator() -> None:
    """Run a federation's aggregator, or talk to a running one."""


@aggregator.command("start")
@connection_options
@click.option(
    "--task",
    "task_file",
    type=click.Path(path_type=Path),
    help="Task spec (TOML): model, training, data. Not needed with --resume.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=None,
    help="Rounds to run in all. [default: 10; with --resume: the run's own]",
)
@click.option(
    "--min-devices",
    type=click.IntRange(min=1),
    default=None,
    help="Quorum: updates needed to close a round. [default: 1; with --resume: the run's own]",
)
@click.option(
    "--deadline",
    type=click.FloatRange(min=0),
    default=600,
    show_default=True,
    help="Seconds a round stays open waiting for present devices (0: no deadline).",
)
@click.option(
    "--on-short",
    type=click.Choice(["retry", "stop"]),
    default="retry",
    show_default=True,
    help="At the deadline below quorum: retry the round or stop.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory for checkpoints, metrics.jsonl, the journal and the plot.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir after its last round.")
@click.option(
    "--stop-after", type=click.IntRange(min=1), help="Stop (resumably) after completing this round."
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Torch threads for averaging (more only pays off for large models).",
)
@click.option(
    "--signing-key",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="FEDMQ_SIGNING_KEY",
    help="Aggregator's Ed25519 key: sign every model.",
)
@click.option(
    "--device-keys",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="FEDMQ_DEVICE_KEYS",
    help="Directory of <device>.pub keys: refuse unsigned or forged updates.",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar="FEDMQ_INSECURE",
    help="Run without signatures: unsigned models, updates accepted unchecked (logged loudly). "
    "Without it, a missing key stops the aggregator.",
)
@click.option(
    "--upstream",
    "upstream_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Run as a site's edge aggregator: the site's credentials at the root federation "
    "(upstream/<site>.toml in a home made with `fedmq broker init --bridge-credentials`). "
    "Rounds follow the root's, the task is the root's, and each round's result goes up as "
    "one signed partial result.",
)
@click.option(
    "--plot/--no-plot",
    default=True,
    show_default=True,
    help="Draw the run's plots (metrics.png, devices.png, bytes.png) in --run-dir when it ends; "
    "--no-plot skips those seconds of matplotlib where nobody looks (scripts, tests).",
)
@click.option(
    "--secure-sum",
    is_flag=True,
    help="With --upstream: the site's devices send masked inputs (SecAgg+, the task's "
    "[secure_aggregation] defaults) and the site learns only their sum, which it forwards.",
)
@arch_option
@fedmq_errors
def aggregator_start(
    connection,
    task_file,
    rounds,
    min_devices,
    deadline,
    on_short,
    run_dir,
    resume,
    stop_after,
    threads,
    signing_key,
    device_keys,
    insecure,
    upstream_file,
    plot,
    secure_sum,
    arch,
) -> None:
    """Run rounds: announce the model, collect updates, average them, checkpoint, repeat.

    \b
    Example:
      fedmq aggregator start --config aggregator.toml --task task.toml \\
          --rounds 20 --min-devices 3 --run-dir runs/exp1
    \b
    At a site (its broker bridged to the root's, see `fedmq broker init --bridge-to`):
      fedmq aggregator start --config site/credentials/fedmq-aggregator.toml \\
          --upstream site/upstream/site-a.toml --min-devices 2 --run-dir runs/site-a
    """
    import torch

    from aggregator.allocator import fix_mmap_threshold
    from aggregator.service import Aggregator, AggregatorConfig
    from broker import zoo
    from broker.errors import ConfigError, TaskError
    from broker.task import TaskSpec
    from fedmq.progress import RoundProgress
    from fedmq.signing_hooks import aggregator_hooks, known_devices

    torch.set_num_threads(threads)
    settings, federation, config = connection.resolve()
    upstream = None
    if upstream_file is not None:
        if task_file is not None or rounds is not None:
            raise ConfigError(
                "--upstream: a site takes its task and rounds from the root; drop --task/--rounds"
            )
        upstream, task_file = _site_upstream(
            upstream_file, settings, federation, deadline, secure_sum and not resume
        )
    elif secure_sum:
        raise ConfigError("--secure-sum is for a site's aggregator: add --upstream FILE")
    if task_file is None and not resume:
        raise ConfigError("a new run needs --task FILE (or --resume to continue one)")
    task = TaskSpec.load(task_file) if isinstance(task_file, Path) else task_file
    registered = architectures(config, connection.config_file, arch)
    if task is not None:
        try:
            zoo.resolve(task.model.arch, registered)
        except TaskError as exc:
            raise TaskError(
                f"{task_file}: {exc}; register it with --arch NAME=package.module:function "
                "or an [architectures] table in --config"
            ) from None
    sign_model, verify_update = aggregator_hooks(
        signing_key or config.get("signing_key"), device_keys or config.get("device_keys")
    )
    fix_mmap_threshold()  # a long run's heap must not keep what its busiest round held
    service = Aggregator(
        AggregatorConfig(
            connection=settings,
            federation=federation,
            run_dir=run_dir,
            task=task,
            rounds=rounds,
            min_devices=min_devices,
            deadline=deadline or None,
            on_short=on_short,
            resume=resume,
            stop_after=stop_after,
            sign_model=sign_model,
            verify_update=verify_update,
            insecure=insecure,
            architectures=registered,
            upstream=upstream,
            plot=plot,
            devices=(
                known_devices(device_keys or config.get("device_keys")) if settings.cluster else ()
            ),
        ),
        on_event=None,
    )
    _stop_on_sigterm(service.stop)
    try:
        with RoundProgress(service) as progress:
            service.on_event = progress.event
            service.run()
    finally:
        if upstream is not None:
            upstream.stop()
    click.echo(
        f"run directory: {run_dir} ({service.phase} after round {service.state.completed_round})"
    )


def _site_upstream(upstream_file: Path, settings, federation: str, deadline: float, secure):
    """(Upstream, the site's task: the root's, with a secure sum at the site if asked)
    for a site's aggregator: connect, wait for the root's model."""
    from aggregator.upstream import Upstream, site_task

    upstream = Upstream(upstream_file, settings, site_federation=federation)
    upstream.start()
    try:
        click.echo(
            f"site {federation!r}: waiting for the root {upstream.root.federation!r}'s model"
        )
        root = upstream.first_model(timeout=deadline or 3600)
        task = site_task(root.task, {"enabled": True} if secure else None)
    except BaseException:
        upstream.stop()
        raise
    click.echo(f"site {federation!r}: the root is at round {root.round}; following it")
    return upstream, task


def status_options(func):
    """The options of `fedmq status` and its alias `fedmq aggregator status`."""
    for option in reversed(
        [
            connection_options,
            click.option(
                "--timeout",
                type=float,
                default=5,
                show_default=True,
                help="Seconds to wait for the retained state.",
            ),
            click.option(
                "--json", "as_json", is_flag=True, help="Print the raw JSON state once (scripts)."
            ),
            click.option("--watch", is_flag=True, help="Redraw every second until Ctrl-C."),
            fedmq_errors,
        ]
    ):
        func = option(func)
    return func


def show_status(connection, timeout: float, as_json: bool, watch: bool) -> None:
    """Read the aggregator's retained state and presence with these credentials (the
    operator's account may read those two topics only) and print them."""
    from fedmq.operator import read_state
    from fedmq.status_view import show

    if as_json and watch:
        raise click.UsageError("--json prints the state once; drop --watch")
    settings, federation, _ = connection.resolve()

    def read() -> dict:
        return read_state(settings, federation, timeout=timeout)

    if as_json:
        click.echo(json.dumps(read(), indent=2, sort_keys=True))
        return
    show(read, watch=watch)


@main.command("status")
@status_options
def status_command(connection, timeout, as_json, watch) -> None:
    """The federation at a glance: round and phase, progress towards quorum, each device
    (status, last seen, last metrics), updates accepted and refused, whether the aggregator
    runs. Reads only the aggregator's retained state: the operator's credentials suffice."""
    show_status(connection, timeout, as_json, watch)


@aggregator.command("status")
@status_options
def aggregator_status(connection, timeout, as_json, watch) -> None:
    """Same as `fedmq status`."""
    show_status(connection, timeout, as_json, watch)


def _control_command(name: str, help_text: str, expect: set[str]) -> None:
    @aggregator.command(name, help=help_text)
    @connection_options
    @click.option(
        "--timeout",
        type=float,
        default=10,
        show_default=True,
        help="Seconds to wait for the aggregator to confirm.",
    )
    @fedmq_errors
    def command(connection, timeout) -> None:
        from fedmq.operator import send_control

        settings, federation, _ = connection.resolve()
        state = send_control(settings, federation, name, expect_phases=expect, timeout=timeout)
        click.echo(f"{name}: aggregator is {state.get('phase')} at round {state.get('round')}")


_control_command("pause", "Pause: keep collecting updates but do not close rounds.", {"paused"})
_control_command(
    "resume", "Resume a paused aggregator.", {"selecting", "collecting", "aggregating"}
)
_control_command(
    "stop", "Stop the aggregator cleanly; continue later with --resume.", {"stopped", "done"}
)


# -- model ---------------------------------------------------------------------------
@main.group()
def model() -> None:
    """A run's global model, outside fedmq."""


@model.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--round",
    "round_",
    type=click.IntRange(min=0),
    help="Round whose global model to export (0: the initial one). [default: the last completed]",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torchscript", "onnx"]),
    required=True,
    help="safetensors: weights + task metadata; torchscript: torch.jit.load-able; "
    "onnx: for onnxruntime (needs pip install 'fedmq[export]').",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File to write. [default: RUN_DIR/export/round-NNNNNN.<safetensors|pt|onnx>]",
)
@click.option(
    "--time",
    "time_steps",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="cnn1d only: the window length T the ONNX file takes, (N, in_channels, T).",
)
@arch_option
@fedmq_errors
def model_export(run_dir, round_, fmt, out, time_steps, arch) -> None:
    """Write the global model of the run in RUN_DIR, with its task, as a file that loads
    without fedmq.

    \b
    safetensors  safetensors.torch.load_file(FILE) gives the state_dict;
                 safe_open(FILE, "pt").metadata() has task (JSON), round, arch, format
    torchscript  torch.jit.load(FILE, _extra_files={"task.json": ""}); eval mode
    onnx         onnxruntime.InferenceSession(FILE): input "input", output "output",
                 dynamic batch axis; the task in the model's metadata_props

    linear/mlp take (N, in_features) and cnn1d (N, in_channels, T). The model is in
    eval mode (BatchNorm uses its running statistics).

    \b
    Example:
      fedmq model export runs/exp1 --format onnx --out har.onnx
    """
    from fedmq.export import export_model

    registered = architectures({}, None, arch)
    done = export_model(run_dir, fmt, out=out, round_=round_, registry=registered, time=time_steps)
    click.echo(f"{done.path}: {done.arch} after round {done.round} ({done.format})")


# -- demo ----------------------------------------------------------------------------
STRATEGY_NAMES = ("fedavg", "fedprox", "median", "trimmed_mean", "krum", "multi_krum", "bulyan")


@main.command()
@click.option(
    "--devices",
    type=click.IntRange(min=1, max=32),
    default=None,
    help="Device agents to start, each with its own subjects' data. "
    "[default: 3; 10 with --attack, one person each]",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=None,
    help="Federated rounds. [default: the demo task's]",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed for the data split, the model and the choice of attackers.",
)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to leave data, broker, checkpoints, metrics and plot. [default: runs/demo-<time>]",
)
@click.option(
    "--strategy",
    metavar="NAME",
    default=None,
    help=f"How the aggregator combines updates: {', '.join(STRATEGY_NAMES)}, or any other "
    "strategy in the README's table. [default: fedavg]",
)
@click.option(
    "--strategy-param",
    "strategy_params",
    metavar="KEY=VALUE",
    multiple=True,
    help="A [strategy] parameter, e.g. beta=0.2 or f=2 (repeatable). Under --attack, "
    "trimmed_mean's beta and krum's, multi_krum's and bulyan's f default to match the "
    "attackers (bulyan: at most (devices - 3) / 4).",
)
@click.option(
    "--attack",
    type=click.Choice(ATTACK_KINDS),
    default=None,
    help="Some devices send poisoned updates of this kind, from the honest update "
    "delta = w - g: sign_flip g - S*delta, scale g + S*delta, noise g + Gaussian of "
    "expected norm S*|delta|, constant S in every weight.",
)
@click.option(
    "--attackers",
    "attackers",
    type=float,
    metavar="F",
    default=None,
    help="Fraction of the devices that attack, 0 <= F < 0.5, chosen from --seed. "
    "[default with --attack: 0.2]",
)
@click.option(
    "--attack-scale",
    type=float,
    metavar="S",
    default=None,
    help="The attack's scale S. [default: sign_flip 4, scale 10, noise 10, constant 1]",
)
@click.option(
    "--dp-noise",
    type=click.FloatRange(min=0),
    metavar="SIGMA",
    default=None,
    help="Differential privacy (DP-FedAvg): Gaussian noise of std SIGMA * C on the sum of "
    "the clipped updates; prints epsilon at delta = 1e-5.",
)
@click.option(
    "--dp-clip",
    type=click.FloatRange(min=0, min_open=True),
    metavar="C",
    default=None,
    help="With --dp-noise: each device's update is clipped to L2 norm C. [default: 1.0]",
)
@click.option(
    "--secure-aggregation",
    "secure",
    is_flag=True,
    help="SecAgg+: the devices mask their updates so that the aggregator and the broker "
    "see only their sum (the [secure_aggregation] table of the task).",
)
@click.option(
    "--compression",
    type=click.Choice(["fp16", "int8", "int8-channel", "topk"]),
    default=None,
    help="The devices send their deltas compressed (the [compression] table of the task): "
    "fp16, int8 with one scale per tensor or per channel (stochastic rounding), or topk "
    "(each tensor's largest coordinates, the rest kept for later rounds).",
)
@click.option(
    "--topk-fraction",
    type=click.FloatRange(min=0, max=1, min_open=True),
    metavar="F",
    default=None,
    help="With --compression topk: the share of each tensor's coordinates sent. [default: 0.01]",
)
@fedmq_errors
def demo(
    devices: int | None,
    rounds: int | None,
    seed: int,
    run_dir: Path | None,
    strategy: str | None,
    strategy_params: tuple[str, ...],
    attack: str | None,
    attackers: float | None,
    attack_scale: float | None,
    dp_noise: float | None,
    dp_clip: float | None,
    secure: bool,
    compression: str | None,
    topk_fraction: float | None,
) -> None:
    """Federated learning on real smartwatch data, on this machine, end to end.

    Starts a secured mosquitto on a free port, an aggregator and N device agents,
    each holding whole subjects of seglearn's watch data set (6-axis inertial data
    of 10 people doing 7 shoulder exercises), runs the rounds with live progress,
    and compares the federated model with the same model trained centrally,
    both on data no device has seen.

    \b
    Under attack (10 devices, 2 of them attackers sending g - 4*delta):
      fedmq demo --strategy median --attack sign_flip
    """
    from fedmq.demo.attacks import (
        ATTACK_DEVICES,
        parse_strategy_params,
        plan_attack,
        strategy_table,
    )
    from fedmq.demo.run import run_demo

    devices = devices or (ATTACK_DEVICES if attack else 3)
    plan = plan_attack(attack, devices, attackers, attack_scale, seed)
    table = strategy_table(
        strategy,
        parse_strategy_params(strategy_params),
        devices,
        len(plan.attackers) if plan else 0,
    )
    if dp_clip is not None and dp_noise is None:
        raise click.UsageError("--dp-clip needs --dp-noise (the noise multiplier)")
    privacy = None
    if dp_noise is not None:
        privacy = {"noise_multiplier": dp_noise, "clip_norm": dp_clip or 1.0, "delta": 1e-5}
    if topk_fraction is not None and compression != "topk":
        raise click.UsageError("--topk-fraction needs --compression topk")
    if compression and secure:
        raise click.UsageError(
            "--compression and --secure-aggregation do not combine: secure aggregation "
            "quantizes the updates itself, inside its masks"
        )
    run_demo(
        devices=devices,
        rounds=rounds,
        seed=seed,
        run_dir=run_dir,
        strategy=table or None,
        privacy=privacy,
        attack=plan,
        secure={"enabled": True} if secure else None,
        compression=compression_table(compression, topk_fraction),
    )


def compression_table(choice: str | None, fraction: float | None) -> dict | None:
    """The demo's [compression] table for ``--compression`` (and ``--topk-fraction``)."""
    if choice is None:
        return None
    if choice == "topk":
        return {"encoding": "topk", "fraction": fraction or 0.01}
    if choice.startswith("int8"):
        return {"encoding": "int8", "per_channel": choice == "int8-channel"}
    return {"encoding": choice}


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the PNGs. [default: RUN_DIR]",
)
@fedmq_errors
def plot(run_dir: Path, out_dir: Path | None) -> None:
    """Draw a recorded run's figures as PNGs: loss and accuracy per round (metrics.png),
    the spread of the devices' evaluations (devices.png), bytes per round (bytes.png).

    Prints the path of each file written; a figure the run has no data for is skipped
    with a note on stderr."""
    from aggregator.run_plots import plot_run

    result = plot_run(run_dir, out_dir)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for path in result.written:
        click.echo(str(path))


if __name__ == "__main__":
    main()
