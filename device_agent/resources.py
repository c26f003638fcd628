"""When a device may train: its owner's limits, checked against readings of the machine.

A Raspberry Pi on a shelf is someone's: it may train in office hours only, not when
memory is short, not when it runs hot, not on battery. ``why_not`` is a pure
function of the limits, the readings and the time, and says why not in words the
aggregator's status shows; the readers at the edge take a ``root`` so tests point
them at a fake ``/proc`` and ``/sys`` tree. A reading the machine does not offer
(no thermal zone, no power supply) sets no limit: it never blocks training.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Hours:
    """A daily window of local time, "08:00-18:00"; "22:00-06:00" wraps midnight."""

    start: dt.time
    end: dt.time
    text: str

    @classmethod
    def parse(cls, text: str) -> Hours:
        match = _HOURS.match(text) if isinstance(text, str) else None
        if match is None:
            raise ConfigError(f'hours {text!r} is not HH:MM-HH:MM, e.g. "08:00-18:00"')
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ConfigError(f"hours {text!r}: not a time of day")
        end = dt.time(23, 59, 59, 999999) if h2 == 24 else dt.time(h2, m2)
        if dt.time(h1, m1) == end:
            raise ConfigError(f"hours {text!r} is an empty window")
        return cls(dt.time(h1, m1), end, f"{h1:02d}:{m1:02d}-{h2:02d}:{m2:02d}")

    def contains(self, now: dt.time) -> bool:
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end  # wraps midnight


@dataclass(frozen=True)
class Limits:
    """The ``[limits]`` table of an agent's config file; None sets no limit."""

    hours: Hours | None = None
    min_free_mb: float | None = None
    max_cpu_temp: float | None = None  # degrees Celsius
    require_mains: bool = False

    @property
    def any(self) -> bool:
        return bool(self.hours or self.min_free_mb or self.max_cpu_temp or self.require_mains)

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, where: str = "[limits]") -> Limits:
        """From a TOML table; ConfigError naming ``where`` and the key on anything odd."""
        if table is None:
            return cls()
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        unknown = set(table) - {"hours", "min_free_mb", "max_cpu_temp", "require_mains"}
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                "(known: hours, min_free_mb, max_cpu_temp, require_mains)"
            )
        hours = table.get("hours")
        try:
            parsed_hours = None if hours is None else Hours.parse(hours)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        numbers = {}
        for key in ("min_free_mb", "max_cpu_temp"):
            value = table.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                raise ConfigError(f"{where}: {key} must be a positive number, not {value!r}")
            numbers[key] = None if value is None else float(value)
        mains = table.get("require_mains", False)
        if not isinstance(mains, bool):
            raise ConfigError(f"{where}: require_mains must be true or false, not {mains!r}")
        return cls(parsed_hours, require_mains=mains, **numbers)


@dataclass(frozen=True)
class Readings:
    """What the machine says now; None where it cannot say."""

    free_mb: float | None = None
    cpu_temp: float | None = None  # the hottest thermal zone, degrees Celsius
    on_mains: bool | None = None


def why_not(limits: Limits, readings: Readings, now: dt.datetime) -> str | None:
    """Why this device may not train now, or None when it may."""
    if limits.hours is not None and not limits.hours.contains(now.time()):
        return f"outside training hours {limits.hours.text}"
    if (
        limits.min_free_mb is not None
        and readings.free_mb is not None
        and readings.free_mb < limits.min_free_mb
    ):
        return f"only {readings.free_mb:.0f} MB free, needs {limits.min_free_mb:g} MB"
    if (
        limits.max_cpu_temp is not None
        and readings.cpu_temp is not None
        and readings.cpu_temp > limits.max_cpu_temp
    ):
        return f"CPU at {readings.cpu_temp:.1f} °C, ceiling {limits.max_cpu_temp:g} °C"
    if limits.require_mains and readings.on_mains is False:
        return "on battery"
    return None


# -- readers at the edge ------------------------------------------------------------------
def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def free_memory_mb(root: str | Path = "/") -> float | None:
    """MemAvailable of /proc/meminfo in MB; None when it cannot be read."""
    text = _text(Path(root) / "proc" / "meminfo")
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            parts = rest.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) / 1024  # kB
    return None


def cpu_temperature(root: str | Path = "/") -> float | None:
    """The hottest thermal zone in °C (sysfs gives millidegrees); None when there is none."""
    temps = []
    for zone in sorted((Path(root) / "sys" / "class" / "thermal").glob("thermal_zone*")):
        text = _text(zone / "temp")
        try:
            temps.append(int(text) / 1000)
        except (TypeError, ValueError):
            continue
    return max(temps) if temps else None


def on_mains(root: str | Path = "/") -> bool | None:
    """True on mains power (an online "Mains" supply, or a battery charging or full),
    False on battery, None when no power supply can be read (a Pi on a plug: allowed)."""
    supplies = sorted((Path(root) / "sys" / "class" / "power_supply").glob("*"))
    batteries = []
    for supply in supplies:
        kind = _text(supply / "type")
        if kind == "Mains" and _text(supply / "online") == "1":
            return True
        if kind == "Battery":
            batteries.append(_text(supply / "status"))
    # "Not charging": plugged in, held below a charge threshold (laptops)
    if any(status in ("Charging", "Full", "Not charging") for status in batteries):
        return True
    mains_readable = any(
        _text(s / "type") == "Mains" and _text(s / "online") is not None for s in supplies
    )
    if any(batteries) or mains_readable:
        return False
    return None


def read(root: str | Path = "/") -> Readings:
    return Readings(free_memory_mb(root), cpu_temperature(root), on_mains(root))
