"""Once the run is over nothing takes from the aggregator's inbox: a full inbox must not
hold the network thread, which has to read the broker's ack of the final model (seen at
1,000 secure devices: survivors' reveals kept coming after the sum was unmasked, and the
aggregator waited out its final-publish timeout, disconnected for missing keepalives)."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from aggregator.service import RECEIVE_MAXIMUM
from broker.task import TaskSpec
from fedmq.synthetic import blobs_task
from tests.helpers import join

pytestmark = pytest.mark.mosquitto


def _message(mid: int) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid, b"fedmq/test/secagg/bob")
    msg.payload = b"late"
    msg.qos = 1
    return msg


@pytest.mark.parametrize("phase", ["collecting", "done"])
def test_a_full_inbox_holds_the_network_thread_only_while_the_loop_runs(
    federation, tmp_path, phase
):
    fed = federation()
    agg = fed.aggregator(tmp_path / "run", TaskSpec.load(blobs_task(tmp_path)), rounds=1)
    for mid in range(1, RECEIVE_MAXIMUM + 1):
        agg._on_message(agg.client, None, _message(mid))
    agg.phase = phase
    late = fed.in_thread(agg._on_message, agg.client, None, _message(RECEIVE_MAXIMUM + 1))
    late.join(2)
    if phase == "done":
        assert not late.is_alive()  # not queued, not acked: the broker keeps it
        assert join(late, 1) is None and len(agg._inbox) == RECEIVE_MAXIMUM
    else:
        assert late.is_alive()  # back-pressure while the loop still reads the inbox
        agg.stop()
        join(late, 2)
