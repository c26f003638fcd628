"""One exception hierarchy for fedmq.

Every anticipated failure is a ``FedmqError`` carrying a short machine-readable
``reason``; the CLI turns it into one line on stderr, the aggregator counts
refused updates by that reason in its ``state`` topic.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Base class of every error fedmq raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class CodecError(FedmqError):
    """A payload was refused by the codec; ``reason`` says why."""

    reason = "malformed"


class TaskError(FedmqError):
    """A task spec (TOML file or the JSON travelling in the model) is invalid."""

    reason = "bad_task"


class DataError(FedmqError):
    """A device's data file cannot be used; the message names the file."""

    reason = "bad_data"


class BrokerError(FedmqError):
    """The broker could not be started, reached or configured."""

    reason = "broker"


class ConfigError(FedmqError):
    """A configuration value (flag, environment variable, config file) is invalid."""

    reason = "config"
