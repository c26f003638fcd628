"""When a device may train: limits against readings, and readers over fake /proc and /sys."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from broker.errors import ConfigError
from device_agent.resources import (
    Hours,
    Limits,
    Readings,
    cpu_temperature,
    free_memory_mb,
    on_mains,
    read,
    why_not,
)

MEMINFO = "MemTotal:        3884096 kB\nMemFree:          212340 kB\nMemAvailable:     122880 kB\n"


def at(hhmm: str) -> dt.datetime:
    h, m = (int(x) for x in hhmm.split(":"))
    return dt.datetime(2026, 11, 27, h, m)


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- hours ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("window", "inside", "outside"),
    [
        ("08:00-18:00", ["08:00", "12:30", "17:59"], ["07:59", "18:00", "23:00", "00:00"]),
        ("22:00-06:00", ["22:00", "23:59", "00:00", "05:59"], ["06:00", "12:00", "21:59"]),
        ("00:00-24:00", ["00:00", "12:00", "23:59"], []),
    ],
)
def test_hours_window_may_wrap_midnight(window, inside, outside):
    hours = Hours.parse(window)
    assert all(hours.contains(at(t).time()) for t in inside)
    assert not any(hours.contains(at(t).time()) for t in outside)


@pytest.mark.parametrize("text", ["8-18", "08:00", "25:00-06:00", "08:60-09:00", "09:00-09:00", 8])
def test_malformed_hours_are_refused(text):
    with pytest.raises(ConfigError, match="hours"):
        Hours.parse(text)


# -- why_not ----------------------------------------------------------------------------------
def test_each_limit_says_why_in_words():
    noon = at("12:00")
    assert why_not(Limits(hours=Hours.parse("08:00-18:00")), Readings(), at("19:00")) == (
        "outside training hours 08:00-18:00"
    )
    assert why_not(Limits(min_free_mb=256), Readings(free_mb=120), noon) == (
        "only 120 MB free, needs 256 MB"
    )
    assert why_not(Limits(max_cpu_temp=75), Readings(cpu_temp=81.0), noon) == (
        "CPU at 81.0 °C, ceiling 75 °C"
    )
    assert why_not(Limits(require_mains=True), Readings(on_mains=False), noon) == "on battery"


def test_within_limits_or_without_readings_training_is_allowed():
    hours = Hours.parse("08:00-18:00")
    limits = Limits(hours, min_free_mb=256, max_cpu_temp=75, require_mains=True)
    fine = Readings(free_mb=300, cpu_temp=60.0, on_mains=True)
    assert why_not(limits, fine, at("12:00")) is None
    assert why_not(limits, Readings(), at("12:00")) is None  # nothing readable sets no limit
    assert why_not(Limits(), Readings(free_mb=1, cpu_temp=120, on_mains=False), at("3:00")) is None
    assert why_not(limits, Readings(cpu_temp=75.0), at("12:00")) is None  # at the ceiling: ok


def test_limits_table_is_checked_naming_the_key():
    limits = Limits.from_table(
        {"hours": "22:00-06:00", "min_free_mb": 256, "max_cpu_temp": 75, "require_mains": True}
    )
    assert limits == Limits(Hours.parse("22:00-06:00"), 256.0, 75.0, True)
    assert Limits.from_table(None) == Limits() and not Limits().any
    for table, match in [
        ({"hours": "8 to 6"}, r"dev.toml: \[limits\]: hours '8 to 6'"),
        ({"min_free_mb": -1}, "min_free_mb must be a positive number"),
        ({"max_cpu_temp": "hot"}, "max_cpu_temp must be a positive number"),
        ({"require_mains": "yes"}, "require_mains must be true or false"),
        ({"max_temp": 70}, "unknown key.*max_temp"),
        ("08:00-18:00", "must be a table"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Limits.from_table(table, "dev.toml: [limits]")


# -- readers over a fake tree -----------------------------------------------------------------
def test_free_memory_is_memavailable_in_mb(tmp_path):
    assert free_memory_mb(tmp_path) is None
    write(tmp_path, "proc/meminfo", MEMINFO)
    assert free_memory_mb(tmp_path) == 120.0
    write(tmp_path, "proc/meminfo", "MemTotal: 100 kB\n")  # a kernel without MemAvailable
    assert free_memory_mb(tmp_path) is None


def test_cpu_temperature_is_the_hottest_zone(tmp_path):
    assert cpu_temperature(tmp_path) is None  # no thermal zones: no ceiling applies
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "48312\n")
    write(tmp_path, "sys/class/thermal/thermal_zone1/temp", "81000\n")
    write(tmp_path, "sys/class/thermal/thermal_zone2/temp", "garbage\n")
    write(tmp_path, "sys/class/thermal/cooling_device0/cur_state", "1\n")
    assert cpu_temperature(tmp_path) == 81.0


@pytest.mark.parametrize(
    ("supplies", "expected"),
    [
        ({}, None),  # a Pi on a plug shows no supply at all: allowed
        ({"AC/type": "Mains", "AC/online": "1"}, True),
        ({"AC/type": "Mains", "AC/online": "0"}, False),
        ({"BAT0/type": "Battery", "BAT0/status": "Discharging"}, False),
        ({"BAT0/type": "Battery", "BAT0/status": "Charging"}, True),
        ({"BAT0/type": "Battery", "BAT0/status": "Full"}, True),
        (
            {
                "AC/type": "Mains",
                "AC/online": "0",
                "BAT0/type": "Battery",
                "BAT0/status": "Discharging",
                "usb/type": "USB",
            },
            False,
        ),
        ({"usb/type": "USB", "usb/online": "1"}, None),
    ],
)
def test_mains_power_from_power_supplies(tmp_path, supplies, expected):
    (tmp_path / "sys/class/power_supply").mkdir(parents=True)
    for name, text in supplies.items():
        write(tmp_path, f"sys/class/power_supply/{name}", text + "\n")
    assert on_mains(tmp_path) is expected


def test_read_gathers_all_readings(tmp_path):
    write(tmp_path, "proc/meminfo", MEMINFO)
    write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "70500\n")
    write(tmp_path, "sys/class/power_supply/BAT0/type", "Battery\n")
    write(tmp_path, "sys/class/power_supply/BAT0/status", "Discharging\n")
    readings = read(tmp_path)
    assert readings == Readings(free_mb=120.0, cpu_temp=70.5, on_mains=False)
    limits = Limits(min_free_mb=100, max_cpu_temp=75, require_mains=True)
    assert why_not(limits, readings, at("12:00")) == "on battery"


def test_this_machine_reads_without_error():
    readings = read()  # whatever this host offers; never raises
    assert readings.free_mb is None or readings.free_mb > 0


# -- the agent's command line -----------------------------------------------------------------
def test_cli_limits_come_from_the_config_table_and_flags_override_them(tmp_path):
    from fedmq.cli import _limits

    config = {"limits": {"hours": "08:00-18:00", "max_cpu_temp": 75}}
    none = {"hours": None, "min_free_mb": None, "max_cpu_temp": None, "require_mains": None}
    assert _limits(config, tmp_path / "dev.toml", **none) == Limits(
        Hours.parse("08:00-18:00"), max_cpu_temp=75.0
    )
    flags = {**none, "hours": "22:00-06:00", "require_mains": True}
    assert _limits(config, tmp_path / "dev.toml", **flags) == Limits(
        Hours.parse("22:00-06:00"), max_cpu_temp=75.0, require_mains=True
    )
    assert _limits({}, None, **none) == Limits()
    with pytest.raises(ConfigError, match=r"dev.toml: \[limits\]: unknown key\(s\) max_temp"):
        _limits({"limits": {"max_temp": 70}}, tmp_path / "dev.toml", **none)


def test_cli_refuses_bad_limits_before_connecting(tmp_path):
    from click.testing import CliRunner

    from fedmq.cli import main

    data = tmp_path / "d.csv"
    data.write_text("x,label\n1,0\n")
    config = tmp_path / "dev1.toml"
    config.write_text(
        'federation = "f"\nbroker = "127.0.0.1:9"\nusername = "dev1"\npassword = "x"\n'
        '[limits]\nhours = "9 to 5"\n'
    )
    args = ["agent", "run", "--config", str(config), "--data", str(data), "--insecure"]
    env = {k: None for k in os.environ if k.startswith("FEDMQ_")}
    result = CliRunner(env=env).invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "dev1.toml: [limits]: hours '9 to 5' is not HH:MM-HH:MM" in result.output
