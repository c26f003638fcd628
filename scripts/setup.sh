#!/usr/bin/env bash
# Install what fedmq needs on a Debian machine (run as root for apt):
# mosquitto + clients, a virtualenv in .venv, CPU torch, and fedmq with its extras;
# with FEDMQ_TEST_SETUP=1 (make test) also rabbitmq-server, for the clustered-broker tests.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="${1:-demo,dev,privacy,export}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"   # the CPU wheel; a bare `torch` would pull CUDA

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root to apt-get install $*" >&2
        exit 1
    fi
    if [ -z "${FEDMQ_APT_UPDATED:-}" ]; then
        apt-get update -qq
        export FEDMQ_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_sub >/dev/null; then
    echo "setup: installing mosquitto and mosquitto-clients"
    apt_install mosquitto mosquitto-clients
fi

if [ -n "${FEDMQ_TEST_SETUP:-}" ] && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] \
    && [ -z "${FEDMQ_NO_RABBITMQ:-}" ]; then
    # for `make test` only: the clustered-broker tests (marker rabbitmq) start their own
    # RabbitMQ nodes, with their own epmd, on loopback ports; Debian 12 ships 3.10 with
    # the MQTT plugin
    echo "setup: installing rabbitmq-server (FEDMQ_NO_RABBITMQ=1 skips it and its tests)"
    apt_install rabbitmq-server
    # the package's own node is not needed: keep it from starting at boot and stop it
    if command -v systemctl >/dev/null; then
        systemctl disable rabbitmq-server >/dev/null 2>&1 || true
    fi
    if command -v service >/dev/null; then
        service rabbitmq-server stop >/dev/null 2>&1 || true
    fi
fi

if ! command -v shellcheck >/dev/null; then
    echo "setup: installing shellcheck (the tests lint scripts/install-agent.sh)"
    apt_install shellcheck
fi

pip_install() {
    # quiet, minus the notices some machines' pip config prints for every package
    .venv/bin/pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; }
}

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c "import ensurepip" 2>/dev/null; then
        echo "setup: installing python3-venv"
        apt_install python3-venv
    fi
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup: installing torch==$TORCH_VERSION (CPU)"
    pip_install "torch==$TORCH_VERSION"
fi
if ! .venv/bin/python -c "import fedmq, broker, aggregator, device_agent" 2>/dev/null \
    || [ pyproject.toml -nt .venv/.fedmq-installed ]; then
    echo "setup: installing fedmq[$EXTRAS]"
    pip_install -e ".[$EXTRAS]"
    touch .venv/.fedmq-installed
fi
