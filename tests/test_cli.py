"""Every command explains itself; wrong input gets one clear line, not a traceback."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from fedmq.cli import main


def all_commands(group: click.Group, prefix=()):
    yield prefix
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("path", list(all_commands(main)), ids=lambda p: " ".join(p) or "fedmq")
def test_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command = main
    for name in path:
        command = command.commands[name]
    assert (command.help or "").split("\n")[0].strip()[:20] in " ".join(result.output.split())


def test_every_expected_command_exists():
    names = {" ".join(p) for p in all_commands(main)}
    assert {
        "broker up",
        "broker init",
        "broker add-device",
        "broker remove-device",
        "agent run",
        "aggregator start",
        "aggregator status",
        "aggregator pause",
        "aggregator resume",
        "aggregator stop",
        "demo",
    } <= names


def test_wrong_flag_is_a_usage_error():
    result = CliRunner().invoke(main, ["aggregator", "start", "--nope"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_new_run_without_task_says_so(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "aggregator",
            "start",
            "--broker",
            "127.0.0.1:1",
            "--federation",
            "f",
            "--run-dir",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 1
    assert "needs --task" in result.output and "Traceback" not in result.output


def test_unreachable_broker_is_one_clear_line(tmp_path, monkeypatch):
    task = tmp_path / "task.toml"
    task.write_text('[model]\narch = "linear"\nin_features = 2\n')
    from aggregator import service

    monkeypatch.setattr(service, "CONNECT_TIMEOUT", 1.0)
    result = CliRunner().invoke(
        main,
        [
            "aggregator",
            "start",
            "--broker",
            "127.0.0.1:1",
            "--federation",
            "f",
            "--task",
            str(task),
            "--run-dir",
            str(tmp_path / "r"),
            "--insecure",
        ],
    )
    assert result.exit_code == 1
    assert "cannot connect to the broker at 127.0.0.1:1: connection refused" in result.output
    assert "Traceback" not in result.output


def test_aggregator_without_keys_refuses_to_start_unless_insecure(tmp_path):
    task = tmp_path / "task.toml"
    task.write_text('[model]\narch = "linear"\nin_features = 2\n')
    args = ["aggregator", "start", "--broker", "127.0.0.1:1", "--federation", "f"]
    args += ["--task", str(task), "--run-dir", str(tmp_path / "r")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "needs its signing key and the device-key directory" in result.output
    assert "--insecure" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # refused before anything was written
