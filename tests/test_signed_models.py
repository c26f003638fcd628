"""Models are signed by the aggregator: an agent refuses one that is not, even from the
aggregator's own account (a misconfigured ACL or a compromised broker)."""

from __future__ import annotations

import pytest

from aggregator.service import initial_weights
from broker import messages, signing
from broker.home import load_credentials
from broker.task import TaskSpec
from broker.topics import Topics
from tests.helpers import blobs_task, join, publish_as, wait_for, write_blobs

pytestmark = pytest.mark.mosquitto


def publish_model(fed, tmp_path, *, signer: str | None, federation: str = "") -> None:
    """The blobs task's initial model, retained, signed with ``signer``'s key (or not)."""
    task = TaskSpec.load(blobs_task(tmp_path))
    sign = None
    if signer is not None:
        key = signing.load_private(load_credentials(fed.credentials(signer))["signing_key"])
        sign = lambda tensors, meta: signing.sign(key, tensors, meta)  # noqa: E731
    payload, _ = messages.encode_model(
        initial_weights(task), 1, task, federation=federation, run_id="run-1", sign=sign
    )
    publish_as(fed, "fedmq-aggregator", Topics(fed.name).model, payload, retain=True)


def assert_refused(fed, tmp_path, reason: str) -> None:
    """bob's agent refuses the retained model for ``reason`` and trains nothing."""
    files = write_blobs(tmp_path / "data", ["bob"])
    agent = fed.agent("bob", files["bob"], max_rounds=1)
    events = []
    agent.on_event = lambda kind, info: events.append((kind, info))
    thread = fed.in_thread(agent.run, timeout=20)
    wait_for(lambda: ("model_refused", {"reason": reason}) in events, 15, "the refusal")
    agent.stop()
    join(thread, 20)
    assert not any(kind == "trained" for kind, _ in events)


@pytest.mark.parametrize("forgery", ["unsigned", "signed by a device"])
def test_agent_refuses_a_model_the_aggregator_did_not_sign(federation, tmp_path, forgery):
    fed = federation(devices=["bob"])
    signer = None if forgery == "unsigned" else "bob"
    publish_model(fed, tmp_path, signer=signer, federation=fed.name)
    assert_refused(fed, tmp_path, "missing_signature" if signer is None else "bad_signature")


def test_agent_trains_on_a_properly_signed_model(federation, tmp_path):
    fed = federation(devices=["bob"])
    publish_model(fed, tmp_path, signer="fedmq-aggregator", federation=fed.name)
    files = write_blobs(tmp_path / "data", ["bob"])
    agent = fed.agent("bob", files["bob"], max_rounds=1)
    assert join(fed.in_thread(agent.run, timeout=20), 30) == 0
    assert agent.rounds_trained == 1


def test_agent_refuses_a_signed_model_of_another_federation(federation, tmp_path):
    """The aggregator's key signs models of every federation it runs: the name binds them."""
    fed = federation(devices=["bob"])
    publish_model(fed, tmp_path, signer="fedmq-aggregator", federation="elsewhere")
    assert_refused(fed, tmp_path, "wrong_run")
