"""What a device agent accepts: only architectures it has, only with keys unless --insecure,
its data file from its config, cnn1d rows of the right shape; and what it says at the end."""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from aggregator.service import initial_weights
from broker import messages, signing
from broker.errors import ConfigError, DataError, TaskError
from broker.home import load_credentials
from broker.launcher import free_port
from broker.task import TaskSpec, from_dict
from broker.topics import Topics
from device_agent.agent import Agent
from fedmq.cli import main
from fedmq.synthetic import BLOBS_TASK
from tests.helpers import join, mqtt_session, publish_as, wait_for, write_blobs

SENTINEL = "tests.arch_sentinel"


def task_with(arch: str, **args) -> TaskSpec:
    return from_dict(
        {
            "model": {"arch": arch, **args},
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.1},
            "seed": 1,
        }
    )


def publish_signed_model(fed, task: TaskSpec, tensors=None, round_: int = 1, final=False):
    """A model the aggregator really signed: signatures alone do not make a task safe."""
    key = load_credentials(fed.credentials("fedmq-aggregator"))["signing_key"]
    private = signing.load_private(key)
    payload, model_hash = messages.encode_model(
        tensors if tensors is not None else initial_weights(blobs()),
        round_,
        task,
        final=final,
        federation=fed.name,
        run_id="run-1",
        sign=lambda t, m: signing.sign(private, t, m),
    )
    publish_as(fed, "fedmq-aggregator", Topics(fed.name).model, payload, retain=True)
    return model_hash


def blobs() -> TaskSpec:
    return TaskSpec.from_json(json.dumps(tomllib.loads(BLOBS_TASK)))


