#!/usr/bin/env bash
# Install (or remove) a fedmq device agent as a systemd service on Debian / Raspberry Pi OS.
#
#   install-agent.sh install --credentials pi-kitchen.toml --data sensors.csv
#   install-agent.sh uninstall [--purge]
#
# What install does, as root:
#   - a system user `fedmq` (no login, home = the state directory)
#   - a venv under --prefix with the agent's dependencies only: CPU torch, paho-mqtt,
#     safetensors, numpy, click, rich, cryptography (no matplotlib, no scikit-learn),
#     and fedmq itself from --from (a source tree or a wheel) without its extras
#   - the credentials bundle that `fedmq broker add-device` wrote (the .toml and the key
#     and certificate files it names), copied 0600 and owned by the agent's user
#   - the data file, copied into the state directory
#   - the agent's config file <etc>/agent.toml: broker, federation, device id, data,
#     credentials, limits (threads); `fedmq agent run --config` reads it. Its flags and
#     FEDMQ_* variables override the file: put those in <etc>/agent.env
#   - a systemd unit: own user, restart on failure, CPU and memory caps, journald,
#     read-only system; enabled and started when systemd runs
#
# Only 64-bit systems: PyPI has no torch wheel for 32-bit ARM (armv7l / armhf).
# --dry-run prints what would be done and changes nothing.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"   # x86_64: the +cpu build; aarch64: PyPI's (see below)
# what the agent imports (pyproject's core dependencies); fedmq itself goes in with --no-deps
AGENT_DEPS=("paho-mqtt>=2.1,<3" "safetensors>=0.4" "numpy>=1.24" "click>=8.1" "rich>=13"
    "cryptography>=42" "tomli>=2; python_version < '3.11'")
SOURCE_TREE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICE=fedmq-agent

PREFIX=/opt/fedmq
ETC_DIR=/etc/fedmq
STATE_DIR=/var/lib/fedmq
UNIT_DIR=/etc/systemd/system
AGENT_USER=fedmq
CREDENTIALS=""
DATA=""
DEVICE=""
FEDERATION=""
BROKER=""
FROM=""
SITE_PACKAGES_FROM=""
THREADS=""
CPU_QUOTA="${FEDMQ_CPU_QUOTA:-200%}"
MEMORY_MAX="${FEDMQ_MEMORY_MAX:-1G}"
SYSTEMD=1
KEEP_VENV=0
DRY_RUN=0
PURGE=0

