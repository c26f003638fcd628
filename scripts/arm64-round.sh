#!/usr/bin/env bash
# A federation round with one agent on an emulated 64-bit ARM Debian: proof without a Pi.
#
#   scripts/arm64-round.sh [--rounds 3] [--host-agents 2] [--cache DIR] [--run-dir DIR]
#   scripts/arm64-round.sh --amd64-install-check      # the install script in a clean amd64 root
#
# As root on a Debian 12 host:
#   1. installs qemu-user-static, binfmt-support and debootstrap (apt) if missing, and
#      registers qemu's aarch64 interpreter with binfmt_misc;
#   2. makes a minimal Debian 12 arm64 root with debootstrap (--foreign, then its second
#      stage run under qemu), cached in --cache (default /var/tmp/fedmq-arm64, env
#      FEDMQ_ROOT_CACHE): a second run reuses it;
#   3. bind-mounts /proc, /sys, /dev and this repository (read-only) into it, and gives it
#      the host's CA certificates (pip then reaches the package index as the host does);
#   4. runs scripts/chroot_round.py on the host: a secured mosquitto on a free 127.0.0.1
#      port, the demo's watch data and task, the aggregator and --host-agents agents on the
#      host, and ONE agent installed in the root by scripts/install-agent.sh and started
#      there as its systemd unit would (chroot shares the host's network);
#   5. prints each round's seconds, the emulated agent's import time, start-up time, peak
#      memory and whether its updates were accepted; stops everything it started and
#      unmounts (trap), the root stays cached.
#
# --amd64-install-check does the same with an amd64 root (no emulation), no host agent and
# one round, in a fresh copy of the cached root each time: the install script, run in a
# clean Debian, up to a started agent that goes online and trains. Neither runs in CI
# (minutes to tens of minutes).
#
# env: FEDMQ_PYTHON (the host's python with fedmq's dependencies; default .venv/bin/python
# of this repository), FEDMQ_TORCH_INDEX (passed to install-agent.sh), FEDMQ_ROOT_CACHE.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCH=arm64
SUITE=bookworm   # Debian 12
ROUNDS=3
HOST_AGENTS=2
CACHE=""
RUN_DIR=""
FRESH_VENV=0
PYTHON="${FEDMQ_PYTHON:-$REPO/.venv/bin/python}"
SRC_IN_ROOT=/opt/fedmq-src
MOUNTED=()   # mount points, in mount order
ROOT=""
DRIVER_PID=""

usage() {
    cat <<EOF
usage: $0 [options]
  --rounds N            rounds of the federation (default $ROUNDS)
  --host-agents N       agents on the host beside the one in the root (default $HOST_AGENTS)
  --cache DIR           where the Debian root is made and kept (default /var/tmp/fedmq-ARCH,
                        env FEDMQ_ROOT_CACHE)
  --run-dir DIR         broker home, data, logs, metrics (default: a new directory in /tmp)
  --fresh-venv          re-create the agent's venv in the root (default: keep it if its
                        torch is the right version; fedmq itself is always re-installed)
  --amd64-install-check an amd64 root, no host agent, one round (unless --rounds)
EOF
}

die() {
    echo "arm64-round: $*" >&2
    exit 1
}

say() { echo "arm64-round: $*"; }

parse_options() {
    local rounds_given=0 agents_given=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --rounds) ROUNDS="${2:?--rounds needs a number}"; rounds_given=1; shift ;;
            --host-agents) HOST_AGENTS="${2:?--host-agents needs a number}"; agents_given=1; shift ;;
            --cache) CACHE="${2:?--cache needs a directory}"; shift ;;
            --run-dir) RUN_DIR="${2:?--run-dir needs a directory}"; shift ;;
            --fresh-venv) FRESH_VENV=1 ;;
            --amd64-install-check) ARCH=amd64 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown option $1" ;;
        esac
        shift
    done
    if [ "$ARCH" = amd64 ]; then
        [ "$rounds_given" = 1 ] || ROUNDS=1
        [ "$agents_given" = 1 ] || HOST_AGENTS=0
    fi
    case "$ROUNDS" in [1-9] | [1-9][0-9]) ;; *) die "--rounds must be a number from 1 to 99" ;; esac
    case "$HOST_AGENTS" in [0-9]) ;; *) die "--host-agents must be a number from 0 to 9" ;; esac
    CACHE="${CACHE:-${FEDMQ_ROOT_CACHE:-/var/tmp/fedmq-$ARCH}}"
}

# ------------------------------------------------------------------------ host tools