def clean_env(**extra: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FEDMQ_")}
    env.update(extra)
    return env


# -- no code from the wire ------------------------------------------------------------------


@pytest.mark.mosquitto
@pytest.mark.parametrize("arch", [f"{SENTINEL}:build", "os:system", "tiny"])
def test_agent_refuses_a_model_naming_an_architecture_it_does_not_have(
    federation, tmp_path, caplog, arch
):
    """Even signed by the aggregator: refused by name, nothing imported, nothing published,
    and the agent still trains on the next model it can build."""
    caplog.set_level(logging.INFO, logger="fedmq")
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"])
    updates: queue.Queue = queue.Queue()
    with mqtt_session(fed.settings("fedmq-aggregator"), "test-updates") as watcher:
        watcher.on_message = lambda c, u, m: updates.put(m.payload)
        watcher.subscribe(Topics(fed.name).updates_filter, qos=1)
        publish_signed_model(fed, task_with(arch, in_features=4, out_features=3))

        agent = fed.agent("bob", files["bob"], max_rounds=1)
        events: list = []
        agent.on_event = lambda kind, info: events.append((kind, info))
        thread = fed.in_thread(agent.run, timeout=60)
        wait_for(lambda: any(k == "model_refused" for k, _ in events), 20, "the refusal")
        assert ("model_refused", {"reason": "unknown_architecture", "arch": arch}) in events
        assert SENTINEL not in sys.modules and "FEDMQ_TEST_ARCH_SENTINEL" not in os.environ
        assert thread.is_alive()
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert errors[0].startswith(
            f"model names architecture {arch!r} which this device does not have: register it "
            "in the [architectures] table of the agent's config file or with --arch"
        )

        good = publish_signed_model(fed, blobs(), round_=2)
        assert join(thread, 60) == 0  # trained once, on the model it can build
        update = messages.decode_update(updates.get(timeout=10))
        assert update.base_hash == good
        assert updates.empty()  # nothing was published for the refused model
    assert [k for k, _ in events].count("trained") == 1


@pytest.mark.mosquitto
def test_a_locally_registered_architecture_trains(federation, tmp_path):
    """tests/custom_arch.py, registered by name on both sides, as a config file would."""
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"])
    registry = {"tiny": "tests.custom_arch:tiny"}
    task = task_with("tiny", in_features=4, out_features=3, width=5)
    with pytest.raises(TaskError, match="unknown architecture 'tiny'"):
        initial_weights(task)  # the aggregator has only what it registers too
    publish_signed_model(fed, task, initial_weights(task, registry))
    agent = fed.agent("bob", files["bob"], max_rounds=1, architectures=registry)
    assert join(fed.in_thread(agent.run, timeout=60), 60) == 0
    assert agent.rounds_trained == 1


def test_cli_registers_architectures_from_the_config_file_and_flags(tmp_path):
    from fedmq.cli_common import architectures
    from tests import custom_arch

    config = {"architectures": {"tiny": "tests.custom_arch:tiny"}}
    assert architectures(config, tmp_path / "dev.toml", ()) == {"tiny": custom_arch.tiny}
    both = architectures(config, None, ("small=tests.custom_arch:tiny",))
    assert set(both) == {"tiny", "small"}
    with pytest.raises(ConfigError, match=r"dev.toml: \[architectures\]: 'mlp' is a built-in"):
        architectures({"architectures": {"mlp": "x.y:z"}}, tmp_path / "dev.toml", ())
    result = CliRunner(env=clean_env()).invoke(
        main, ["agent", "run", "--arch", "gone=nope_xyz:build", *offline_args(tmp_path)]
    )
    assert result.exit_code == 1
    assert "architecture 'gone': cannot import 'nope_xyz'" in result.output, result.output


# -- signatures fail closed ---------------------------------------------------------------


def offline_args(tmp_path: Path, data: bool = True) -> list[str]:
    args = ["--broker", f"127.0.0.1:{free_port()}", "--federation", "f", "--device-id", "dev1"]
    if data:
        path = tmp_path / "d.csv"
        path.write_text("x,label\n1,0\n2,1\n")
        args += ["--data", str(path)]
    return args


@pytest.mark.mosquitto
def test_agent_library_fails_closed_without_keys(federation, tmp_path, caplog):
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"])
    config = fed.agent_config("bob", files["bob"])
    for missing in ("verify_model", "sign"):
        with pytest.raises(ConfigError, match="--insecure to run without them"):
            Agent(config.__class__(**{**config.__dict__, missing: None}))
    caplog.set_level(logging.WARNING, logger="fedmq")
    bare = {**config.__dict__, "verify_model": None, "sign": None, "insecure": True}
    Agent(config.__class__(**bare)).close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("models are not verified" in w for w in warnings), warnings
    assert any("updates are not signed" in w for w in warnings), warnings


def test_agent_cli_without_keys_refuses_to_start(tmp_path):
    args = ["agent", "run", *offline_args(tmp_path), "--timeout", "5"]  # a bound, if it ran
    result = CliRunner(env=clean_env()).invoke(main, args)
    assert result.exit_code == 1, result.output
    assert (
        "Error: device dev1: no model key (models would not be verified) and no signing key"
        in result.output
    )
    assert "--insecure to run without them" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("how", ["flag", "env"])
def test_agent_cli_insecure_runs_and_warns(tmp_path, how):
    flag, env = (
        (["--insecure"], clean_env()) if how == "flag" else ([], clean_env(FEDMQ_INSECURE="1"))
    )
    result = CliRunner(env=env).invoke(
        main, ["agent", "run", *offline_args(tmp_path), *flag, "--timeout", "0.5"]
    )
    assert "gave up after 0.5s" in result.output, result.output  # it ran
    assert "WARNING" in result.output
    assert "insecure: models are not verified (no model key)" in result.output
    assert "insecure: updates are not signed (no signing key)" in result.output


# -- the data file can come from the config file ----------------------------------------------


def minimal_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "dev1.toml"
    path.write_text(
        f'federation = "f"\nbroker = "127.0.0.1:{free_port()}"\nusername = "dev1"\n'
        f'password = "x"\n{extra}'
    )
    return path


def test_agent_cli_without_data_names_the_config_file(tmp_path):
    config = minimal_config(tmp_path)
    result = CliRunner(env=clean_env()).invoke(main, ["agent", "run", "--config", str(config)])
    assert result.exit_code == 1
    assert f'no data file: pass --data FILE or put data = "FILE" in {config}' in result.output
    result = CliRunner(env=clean_env()).invoke(
        main, ["agent", "run", *offline_args(tmp_path, data=False)]
    )
    assert result.exit_code == 1 and "no data file: pass --data FILE" in result.output


def test_agent_cli_data_from_config_is_relative_to_it_and_flags_win(tmp_path):
    sub = tmp_path / "device"
    sub.mkdir()
    config = minimal_config(sub, 'data = "sensors.csv"\n')
    args = ["agent", "run", "--config", str(config), "--insecure", "--timeout", "0.2"]
    result = CliRunner(env=clean_env()).invoke(main, args)
    assert f"{sub / 'sensors.csv'}: data file not found" in result.output, result.output
    result = CliRunner(env=clean_env(FEDMQ_DATA=str(tmp_path / "env.csv"))).invoke(main, args)
    assert f"{tmp_path / 'env.csv'}: data file not found" in result.output, result.output
    result = CliRunner(env=clean_env(FEDMQ_DATA=str(tmp_path / "env.csv"))).invoke(
        main, [*args, "--data", str(tmp_path / "flag.csv")]
    )
    assert f"{tmp_path / 'flag.csv'}: data file not found" in result.output, result.output
    bad = minimal_config(tmp_path, "data = 3\n")
    result = CliRunner(env=clean_env()).invoke(main, ["agent", "run", "--config", str(bad)])
    assert f"{bad}: data must be a file name" in result.output, result.output


@pytest.mark.mosquitto
def test_agent_cli_trains_on_the_data_its_config_names(federation, tmp_path):
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"])
    creds = fed.credentials("bob")
    creds.write_text(creds.read_text() + f'data = "{files["bob"]}"\n')
    publish_signed_model(fed, blobs())
    result = CliRunner(env=clean_env()).invoke(
        main, ["agent", "run", "--config", str(creds), "--max-rounds", "1", "--timeout", "60"]
    )
    assert result.exit_code == 0, result.output


# -- cnn1d on flat CSV rows -------------------------------------------------------------------


def cnn_csv(path: Path, columns: int, samples: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = [",".join(f"v{i}" for i in range(columns)) + ",label"]
    for _ in range(samples):
        rows.append(",".join(f"{v:.4f}" for v in rng.normal(size=columns)) + f",{rng.integers(3)}")
    path.write_text("\n".join(rows) + "\n")
    return path


CNN = {"in_channels": 2, "num_classes": 3, "channels": [4], "kernel_size": 3}


@pytest.mark.mosquitto
def test_cnn1d_trains_on_flat_csv_rows_of_channels_times_time(federation, tmp_path):
    fed = federation(devices=["bob"])
    task = task_with("cnn1d", **CNN)
    publish_signed_model(fed, task, initial_weights(task))
    agent = fed.agent("bob", cnn_csv(tmp_path / "bob.csv", columns=2 * 8), max_rounds=1)
    assert join(fed.in_thread(agent.run, timeout=60), 60) == 0
    assert agent.rounds_trained == 1


@pytest.mark.mosquitto
def test_cnn1d_on_rows_that_do_not_divide_is_one_clear_line(federation, tmp_path):
    fed = federation(devices=["bob"])
    task = task_with("cnn1d", **CNN)
    publish_signed_model(fed, task, initial_weights(task))
    data = cnn_csv(tmp_path / "bob.csv", columns=5)
    agent = fed.agent("bob", data, max_rounds=1)
    with pytest.raises(DataError) as info:
        join(fed.in_thread(agent.run, timeout=60), 60)
    assert str(info.value) == (
        f"{data}: cnn1d expects rows of in_channels x time = 2 x T values "
        "(channel after channel); got 5 feature columns"
    )


# -- the end of a run -----------------------------------------------------------------------


@pytest.mark.mosquitto
def test_agent_says_the_federation_finished_after_the_last_round(federation, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedmq.agent")
    fed = federation(devices=["bob"])
    files = write_blobs(tmp_path / "data", ["bob"])
    _, agg_thread = fed.start_aggregator(tmp_path, rounds=2, min_devices=1)
    agent = fed.agent("bob", files["bob"], exit_when_done=True)
    events: list = []
    agent.on_event = lambda kind, info: events.append((kind, info))
    assert join(fed.in_thread(agent.run, timeout=90), 90) == 0
    join(agg_thread, 30)
    assert ("done", {"round": 2}) in events
    assert [i["round"] for k, i in events if k == "trained"] == [1, 2]
    messages_ = [r.getMessage() for r in caplog.records]
    assert "the federation finished after round 2" in messages_, messages_


# -- the aggregator builds only what its own machine registers ------------------------------


def test_aggregator_cli_builds_only_registered_architectures(tmp_path, monkeypatch):
    from aggregator import service

    monkeypatch.setattr(service, "CONNECT_TIMEOUT", 1.0)
    task = tmp_path / "task.toml"
    task.write_text('[model]\narch = "tiny"\nin_features = 4\n')
    args = ["aggregator", "start", "--broker", "127.0.0.1:1", "--federation", "f"]
    args += ["--task", str(task), "--run-dir", str(tmp_path / "run"), "--insecure"]
    result = CliRunner(env=clean_env()).invoke(main, args)
    assert result.exit_code == 1
    assert f"{task}: unknown architecture 'tiny'" in result.output, result.output
    assert "register it with --arch NAME=package.module:function" in result.output
    result = CliRunner(env=clean_env()).invoke(
        main, [*args, "--arch", "tiny=tests.custom_arch:tiny"]
    )
    assert result.exit_code == 1
    assert "broker at 127.0.0.1:1: connection refused" in result.output, result.output  # built