usage() {
    cat <<EOF
usage: $0 install --credentials FILE --data FILE [options]
       $0 uninstall [--purge] [--etc-dir DIR]

install options:
  --credentials FILE   credentials file from \`fedmq broker add-device\` (its key and
                       certificate files must sit next to it, as add-device lists them)
  --data FILE          the device's local data (CSV or .npz), copied to the state dir
  --device ID          device id (default: the credentials file's)
  --federation NAME    federation (default: the credentials file's)
  --broker HOST:PORT   broker address (default: the credentials file's)
  --threads N          torch threads for training (default: torch's choice)
  --cpu-quota PCT      systemd CPUQuota (default $CPU_QUOTA; 100% = one core)
  --memory-max SIZE    systemd MemoryMax (default $MEMORY_MAX)
  --prefix DIR         program directory, holds the venv (default $PREFIX)
  --etc-dir DIR        config and credentials (default $ETC_DIR)
  --state-dir DIR      data and the service's home (default $STATE_DIR)
  --unit-dir DIR       where the systemd unit goes (default $UNIT_DIR)
  --user NAME          run the agent as NAME, created if missing (default $AGENT_USER)
  --from PATH          fedmq source tree or wheel (default: $SOURCE_TREE)
  --no-systemd         write the unit but neither enable nor start it
  --keep-venv          keep an existing venv whose torch is \$TORCH_VERSION (an upgrade of
                       fedmq without downloading torch again); fedmq is re-installed
  --dry-run            print what would be done, change nothing
  --site-packages-from VENV   (tests) reuse VENV's installed packages instead of
                       downloading torch; the agent's dependencies are not pip-installed
uninstall: stops and removes the service and the program directory; --purge also
  removes the config, credentials, data and the user it created.
environment: TORCH_VERSION (default 2.13.0), FEDMQ_CPU_QUOTA, FEDMQ_MEMORY_MAX,
  FEDMQ_TORCH_INDEX (an extra index for torch, e.g. PyTorch's CPU wheel index: then x86_64
  installs torch==VERSION+cpu from it; unset: torch==VERSION as pip finds it, and PyPI's
  x86_64 and aarch64 wheels are CUDA builds that bring gigabytes of NVIDIA wheels)
EOF
}

die() {
    echo "install-agent: $*" >&2
    exit 1
}

say() { echo "install-agent: $*"; }

# run a command, or only print it with --dry-run
run() {
    if [ "$DRY_RUN" = 1 ]; then
        echo "+ $*"
    else
        "$@"
    fi
}

systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

check_architecture() {
    local machine bits
    machine="${FEDMQ_INSTALL_ARCH:-$(uname -m)}"          # override: tests of the refusal
    bits="${FEDMQ_INSTALL_BITS:-$(getconf LONG_BIT 2>/dev/null || echo 64)}"
    case "$machine" in
        armv6* | armv7* | armv8l | armhf | arm)
            bits=32 ;;
    esac
    if [ "$bits" = 32 ]; then
        # a 64-bit kernel with a 32-bit userland reports aarch64 but LONG_BIT=32
        die "this is a 32-bit system ($machine, ${bits}-bit userland): PyPI has no torch wheel \
for 32-bit ARM (armv7/armhf), so the agent cannot be installed. Install the 64-bit \
(arm64) Raspberry Pi OS or Debian (Pi 3, 4, 5, Zero 2 W and later) and run this again."
    fi
    case "$machine" in
        aarch64 | arm64)
            # PyPI's aarch64 torch 2.13.0 is a CUDA 13 build: pip also brings 2.4 GB of
            # NVIDIA wheels and triton, which `import torch` loads even with no GPU (seen
            # under qemu by scripts/arm64-round.sh). FEDMQ_TORCH_INDEX=<an index with
            # aarch64 CPU wheels> avoids them, if one is reachable.
            TORCH_SPEC="torch==$TORCH_VERSION"
            TORCH_INDEX="${FEDMQ_TORCH_INDEX-}"
            if [ -z "$TORCH_INDEX" ]; then
                TORCH_NOTE="PyPI's aarch64 torch $TORCH_VERSION is a CUDA build: with its NVIDIA \
libraries about 2.9 GB to download and 4.7 GB on disk (FEDMQ_TORCH_INDEX: see --help)"
            fi ;;
        x86_64 | amd64)  # PyPI's x86_64 wheel pulls CUDA: the +cpu build of PyTorch's index
            TORCH_INDEX="${FEDMQ_TORCH_INDEX-}"
            if [ -n "$TORCH_INDEX" ]; then
                TORCH_SPEC="torch==$TORCH_VERSION+cpu"
            else  # what pip finds (a local wheel directory, say), as scripts/setup.sh does
                TORCH_SPEC="torch==$TORCH_VERSION"
                TORCH_NOTE="no FEDMQ_TORCH_INDEX: torch $TORCH_VERSION as pip finds it; PyPI's \
x86_64 wheel is a CUDA build (gigabytes): point FEDMQ_TORCH_INDEX at PyTorch's CPU wheel index"
            fi ;;
        *) die "unsupported machine $machine: torch has wheels for aarch64 and x86_64 only" ;;
    esac
}

parse_options() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --credentials) CREDENTIALS="${2:?--credentials needs a file}"; shift ;;
            --data) DATA="${2:?--data needs a file}"; shift ;;
            --device) DEVICE="${2:?--device needs an id}"; shift ;;
            --federation) FEDERATION="${2:?--federation needs a name}"; shift ;;
            --broker) BROKER="${2:?--broker needs HOST:PORT}"; shift ;;
            --threads) THREADS="${2:?--threads needs a number}"; shift ;;
            --cpu-quota) CPU_QUOTA="${2:?--cpu-quota needs a percentage}"; shift ;;
            --memory-max) MEMORY_MAX="${2:?--memory-max needs a size}"; shift ;;
            --prefix) PREFIX="${2:?--prefix needs a directory}"; shift ;;
            --etc-dir) ETC_DIR="${2:?--etc-dir needs a directory}"; shift ;;
            --state-dir) STATE_DIR="${2:?--state-dir needs a directory}"; shift ;;
            --unit-dir) UNIT_DIR="${2:?--unit-dir needs a directory}"; shift ;;
            --user) AGENT_USER="${2:?--user needs a name}"; shift ;;
            --from) FROM="${2:?--from needs a path}"; shift ;;
            --site-packages-from) SITE_PACKAGES_FROM="${2:?needs a venv}"; shift ;;
            --no-systemd) SYSTEMD=0 ;;
            --keep-venv) KEEP_VENV=1 ;;
            --dry-run) DRY_RUN=1 ;;
            --purge) PURGE=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown option $1" ;;
        esac
        shift
    done
}

absolute() { (cd "$(dirname "$1")" && echo "$(pwd)/$(basename "$1")"); }

# ------------------------------------------------------------------------ install

ensure_user() {
    if id -u "$AGENT_USER" >/dev/null 2>&1; then
        CREATED_USER=0
        return
    fi
    say "creating system user $AGENT_USER"
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin "$AGENT_USER"
    CREATED_USER=1
}

pip_quiet() {
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

venv_has_torch() {
    "$VENV/bin/python" -c "import sys, torch
sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null
}

make_venv() {
    if [ "$KEEP_VENV" = 1 ] && [ -z "$SITE_PACKAGES_FROM" ] && [ -x "$VENV/bin/python" ] \
        && venv_has_torch; then
        say "keeping the venv $VENV (torch $TORCH_VERSION is in it; --keep-venv)"
        run pip_quiet "${AGENT_DEPS[@]}"
        return
    fi
    if [ "$DRY_RUN" = 0 ] && ! python3 -c "import venv, ensurepip" 2>/dev/null; then
        [ "$(id -u)" = 0 ] || die "python3-venv is missing: apt-get install python3-venv"
        say "installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    say "creating the venv $VENV"
    if [ -n "$SITE_PACKAGES_FROM" ]; then
        # tests: see another venv's torch & co. (and its pip and setuptools) through a .pth
        # line (its own .pth files, e.g. an editable fedmq, are not read): nothing downloaded
        run python3 -m venv --clear --without-pip "$VENV"
        local site
        site="$("$SITE_PACKAGES_FROM/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        say "reusing the packages of $site (no torch download)"
        if [ "$DRY_RUN" = 0 ]; then
            echo "$site" >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fedmq-reuse.pth"
        fi
    else
        run python3 -m venv --clear "$VENV"
        say "installing torch==$TORCH_VERSION and the agent's dependencies"
        [ -z "${TORCH_NOTE:-}" ] || say "note: $TORCH_NOTE"
        if [ -n "$TORCH_INDEX" ]; then
            run pip_quiet --extra-index-url "$TORCH_INDEX" "$TORCH_SPEC"
        else
            run pip_quiet "$TORCH_SPEC"
        fi
        run pip_quiet "${AGENT_DEPS[@]}"
    fi
}

install_package() {
    local from="${FROM:-$SOURCE_TREE}" stage
    [ -e "$from" ] || die "--from $from: no such file or directory"
    if [ -d "$from" ]; then
        [ -f "$from/pyproject.toml" ] || die "--from $from: not a fedmq source tree (no pyproject.toml)"
        # build from a copy: the build leaves build/ and *.egg-info behind, not in the user's tree
        stage="$(mktemp -d)"
        # shellcheck disable=SC2064  # expand now: the path is fixed
        trap "rm -rf '$stage'" EXIT
        cp -r "$from/pyproject.toml" "$from/README.md" "$from/broker" "$from/device_agent" \
            "$from/aggregator" "$from/fedmq" "$stage/"
        from="$stage"
    fi
    say "installing fedmq from ${FROM:-$SOURCE_TREE} (no extras, --no-deps)"
    if [ -n "$SITE_PACKAGES_FROM" ]; then
        run pip_quiet --no-deps --no-build-isolation --no-index "$from"
    else
        run pip_quiet --no-deps "$from"
    fi
    if [ "$DRY_RUN" = 0 ]; then
        "$VENV/bin/python" -c "import torch, paho.mqtt, safetensors, device_agent.agent, fedmq.cli" \
            || die "the venv $VENV cannot import the agent: see pip's output above"
    fi
}

write_config() {
    say "writing $ETC_DIR/agent.toml and copying the credentials bundle"
    run install -d -m 0750 "$ETC_DIR"
    run install -d -m 0750 "$STATE_DIR" "$STATE_DIR/data"
    run install -m 0640 "$DATA" "$STATE_DIR/data/$(basename "$DATA")"
    [ "$DRY_RUN" = 1 ] && return
    # fedmq's own reader checks the credentials (and names the file on any problem)
    "$VENV/bin/python" - "$CREDENTIALS" "$ETC_DIR" "$STATE_DIR/data/$(basename "$DATA")" \
        "$DEVICE" "$FEDERATION" "$BROKER" "$THREADS" <<'PY'
import os, shutil, sys
from pathlib import Path

from broker.errors import ConfigError
from broker.home import PATH_KEYS, dump_toml, load_credentials

creds_file, etc, data, device, federation, broker, threads = sys.argv[1:]
try:
    creds = load_credentials(creds_file)
except ConfigError as exc:
    sys.exit(f"install-agent: {exc}")
if creds.get("role") not in (None, "device"):
    sys.exit(f"install-agent: {creds_file} is the credentials of a {creds['role']}, not a device")
etc = Path(etc)
doc = {
    "federation": federation or creds["federation"],
    "broker": broker or creds["broker"],
    "username": creds["username"],
    "password": creds["password"],
    "device_id": device or creds.get("device_id") or creds["username"],
    "data": data,
}
if not doc["broker"]:
    sys.exit(f"install-agent: {creds_file} holds no broker address: pass --broker HOST:PORT")
for key in PATH_KEYS:  # key and certificate files: copied next to agent.toml, 0600
    if creds.get(key) is not None:
        src = Path(creds[key])
        if src.is_dir():
            sys.exit(f"install-agent: {creds_file}: {key} is a directory (not a device's bundle)")
        shutil.copyfile(src, etc / src.name)
        os.chmod(etc / src.name, 0o600)
        doc[key] = src.name
if creds.get("identity_cert"):  # the registry's word on its key: secure aggregation
    doc["identity_cert"] = creds["identity_cert"]
if threads:
    doc["threads"] = int(threads)
header = (
    "fedmq agent config, written by scripts/install-agent.sh; read by\n"
    "`fedmq agent run --config` (flags and FEDMQ_* variables, e.g. in agent.env, override it).\n"
    "Secret (holds a password): keep it 0600. Relative paths are relative to this file."
)
fd = os.open(etc / "agent.toml", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    f.write(dump_toml(doc, header))
os.chmod(etc / "agent.toml", 0o600)
PY
    if [ ! -e "$ETC_DIR/agent.env" ]; then
        cat >"$ETC_DIR/agent.env" <<'EOF'
# FEDMQ_* overrides of agent.toml for the fedmq-agent service, one VAR=value a line, e.g.
# FEDMQ_BROKER=broker.lan:8883
# FEDMQ_THREADS=2
EOF
        chmod 0600 "$ETC_DIR/agent.env"
    fi
    chown -R "$AGENT_USER:" "$ETC_DIR" "$STATE_DIR"
}

write_unit() {
    local unit="$UNIT_DIR/$SERVICE.service"
    say "writing $unit"
    run install -d "$UNIT_DIR"
    [ "$DRY_RUN" = 1 ] && return
    cat >"$unit" <<EOF
# fedmq device agent, written by scripts/install-agent.sh
[Unit]
Description=fedmq device agent (federated learning over MQTT)
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=10

[Service]
Type=simple
User=$AGENT_USER
Group=$(id -gn "$AGENT_USER")
EnvironmentFile=-$ETC_DIR/agent.env
Environment=PYTHONUNBUFFERED=1 HOME=$STATE_DIR
WorkingDirectory=$STATE_DIR
ExecStart=$VENV/bin/fedmq agent run --config $ETC_DIR/agent.toml
Restart=on-failure
RestartSec=15
TimeoutStopSec=30
CPUQuota=$CPU_QUOTA
MemoryMax=$MEMORY_MAX
Nice=10
StandardOutput=journal
StandardError=journal
SyslogIdentifier=$SERVICE
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=$STATE_DIR
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
LockPersonality=yes

[Install]
WantedBy=multi-user.target
EOF
}

write_manifest() {
    [ "$DRY_RUN" = 1 ] && return
    # what uninstall removes
    cat >"$ETC_DIR/install.env" <<EOF
PREFIX='$PREFIX'
STATE_DIR='$STATE_DIR'
UNIT_DIR='$UNIT_DIR'
AGENT_USER='$AGENT_USER'
CREATED_USER='$CREATED_USER'
EOF
}

start_service() {
    local start="sudo -u $AGENT_USER $VENV/bin/fedmq agent run --config $ETC_DIR/agent.toml"
    if [ "$SYSTEMD" = 0 ]; then
        say "installed; the service is not enabled (--no-systemd). Start it with"
        echo "  systemctl enable --now $SERVICE    (or, without systemd: $start)"
    elif systemd_running; then
        run systemctl daemon-reload
        run systemctl enable "$SERVICE"
        run systemctl restart "$SERVICE"  # a re-install (upgrade) runs the new venv and config
        say "started: systemctl status $SERVICE; logs: journalctl -u $SERVICE -f"
    else
        say "installed, but systemd is not running here (a container?). Start the agent with"
        echo "  $start"
    fi
}

cmd_install() {
    parse_options "$@"
    [ -n "$CREDENTIALS" ] || die "--credentials FILE is required (from \`fedmq broker add-device\`)"
    [ -n "$DATA" ] || die "--data FILE is required (the device's CSV or .npz)"
    [ -f "$CREDENTIALS" ] || die "--credentials $CREDENTIALS: no such file"
    [ -f "$DATA" ] || die "--data $DATA: no such file"
    if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
        die "run as root (it creates a user and writes to $PREFIX, $ETC_DIR, $UNIT_DIR)"
    fi
    case "$THREADS" in "" | [1-9] | [1-9][0-9]) ;; *) die "--threads must be a number" ;; esac
    check_architecture
    CREDENTIALS="$(absolute "$CREDENTIALS")"
    DATA="$(absolute "$DATA")"
    VENV="$PREFIX/venv"
    ensure_user
    make_venv
    install_package
    write_config
    write_unit
    write_manifest
    start_service
}

# ------------------------------------------------------------------------ uninstall

cmd_uninstall() {
    parse_options "$@"
    local manifest="$ETC_DIR/install.env" CREATED_USER=0
    if [ -f "$manifest" ]; then
        # shellcheck source=/dev/null
        . "$manifest"
    else
        say "no $manifest: removing the default locations"
    fi
    if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
        die "run as root"
    fi
    local unit="$UNIT_DIR/$SERVICE.service"
    if [ "$SYSTEMD" = 1 ] && systemd_running; then
        run systemctl disable --now "$SERVICE" || true
    fi
    say "removing $unit and $PREFIX"
    run rm -f "$unit"
    if [ "$SYSTEMD" = 1 ] && systemd_running; then
        run systemctl daemon-reload
    fi
    run rm -rf "$PREFIX/venv"
    run rmdir --ignore-fail-on-non-empty "$PREFIX" 2>/dev/null || true
    if [ "$PURGE" = 1 ]; then
        say "purging $ETC_DIR (config, credentials) and $STATE_DIR (data)"
        run rm -rf "$ETC_DIR" "$STATE_DIR"
        if [ "$CREATED_USER" = 1 ] && id -u "$AGENT_USER" >/dev/null 2>&1; then
            run userdel "$AGENT_USER"
        fi
    else
        say "kept $ETC_DIR (credentials) and $STATE_DIR (data): --purge removes them"
    fi
}

case "${1:-}" in
    install) shift; cmd_install "$@" ;;
    uninstall) shift; cmd_uninstall "$@" ;;
    -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
esac
