"""A site's broker: the bridge block fedmq writes (pure), the site home that keeps the
root bundle secret, and the site ACL on a real bridge: only the site's aggregator
account reaches the root's topics, never one of the site's devices."""

from __future__ import annotations

import queue
import stat
import threading
from pathlib import Path

import pytest

from broker.acl import render_acl
from broker.errors import ConfigError
from broker.home import BrokerHome
from broker.mosquitto_conf import Bridge, MosquittoConfig, render
from broker.topics import Topics
from tests.helpers import mqtt_session, publish_as
from tests.sites_helpers import AGGREGATOR, make_site

pytestmark = pytest.mark.mosquitto


def _bridge(**changes) -> Bridge:
    values = dict(
        address="root.example:8883",
        root_federation="root",
        site="site-a",
        username="site-a",
        password="s3cret-Pw_",
        ca_file=Path("/h/upstream/ca.crt"),
    )
    return Bridge(**{**values, **changes})


def test_the_bridge_block_is_a_persistent_mqtt311_bridge_over_verified_tls():
    text = render(MosquittoConfig(data_dir=Path("/h/data"), port=1883, bridge=_bridge()))
    block = text[text.index("connection ") :].splitlines()
    assert block[:2] == ["connection fedmq-site-site-a", "address root.example:8883"]
    for line in (
        "bridge_protocol_version mqttv311",
        "remote_clientid fedmq-site-site-a",
        "remote_username site-a",
        "remote_password s3cret-Pw_",
        "cleansession false",
        "local_cleansession false",
        "notifications false",
        "bridge_cafile /h/upstream/ca.crt",
        "bridge_insecure false",
        # 1:1 topics, QoS 1: the root's model in, the site's own update and status out
        "topic fedmq/root/model in 1",
        "topic fedmq/root/updates/site-a out 1",
        "topic fedmq/root/status/site-a out 1",
    ):
        assert line in block, line
    assert [ln for ln in block if ln.startswith("topic ")] == [
        "topic fedmq/root/model in 1",
        "topic fedmq/root/updates/site-a out 1",
        "topic fedmq/root/status/site-a out 1",
    ]
    plain = render(
        MosquittoConfig(data_dir=Path("/h/data"), port=1883, bridge=_bridge(ca_file=None))
    )
    assert "bridge_cafile" not in plain and "connection fedmq-site-site-a" in plain
    assert "connection " not in render(MosquittoConfig(data_dir=Path("/h/data"), port=1883))


@pytest.mark.parametrize(
    "changes",
    [
        {"password": "two words"},
        {"password": ""},
        {"cert_file": Path("/c.crt")},  # without its key
        {"ca_file": None, "cert_file": Path("/c.crt"), "key_file": Path("/c.key")},
    ],
)
def test_a_bridge_that_mosquitto_would_misread_is_refused(changes):
    with pytest.raises(ValueError):
        render(MosquittoConfig(data_dir=Path("/h"), port=1883, bridge=_bridge(**changes)))


def test_the_site_acl_gives_the_root_topics_to_the_site_aggregator_alone():
    acl = render_acl("farm-a", upstream=("root", "site-a"))
    blocks = acl.split("\nuser ")
    aggregator = next(b for b in blocks if b.startswith(AGGREGATOR))
    for line in (
        "topic read fedmq/root/model",
        "topic write fedmq/root/updates/site-a",
        "topic write fedmq/root/status/site-a",
    ):
        assert line in aggregator.splitlines()
    others = [b for b in blocks if not b.startswith(AGGREGATOR)]
    assert all("fedmq/root" not in b for b in others)  # no pattern, no operator line
    assert "fedmq/root" not in render_acl("farm-a")
    with pytest.raises(ConfigError, match="must differ"):
        render_acl("root", upstream=("root", "site-a"))


def _root_home(tmp_path) -> BrokerHome:
    root = BrokerHome.create(tmp_path / "root", "root")
    root.add_device("site-a", broker="127.0.0.1:8883")
    return root


