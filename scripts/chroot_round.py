"""The host side of ``scripts/arm64-round.sh``: a federation whose one agent runs in a Debian root.

Run by that script (as root, the root made and mounted): it starts a secured mosquitto on
a free 127.0.0.1 port, writes the demo's watch data and task, installs an agent in the
root with ``scripts/install-agent.sh`` (``--no-systemd``: no systemd in a chroot), starts
it as the unit would (the unit's ``ExecStart``, ``User``, ``WorkingDirectory`` and
``Environment``, under ``chroot``), runs the aggregator with ``--host-agents`` more agents
on the host, and prints each round's seconds and what the agent in the root did: its
import time, start-up time, peak memory, and whether its updates were accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.service import Aggregator
from broker.home import PATH_KEYS, load_credentials
from broker.task import TaskSpec
from fedmq.demo import watch_data
from fedmq.local import LocalFederation

FEDERATION = "chroot-round"
BUNDLE_IN_ROOT = "/tmp/fedmq-in"  # the device's credentials bundle and data, copied in
UNIT = "/etc/systemd/system/fedmq-agent.service"  # where install-agent.sh writes it
PREFIX = "/opt/fedmq"
# host variables that tell pip how to reach the index (the root gets the host's CAs), and
# qemu-user's (QEMU_CPU: the emulated CPU)
PASSED_ENV = ("REQUESTS_CA_BUNDLE", "FEDMQ_TORCH_INDEX", "TORCH_VERSION")
PASSED_PREFIXES = ("PIP_", "SSL_CERT_", "QEMU_")
SEEN = ("online", "training", "skipped")  # statuses that say the agent is connected


def root_env(**extra: str) -> list[str]:
    """``env -i NAME=VALUE...``: a command in the root sees only these variables."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
    }
    env.update(
        (k, v) for k, v in os.environ.items() if k in PASSED_ENV or k.startswith(PASSED_PREFIXES)
    )
    env.update(extra)
    return ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items())]


def copy_bundle(credentials: Path, data: Path, dest: Path) -> tuple[str, str]:
    """Copy a device's credentials file, the key files it names, and its data into ``dest``;
    return the two paths as the root sees them."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, mode=0o700)
    shutil.copy2(credentials, dest)
    creds = load_credentials(credentials)  # its paths resolved
    for key in PATH_KEYS:
        if creds.get(key) is not None:
            shutil.copy2(creds[key], dest)
    shutil.copy2(data, dest / data.name)
    return f"{BUNDLE_IN_ROOT}/{credentials.name}", f"{BUNDLE_IN_ROOT}/{data.name}"


@dataclass(frozen=True)
class UnitCommand:
    """What systemd would run: the unit's ExecStart as User, in WorkingDirectory, with its
    Environment (agent.env, its EnvironmentFile, holds comments only after an install)."""

    argv: list[str]
    user: str
    workdir: str
    env: dict[str, str]


def read_unit(text: str) -> UnitCommand:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ExecStart", "User", "WorkingDirectory", "Environment"):
            values[key] = value
    missing = {"ExecStart", "User", "WorkingDirectory"} - values.keys()
    if missing:
        raise SystemExit(f"chroot-round: the unit {UNIT} has no {', '.join(sorted(missing))}")
    env = dict(item.split("=", 1) for item in shlex.split(values.get("Environment", "")))
    return UnitCommand(
        shlex.split(values["ExecStart"]), values["User"], values["WorkingDirectory"], env
    )


def user_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise SystemExit(f"chroot-round: no user {user} in {root}/etc/passwd")


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory (VmHWM) of a live process, in kB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class GuestWatch:
    """Samples the agent in the root: peak memory, when the broker first saw it."""

    proc: subprocess.Popen
    device: str
    started: float
    peak_kb: int = 0
    online_after: float | None = None
    exit_code: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, aggregator: Aggregator) -> None:
        while not self.stop.is_set() and self.proc.poll() is None:
            self.peak_kb = max(self.peak_kb, vm_hwm_kb(self.proc.pid))
            if self.online_after is None and aggregator.status.get(self.device) in SEEN:
                self.online_after = time.monotonic() - self.started
                print(f"{self.device}: online on the broker {self.online_after:.1f} s after start")
            if aggregator.phase in ("done", "stopped"):
                return
            self.stop.wait(0.5)
        if self.proc.poll() not in (None, 0) and aggregator.phase not in ("done", "stopped"):
            print(f"{self.device}: the agent exited with code {self.proc.returncode}: stopping")
            aggregator.stop()

    def reap(self, timeout: float) -> None:
        """Wait for the agent's exit with wait4: its rusage has the exact peak (ru_maxrss)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.exit_code = os.waitstatus_to_exitcode(status)
                self.proc.returncode = self.exit_code
                self.peak_kb = max(self.peak_kb, usage.ru_maxrss)
                return
            self.peak_kb = max(self.peak_kb, vm_hwm_kb(self.proc.pid))
            time.sleep(0.2)


def run_logged(cmd: list[str], log: Path, what: str) -> float:
    started = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
        raise SystemExit(f"chroot-round: {what} failed (exit {code}, {seconds:.0f} s):\n{tail}")
    return seconds


def install_agent(args, root: Path, creds: str, data: str, broker: str, log: Path) -> float:
    env = root_env()
    cmd = ["chroot", str(root), *env, "bash", f"{args.src}/scripts/install-agent.sh"]
    cmd += ["install", "--credentials", creds, "--data", data, "--broker", broker]
    cmd += ["--threads", "1", "--no-systemd"]
    if not args.fresh_venv:
        cmd.append("--keep-venv")
    print(f"installing the agent in the root: {shlex.join(cmd[2 + len(env) :])}")
    seconds = run_logged(cmd, log, "install-agent.sh in the root")
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("install-agent:"):
            print(f"  {line}")
    return seconds


