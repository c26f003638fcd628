"""The topic tree of one federation: every topic string is built here.

fedmq/<federation>/model                retained global model (aggregator)
fedmq/<federation>/updates/<device_id>  one device's update (that device)
fedmq/<federation>/status/<device_id>   retained JSON status + last will (device)
fedmq/<federation>/state                retained JSON state (aggregator)
fedmq/<federation>/control              JSON commands (operator)
fedmq/<federation>/aggregator           retained JSON presence + last will (aggregator)

Secure aggregation (``broker/secagg/wire.py``):

fedmq/<federation>/secagg/<device_id>   that device's protocol messages (that device)
fedmq/<federation>/round                retained roster, then unmasking request (aggregator)
fedmq/<federation>/inbox/<device_id>    the shares sealed for that device (aggregator)
fedmq/<federation>/receipts/<device_id> retained: that device sent its masked input (device)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker.errors import ConfigError

ROOT = "fedmq"
DEVICE_TOPICS = ("updates", "status", "secagg", "inbox", "receipts")  # <kind>/<device_id>
# Names end up in topics, file names and ACL patterns: keep them boring.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid federation or device name, else raise ConfigError."""
    if not _NAME.match(value or ""):
        raise ConfigError(
            f"invalid {kind} {value!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Topics:
    federation: str

    def __post_init__(self) -> None:
        check_name("federation name", self.federation)

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.federation}"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def control(self) -> str:
        return f"{self.base}/control"

    @property
    def aggregator(self) -> str:
        return f"{self.base}/aggregator"

    @property
    def all(self) -> str:
        return f"{self.base}/#"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    @property
    def secagg_filter(self) -> str:
        return f"{self.base}/secagg/+"

    def secagg(self, device_id: str) -> str:
        return f"{self.base}/secagg/{check_name('device id', device_id)}"

    def inbox(self, device_id: str) -> str:
        return f"{self.base}/inbox/{check_name('device id', device_id)}"

    def receipt(self, device_id: str) -> str:
        return f"{self.base}/receipts/{check_name('device id', device_id)}"

    @property
    def updates_filter(self) -> str:
        return f"{self.base}/updates/+"

    @property
    def status_filter(self) -> str:
        return f"{self.base}/status/+"

    def update(self, device_id: str) -> str:
        return f"{self.base}/updates/{check_name('device id', device_id)}"

    def status(self, device_id: str) -> str:
        return f"{self.base}/status/{check_name('device id', device_id)}"

    def device_of(self, topic: str) -> str | None:
        """The device id of an ``updates/<id>``, ``status/<id>`` (...) topic, else None."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) == 2 and parts[0] in DEVICE_TOPICS and _NAME.match(parts[1]):
            return parts[1]
        return None

    def kind_of(self, topic: str) -> str | None:
        """'model', 'state', 'control', 'updates' or 'status' for a topic of this federation."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            return None
        head = topic[len(prefix) :].split("/", 1)[0]
        kinds = ("model", "state", "control", "aggregator", "round", *DEVICE_TOPICS)
        return head if head in kinds else None