install_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ "$ARCH" = arm64 ]; then
        [ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -x /usr/bin/qemu-aarch64-static ] \
            || missing+=(qemu-user-static)
        command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    fi
    command -v mosquitto >/dev/null || missing+=(mosquitto)
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]} (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

enable_binfmt() {
    [ "$ARCH" = arm64 ] || return 0
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
            || die "cannot mount binfmt_misc (a container without the privilege?): \
qemu cannot run arm64 programs here"
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
    fi
    grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
        || die "binfmt_misc's qemu-aarch64 entry is disabled: update-binfmts --enable qemu-aarch64"
}

# ------------------------------------------------------------------------ the Debian root

refuse_if_mounted() {  # never rm -rf a root with /dev or /proc still bound into it
    if awk '{print $2}' /proc/mounts | grep -q "^$1/"; then
        die "$1 still has mounts from an earlier run (see /proc/mounts): unmount them first"
    fi
}

make_root() {
    mkdir -p "$CACHE"
    CACHE="$(cd "$CACHE" && pwd -P)"  # canonical: compared with /proc/PID/root on clean-up
    ROOT="$CACHE/rootfs"
    if [ -f "$ROOT/.fedmq-root-ready" ]; then
        say "reusing the Debian $SUITE $ARCH root $ROOT"
        return
    fi
    local partial="$CACHE/rootfs.partial" started=$SECONDS
    refuse_if_mounted "$partial"
    rm -rf --one-file-system "$partial"
    local packages=python3,python3-venv,ca-certificates
    if [ "$ARCH" = arm64 ]; then
        say "debootstrap: Debian $SUITE arm64 into $partial (first stage, on the host)"
        debootstrap --arch=arm64 --foreign --variant=minbase --include="$packages" \
            "$SUITE" "$partial" >"$CACHE/debootstrap.log" 2>&1 \
            || die "debootstrap failed: see $CACHE/debootstrap.log"
        say "debootstrap: second stage, under qemu (a few minutes)"
        chroot "$partial" /debootstrap/debootstrap --second-stage >>"$CACHE/debootstrap.log" 2>&1 \
            || die "debootstrap's second stage failed: see $CACHE/debootstrap.log"
    else
        say "debootstrap: Debian $SUITE $ARCH into $partial"
        debootstrap --arch="$ARCH" --variant=minbase --include="$packages" \
            "$SUITE" "$partial" >"$CACHE/debootstrap.log" 2>&1 \
            || die "debootstrap failed: see $CACHE/debootstrap.log"
    fi
    touch "$partial/.fedmq-root-ready"
    refuse_if_mounted "$ROOT"
    rm -rf --one-file-system "$ROOT"
    mv "$partial" "$ROOT"
    say "made $ROOT in $((SECONDS - started)) s"
}

clean_copy() {
    # the install check starts from a clean Debian each time: a copy of the cached root,
    # which itself stays as debootstrap made it
    local copy="$CACHE/check-root"
    refuse_if_mounted "$copy"
    rm -rf --one-file-system "$copy"
    cp -a "$ROOT" "$copy"
    ROOT="$copy"
    say "a clean copy of it: $ROOT"
}

bind() {  # bind SRC DEST [ro]
    if [ -d "$1" ]; then
        mkdir -p "$2"
    fi
    mount --bind "$1" "$2"
    MOUNTED+=("$2")
    mount --make-private "$2"  # what is mounted on top of it stays out of the host's tree
    if [ "${3:-}" = ro ]; then
        mount -o remount,bind,ro "$2"
    fi
}

pi4_cpuinfo() {  # a Raspberry Pi 4's /proc/cpuinfo, one entry per host CPU
    local cpu
    for ((cpu = 0; cpu < $(nproc); cpu++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$cpu"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n'
        printf 'CPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done
    printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B (emulated by qemu)\n'
}

prepare_root() {
    bind /proc "$ROOT/proc"
    bind /sys "$ROOT/sys"
    bind /dev "$ROOT/dev"
    bind "$REPO" "$ROOT$SRC_IN_ROOT" ro
    if [ "$ARCH" = arm64 ]; then
        # qemu-user shows the host's /proc/cpuinfo (x86), and torch's CPU detection then
        # crashes at import (SIGSEGV loading torch._C): the root sees a Pi 4's instead,
        # and qemu emulates its CPU, a Cortex-A72 (no SVE, as on the Pi)
        pi4_cpuinfo >"$CACHE/cpuinfo"
        bind "$CACHE/cpuinfo" "$ROOT/proc/cpuinfo" ro
        export QEMU_CPU=cortex-a72
    fi
    # pip in the root reaches the index as the host's does: same CA certificates, and the
    # host's pip find-links directory (PIP_FIND_LINKS, if any) read-only at the same path
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
        chroot "$ROOT" update-ca-certificates >/dev/null 2>&1 \
            || die "update-ca-certificates failed in $ROOT"
    fi
    local dir
    for dir in ${PIP_FIND_LINKS:-}; do
        case "$dir" in /*) [ -d "$dir" ] && bind "$dir" "$ROOT$dir" ro ;; esac
    done
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
}

# ------------------------------------------------------------------------ clean-up

stop_root_processes() {
    # whatever still runs inside this root was started by this script (the root is ours)
    local link pid
    for link in /proc/[0-9]*/root; do
        pid="${link#/proc/}"
        pid="${pid%/root}"
        if [ "$(readlink "$link" 2>/dev/null)" = "$ROOT" ]; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
}

cleanup() {
    local code=$?
    trap - EXIT INT TERM
    if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
        kill -TERM "$DRIVER_PID" 2>/dev/null || true
        wait "$DRIVER_PID" 2>/dev/null || true
    fi
    if [ -n "$ROOT" ]; then
        stop_root_processes
        sleep 1
        local i
        for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
            umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" \
                || echo "arm64-round: could not unmount ${MOUNTED[i]}" >&2
        done
    fi
    exit "$code"
}

# ------------------------------------------------------------------------ main

main() {
    parse_options "$@"
    [ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mounts)"
    [ -x "$PYTHON" ] || die "no $PYTHON: run scripts/setup.sh (or make demo) first, or set FEDMQ_PYTHON"
    install_host_tools
    enable_binfmt
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    make_root
    if [ "$ARCH" = amd64 ]; then clean_copy; fi
    prepare_root
    RUN_DIR="${RUN_DIR:-$(mktemp -d "/tmp/fedmq-$ARCH-round.XXXXXX")}"
    local args=(--root "$ROOT" --arch "$ARCH" --src "$SRC_IN_ROOT" --rounds "$ROUNDS"
        --host-agents "$HOST_AGENTS" --run-dir "$RUN_DIR")
    [ "$FRESH_VENV" = 1 ] && args+=(--fresh-venv)
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$REPO/scripts/chroot_round.py" \
        "${args[@]}" &
    DRIVER_PID=$!
    local code=0
    wait "$DRIVER_PID" || code=$?
    DRIVER_PID=""
    return "$code"
}

main "$@"