def import_seconds(root: Path) -> float:
    """Wall time of a fresh interpreter in the root importing torch and the agent."""
    code = "import torch, device_agent.agent"
    cmd = ["chroot", str(root), *root_env(), f"{PREFIX}/venv/bin/python", "-c", code]
    started = time.monotonic()
    # its output is the emulated torch's noise (oneDNN cannot read the CPU's MIDR_EL1)
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"chroot-round: the root's venv cannot import the agent:\n{done.stderr}")
    return seconds


def start_guest(root: Path, unit: UnitCommand, log: Path) -> subprocess.Popen:
    uid, gid = user_ids(root, unit.user)
    qemu = {k: v for k, v in os.environ.items() if k.startswith("QEMU_")}
    env = [f"{k}={v}" for k, v in {**unit.env, "PATH": "/usr/bin:/bin", **qemu}.items()]
    # chroot and env exec: the pid is the agent's (under qemu, the emulator's)
    cmd = ["chroot", f"--userspec={uid}:{gid}", str(root), "/usr/bin/env", "-i"]
    cmd += [f"--chdir={unit.workdir}", *env, *unit.argv, "--exit-when-done"]
    print(f"starting the agent as its unit would: {shlex.join(cmd)}")
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def round_line(row: dict, guest: str, watch: GuestWatch) -> str:
    accepted = "accepted" if guest in row.get("contributors", []) else "NOT accepted"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(row.get("metrics", {}).items()))
    return (
        f"round {row['round']}: {row['devices']} devices, {row['seconds']:.1f} s; "
        f"{guest}'s update {accepted}; {metrics}; "
        f"{guest} peak memory so far {watch.peak_kb / 1024:.0f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--src", required=True, help="this repository, as the root sees it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--host-agents", type=int, default=2)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds a round may last")
    parser.add_argument("--fresh-venv", action="store_true")
    args = parser.parse_args(argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    began = time.monotonic()
    guest = f"{args.arch}-0"
    names = [f"watch-{k}" for k in range(args.host_agents)] + [guest]
    run_dir = args.run_dir
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data = watch_data.prepare(run_dir / "data", devices=len(names), seed=0)
    task = TaskSpec.load(data.task_path)
    print(f"run directory {run_dir}; devices {', '.join(names)} (watch data, demo task)")

    watch: GuestWatch | None = None
    with LocalFederation.create(run_dir / "broker", FEDERATION, names) as fed:
        broker = load_credentials(fed.credentials(guest))["broker"] or f"127.0.0.1:{fed.tls_port}"
        print(f"mosquitto on {broker} (TLS, accounts, ACL, signed models and updates)")
        creds, data_in_root = copy_bundle(
            fed.credentials(guest), data.device_files[-1], args.root / BUNDLE_IN_ROOT.lstrip("/")
        )
        install_log = logs / "install.log"
        install_s = install_agent(args, args.root, creds, data_in_root, broker, install_log)
        print(f"install-agent.sh in the root: {install_s:.0f} s")
        unit = read_unit((args.root / UNIT.lstrip("/")).read_text())
        imported = import_seconds(args.root)
        print(f"{guest}: a new python importing torch and the agent: {imported:.1f} s")

        aggregator = Aggregator(
            fed.aggregator_config(
                run_dir / "run",
                task,
                rounds=args.rounds,
                min_devices=len(names),
                deadline=args.deadline,
                on_short="stop",
                plot=False,
            )
        )
        proc = start_guest(args.root, unit, logs / f"{guest}.log")
        fed.procs.append(proc)
        watch = GuestWatch(proc, guest, time.monotonic())
        for name, path in zip(names[:-1], data.device_files):
            fed.spawn_agent(name, path, "--exit-when-done", log=logs / f"{name}.log")
        threading.Thread(target=watch.run, args=(aggregator,), daemon=True).start()

        printed = 0
        metrics_path = run_dir / "run" / "metrics.jsonl"

        def show_rounds() -> None:
            nonlocal printed
            if metrics_path.exists():
                rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
                for row in rows[printed:]:
                    print(round_line(row, guest, watch), flush=True)
                printed = len(rows)

        def rounds_printer() -> None:
            while aggregator.phase not in ("done", "stopped"):
                show_rounds()
                time.sleep(0.5)

        threading.Thread(target=rounds_printer, daemon=True).start()
        try:
            aggregator.run()
        finally:
            watch.stop.set()
        watch.reap(timeout=120)
        show_rounds()

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    accepted = [r["round"] for r in rows if guest in r.get("contributors", [])]
    online = "never" if watch.online_after is None else f"{watch.online_after:.1f} s"
    print(
        f"{guest} ({args.arch}{', emulated by qemu-user' if args.arch == 'arm64' else ''}): "
        f"install {install_s:.0f} s, import torch + agent {imported:.1f} s, start to online "
        f"{online}, peak memory {watch.peak_kb / 1024:.0f} MB (max RSS of its process), "
        f"updates accepted in rounds {accepted} of {len(rows)}, exit code {watch.exit_code}"
    )
    print(f"{time.monotonic() - began:.0f} s in all; logs in {logs}")
    ok = len(rows) == args.rounds and len(accepted) == args.rounds and watch.exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("chroot-round: stopped", file=sys.stderr)
        sys.exit(130)
