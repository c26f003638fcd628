"""The zygote forks ``fedmq`` commands that behave as ``python -m fedmq.cli`` would.

``LocalFederation.spawn`` (the demo, the tests, the benchmarks) starts every agent and
aggregator this way, so the end-to-end tests run through it; these check the contract
itself: each child has its own environment, directory, log and exit code, takes
signals like a process of its own, and the zygote forks with no thread but its main one.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from broker.launcher import free_port
from fedmq.zygote import Zygote

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def zygote(tmp_path):
    z = Zygote(env={**os.environ, "PYTHONUNBUFFERED": "1"}, log=tmp_path / "zygote.log")
    yield z
    z.close()


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


def test_a_child_runs_the_command_with_its_own_log_environment_and_directory(
    zygote, tmp_path, monkeypatch
):
    assert threads_of(zygote.pid) == 1  # forking a threaded process could copy a held lock
    log = tmp_path / "child.log"
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # the child starts where the parent is when it asks
    env = {**os.environ, "NO_COLOR": "1", "FEDMQ_TEST_MARK": "seen"}
    code = zygote.spawn(["broker", "init", "home", "--federation", "z"], env=env, log=log).wait(30)
    assert code == 0, log.read_text()
    assert (work / "home" / "accounts.json").exists()  # relative to the child's directory
    # a bad command: click's usage error, exit 2, in the child's own log
    bad = zygote.spawn(["broker", "init", "--no-such-flag"], env=env, log=log)
    assert bad.wait(30) == 2
    assert "No such option '--no-such-flag'" in log.read_text()
    # and the environment is the one sent, not the zygote's
    probe = tmp_path / "env.log"
    code = zygote.spawn(["agent", "run", "--config", "$FEDMQ_TEST_MARK"], env=env, log=probe)
    assert code.wait(30) == 1
    assert "$FEDMQ_TEST_MARK" in probe.read_text()
    assert threads_of(zygote.pid) == 1


def test_a_child_takes_signals_as_a_process_of_its_own(federation, zygote, tmp_path):
    fed = federation(devices=["bob"])
    data = tmp_path / "bob.csv"
    data.write_text("x0,x1,label\n0.1,0.2,0\n0.3,0.4,1\n")
    nowhere = f"127.0.0.1:{free_port()}"  # the agent retries forever: it must be stopped
    args = ["agent", "run", "--config", str(fed.credentials("bob")), "--data", str(data)]
    env = dict(os.environ)
    term = zygote.spawn([*args, "--broker", nowhere], env=env, log=tmp_path / "term.log")
    killed = zygote.spawn([*args, "--broker", nowhere], env=env, log=tmp_path / "kill.log")
    assert term.pid != killed.pid
    with pytest.raises(subprocess.TimeoutExpired):
        term.wait(1.0)
    assert term.poll() is None and killed.poll() is None
    term.terminate()  # the agent's own SIGTERM handler: leaves cleanly
    assert term.wait(15) == 0, (tmp_path / "term.log").read_text()
    killed.kill()
    assert killed.wait(15) == -signal.SIGKILL
    killed.kill()  # already reaped: nothing is sent to a pid that may be someone else's now
    assert "connection refused" in (tmp_path / "kill.log").read_text()


def test_the_zygote_leaves_when_told_and_its_children_are_gone(tmp_path):
    z = Zygote(env=dict(os.environ), log=tmp_path / "zygote.log")
    child = z.spawn(["--version"], env=dict(os.environ), log=tmp_path / "v.log")
    assert child.wait(30) == 0
    assert (tmp_path / "v.log").read_text().startswith("fedmq, version")
    z.close(timeout=10)
    assert z.proc.returncode == 0
    with pytest.raises(RuntimeError, match="zygote has exited"):
        z.spawn(["--version"], env=dict(os.environ), log=None)