def test_a_site_home_keeps_its_root_bundle_secret(tmp_path):
    root = _root_home(tmp_path)
    site = BrokerHome.create(
        tmp_path / "site",
        "farm-a",
        bridge_credentials=root.credentials_path("site-a"),
        bridge_to="127.0.0.1:9883",
    )
    upstream = tmp_path / "site" / "upstream"
    assert stat.S_IMODE(upstream.stat().st_mode) == 0o700
    files = sorted(p.name for p in upstream.iterdir())
    assert files == ["aggregator.pub", "ca.crt", "registry.pub", "site-a.ed25519", "site-a.toml"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in upstream.iterdir())
    creds = site.upstream()
    assert creds["federation"] == "root" and creds["broker"] == "127.0.0.1:9883"
    assert creds["model_key"].read_bytes() == root.aggregator_public_key_path.read_bytes()
    conf = site.write_config(port=1883, tls_port=8883)
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600  # it holds the bridge's password
    assert f"remote_password {creds['password']}" in conf.read_text()
    assert "address 127.0.0.1:9883" in conf.read_text()
    assert "topic write fedmq/root/updates/site-a" in site.acl_path.read_text()


@pytest.mark.parametrize(
    "account, federation, bridge_to, message",
    [
        (AGGREGATOR, "farm-a", None, "not a device's credentials"),
        ("site-a", "root", None, "is its root's too"),
        ("site-a", "farm-a", "not an address", "HOST:PORT"),
    ],
)
def test_a_site_home_refuses_what_would_not_work(tmp_path, account, federation, bridge_to, message):
    root = _root_home(tmp_path)
    with pytest.raises(ConfigError, match=message):
        BrokerHome.create(
            tmp_path / "site",
            federation,
            bridge_credentials=root.credentials_path(account),
            bridge_to=bridge_to,
        )
    assert not (tmp_path / "site").exists()
    with pytest.raises(ConfigError, match="needs --bridge-credentials"):
        BrokerHome.create(tmp_path / "site", "farm-a", bridge_to="127.0.0.1:8883")


def test_a_site_device_can_neither_write_nor_read_the_root_topics(federation, tmp_path):
    root = federation(devices=[], name="root")
    site = make_site(root, tmp_path / "farm-a", "farm-a", "site-a", ["d1"])
    try:
        rt = Topics("root")
        at_root: queue.Queue = queue.Queue()
        with mqtt_session(root.settings(AGGREGATOR), "test-root-listener") as listener:
            listener.on_message = lambda c, u, m: at_root.put(m.payload)
            listener.subscribe(rt.updates_filter, qos=1)
            listener.subscribe(rt.status_filter, qos=1)
            # the subscription is in place before anything is published
            publish_as(root, AGGREGATOR, "fedmq/root/control", b"{}")

            # a site device publishes on the root's topics of the site: refused locally ...
            refusals = []
            with mqtt_session(site.settings("d1"), "test-site-device") as device:
                acked = threading.Semaphore(0)

                def on_publish(client, userdata, mid, reason_code, properties):
                    refusals.append(reason_code)
                    acked.release()

                device.on_publish = on_publish
                device.publish(rt.update("site-a"), b"from-a-site-device", qos=1)
                device.publish(rt.status("site-a"), b"from-a-site-device", qos=1)
                assert acked.acquire(timeout=10) and acked.acquire(timeout=10)
            # ... and the site's aggregator account, on the same topic, gets through
            publish_as(site, AGGREGATOR, rt.update("site-a"), b"from-the-site-aggregator")
            assert at_root.get(timeout=20) == b"from-the-site-aggregator"
            publish_as(site, AGGREGATOR, rt.update("site-a"), b"second")
            assert at_root.get(timeout=20) == b"second"  # in order: nothing came between
            assert at_root.empty()
            assert len(refusals) == 2 and all(rc.is_failure for rc in refusals), refusals

        # the root's model reaches the site's aggregator account, not the site's devices
        seen: dict[str, queue.Queue] = {"aggregator": queue.Queue(), "device": queue.Queue()}
        site_model = Topics("farm-a").model
        with (
            mqtt_session(site.settings(AGGREGATOR), "test-site-agg") as agg,
            mqtt_session(site.settings("d1"), "test-site-dev") as dev,
        ):
            for name, client in (("aggregator", agg), ("device", dev)):
                client.on_message = lambda c, u, m, name=name: seen[name].put(m.payload)
                client.subscribe([(rt.model, 1), (site_model, 1)])
            publish_as(root, AGGREGATOR, rt.model, b"root-model", retain=True)
            assert seen["aggregator"].get(timeout=20) == b"root-model"
            # a marker the device may read, published after the root's model was here
            publish_as(site, AGGREGATOR, site_model, b"site-model")
            assert seen["device"].get(timeout=10) == b"site-model"
            assert seen["device"].empty()
    finally:
        site.close()
